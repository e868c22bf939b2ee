"""Outbox against the real Synapse, through a fault-injecting proxy.

Every test checks delivery with the recipient's *real* ``/sync`` (raw HTTP, one access token per
device): each message arrives exactly once per device. The outbox's own bookkeeping is never the
evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import secrets
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot_toolkit.metrics import Metrics
from bot_toolkit.outbox import HttpTransport, Outbox
from bot_toolkit.store import Store
from tests.fault_proxy import Fault, FaultProxy
from tests.synapse import LocalSynapse, RegisteredUser

pytestmark = pytest.mark.synapse

EVENT_TYPE = "org.example.outbox_test"
SYNC_FILTER = json.dumps(
    {
        "room": {"rooms": []},
        "presence": {"types": []},
        "account_data": {"types": []},
    }
)


@dataclass
class World:
    synapse: LocalSynapse
    bot: RegisteredUser
    devices: list[RegisteredUser]  # every recipient device, each with its own token

    def messages(self, run: str, n: int) -> dict[str, dict[str, Any]]:
        """One message to every recipient device, tagged with the run and payload id ``n``."""
        out: dict[str, dict[str, Any]] = {}
        for dev in self.devices:
            out.setdefault(dev.user_id, {})[dev.device_id] = {"run": run, "n": n}
        return out


@pytest.fixture(scope="module")
def world(synapse: LocalSynapse) -> World:
    """The bot and two recipients with three devices each (shared by the module's tests)."""
    bot = synapse.register()
    devices: list[RegisteredUser] = []
    for _ in range(2):
        first = synapse.register()
        devices.append(first)
        devices.extend(synapse.login(first.user_id, first.password) for _ in range(2))
    assert len({(d.user_id, d.device_id) for d in devices}) == 6
    return World(synapse, bot, devices)


@pytest.fixture
async def proxy(synapse: LocalSynapse) -> AsyncIterator[FaultProxy]:
    p = FaultProxy(synapse.url)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def to_device_events(
    http: aiohttp.ClientSession,
    hs_url: str,
    token: str,
    *,
    expect: int,
    run: str,
    within: float = 60.0,
) -> list[dict[str, Any]]:
    """Drain a device's to-device inbox with real /sync calls (bounded).

    Stops after at least ``expect`` events of this run arrived *and* one further sync brought
    none, so a duplicate still waiting in the inbox would be seen.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    since: str | None = None
    got: list[dict[str, Any]] = []
    for _ in range(1000):
        if loop.time() > deadline:
            raise AssertionError(f"only {len(got)} of {expect} to-device events within {within}s")
        params = {"filter": SYNC_FILTER, "timeout": "0" if len(got) >= expect else "1000"}
        if since is not None:
            params["since"] = since
        async with http.get(
            hs_url + "/_matrix/client/v3/sync",
            params=params,
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
        since = body["next_batch"]
        events = body.get("to_device", {}).get("events", [])
        got.extend(e for e in events if e["type"] == EVENT_TYPE and e["content"].get("run") == run)
        if not events and len(got) >= expect:
            return got
    raise AssertionError("sync loop did not settle")


async def assert_each_delivered_once(
    http: aiohttp.ClientSession, world: World, run: str, n_payloads: int
) -> None:
    for dev in world.devices:
        events = await to_device_events(
            http, world.synapse.url, dev.access_token, expect=n_payloads, run=run
        )
        seen = Counter(e["content"]["n"] for e in events)
        dupes = {n: c for n, c in seen.items() if c > 1}
        missing = set(range(n_payloads)) - set(seen)
        assert not dupes and not missing, (dev.device_id, dupes, missing)
        assert all(e["sender"] == world.bot.user_id for e in events)


async def run_outbox(
    world: World,
    proxy: FaultProxy,
    store: Store,
    metrics: Metrics,
    *,
    run: str,
    n_payloads: int,
    **kw: Any,
) -> list[str]:
    kw.setdefault("batch_size", 4)
    kw.setdefault("concurrency", 4)
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.5)
    kw.setdefault("request_timeout", 2.0)
    async with HttpTransport(proxy.url, world.bot.access_token) as transport:
        outbox = Outbox(transport, store, metrics, **kw)
        await outbox.start()
        results = await asyncio.gather(
            *(outbox.send(EVENT_TYPE, world.messages(run, n)) for n in range(n_payloads))
        )
        assert await outbox.flush(90), "outbox did not drain"
        assert await outbox.close(deadline=5) == 0
    return sorted({t for r in results for t in r})


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open_in(tmp_path)
    try:
        yield s
    finally:
        await s.close()


def retries(metrics: Metrics) -> dict[str, float]:
    counter = metrics.get("outbox_retries_total")
    assert counter is not None
    return {labels[0]: value for labels, value in counter.series().items()}


def sent(metrics: Metrics) -> float:
    counter = metrics.get("outbox_requests_sent_total")
    assert counter is not None
    return counter.get(EVENT_TYPE)


N = 20  # payloads per device: 120 messages, 30+ requests of at most 4


async def test_clean_run_delivers_each_message_once(
    world: World, proxy: FaultProxy, store: Store, http: aiohttp.ClientSession
) -> None:
    run, metrics = secrets.token_hex(4), Metrics()
    txns = await run_outbox(world, proxy, store, metrics, run=run, n_payloads=N)
    assert len(txns) == math.ceil(6 * N / 4) == len(proxy.hits)
    assert all(h.messages <= 4 for h in proxy.hits)
    assert sum(h.messages for h in proxy.hits) == 6 * N
    await assert_each_delivered_once(http, world, run, N)


async def test_429_with_retry_after_is_honoured(
    world: World,
    proxy: FaultProxy,
    store: Store,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run, metrics = secrets.token_hex(4), Metrics()
    proxy.plan.extend(
        [Fault.rate_limited(300), Fault.passthrough(), Fault.rate_limited(200)]
        + [Fault.rate_limited(100)] * 4
    )
    with caplog.at_level(logging.INFO, logger="bot_toolkit.outbox"):
        await run_outbox(world, proxy, store, metrics, run=run, n_payloads=N)
    assert proxy.counts["429"] == 6
    assert retries(metrics) == {"429": 6}
    limited = [h for h in proxy.hits if h.fault.kind == "429"]
    # Each 429 brought exactly one more attempt of the same request, and nothing else did: every
    # request reached the proxy once, plus once per 429 it got.
    passed = Counter(proxy.txn_ids("pass"))
    assert set(passed) == set(proxy.txn_ids()) and set(passed.values()) == {1}
    assert Counter(proxy.txn_ids()) == passed + Counter(h.txn_id for h in limited)
    # The outbox logged one 429 retry per 429 the proxy sent, for the same request, with a delay
    # of at least what that answer asked for.
    logged: dict[str, list[float]] = {}
    for r in caplog.records:
        if r.name == "bot_toolkit.outbox" and "retrying in" in r.msg:
            assert isinstance(r.args, tuple)
            _etype, txn, _attempt, reason, _detail, delay = r.args
            assert reason == "429", r.getMessage()
            logged.setdefault(str(txn), []).append(float(delay))  # type: ignore[arg-type]
    asked: dict[str, list[float]] = {}
    for h in limited:
        asked.setdefault(h.txn_id, []).append(h.fault.retry_after_ms / 1000)
    assert logged.keys() == asked.keys()
    for txn, delays in logged.items():
        assert len(delays) == len(asked[txn])
        assert all(d >= a for d, a in zip(delays, asked[txn], strict=True)), (txn, delays)
    # At the server: each rate-limited request came back no sooner than it was asked to. Both
    # times are the proxy's own time.monotonic() readings of arrivals, and this is a lower bound
    # the protocol requires, not a performance limit: a slow machine only makes the gap longer.
    # (The outbox starts its wait only after the 429 reached it, so there is no tolerance.)
    for i, hit in enumerate(proxy.hits):
        if hit.fault.kind != "429":
            continue
        later = next(h for h in proxy.hits[i + 1 :] if h.txn_id == hit.txn_id)
        assert later.at - hit.at >= hit.fault.retry_after_ms / 1000, (hit, later)
    await assert_each_delivered_once(http, world, run, N)


async def test_500_answers_are_retried_and_deduplicated(
    world: World, proxy: FaultProxy, store: Store, http: aiohttp.ClientSession
) -> None:
    run, metrics = secrets.token_hex(4), Metrics()
    # forward_then_500: Synapse processed the request, the client saw a 500 and resends it.
    proxy.plan.extend([Fault.server_error(), Fault.forward_then_500()] * 4)
    await run_outbox(world, proxy, store, metrics, run=run, n_payloads=N)
    assert proxy.counts["500"] == 4 and proxy.counts["forward_500"] == 4
    assert retries(metrics) == {"5xx": 8}
    await assert_each_delivered_once(http, world, run, N)


async def test_stalled_requests_time_out_and_are_retried(
    world: World, proxy: FaultProxy, store: Store, http: aiohttp.ClientSession
) -> None:
    run, metrics = secrets.token_hex(4), Metrics()
    proxy.plan.extend([Fault.stall(10), Fault.passthrough()] * 3)
    await run_outbox(world, proxy, store, metrics, run=run, n_payloads=N, request_timeout=0.5)
    assert proxy.counts["stall"] == 3
    assert retries(metrics) == {"timeout": 3}
    await assert_each_delivered_once(http, world, run, N)


async def test_dropped_connections_are_retried_and_deduplicated(
    world: World, proxy: FaultProxy, store: Store, http: aiohttp.ClientSession
) -> None:
    run, metrics = secrets.token_hex(4), Metrics()
    # aiohttp resends an idempotent PUT once by itself when the connection drops, so faults come
    # in pairs to reach the outbox's own retry. drop_after: Synapse has processed the request.
    proxy.plan.extend(
        [
            Fault.drop_after(),
            Fault.drop_after(),
            Fault.drop_before(),
            Fault.drop_before(),
            Fault.drop_after(),
            Fault.drop_before(),
        ]
    )
    # One request at a time, so the faults land on successive attempts of the same request.
    txns = await run_outbox(world, proxy, store, metrics, run=run, n_payloads=N, concurrency=1)
    await assert_each_delivered_once(http, world, run, N)
    assert proxy.counts["drop_after"] == 3 and proxy.counts["drop_before"] == 3
    assert retries(metrics) == {"connection": 3}
    # Processed-then-dropped requests were sent again under the same transaction id.
    for txn in proxy.txn_ids("drop_after"):
        assert proxy.txn_ids().count(txn) >= 2
    assert set(proxy.txn_ids()) == set(txns)


async def test_mixed_faults(
    world: World, proxy: FaultProxy, store: Store, http: aiohttp.ClientSession
) -> None:
    run, metrics = secrets.token_hex(4), Metrics()
    rng = random.Random(20241)
    menu = [
        Fault.rate_limited(50),
        Fault.server_error(),
        Fault.forward_then_500(),
        Fault.stall(5),
        Fault.drop_before(),
        Fault.drop_after(),
        Fault.delay(0.1),
        Fault.hold_response(0.1),
    ]

    def policy(n: int) -> Fault:
        # Faults on about half of the first 150 requests, then a healthy homeserver.
        if n < 150 and rng.random() < 0.5:
            return rng.choice(menu)
        return Fault.passthrough()

    proxy.policy = policy
    n = 40
    txns = await run_outbox(
        world, proxy, store, metrics, run=run, n_payloads=n, request_timeout=0.5
    )
    await assert_each_delivered_once(http, world, run, n)
    injected = sum(c for kind, c in proxy.counts.items() if kind != "pass")
    assert injected >= 20, proxy.counts
    assert sum(retries(metrics).values()) >= 10
    assert sent(metrics) == len(txns)
    assert set(proxy.txn_ids()) == set(txns)


async def test_processed_but_unacknowledged_requests_are_resent_with_same_ids(
    world: World, proxy: FaultProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Synapse processed every request, the answers never came back, the bot shut down.

    After a restart the outbox resends the same transaction ids and Synapse drops the repeats.
    """
    run = secrets.token_hex(4)
    proxy.policy = lambda _n: Fault.hold_response(30)
    store = await Store.open_in(tmp_path)
    try:
        async with HttpTransport(proxy.url, world.bot.access_token) as transport:
            first = Outbox(transport, store, Metrics(), batch_size=6, concurrency=4)
            await first.start()
            txns = await first.send(EVENT_TYPE, world.messages(run, 0))
            assert len(txns) == 1
            for _ in range(200):  # bounded: until Synapse has processed it
                if proxy.hits and proxy.hits[0].forwarded:
                    break
                await asyncio.sleep(0.05)
            assert proxy.hits[0].forwarded and proxy.hits[0].upstream_status == 200
            assert await first.close(deadline=0.2) == 1  # unacknowledged: stays persisted
    finally:
        await store.close()

    proxy.policy = None
    proxy.release()
    store = await Store.open_in(tmp_path)
    try:
        async with HttpTransport(proxy.url, world.bot.access_token) as transport:
            second = Outbox(transport, store, Metrics())
            assert await second.start() == 1
            assert await second.flush(30)
            await second.close()
    finally:
        await store.close()
    await assert_each_delivered_once(http, world, run, 1)
    assert proxy.txn_ids() == txns * 2


async def test_10000_messages_to_10000_devices_in_40_requests(
    world: World, proxy: FaultProxy, store: Store, http: aiohttp.ClientSession
) -> None:
    """40 PUTs reach Synapse; the one real device among the 10,000 gets its message once."""
    run, metrics = secrets.token_hex(4), Metrics()
    real = world.devices[0]
    messages: dict[str, dict[str, Any]] = {real.user_id: {real.device_id: {"run": run, "n": 0}}}
    for i in range(9_999):
        user = f"@ghost{i // 100}:{world.synapse.server_name}"
        messages.setdefault(user, {})[f"GHOST{i}"] = {"run": run, "n": i + 1}
    async with HttpTransport(proxy.url, world.bot.access_token) as transport:
        outbox = Outbox(transport, store, metrics)
        await outbox.start()
        txns = await outbox.send(EVENT_TYPE, messages)
        assert await outbox.flush(120)
        await outbox.close()
    assert len(txns) == len(proxy.hits) == math.ceil(10_000 / 250) == 40
    assert all(h.messages <= 250 and h.upstream_status == 200 for h in proxy.hits)
    assert sum(h.messages for h in proxy.hits) == 10_000
    events = await to_device_events(http, world.synapse.url, real.access_token, expect=1, run=run)
    assert [e["content"]["n"] for e in events] == [0]


# ------------------------------------------------------------------ crash and restart

CHILD = Path(__file__).with_name("outbox_crash_child.py")
ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass
class Child:
    """A child process whose stdout and stderr go to files (no pipe can fill up and stall it)."""

    proc: asyncio.subprocess.Process
    stdout: Path
    stderr: Path

    def tail(self) -> str:
        out = self.stdout.read_text(errors="replace")[-1000:]
        err = self.stderr.read_text(errors="replace")[-3000:]
        return f"stdout: {out}\nstderr: {err}"


async def _spawn(
    phase: str, proxy: FaultProxy, world: World, store: Path, plan: Path | None, *, logs: Path
) -> Child:
    args = [str(CHILD), phase, "--homeserver", proxy.url, "--store", str(store)]
    if plan is not None:
        args += ["--plan", str(plan)]
    env = {**os.environ, "BOT_TOOLKIT_TEST_TOKEN": world.bot.access_token}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    stdout, stderr = logs / f"{phase}.stdout", logs / f"{phase}.stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=out, stderr=err, env=env
        )
    return Child(proc, stdout, stderr)


async def _read_line(child: Child, prefix: str, within: float = 60.0) -> str:
    """The rest of the child's first stdout line starting with ``prefix`` (bounded wait).

    The child flushes each line as it prints it; the file is read again after each short wait
    for the child to exit, until the line is there, the child ended without it, or time is up.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        ended = child.proc.returncode is not None  # read after this: nothing more can come
        # Only complete lines: the last piece may still be being written.
        for raw in child.stdout.read_text(errors="replace").split("\n")[:-1]:
            if raw.startswith(prefix):
                return raw[len(prefix) :].strip()
        if ended:
            raise AssertionError(f"child ended before {prefix!r}: {child.tail()}")
        if loop.time() > deadline:
            raise AssertionError(f"no {prefix!r} from the child within {within}s: {child.tail()}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(child.proc.wait()), 0.05)


async def _stop(child: Child) -> None:
    if child.proc.returncode is None:
        child.proc.kill()
        await child.proc.wait()


async def test_sigkill_mid_flight_then_restart_delivers_everything_once(
    world: World, proxy: FaultProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    run, n = secrets.token_hex(4), 10
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([[EVENT_TYPE, world.messages(run, i)] for i in range(n)]))
    store = tmp_path / "bot_toolkit.sqlite3"
    # 60 messages -> 30 requests of 2; three lanes of devices run side by side.
    # First wave accepted; second wave: two processed by Synapse but unanswered, one stalled
    # before Synapse saw it. Everything after that is held until the kill.
    proxy.plan.extend(
        [Fault.passthrough()] * 3
        + [Fault.hold_response(60), Fault.stall(60), Fault.hold_response(60)]
    )
    proxy.policy = lambda _n: Fault.stall(60)

    child = await _spawn("send", proxy, world, store, plan, logs=tmp_path)
    try:
        enqueued = json.loads(await _read_line(child, "ENQUEUED"))
        assert len(enqueued) == 30
        for _ in range(600):  # bounded: until both held requests were processed by Synapse
            held = [h for h in proxy.hits if h.fault.kind == "hold_response"]
            if len(proxy.hits) >= 6 and len(held) == 2 and all(h.forwarded for h in held):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"requests never got in flight: {proxy.counts}")
        child.proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(child.proc.wait(), 30) == -signal.SIGKILL
    finally:
        await _stop(child)

    first_run_txns = proxy.txn_ids()
    processed_unacked = proxy.txn_ids("hold_response")
    with sqlite3.connect(store) as db:
        persisted = [r[0] for r in db.execute("SELECT txn_id FROM outbox_requests ORDER BY seq")]
    assert 27 <= len(persisted) <= 30  # only the first wave can have been deleted
    assert set(processed_unacked) <= set(persisted)  # Synapse has them; we must resend them

    proxy.plan.clear()
    proxy.policy = None
    proxy.release()
    again = await _spawn("recover", proxy, world, store, None, logs=tmp_path)
    try:
        assert int(await _read_line(again, "RECOVERED")) == len(persisted)
        assert await _read_line(again, "FLUSHED") == "true"
        assert await asyncio.wait_for(again.proc.wait(), 30) == 0, again.tail()
    finally:
        await _stop(again)

    await assert_each_delivered_once(http, world, run, n)
    resent = proxy.txn_ids()[len(first_run_txns) :]
    assert sorted(resent) == sorted(persisted)  # original ids, nothing new
    assert set(first_run_txns) | set(resent) == set(enqueued)


# ------------------------------------------------------------------ the benchmark script


async def test_fanout_benchmark_smoke(synapse: LocalSynapse) -> None:
    """The benchmark runs end to end with tiny numbers (no timing asserted)."""
    script = Path(ROOT) / "benchmarks" / "outbox_fanout.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--homeserver",
        synapse.url,
        "--users",
        "3",
        "--messages",
        "12",
        "--batch-size",
        "2",
        "--verify",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    # 12 messages over 3 devices = 4 per device; 2 per request -> 6 requests.
    assert result["http_requests"] == result["requests_accepted"] == 6
    assert (result["delivered"], result["duplicates"]) == (12, 0)
    assert result["tracemalloc_peak_mib"] > 0
