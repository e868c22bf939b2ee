"""Benchmark: what the durable inbound queue costs per sync, next to stock nio in one process.

Usage::

    python benchmarks/inbound_queue.py            # table
    python benchmarks/inbound_queue.py --json     # one JSON object

Each round feeds the same sync responses (``--batches`` responses of ``--events`` plaintext
to-device events each) through ``AsyncClient.receive_response``, the path ``sync()`` takes, on
three offline nio clients (nio's SQLite store on disk, sync tokens saved):

* ``nio``: stock nio 0.26 (it saves the token, then runs its to-device handling);
* ``plugin``: with the bot_toolkit plugin (events decoded and handed to a started dispatcher);
* ``durable``: the plugin plus the durable inbound queue on a real store file (each batch
  committed with ``synchronous=FULL``, AES-GCM sealed, before nio's token save; every event
  handled and its row deleted).

Reported: to-device events per second for each, best of ``--rounds``, and the ratios. The
durable figure includes waiting until every event was handled and forgotten.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from nio import AsyncClient, AsyncClientConfig, SyncResponse

from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.events import ToDeviceEvent
from bot_toolkit.inbound_queue import InboundQueue
from bot_toolkit.nio_plugin import attach
from bot_toolkit.store import Store

USER, DEVICE, PEER = "@bot:bench.local", "BENCHDEV", "@peer:bench.local"
_tokens = itertools.count()


def responses(batches: int, events: int) -> list[SyncResponse]:
    """``batches`` sync responses of ``events`` plaintext to-device events each."""
    out = []
    for b in range(batches):
        raw = {
            "next_batch": f"s{next(_tokens)}",
            "to_device": {
                "events": [
                    {
                        "type": "org.example.bench",
                        "sender": PEER,
                        "content": {"batch": b, "n": n, "body": "x" * 64},
                    }
                    for n in range(events)
                ]
            },
        }
        out.append(SyncResponse.from_dict(raw))
    return out


def _client(store_dir: Path) -> AsyncClient:
    store_dir.mkdir(parents=True, exist_ok=True)
    config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
    client = AsyncClient(
        "http://127.0.0.1:9", USER, DEVICE, store_path=str(store_dir), config=config
    )
    client.restore_login(USER, DEVICE, "not-a-token")
    return client


async def _run(kind: str, work: Path, batches: int, events: int) -> float:
    """Seconds to handle all the batches with ``kind``."""
    client = _client(work / kind / "nio")
    feed = responses(batches, events)
    dispatcher = Dispatcher(handler_timeout=None, queue_size=max(10_000, batches * events))
    handled = 0

    @dispatcher.on(ToDeviceEvent)
    async def count(event: ToDeviceEvent) -> None:
        nonlocal handled
        handled += 1

    store: Store | None = None
    plugin = None
    if kind != "nio":
        plugin = attach(client, dispatcher)
        if kind == "durable":
            store = await Store.open(work / kind / "bot_toolkit.sqlite3")
            await plugin.use_inbound_queue(InboundQueue(store, "bench-secret-" + "x" * 32))
        await dispatcher.start()
    try:
        start = time.perf_counter()
        for response in feed:
            await client.receive_response(response)
        if plugin is not None:
            assert await dispatcher.join(120)
            await plugin.close_inbound()
            assert handled == batches * events, (kind, handled)
        elapsed = time.perf_counter() - start
        if store is not None:
            rows = await store.fetchall("SELECT COUNT(*) FROM inbound_events")
            assert rows[0][0] == 0, rows
    finally:
        if plugin is not None:
            plugin.detach()
        await dispatcher.close()
        if store is not None:
            await store.close()
        await client.close()
    return elapsed


async def bench(batches: int, events: int, rounds: int) -> dict[str, Any]:
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bt-inbound-bench-") as tmp:
        for r in range(rounds):
            for kind in ("nio", "plugin", "durable"):
                seconds = await _run(kind, Path(tmp) / f"r{r}", batches, events)
                best[kind] = min(best.get(kind, seconds), seconds)
    total = batches * events
    rates = {kind: total / seconds for kind, seconds in best.items()}
    return {
        "batches": batches,
        "events_per_batch": events,
        "rounds": rounds,
        "events_per_s": rates,
        "ms_per_batch": {kind: 1000 * best[kind] / batches for kind in best},
        "durable_vs_nio": rates["durable"] / rates["nio"],
        "durable_vs_plugin": rates["durable"] / rates["plugin"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(bench(args.batches, args.events, args.rounds))
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.batches} syncs x {args.events} to-device events, best of {args.rounds}")
    for kind, rate in result["events_per_s"].items():
        per = result["ms_per_batch"][kind]
        print(f"  {kind:8s} {rate:12,.0f} events/s   {per:8.2f} ms per sync")
    print(f"  durable / stock nio: {result['durable_vs_nio']:.2f}x")
    print(f"  durable / plugin:    {result['durable_vs_plugin']:.2f}x")


if __name__ == "__main__":
    main()
