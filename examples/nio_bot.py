"""A nio bot with bot_toolkit: people verify it from Element, and it sends withheld notices.
Env: HOMESERVER, USER_ID, DEVICE_ID, ACCESS_TOKEN; optional STORE_DIR, ALLOWED_USERS (globs)."""

import asyncio
import os
from pathlib import Path

from nio import AsyncClient, AsyncClientConfig

import bot_toolkit as bt

env = os.environ
USER, DEVICE, STORE = env["USER_ID"], env["DEVICE_ID"], env.get("STORE_DIR", "store")
ALLOWED = env.get("ALLOWED_USERS", "@*:" + USER.split(":", 1)[1])  # default: its homeserver


async def confirm(sas: bt.SasPrompt) -> bool:  # True: the SAS matches; a real bot might ask a human
    emoji = ", ".join(f"{e} {name}" for e, name in sas.emoji)
    print(f"SAS with {sas.user_id} {sas.device_id}: {emoji} | {sas.decimals}", flush=True)
    return True


async def main() -> None:
    key = bt.store_secret(Path(STORE))  # this install's pickle key (STORE/store.key, 0600)
    config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True, pickle_key=key)
    client = AsyncClient(env["HOMESERVER"], USER, DEVICE, STORE, config=config)
    client.restore_login(USER, DEVICE, env["ACCESS_TOKEN"])  # loads nio's crypto store
    policy = bt.VerificationPolicy(allowed_users=ALLOWED.split(","), confirm=confirm)
    bot = bt.BotToolkit(client, STORE, verification=policy)  # keys go to verified devices only

    @bot.on(bt.RoomKeyWithheld)
    async def on_withheld(event: bt.RoomKeyWithheld) -> None:
        print(f"{event.sender} withheld a key from us: {event.code} ({event.reason})", flush=True)

    @bot.on(bt.VerificationDone)
    async def on_verified(event: bt.VerificationDone) -> None:
        print(f"verified {event.user_id} {event.device_id}", flush=True)

    async with bot:  # starts the parts in order; closes them (and the client) in reverse
        print(f"ready: verify {USER} device {DEVICE} from Element", flush=True)
        await bot.run()  # syncs until SIGINT or SIGTERM


asyncio.run(main())
