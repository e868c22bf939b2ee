"""A nio bot with bot_toolkit: people verify it from Element, and it sends withheld notices.
Env: HOMESERVER, USER_ID, DEVICE_ID, ACCESS_TOKEN, ALLOWED_USERS (globs); optional STORE_DIR."""

import asyncio
from os import environ as env

import bot_toolkit as bt

USER, DEVICE, STORE = env["USER_ID"], env["DEVICE_ID"], env.get("STORE_DIR", "store")


async def confirm(sas: bt.SasPrompt) -> bool:  # True: the SAS matches; a real bot might ask a human
    print(f"SAS with {sas.user_id} {sas.device_id}: {sas.text}", flush=True)
    return True


async def main() -> None:  # the client's store (STORE) uses this install's key, STORE/store.key
    client = bt.restore_client(env["HOMESERVER"], USER, DEVICE, env["ACCESS_TOKEN"], STORE)
    policy = bt.VerificationPolicy(allowed_users=env["ALLOWED_USERS"].split(","), confirm=confirm)
    async with bt.BotToolkit(client, STORE, verification=policy) as bot:  # stops all, in order

        @bot.on(bt.VerificationDone)
        async def on_verified(event: bt.VerificationDone) -> None:
            print(f"verified {event.user_id} {event.device_id}", flush=True)

        print(f"ready: verify {USER} device {DEVICE} from Element", flush=True)
        await bot.run()  # syncs until SIGINT or SIGTERM


asyncio.run(main())
