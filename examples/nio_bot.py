"""A nio bot with bot_toolkit: people verify it from Element, and it sends withheld notices.

Set HOMESERVER, USER_ID, DEVICE_ID and ACCESS_TOKEN (optional: STORE_DIR, default "store", and
ALLOWED_USERS, comma-separated user ids or globs), then run: python nio_bot.py
"""

import asyncio
import contextlib
import os
import signal

from nio import AsyncClient, AsyncClientConfig

from bot_toolkit import RoomKeyWithheld, key_sharing
from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.nio_plugin import attach
from bot_toolkit.outbox import HttpTransport, Outbox
from bot_toolkit.store import Store
from bot_toolkit.verification import (
    SasPrompt,
    VerificationDone,
    VerificationManager,
    VerificationPolicy,
)
from bot_toolkit.withheld import ShareWith, SharingPolicy

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
    dispatcher = Dispatcher()

    @dispatcher.on(RoomKeyWithheld)
    async def on_withheld(event: RoomKeyWithheld) -> None:
        print(f"{event.sender} withheld a key from us: {event.code} ({event.reason})", flush=True)

    @dispatcher.on(VerificationDone)
    async def on_verified(event: VerificationDone) -> None:
        print(f"verified {event.user_id} {event.device_id}", flush=True)

    plugin = attach(client, dispatcher, intercept_verification=True)  # nio's own SAS is off
    store = await Store.open_in(STORE_DIR)  # outbox queue, m.no_olm ledger, verifications
    transport = HttpTransport(HOMESERVER, ACCESS_TOKEN)
    outbox = Outbox(transport, store, dispatcher=dispatcher)
    await dispatcher.start()
    await outbox.start()  # before key sharing and the manager: both may send as they start
    keys_policy = SharingPolicy(share_with=ShareWith.VERIFIED)  # see the README for the fields
    sharing = await key_sharing.attach(
        client, store=store, outbox=outbox, dispatcher=dispatcher, policy=keys_policy
    )
    policy = VerificationPolicy(allowed_users=ALLOWED_USERS, confirm=confirm)
    manager = VerificationManager(client, dispatcher, outbox, policy, store=store)
    manager.watch(plugin)  # malformed verification events cancel with m.invalid_message
    await manager.start()  # cancels verifications a previous run left open
    if client.should_upload_keys:  # Element can only verify a device whose keys it can see
        await client.keys_upload()
    print(f"ready: verify {USER_ID} device {DEVICE_ID} from Element", flush=True)

    sync = asyncio.create_task(client.sync_forever(timeout=30_000))
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, sync.cancel)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await sync
    finally:  # nothing new comes in; handlers finish; then what they sent goes out
        await dispatcher.close(timeout=10)
        await manager.close()
        await sharing.close()
        await outbox.close(deadline=10)  # what is still unsent stays stored for the next run
        plugin.detach()
        await store.close()
        await transport.close()
        await client.close()


if __name__ == "__main__":
    asyncio.run(main())
