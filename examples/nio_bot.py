"""A nio bot with bot_toolkit: people verify it from Element, and it sends withheld notices.

Set HOMESERVER, USER_ID, DEVICE_ID and ACCESS_TOKEN (optional: STORE_DIR, default "store", and
ALLOWED_USERS, comma-separated user ids or globs), then run: python nio_bot.py
"""

import asyncio
import os

from nio import AsyncClient, AsyncClientConfig

from bot_toolkit import BotToolkit, RoomKeyWithheld, SasPrompt, VerificationDone, VerificationPolicy

HOMESERVER, USER_ID = os.environ["HOMESERVER"], os.environ["USER_ID"]
DEVICE_ID, ACCESS_TOKEN = os.environ["DEVICE_ID"], os.environ["ACCESS_TOKEN"]
STORE_DIR = os.environ.get("STORE_DIR", "store")  # keep it: it holds the bot's device keys
# Who may verify the bot: user ids or globs (default: everyone on the bot's homeserver).
ALLOWED_USERS = os.environ.get("ALLOWED_USERS", "@*:" + USER_ID.split(":", 1)[1]).split(",")


async def confirm(sas: SasPrompt) -> bool:  # an allowed user's SAS; a real bot might ask
    emoji = ", ".join(f"{e} {name}" for e, name in sas.emoji)  # its operator instead
    print(f"SAS with {sas.user_id} {sas.device_id}: {emoji} | {sas.decimals}", flush=True)
    return True  # True: it matches (False cancels with m.mismatched_sas)


async def main() -> None:
    os.makedirs(STORE_DIR, exist_ok=True)
    config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
    client = AsyncClient(HOMESERVER, USER_ID, DEVICE_ID, STORE_DIR, config=config)
    client.restore_login(USER_ID, DEVICE_ID, ACCESS_TOKEN)  # loads nio's crypto store
    policy = VerificationPolicy(allowed_users=ALLOWED_USERS, confirm=confirm)
    bot = BotToolkit(client, STORE_DIR, verification=policy)  # keys go to verified devices

    @bot.on(RoomKeyWithheld)
    async def on_withheld(event: RoomKeyWithheld) -> None:
        print(f"{event.sender} withheld a key from us: {event.code} ({event.reason})", flush=True)

    @bot.on(VerificationDone)
    async def on_verified(event: VerificationDone) -> None:
        print(f"verified {event.user_id} {event.device_id}", flush=True)

    async with bot:  # starts the parts in order, closes them (and the client) in reverse
        print(f"ready: verify {USER_ID} device {DEVICE_ID} from Element", flush=True)
        await bot.run()  # syncs until SIGINT or SIGTERM


if __name__ == "__main__":
    asyncio.run(main())
