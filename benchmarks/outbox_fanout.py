"""Fan-out benchmark: to-device messages to many users through the Outbox, against a local Synapse.

Default workload: 1,000 users with one device each, 10,000 messages, i.e. 10 messages per device,
given to the outbox as 10 ``send()`` calls that each address every device (a bot sending a notice
to everyone, ten times). ``--devices-per-user 10`` instead makes 10,000 distinct ``(user, device)``
pairs with one message each. Either way the outbox should make ``ceil(10,000 / 250) = 40``
requests; with one device per user, requests to the same device go in order, so 4 chains of 10
requests run side by side; with 10,000 devices all 40 are independent.

Reported: HTTP requests made (attempts, including retries), requests accepted, messages, time to
enqueue (persisted), total time until the homeserver accepted everything, messages per second,
the Python heap peak (tracemalloc) over the send phase and the process's max RSS growth.
``--verify`` then drains every recipient device's real ``/sync`` and counts what arrived (not
timed).

Without ``--homeserver`` a throwaway Synapse is started (``bot_toolkit.testing.LocalSynapse``,
with ``bcrypt_rounds`` lowered so that registering 1,000 users takes seconds, not minutes).
Everything stays on 127.0.0.1.

    python benchmarks/outbox_fanout.py                # the 10,000 x 1,000 run
    python benchmarks/outbox_fanout.py --json         # machine-readable
    python benchmarks/outbox_fanout.py --users 3 --messages 12 --homeserver http://127.0.0.1:8008
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import secrets
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bot_toolkit.metrics import Metrics
from bot_toolkit.outbox import HttpTransport, Outbox, ToDeviceMessages
from bot_toolkit.store import Store
from bot_toolkit.testing import LocalSynapse

EVENT_TYPE = "org.example.fanout"


class _FastRegistrationSynapse(LocalSynapse):
    """LocalSynapse with cheap password hashing, for registering many users quickly."""

    def _write_config(self) -> Path:
        path = super()._write_config()
        config = json.loads(path.read_text())
        config["bcrypt_rounds"] = 4
        path.write_text(json.dumps(config, indent=1))
        return path


@dataclass
class Device:
    user_id: str
    device_id: str
    token: str


@dataclass
class Result:
    users: int
    devices: int
    messages: int
    send_calls: int
    batch_size: int
    concurrency: int
    http_requests: int
    requests_accepted: int
    retries: int
    enqueue_seconds: float
    total_seconds: float
    messages_per_second: float
    tracemalloc_peak_mib: float | None
    max_rss_growth_mib: float
    delivered: int | None
    duplicates: int | None


class _CountingTransport:
    """Counts every HTTP attempt the outbox makes."""

    def __init__(self, inner: HttpTransport) -> None:
        self.inner = inner
        self.attempts = 0

    async def send_to_device(
        self, event_type: str, txn_id: str, messages: ToDeviceMessages
    ) -> None:
        self.attempts += 1
        await self.inner.send_to_device(event_type, txn_id, messages)


async def _post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], token: str | None = None
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    for attempt in range(5):
        async with http.post(url, json=body, headers=headers) as resp:
            data: dict[str, Any] = await resp.json()
            if resp.status == 200:
                return data
            if resp.status != 429 or attempt == 4:
                raise RuntimeError(f"POST {url} -> {resp.status}: {data}")
            await asyncio.sleep(data.get("retry_after_ms", 500) / 1000)
    raise AssertionError("unreachable")


async def _register_users(
    http: aiohttp.ClientSession, hs: str, users: int, per_user: int, parallel: int
) -> tuple[Device, list[Device]]:
    """Register the bot and ``users`` recipients (``per_user`` devices each), concurrently."""
    prefix = secrets.token_hex(3)
    sem = asyncio.Semaphore(parallel)

    async def register(localpart: str) -> tuple[Device, str]:
        password = secrets.token_urlsafe(12)
        async with sem:
            res = await _post(
                http,
                hs + "/_matrix/client/v3/register",
                {"username": localpart, "password": password, "auth": {"type": "m.login.dummy"}},
            )
        return Device(res["user_id"], res["device_id"], res["access_token"]), password

    async def login(user_id: str, password: str) -> Device:
        async with sem:
            res = await _post(
                http,
                hs + "/_matrix/client/v3/login",
                {
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": user_id},
                    "password": password,
                },
            )
        return Device(res["user_id"], res["device_id"], res["access_token"])

    bot, _ = await register(f"fanout_bot_{prefix}")
    firsts = await asyncio.gather(*(register(f"fan_{prefix}_{i}") for i in range(users)))
    devices = [d for d, _ in firsts]
    if per_user > 1:
        extra = await asyncio.gather(
            *(login(d.user_id, pw) for d, pw in firsts for _ in range(per_user - 1))
        )
        devices.extend(extra)
    devices.sort(key=lambda d: (d.user_id, d.device_id))
    return bot, devices


def _plan(devices: Sequence[Device], messages: int, run: str) -> list[dict[str, dict[str, Any]]]:
    """Message k goes to device k % D with payload n = k // D; one send() call per payload n."""
    calls: list[dict[str, dict[str, Any]]] = []
    for k in range(messages):
        n, d = divmod(k, len(devices))
        if n == len(calls):
            calls.append({})
        dev = devices[d]
        calls[n].setdefault(dev.user_id, {})[dev.device_id] = {"run": run, "n": n}
    return calls


async def _count_delivered(
    http: aiohttp.ClientSession, hs: str, devices: Sequence[Device], run: str, parallel: int
) -> tuple[int, int]:
    """Drain every device's inbox with real /sync; returns (messages of this run, duplicates).

    Raises ``RuntimeError`` when a sync fails or an inbox is not drained within the bounded number
    of syncs (a partial count would pass for lost messages).
    """
    sem = asyncio.Semaphore(parallel)
    flt = json.dumps({"room": {"rooms": []}, "presence": {"types": []}})
    max_syncs = 1000  # bounded; 100 to-device events per sync at most

    async def drain(dev: Device) -> tuple[int, int]:
        seen: dict[int, int] = {}
        since: str | None = None
        async with sem:
            for _ in range(max_syncs):
                params = {"filter": flt, "timeout": "0"}
                if since:
                    params["since"] = since
                async with http.get(
                    hs + "/_matrix/client/v3/sync",
                    params=params,
                    headers={"Authorization": f"Bearer {dev.token}"},
                ) as resp:
                    if resp.status != 200:
                        text = (await resp.text())[:500]
                        raise RuntimeError(
                            f"/sync for {dev.user_id} {dev.device_id} -> {resp.status}: {text}"
                        )
                    body = await resp.json()
                since = body["next_batch"]
                events = body.get("to_device", {}).get("events", [])
                for e in events:
                    if e["type"] == EVENT_TYPE and e["content"].get("run") == run:
                        n = e["content"]["n"]
                        seen[n] = seen.get(n, 0) + 1
                if not events:
                    break
            else:
                raise RuntimeError(
                    f"the inbox of {dev.user_id} {dev.device_id} was not drained in {max_syncs} "
                    f"syncs ({sum(seen.values())} messages of this run so far)"
                )
        return sum(seen.values()), sum(c - 1 for c in seen.values())

    results = await asyncio.gather(*(drain(d) for d in devices))
    return sum(r[0] for r in results), sum(r[1] for r in results)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def run(args: argparse.Namespace, hs: str) -> Result:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        bot, devices = await _register_users(
            http, hs, args.users, args.devices_per_user, args.register_parallel
        )
        run_id = secrets.token_hex(4)
        with tempfile.TemporaryDirectory(prefix="outbox-bench-") as data_dir:
            store = await Store.open_in(data_dir)
            transport = _CountingTransport(HttpTransport(hs, bot.token))
            metrics = Metrics()
            outbox = Outbox(
                transport,
                store,
                metrics,
                batch_size=args.batch_size,
                concurrency=args.concurrency,
            )
            await outbox.start()
            rss_before = _rss_mib()
            if args.tracemalloc:
                tracemalloc.start()
            t0 = time.perf_counter()
            calls = _plan(devices, args.messages, run_id)
            await asyncio.gather(*(outbox.send(EVENT_TYPE, c) for c in calls))
            t_enqueued = time.perf_counter()
            if not await outbox.flush(args.flush_timeout):
                raise RuntimeError(f"not flushed within {args.flush_timeout}s")
            t1 = time.perf_counter()
            peak = None
            if args.tracemalloc:
                peak = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
            rss_growth = _rss_mib() - rss_before
            await outbox.close()
            await transport.inner.close()
            await store.close()
        delivered = duplicates = None
        if args.verify:
            delivered, duplicates = await _count_delivered(
                http, hs, devices, run_id, args.register_parallel
            )
    sent = metrics.get("outbox_requests_sent_total")
    retries = metrics.get("outbox_retries_total")
    total = t1 - t0
    return Result(
        users=args.users,
        devices=len(devices),
        messages=args.messages,
        send_calls=len(calls),
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        http_requests=transport.attempts,
        requests_accepted=int(sent.total()) if sent else 0,
        retries=int(retries.total()) if retries else 0,
        enqueue_seconds=round(t_enqueued - t0, 4),
        total_seconds=round(total, 4),
        messages_per_second=round(args.messages / total, 1) if total > 0 else 0.0,
        tracemalloc_peak_mib=round(peak, 2) if peak is not None else None,
        max_rss_growth_mib=round(rss_growth, 2),
        delivered=delivered,
        duplicates=duplicates,
    )


def _table(result: Result) -> str:
    rows = [(k.replace("_", " "), "-" if v is None else str(v)) for k, v in asdict(result).items()]
    width = max(len(k) for k, _ in rows)
    # A request carries one message per device, so it also takes messages-per-device requests.
    per_device = math.ceil(result.messages / result.devices)
    expected = max(math.ceil(result.messages / result.batch_size), per_device)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(
        f"{'fewest possible':<{width}}  {expected} "
        "(max(ceil(messages / batch size), messages per device))"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--devices-per-user", type=int, default=1)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--register-parallel", type=int, default=16)
    parser.add_argument("--flush-timeout", type=float, default=600.0)
    parser.add_argument("--homeserver", help="use this Synapse instead of starting one")
    parser.add_argument("--no-tracemalloc", dest="tracemalloc", action="store_false")
    parser.add_argument("--verify", action="store_true", help="count arrivals with real /sync")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.users < 1 or args.messages < 1 or args.devices_per_user < 1:
        parser.error("--users, --devices-per-user and --messages must be at least 1")

    if args.homeserver:
        result = asyncio.run(run(args, args.homeserver.rstrip("/")))
    else:
        with _FastRegistrationSynapse() as server:
            result = asyncio.run(run(args, server.url))
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(_table(result))
    if result.duplicates or (result.delivered is not None and result.delivered != result.messages):
        print("delivery check FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
