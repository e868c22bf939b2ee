"""Benchmark: to-device decoding (nio 0.26 vs bot_toolkit) and dispatcher throughput/latency.

Usage::

    python benchmarks/decode_dispatch.py            # table
    python benchmarks/decode_dispatch.py --json     # one JSON object

Decoding: the same mix of verification and key events, as the already-parsed dicts of a sync
response, goes through ``nio.events.ToDeviceEvent.parse_event`` and ``bot_toolkit.decode``; each
is timed with ``time.perf_counter`` over many passes, best of several rounds.

Dispatch (when ``bot_toolkit.dispatcher`` exists): no-op handlers; throughput for a stream of
events put with backpressure, and the added latency (``put`` to handler start) for a burst.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

_TXN = "S0meUniqueAndOpaqueString"
_KEY = "fQpGIW1Snz+pwLZu6sTy2aHy/DYWWTspTJRPyNp0PKkymfIsNffysMl6ObMMFdIJhk6g6pwlIqZ54rxo8SLmAg"
_B64 = "fQpGIW1Snz+pwLZu6sTy2aHy/DYWWTspTJRPyNp0PKk"


def _ev(event_type: str, sender: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"type": event_type, "sender": sender, "content": content}


def verification_flow(sender: str, device: str, txn: str) -> list[dict[str, Any]]:
    """The to-device events one side receives in a full SAS verification, plus a cancel."""
    return [
        _ev(
            "m.key.verification.request",
            sender,
            {
                "from_device": device,
                "methods": ["m.sas.v1", "m.qr_code.show.v1", "m.reciprocate.v1"],
                "timestamp": 1559598944869,
                "transaction_id": txn,
            },
        ),
        _ev(
            "m.key.verification.ready",
            sender,
            {"from_device": device, "methods": ["m.sas.v1"], "transaction_id": txn},
        ),
        _ev(
            "m.key.verification.start",
            sender,
            {
                "from_device": device,
                "method": "m.sas.v1",
                "transaction_id": txn,
                "key_agreement_protocols": ["curve25519-hkdf-sha256"],
                "hashes": ["sha256"],
                "message_authentication_codes": ["hkdf-hmac-sha256.v2", "hkdf-hmac-sha256"],
                "short_authentication_string": ["decimal", "emoji"],
            },
        ),
        _ev(
            "m.key.verification.accept",
            sender,
            {
                "method": "m.sas.v1",
                "transaction_id": txn,
                "key_agreement_protocol": "curve25519-hkdf-sha256",
                "hash": "sha256",
                "message_authentication_code": "hkdf-hmac-sha256.v2",
                "short_authentication_string": ["decimal", "emoji"],
                "commitment": _B64,
            },
        ),
        _ev("m.key.verification.key", sender, {"transaction_id": txn, "key": _B64}),
        _ev(
            "m.key.verification.mac",
            sender,
            {
                "transaction_id": txn,
                "keys": _KEY,
                "mac": {f"ed25519:{device}": _B64, "ed25519:MasterKeyBase64": _B64},
            },
        ),
        _ev("m.key.verification.done", sender, {"transaction_id": txn}),
        _ev(
            "m.key.verification.cancel",
            sender,
            {"transaction_id": txn, "code": "m.user", "reason": "User rejected the request"},
        ),
    ]


def key_events(sender: str, device: str, n: int) -> list[dict[str, Any]]:
    """Key traffic: Olm-encrypted events, key requests and their cancellation, withheld, secrets."""
    room = f"!room{n}:example.org"
    session = f"X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0c{n:03d}"
    olm = _ev(
        "m.room.encrypted",
        sender,
        {
            "algorithm": "m.olm.v1.curve25519-aes-sha2",
            "sender_key": "Szl29ksW/L8yZGWAX+8dY1XyFi+i5wm+DRhTGkbMiwU",
            "ciphertext": {
                "7qZcfnBmbEGzxxaWfBjElJuvn7BZx+lSz/SvFrDF/z8": {"type": 1, "body": _KEY}
            },
        },
    )
    return [
        olm,
        copy.deepcopy(olm),
        _ev(
            "m.room_key_request",
            sender,
            {
                "action": "request",
                "requesting_device_id": device,
                "request_id": f"1495474790150.{n}",
                "body": {
                    "algorithm": "m.megolm.v1.aes-sha2",
                    "room_id": room,
                    "session_id": session,
                    "sender_key": "RF3s+E7RkTQTGF2d8Deol0FkQvgII2aJDf3/Jp5mxVU",
                },
            },
        ),
        _ev(
            "m.room_key_request",
            sender,
            {
                "action": "request_cancellation",
                "requesting_device_id": device,
                "request_id": f"1495474790150.{n}",
            },
        ),
        _ev(
            "m.room_key.withheld",
            sender,
            {
                "algorithm": "m.megolm.v1.aes-sha2",
                "sender_key": "RF3s+E7RkTQTGF2d8Deol0FkQvgII2aJDf3/Jp5mxVU",
                "room_id": room,
                "session_id": session,
                "code": "m.unverified",
                "reason": "The sender has disabled encrypting to unverified devices.",
            },
        ),
        _ev(
            "m.secret.request",
            sender,
            {
                "action": "request",
                "name": "m.cross_signing.self_signing",
                "requesting_device_id": device,
                "request_id": f"secret{n}",
            },
        ),
    ]


def build_mix(flows: int = 8) -> list[dict[str, Any]]:
    """A realistic mix of fresh event dicts: ``flows`` verification flows plus key traffic."""
    events: list[dict[str, Any]] = []
    for i in range(flows):
        sender, device = f"@user{i}:example.org", f"DEVICE{i:04d}"
        events += verification_flow(sender, device, f"{_TXN}{i}")
        events += key_events(sender, device, i)
    return events


def _best_rate(
    func: Callable[[Any], object], events: Sequence[Any], passes: int, rounds: int
) -> float:
    """Best events/s of ``rounds`` rounds, each decoding ``events`` ``passes`` times."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(passes):
            for event in events:
                func(event)
        best = min(best, time.perf_counter() - start)
    return len(events) * passes / max(best, 1e-12)


def bench_decode(passes: int = 200, rounds: int = 5, flows: int = 8) -> dict[str, Any]:
    """events/s of nio's ``ToDeviceEvent.parse_event`` and of ``bot_toolkit.decode`` on one mix."""
    from nio.events import ToDeviceEvent  # noqa: PLC0415

    from bot_toolkit import decode  # noqa: PLC0415
    from bot_toolkit.events import UnknownToDeviceEvent  # noqa: PLC0415

    events = build_mix(flows)
    # Sanity: every event decodes, and to a known class.
    unknown = [e["type"] for e in events if isinstance(decode(e), UnknownToDeviceEvent)]
    if unknown:
        raise AssertionError(f"bot_toolkit decoded {unknown} as unknown")
    nio_classes = sorted({type(ToDeviceEvent.parse_event(e)).__name__ for e in events})
    # nio fails loud on nothing: it logs instead; keep the timed loop quiet.
    logging.getLogger("nio").setLevel(logging.ERROR)

    nio_rate = _best_rate(ToDeviceEvent.parse_event, events, max(1, passes // 20), rounds)
    toolkit_rate = _best_rate(decode, events, passes, rounds)
    types: dict[str, int] = {}
    for e in events:
        types[e["type"]] = types.get(e["type"], 0) + 1
    return {
        "events_in_mix": len(events),
        "mix": types,
        "nio_classes": nio_classes,
        "nio_events_per_s": nio_rate,
        "bot_toolkit_events_per_s": toolkit_rate,
        "ratio": toolkit_rate / nio_rate,
    }


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50_ms": pick(0.50) * 1e3,
        "p90_ms": pick(0.90) * 1e3,
        "p99_ms": pick(0.99) * 1e3,
        "max_ms": ordered[-1] * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
    }


def _typed_burst(n: int) -> list[Any]:
    """``n`` distinct typed events from many senders and transactions."""
    from bot_toolkit import decode  # noqa: PLC0415

    mix = build_mix(flows=50)
    out: list[Any] = []
    while len(out) < n:
        round_no = len(out) // len(mix)
        for raw in mix:
            if len(out) == n:
                break
            event = copy.deepcopy(raw)
            event["sender"] = f"{event['sender']}.{round_no}"
            out.append(decode(event))
    return out


async def _dispatch_once(
    events: Sequence[Any], concurrency: int, queue_size: int
) -> tuple[float, list[float]]:
    """Put ``events`` into a fresh dispatcher; return (seconds until all handled, latencies)."""
    from bot_toolkit.dispatcher import Dispatcher  # noqa: PLC0415
    from bot_toolkit.events import ToDeviceEvent  # noqa: PLC0415

    n = len(events)
    index = {id(event): i for i, event in enumerate(events)}
    put_at = [0.0] * n
    started_at = [0.0] * n
    done = asyncio.Event()
    remaining = n
    clock = time.perf_counter

    async def handler(event: Any) -> None:
        nonlocal remaining
        started_at[index[id(event)]] = clock()
        remaining -= 1
        if remaining == 0:
            done.set()

    dispatcher = Dispatcher(concurrency=concurrency, queue_size=queue_size)
    dispatcher.register(ToDeviceEvent, handler)
    await dispatcher.start()
    begin = clock()
    for i, event in enumerate(events):
        put_at[i] = clock()
        await dispatcher.put(event)
    await done.wait()
    elapsed = clock() - begin
    await dispatcher.close(10.0)
    return elapsed, [s - p for s, p in zip(started_at, put_at, strict=True)]


def dispatcher_available() -> bool:
    """Whether ``bot_toolkit.dispatcher`` can be imported and has ``Dispatcher``."""
    try:
        module = importlib.import_module("bot_toolkit.dispatcher")
    except ImportError:
        return False
    return hasattr(module, "Dispatcher")


def bench_dispatch(
    stream: int = 50_000, burst: int = 10_000, concurrency: int = 64, rounds: int = 3
) -> dict[str, Any]:
    """Dispatcher throughput (no-op handler) and put-to-handler-start latency for a burst."""
    if not dispatcher_available():
        return {"available": False}
    stream_events = _typed_burst(stream)
    burst_events = _typed_burst(burst)
    best_rate = 0.0
    for _ in range(rounds):
        elapsed, _lat = asyncio.run(_dispatch_once(stream_events, concurrency, 10_000))
        best_rate = max(best_rate, stream / max(elapsed, 1e-12))
    # Queue large enough for the whole burst, so put never waits: pure added latency.
    burst_runs = [
        asyncio.run(_dispatch_once(burst_events, concurrency, max(burst, 1))) for _ in range(rounds)
    ]
    elapsed, latencies = min(burst_runs, key=lambda run: _percentiles(run[1])["p50_ms"])
    return {
        "available": True,
        "concurrency": concurrency,
        "stream_events": stream,
        "events_per_s": best_rate,
        "burst_events": burst,
        "burst_seconds": elapsed,
        "burst_latency": _percentiles(latencies),
    }


def run(
    *,
    passes: int = 200,
    rounds: int = 5,
    flows: int = 8,
    stream: int = 50_000,
    burst: int = 10_000,
    concurrency: int = 64,
) -> dict[str, Any]:
    """Both sections, as one dict."""
    return {
        "python": sys.version.split()[0],
        "decode": bench_decode(passes, rounds, flows),
        "dispatch": bench_dispatch(stream, burst, concurrency, max(1, min(rounds, 3))),
    }


def format_table(result: dict[str, Any]) -> str:
    """A short human-readable table of :func:`run`'s result."""
    dec = result["decode"]
    lines = [
        f"decode: mix of {dec['events_in_mix']} to-device events (Python {result['python']})",
        f"  {'decoder':<34}{'events/s':>14}",
        f"  {'nio ToDeviceEvent.parse_event':<34}{dec['nio_events_per_s']:>14,.0f}",
        f"  {'bot_toolkit.decode':<34}{dec['bot_toolkit_events_per_s']:>14,.0f}",
        f"  ratio bot_toolkit / nio: {dec['ratio']:.1f}x",
    ]
    disp = result["dispatch"]
    if not disp.get("available"):
        lines.append("dispatch: skipped (bot_toolkit.dispatcher not available)")
    else:
        lat = disp["burst_latency"]
        cells = "".join(f"{lat[k]:>9.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
        lines += [
            f"dispatch: no-op handler, concurrency {disp['concurrency']}",
            f"  throughput, {disp['stream_events']:,} events: {disp['events_per_s']:,.0f} events/s",
            f"  burst of {disp['burst_events']:,}: put -> handler start latency (ms)",
            f"  {'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}",
            f"  {cells}",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--passes", type=int, default=200, help="passes over the mix per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (best is kept)")
    parser.add_argument("--flows", type=int, default=8, help="verification flows in the mix")
    parser.add_argument("--stream", type=int, default=50_000, help="events for throughput")
    parser.add_argument("--burst", type=int, default=10_000, help="events in the latency burst")
    parser.add_argument("--concurrency", type=int, default=64, help="dispatcher concurrency")
    args = parser.parse_args(argv)
    result = run(
        passes=args.passes,
        rounds=args.rounds,
        flows=args.flows,
        stream=args.stream,
        burst=args.burst,
        concurrency=args.concurrency,
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
