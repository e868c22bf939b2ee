"""Child process for the inbound crash test (``tests/test_inbound_crash.py``).

Runs :class:`bot_toolkit.BotToolkit` on a real nio client (restored from ``--user-id``,
``--device-id`` and the access token in ``BOT_TOOLKIT_TEST_TOKEN``) with ``--data-dir``.
Every ``org.example.crash`` event a handler receives is appended to ``--out`` as a JSON line
``{"id": inbound_id, "n": content.n}`` (flushed and fsynced).

``kill`` phase: the moment the first ``org.example.crash`` event is about to enter the
dispatcher, the child checks that nio's saved sync token is already the batch's (the token save
happened), prints ``STORED <json ids in the inbound table>`` and SIGKILLs itself: the kill falls
exactly between nio's token save and the handlers.

``recover`` phase: start (stored events are replayed), sync until ``--expect`` events were
handled, print ``HANDLED <count>`` and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path

from nio import AsyncClient, AsyncClientConfig

from bot_toolkit import BotToolkit, Settings, UnknownToDeviceEvent, store_secret

EVENT_TYPE = "org.example.crash"


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


async def main(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    nio_dir = data_dir / "nio"
    nio_dir.mkdir(parents=True, exist_ok=True)
    config = AsyncClientConfig(
        encryption_enabled=True, store_sync_tokens=True, pickle_key=store_secret(data_dir)
    )
    client = AsyncClient(
        args.homeserver, args.user_id, device_id=args.device_id, store_path=str(nio_dir),
        config=config,
    )  # fmt: skip
    client.restore_login(args.user_id, args.device_id, os.environ["BOT_TOOLKIT_TEST_TOKEN"])
    bot = BotToolkit(client, data_dir, settings=Settings(sync_timeout=1.0))
    handled: list[int] = []
    out = Path(args.out)

    @bot.on(UnknownToDeviceEvent)
    async def record(event: UnknownToDeviceEvent) -> None:
        if event.event_type_name != EVENT_TYPE:
            return
        line = json.dumps({"id": event.inbound_id, "n": event.content.get("n")}) + "\n"
        await asyncio.to_thread(_append, out, line)
        handled.append(1)
        if args.phase == "recover" and len(handled) >= args.expect:
            _say(f"HANDLED {len(handled)}")
            bot.stop()

    if args.phase == "kill":
        dispatcher = bot.dispatcher
        put = dispatcher.put

        async def put_then_die(event: object) -> None:
            if isinstance(event, UnknownToDeviceEvent) and event.event_type_name == EVENT_TYPE:
                saved = client.store.load_sync_token()
                assert saved == client.next_batch, (saved, client.next_batch)
                db = sqlite3.connect(data_dir / "bot_toolkit.sqlite3")
                ids = [r[0] for r in db.execute("SELECT id FROM inbound_events ORDER BY seq")]
                _say("STORED " + json.dumps(ids))
                os.kill(os.getpid(), signal.SIGKILL)
            await put(event)

        dispatcher.put = put_then_die  # type: ignore[method-assign]

    async with asyncio.timeout(args.timeout):
        await bot.run(signals=())
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["kill", "recover"])
    parser.add_argument("--homeserver", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--user-id", required=True)
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=90.0)
    sys.exit(asyncio.run(main(parser.parse_args())))
