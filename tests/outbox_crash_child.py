"""Child process for the outbox crash test (``tests/test_outbox_faults.py``).

``send`` phase: open the store and the outbox, enqueue the messages listed in ``--plan`` (a JSON
file of ``[event_type, {user: {device: content}}]`` items, all sent together), print
``ENQUEUED {json txn ids}``, then try to flush. The test SIGKILLs it while requests are in flight.

``recover`` phase: open the same store, start the outbox (which reloads the unsent requests),
print ``RECOVERED {count}``, flush, print ``FLUSHED {true|false}`` and exit 0.

The access token comes from the environment (``BOT_TOOLKIT_TEST_TOKEN``), not the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from bot_toolkit.metrics import Metrics
from bot_toolkit.outbox import HttpTransport, Outbox
from bot_toolkit.store import Store


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> int:
    token = os.environ["BOT_TOOLKIT_TEST_TOKEN"]
    store = await Store.open(args.store, synchronous=args.synchronous)
    transport = HttpTransport(args.homeserver, token)
    outbox = Outbox(
        transport,
        store,
        Metrics(),
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        backoff_initial=0.05,
        backoff_max=0.5,
        request_timeout=args.request_timeout,
    )
    recovered = await outbox.start()
    try:
        if args.phase == "send":
            items = json.loads(await asyncio.to_thread(Path(args.plan).read_text))
            results = await asyncio.gather(*(outbox.send(t, m) for t, m in items))
            txns = sorted({t for r in results for t in r})
            _say("ENQUEUED " + json.dumps(txns))
            flushed = await outbox.flush(args.flush_timeout)
        else:
            _say(f"RECOVERED {recovered}")
            flushed = await outbox.flush(args.flush_timeout)
        _say("FLUSHED " + json.dumps(flushed))
        return 0 if flushed else 1
    finally:
        await outbox.close(deadline=1.0)
        await transport.close()
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["send", "recover"])
    parser.add_argument("--homeserver", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--plan")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--flush-timeout", type=float, default=60.0)
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(asyncio.run(main(parser.parse_args())))
