"""Unit tests of the verification manager: two managers back to back, fakes for I/O."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock

import pytest

from bot_toolkit.events import ToDeviceEvent, decode
from bot_toolkit.outbox import OutboxClosed
from bot_toolkit.store import Store
from bot_toolkit.undecodable import UndecodableEvent
from bot_toolkit.verification import (
    SasPrompt,
    SasReady,
    State,
    VerificationCancelled,
    VerificationDone,
    VerificationPolicy,
    VerificationRequested,
)
from bot_toolkit.verification.engine import MARK_FAILED_REASON, code_label
from bot_toolkit.verification.persistence import RESTART_REASON
from bot_toolkit.verification.sas import SasSession, compute_commitment
from bot_toolkit.verification.table import Party
from tests.fakes import FakeClock
from tests.verification_helpers import (
    Side,
    auto_confirm,
    close_sides,
    eventually,
    make_side,
    settle,
    wire,
    wired_sides,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
async def pair(clock: FakeClock) -> AsyncIterator[tuple[Side, Side]]:
    async with wired_sides(clock) as (a, b):
        yield a, b


def _done(side: Side, txn: str) -> bool:
    return any(e.transaction_id == txn for e in side.of(VerificationDone))


def _scripted_starter(a: Side, b: Side, txn: str) -> SasSession:
    """Bob's side of a SAS that the test drives by hand: Bob starts, the manager of ``a``
    accepts."""
    return SasSession(
        transaction_id=txn,
        us=Party(b.user_id, b.device_id),  # type: ignore[arg-type]
        them=Party(a.user_id, a.device_id),  # type: ignore[arg-type]
        we_started=True,
    )


async def _keys_exchanged(
    a: Side, b: Side, txn: str, clock: FakeClock, *, until: str
) -> SasSession:
    """Drive request, start, accept and both keys by hand as Bob; wait until ``a`` has sent one
    event of type ``until`` (``key``, or ``mac`` when ``a`` confirms at once). Returns Bob."""
    a.put_raw(b.user_id, "m.key.verification.request", _request(b, txn, clock))
    await eventually(lambda: a.manager.state_of(txn) is State.READY)
    bob = _scripted_starter(a, b, txn)
    a.put_raw(b.user_id, "m.key.verification.start", bob.start_content())
    await eventually(lambda: len(a.outbox.of_type("accept", txn)) == 1)
    bob.receive_accept(a.outbox.of_type("accept", txn)[0][3])
    a.put_raw(b.user_id, "m.key.verification.key", bob.our_key_event_content())
    await eventually(lambda: len(a.outbox.of_type(until, txn)) == 1)
    bob.receive_their_key(a.outbox.of_type("key", txn)[0][3]["key"])
    return bob


async def test_we_request_and_start_both_end_verified(pair: tuple[Side, Side]) -> None:
    a, b = pair
    txn = await b.manager.request_verification(a.user_id, a.device_id)
    await eventually(lambda: _done(a, txn) and _done(b, txn), what="both done")
    assert (b.user_id, b.device_id) in a.keys.verified
    assert (a.user_id, a.device_id) in b.keys.verified
    assert a.manager.state_of(txn) is State.DONE and b.manager.state_of(txn) is State.DONE
    # The same SAS on both sides.
    sas_a, sas_b = a.of(SasReady)[0], b.of(SasReady)[0]
    assert sas_a.emoji == sas_b.emoji and len(sas_a.emoji) == 7
    assert sas_a.decimals == sas_b.decimals
    requested = a.of(VerificationRequested)[0]
    assert requested.incoming and requested.user_id == b.user_id
    assert not b.of(VerificationRequested)[0].incoming
    assert a.metrics.get("verifications_total").get("done", "") == 1  # type: ignore[union-attr]
    assert not a.outbox.cancels() and not b.outbox.cancels()
    # Explicit device ids only.
    assert all(s[2] != "*" for s in b.outbox.sent + a.outbox.sent)
    done = await b.manager.wait_finished(txn, 5)
    assert isinstance(done, VerificationDone)
    assert done.verified_keys == (f"ed25519:{a.device_id}",)


async def test_responder_starts(clock: FakeClock) -> None:
    policy = VerificationPolicy(
        allowed_users=["@*:test"], confirm=auto_confirm(), start_as_requester=False
    )
    async with wired_sides(clock, bob=policy) as (a, b):
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: a.manager.state_of(txn) is State.READY)
        assert await a.manager.start_sas(txn)
        await eventually(lambda: _done(a, txn) and _done(b, txn))
        assert a.outbox.of_type("start", txn) and not b.outbox.of_type("start", txn)
        assert (a.user_id, a.device_id) in b.keys.verified


async def test_start_race_smaller_user_wins(clock: FakeClock) -> None:
    """Both sides start at once: alice (smaller user id) wins, bob's start is dropped."""
    policy = VerificationPolicy(
        allowed_users=["@*:test"], confirm=auto_confirm(), start_as_requester=False
    )
    async with wired_sides(clock, alice=policy, bob=policy) as (a, b):
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: b.manager.state_of(txn) is State.READY)
        await asyncio.gather(a.manager.start_sas(txn), b.manager.start_sas(txn))
        await eventually(lambda: _done(a, txn) and _done(b, txn))
        assert len(a.outbox.of_type("accept", txn)) == 0
        assert len(b.outbox.of_type("accept", txn)) == 1
        for side in (a, b):
            assert len(side.outbox.of_type("key", txn)) == 1


async def test_held_request_until_keys_arrive(clock: FakeClock) -> None:
    a = await make_side("alice", clock)
    b = await make_side("bob", clock)
    wire(a, b)
    # alice has not downloaded bob's keys yet: a query brings them.
    a.keys.later[(b.user_id, b.device_id)] = a.keys.known.pop((b.user_id, b.device_id))
    a.keys.query_delay = 0.05
    try:
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: _done(a, txn) and _done(b, txn))
        assert a.keys.queries == [b.user_id]
        assert (b.user_id, b.device_id) in a.keys.verified
    finally:
        await close_sides(a, b)


async def test_held_request_refused_when_keys_never_arrive(clock: FakeClock) -> None:
    policy = VerificationPolicy(
        allowed_users=["@*:test"], confirm=auto_confirm(), key_query_timeout=0.2
    )
    a = await make_side("alice", clock, policy=policy)
    b = await make_side("bob", clock)
    wire(a, b)
    a.keys.known.pop((b.user_id, b.device_id))
    a.keys.query_hangs = True
    try:
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: b.manager.state_of(txn) is State.CANCELLED)
        assert a.outbox.cancels(txn) == ["m.user"]
        assert a.manager.state_of(txn) is None
        cancelled = b.of(VerificationCancelled)[0]
        assert cancelled.code == "m.user" and not cancelled.by_us
    finally:
        await close_sides(a, b)


async def test_refused_user_gets_m_user(clock: FakeClock) -> None:
    async with wired_sides(clock, alice=VerificationPolicy(allowed_users=["@carol:test"])) as (
        a,
        b,
    ):
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: b.manager.state_of(txn) is State.CANCELLED)
        assert a.outbox.cancels(txn) == ["m.user"]
        assert not a.outbox.of_type("ready")
        # bob never answers the cancel.
        assert not b.outbox.cancels(txn)


async def test_operator_mode_confirm_and_list(clock: FakeClock) -> None:
    operator = VerificationPolicy(allowed_users=["@*:test"], confirm=None, auto_accept=False)
    async with wired_sides(clock, alice=operator) as (a, b):
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: a.manager.state_of(txn) is State.REQUESTED_IN)
        [info] = a.manager.list_in_progress()
        assert (info.id, info.user_id, info.device_id, info.state) == (
            txn,
            b.user_id,
            b.device_id,
            "requested_in",
        )
        assert info.deadline is not None and info.deadline <= clock() + 120
        assert await a.manager.confirm(txn)  # accept the request
        # bob confirms on his own and his MAC may already be here
        await eventually(
            lambda: a.manager.state_of(txn) in (State.KEYS_EXCHANGED, State.MAC_RECEIVED)
        )
        [info] = a.manager.list_in_progress()
        assert len(info.emoji) == 7 and info.decimals is not None
        # bob's SasReady is a lifecycle event on his own dispatcher: it may still be queued
        await eventually(lambda: bool(b.of(SasReady)), what="bob's SasReady")
        assert info.emoji == b.of(SasReady)[0].emoji
        assert not await a.manager.start_sas(txn)  # refused in this state
        assert await a.manager.confirm(txn)
        await eventually(lambda: _done(a, txn) and _done(b, txn))
        assert a.manager.list_in_progress() == []
        with pytest.raises(KeyError):
            await a.manager.confirm(txn)
        with pytest.raises(KeyError):
            await a.manager.confirm("nope")


async def test_operator_cancel_and_peer_cancel_not_answered(clock: FakeClock) -> None:
    operator = VerificationPolicy(allowed_users=["@*:test"], confirm=None)
    async with wired_sides(clock, alice=operator, bob=operator) as (a, b):
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: b.manager.state_of(txn) is State.KEYS_EXCHANGED)
        assert await b.manager.cancel(txn)
        await eventually(lambda: a.manager.state_of(txn) is State.CANCELLED)
        assert b.outbox.cancels(txn) == ["m.user"]
        assert a.outbox.cancels(txn) == []
        [theirs] = a.of(VerificationCancelled)
        assert theirs.code == "m.user" and not theirs.by_us
        [ours] = b.of(VerificationCancelled)
        assert ours.by_us
        assert not await b.manager.cancel(txn)
        assert b.metrics.get("verification_cancels_sent_total").get("m.user") == 1  # type: ignore[union-attr]
        assert a.metrics.get("verifications_total").get("cancelled", "m.user") == 1  # type: ignore[union-attr]


async def test_mismatch_sends_mismatched_sas(clock: FakeClock) -> None:
    no = VerificationPolicy(allowed_users=["@*:test"], confirm=auto_confirm(False))
    async with wired_sides(clock, alice=no, bob=VerificationPolicy(allowed_users=["@*:test"])) as (
        a,
        b,
    ):
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: b.manager.state_of(txn) is State.CANCELLED)
        assert a.outbox.cancels(txn) == ["m.mismatched_sas"]
        assert not b.keys.verified and not a.keys.verified


async def test_timeout_overall(clock: FakeClock) -> None:
    operator = VerificationPolicy(allowed_users=["@*:test"], confirm=None)
    async with wired_sides(clock, alice=operator, bob=operator) as (a, b):
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: a.manager.state_of(txn) is State.KEYS_EXCHANGED)
        clock.advance(599)
        await a.manager.check_timeouts()
        assert a.manager.state_of(txn) is State.KEYS_EXCHANGED
        clock.advance(2)
        await a.manager.check_timeouts()
        assert a.manager.state_of(txn) is State.CANCELLED
        assert a.outbox.cancels(txn) == ["m.timeout"]
        await eventually(lambda: b.manager.state_of(txn) is State.CANCELLED)
        assert not b.outbox.cancels(txn)
        # finished ids are forgotten after the idle period
        clock.advance(601)
        await a.manager.check_timeouts()
        assert a.manager.state_of(txn) is None


async def test_timeout_follows_the_policy(clock: FakeClock) -> None:
    short = VerificationPolicy(allowed_users=["@*:test"], confirm=None, timeout=120.0)
    async with wired_sides(
        clock, alice=short, bob=VerificationPolicy(allowed_users=["@*:test"])
    ) as (a, b):
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: a.manager.state_of(txn) is State.KEYS_EXCHANGED)
        clock.advance(119)
        await a.manager.check_timeouts()
        assert a.manager.state_of(txn) is State.KEYS_EXCHANGED
        clock.advance(2)
        await a.manager.check_timeouts()
        assert a.outbox.cancels(txn) == ["m.timeout"]


def test_policy_refuses_a_timeout_beyond_the_spec() -> None:
    with pytest.raises(ValueError, match="600"):
        VerificationPolicy(timeout=601.0)


async def test_unanswered_request_lapses_silently(clock: FakeClock) -> None:
    operator = VerificationPolicy(allowed_users=["@*:test"], confirm=None, auto_accept=False)
    async with wired_sides(clock, alice=operator) as (a, b):
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: a.manager.state_of(txn) is State.REQUESTED_IN)
        clock.advance(121)
        await a.manager.check_timeouts()
        assert a.manager.state_of(txn) is State.CANCELLED
        assert a.outbox.cancels(txn) == []  # the prompt lapses; nothing is sent
        await eventually(lambda: bool(a.of(VerificationCancelled)))
        assert a.of(VerificationCancelled)[0].code == "m.timeout"


async def test_stale_and_future_requests_ignored(pair: tuple[Side, Side], clock: FakeClock) -> None:
    a, b = pair
    for i, offset in enumerate((-601.0, 301.0)):
        content = {
            "from_device": b.device_id,
            "methods": ["m.sas.v1"],
            "timestamp": int((clock() + offset) * 1000),
            "transaction_id": f"old{i}",
        }
        a.put_raw(b.user_id, "m.key.verification.request", content)
    await settle(a)
    assert a.outbox.sent == []
    assert a.manager.state_of("old0") is None and a.manager.state_of("old1") is None


def _request(side: Side, txn: str, clock: FakeClock) -> dict[str, object]:
    return {
        "from_device": side.device_id,
        "methods": ["m.sas.v1"],
        "timestamp": int(clock() * 1000),
        "transaction_id": txn,
    }


async def test_unknown_transactions(pair: tuple[Side, Side], clock: FakeClock) -> None:
    a, b = pair
    a.outbox.deliver = None  # only look at what alice sends
    sender = b.user_id
    a.put_raw(sender, "m.key.verification.key", {"transaction_id": "u1", "key": "abc"})
    a.put_raw(
        sender,
        "m.key.verification.cancel",
        {"transaction_id": "u2", "code": "m.user", "reason": "x"},
    )
    a.put_raw(
        sender,
        "m.key.verification.start",
        {"transaction_id": "u3", "from_device": b.device_id, "method": "m.qr_code.scan.v1"},
    )
    await settle(a)
    assert a.outbox.cancels("u1") == ["m.unknown_transaction"]
    assert a.outbox.cancels("u2") == []
    assert a.outbox.cancels("u3") == ["m.unknown_method"]


async def test_wrong_user_and_malformed(pair: tuple[Side, Side], clock: FakeClock) -> None:
    a, b = pair
    a.outbox.deliver = None
    a.put_raw(b.user_id, "m.key.verification.request", _request(b, "t1", clock))
    await eventually(lambda: a.manager.state_of("t1") is State.READY)
    a.put_raw("@mallory:test", "m.key.verification.key", {"transaction_id": "t1", "key": "abc"})
    await settle(a)
    assert [(s[1], s[3]["code"]) for s in a.outbox.of_type("cancel", "t1")] == [
        ("@mallory:test", "m.user_mismatch")
    ]
    assert a.manager.state_of("t1") is State.READY  # a third party cannot end it
    # A malformed event of the peer in the known transaction: m.invalid_message.
    a.dispatcher.put_nowait(
        UndecodableEvent(
            sender=b.user_id, transaction_id="t1", event_type_name="m.key.verification.mac"
        )
    )
    await eventually(lambda: a.manager.state_of("t1") is State.CANCELLED)
    assert a.outbox.cancels("t1")[-1] == "m.invalid_message"
    # A malformed cancel is still a cancel: never answered.
    a.put_raw(b.user_id, "m.key.verification.request", _request(b, "t2", clock))
    await eventually(lambda: a.manager.state_of("t2") is State.READY)
    a.dispatcher.put_nowait(
        UndecodableEvent(
            sender=b.user_id, transaction_id="t2", event_type_name="m.key.verification.cancel"
        )
    )
    await eventually(lambda: a.manager.state_of("t2") is State.CANCELLED)
    assert a.outbox.cancels("t2") == []


async def test_key_before_accept_is_unexpected(pair: tuple[Side, Side], clock: FakeClock) -> None:
    a, b = pair
    a.outbox.deliver = None
    a.put_raw(b.user_id, "m.key.verification.request", _request(b, "k1", clock))
    await eventually(lambda: a.manager.state_of("k1") is State.READY)
    a.put_raw(b.user_id, "m.key.verification.key", {"transaction_id": "k1", "key": "abc"})
    await eventually(lambda: a.manager.state_of("k1") is State.CANCELLED)
    assert a.outbox.cancels("k1") == ["m.unexpected_message"]


async def test_concurrent_attempts_all_cancelled_and_error_cap(
    clock: FakeClock,
) -> None:
    policy = VerificationPolicy(
        allowed_users=["@*:test"], confirm=auto_confirm(), max_error_replies=3
    )
    a = await make_side("alice", clock, policy=policy)
    b = await make_side("bob", clock)
    wire(a, b)
    a.outbox.deliver = None
    try:
        a.put_raw(b.user_id, "m.key.verification.request", _request(b, "f0", clock))
        await eventually(lambda: a.manager.state_of("f0") is State.READY)
        a.put_raw(b.user_id, "m.key.verification.request", _request(b, "f1", clock))
        await eventually(lambda: a.manager.state_of("f0") is State.CANCELLED)
        assert a.outbox.cancels("f0") == ["m.user"]
        assert a.outbox.cancels("f1") == ["m.user"]
        assert a.manager.state_of("f1") is None  # never became a transaction
        # Right after, the device's new attempts are refused too (cooldown); later ones are not.
        a.put_raw(b.user_id, "m.key.verification.request", _request(b, "f2", clock))
        await eventually(lambda: a.outbox.cancels("f2") == ["m.user"])
        assert a.manager.state_of("f2") is None
        clock.advance(6)
        a.put_raw(b.user_id, "m.key.verification.request", _request(b, "f3", clock))
        await eventually(lambda: a.manager.state_of("f3") is State.READY)
        assert await a.manager.cancel("f3")
        # A flood of unknown-transaction events: replies capped at 3 per minute per device.
        before = len(a.outbox.cancels())
        for i in range(20):
            a.put_raw(b.user_id, "m.key.verification.key", {"transaction_id": f"x{i}", "key": "k"})
        await settle(a)
        assert len(a.outbox.cancels()) - before <= 3
        clock.advance(61)
        a.put_raw(b.user_id, "m.key.verification.key", {"transaction_id": "late", "key": "k"})
        await settle(a)
        assert a.outbox.cancels("late") == ["m.unknown_transaction"]
    finally:
        await close_sides(a, b)


async def test_duplicates_ignored_and_two_keys_never(clock: FakeClock) -> None:
    """Drive alice by hand as bob (a SasSession of our own), repeating and racing inputs."""
    a = await make_side("alice", clock)
    b = await make_side("bob", clock)
    wire(a, b)
    a.outbox.deliver = None
    try:
        txn = "dup1"
        req = _request(b, txn, clock)
        for _ in range(3):
            a.put_raw(b.user_id, "m.key.verification.request", req)
        await eventually(lambda: a.manager.state_of(txn) is State.READY)
        await settle(a)
        assert len(a.outbox.of_type("ready", txn)) == 1
        bob_sas = _scripted_starter(a, b, txn)
        start = bob_sas.start_content()
        for _ in range(3):
            a.put_raw(b.user_id, "m.key.verification.start", start)
        await eventually(lambda: len(a.outbox.of_type("accept", txn)) == 1)
        bob_sas.receive_accept(a.outbox.of_type("accept", txn)[0][3])
        key = bob_sas.our_key_event_content()
        for _ in range(4):  # the same key again and again, concurrently
            a.put_raw(b.user_id, "m.key.verification.key", key)
        await eventually(lambda: a.manager.state_of(txn) is not State.STARTED_IN)
        await settle(a)
        assert len(a.outbox.of_type("key", txn)) == 1
        assert a.manager.state_of(txn) in (State.KEYS_EXCHANGED, State.MAC_SENT)
        # A different key now: out of sequence; still only one key of ours went out.
        other = SasSession(
            transaction_id=txn,
            us=Party(b.user_id, b.device_id),  # type: ignore[arg-type]
            them=Party(a.user_id, a.device_id),  # type: ignore[arg-type]
            we_started=False,
        )
        a.put_raw(
            b.user_id, "m.key.verification.key", {"transaction_id": txn, "key": other.public_key}
        )
        await eventually(lambda: a.manager.state_of(txn) is State.CANCELLED)
        assert a.outbox.cancels(txn) == ["m.unexpected_message"]
        assert len(a.outbox.of_type("key", txn)) == 1
    finally:
        await close_sides(a, b)


async def test_wrong_mac_is_key_mismatch(clock: FakeClock) -> None:
    a = await make_side("alice", clock, policy=VerificationPolicy(allowed_users=["@*:test"]))
    b = await make_side("bob", clock)
    wire(a, b)
    a.outbox.deliver = None
    try:
        txn = "mac1"
        bob = await _keys_exchanged(a, b, txn, clock, until="key")
        # MAC over the wrong device key.
        mac = bob.mac_content({f"ed25519:{b.device_id}": "not-bobs-key"})
        a.put_raw(b.user_id, "m.key.verification.mac", mac)
        await eventually(lambda: a.manager.state_of(txn) is State.CANCELLED)
        assert a.outbox.cancels(txn) == ["m.key_mismatch"]
        assert not a.keys.verified
    finally:
        await close_sides(a, b)


async def test_legacy_start_first_flow(pair: tuple[Side, Side]) -> None:
    a, b = pair
    a.outbox.deliver = None
    txn = "legacy1"
    bob = _scripted_starter(a, b, txn)
    a.put_raw(b.user_id, "m.key.verification.start", bob.start_content())
    await eventually(lambda: len(a.outbox.of_type("accept", txn)) == 1)
    assert a.manager.state_of(txn) is State.LEGACY_STARTED_IN
    bob.receive_accept(a.outbox.of_type("accept", txn)[0][3])
    a.put_raw(b.user_id, "m.key.verification.key", bob.our_key_event_content())
    await eventually(lambda: len(a.outbox.of_type("mac", txn)) == 1)
    bob.receive_their_key(a.outbox.of_type("key", txn)[0][3]["key"])
    bob.verify_mac(
        a.outbox.of_type("mac", txn)[0][3]["mac"],
        a.outbox.of_type("mac", txn)[0][3]["keys"],
        {f"ed25519:{a.device_id}": a.keys.ed25519},
    )
    a.put_raw(
        b.user_id,
        "m.key.verification.mac",
        bob.mac_content({f"ed25519:{b.device_id}": b.keys.ed25519}),
    )
    await eventually(lambda: a.manager.state_of(txn) is State.DONE)
    assert (b.user_id, b.device_id) in a.keys.verified
    assert not a.outbox.of_type("done", txn)  # the start-first flow has no done


async def test_restart_cancels_unexpired(tmp_path: Path, clock: FakeClock) -> None:
    store = await Store.open(tmp_path / "s.sqlite3")
    operator = VerificationPolicy(allowed_users=["@*:test"], confirm=None)
    try:
        a = await make_side("alice", clock, policy=operator, store=store)
        b = await make_side("bob", clock, policy=operator)
        wire(a, b)
        txn1 = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: a.manager.state_of(txn1) is State.KEYS_EXCHANGED)
        # An older one (another device of bob's) that will have expired by the restart.
        a.keys.known[(b.user_id, "BOB2")] = "ed-bob2"
        a.keys.known[(b.user_id, "BOB3")] = "ed-bob3"
        clock.advance(-700)
        txn0 = "old-one"
        a.put_raw(
            b.user_id,
            "m.key.verification.request",
            {**_request(b, txn0, clock), "from_device": "BOB2"},
        )
        await eventually(lambda: a.manager.state_of(txn0) is State.READY)
        clock.advance(700)
        # A finished one is not persisted.
        txn2 = "finished-one"
        a.put_raw(
            b.user_id,
            "m.key.verification.request",
            {**_request(b, txn2, clock), "from_device": "BOB3"},
        )
        await eventually(lambda: a.manager.state_of(txn2) is State.READY)
        await a.manager.cancel(txn2)
        rows = await store.fetchall("SELECT txn FROM verification_inflight")
        assert sorted(r[0] for r in rows) == sorted([txn0, txn1])
        await close_sides(a, b)  # "crash": nothing is cleaned up

        restarted = await make_side("alice", clock, policy=operator, store=store)
        try:
            cancels = restarted.outbox.of_type("cancel")
            assert [
                (s[1], s[2], s[3]["transaction_id"], s[3]["code"], s[3]["reason"]) for s in cancels
            ] == [(b.user_id, b.device_id, txn1, "m.user", RESTART_REASON)]
            assert await store.fetchall("SELECT * FROM verification_inflight") == []
            assert restarted.manager.list_in_progress() == []
        finally:
            await close_sides(restarted)
    finally:
        await store.close()


class FakePlugin:
    """The decode hooks of :class:`~bot_toolkit.nio_plugin.NioPlugin` that the manager uses."""

    def __init__(self) -> None:
        self.dispatch_undecodable = False
        self.decoded: list[Callable[[ToDeviceEvent, Mapping[str, Any]], None]] = []

    def add_decoded_listener(
        self, listener: Callable[[ToDeviceEvent, Mapping[str, Any]], None]
    ) -> Callable[[], None]:
        self.decoded.append(listener)
        return lambda: self.decoded.remove(listener)

    def feed(self, side: Side, sender: str, event_type: str, content: dict[str, Any]) -> None:
        """What the plugin does for a decoded event: listeners first, then the dispatcher."""
        raw = {"type": event_type, "sender": sender, "content": content}
        event = decode(raw)
        for listener in list(self.decoded):
            listener(event, raw)
        side.dispatcher.put_nowait(event)


async def test_watch_commits_to_the_raw_start(clock: FakeClock) -> None:
    a = await make_side("alice", clock)
    b = await make_side("bob", clock)
    wire(a, b)
    a.outbox.deliver = None
    plugin = FakePlugin()
    a.manager.watch(plugin)  # type: ignore[arg-type]
    assert plugin.dispatch_undecodable and len(plugin.decoded) == 1
    try:
        txn = "raw1"
        bob = _scripted_starter(a, b, txn)
        raw_start = dict(bob.start_content(), **{"org.example.extra": [1, {"x": None}]})
        plugin.feed(a, b.user_id, "m.key.verification.start", raw_start)
        await eventually(lambda: len(a.outbox.of_type("accept", txn)) == 1)
        commitment = a.outbox.of_type("accept", txn)[0][3]["commitment"]
        bob.receive_accept(a.outbox.of_type("accept", txn)[0][3])
        plugin.feed(a, b.user_id, "m.key.verification.key", bob.our_key_event_content())
        await eventually(lambda: len(a.outbox.of_type("key", txn)) == 1)
        their_key = a.outbox.of_type("key", txn)[0][3]["key"]
        # The commitment covers the field the typed event dropped.
        assert commitment == compute_commitment(their_key, raw_start)
        assert commitment != compute_commitment(their_key, bob.start_content())
        # An undecodable event of another type is not the manager's business.
        a.dispatcher.put_nowait(
            UndecodableEvent(
                sender=b.user_id, event_type_name="m.room_key_request", reason="broken"
            )
        )
        await settle(a)
        assert a.manager.state_of(txn) is State.LEGACY_MAC_SENT  # start-first flow, confirmed
        assert a.outbox.cancels(txn) == []
    finally:
        await close_sides(a, b)
    assert plugin.decoded == []  # close() unsubscribed


BOB_MASTER = "bWFzdGVyLWtleS1vZi1ib2ItMzItYnl0ZXMtbG9uZw"  # stands in for an ed25519 key
OTHER_KEY_ID = "ed25519:SOMEOTHERKEY"


def _bob_mac(case: str, bob: SasSession, b: Side) -> dict[str, Any]:
    """Bob's MAC message for each master-key case (see the test below)."""
    device = {f"ed25519:{b.device_id}": b.keys.ed25519}
    master = {f"ed25519:{BOB_MASTER}": BOB_MASTER}
    if case in ("known_master", "unknown_master"):
        return bob.mac_content({**device, **master})
    if case == "unknown_key_id":
        return bob.mac_content({**device, **master, OTHER_KEY_ID: "some-other-key"})
    if case == "wrong_master_mac":
        return bob.mac_content({**device, f"ed25519:{BOB_MASTER}": "not-the-master-key"})
    if case == "id_not_under_key_ids":
        content = bob.mac_content(device)
        # An id slipped into the MAC dict after the fact: the KEY_IDS MAC no longer covers it.
        content["mac"][OTHER_KEY_ID] = content["mac"][f"ed25519:{b.device_id}"]
        return content
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "knows_master", "verified"),
    [
        # The bot knows the master key: the MAC covers the device key and the master key.
        ("known_master", True, ["ed25519:BOBDEV", f"ed25519:{BOB_MASTER}"]),
        # No master key known: its MAC is skipped (KEY_IDS still covers its id).
        ("unknown_master", False, ["ed25519:BOBDEV"]),
        # An id we know nothing of is skipped; the known ones are verified.
        ("unknown_key_id", True, ["ed25519:BOBDEV", f"ed25519:{BOB_MASTER}"]),
        # A wrong MAC for the master key: m.key_mismatch.
        ("wrong_master_mac", True, None),
        # An id the KEY_IDS MAC does not cover: m.key_mismatch, even though it is unknown.
        ("id_not_under_key_ids", True, None),
    ],
)
async def test_mac_master_cross_signing_key(
    clock: FakeClock, case: str, knows_master: bool, verified: list[str] | None
) -> None:
    a = await make_side("alice", clock)
    b = await make_side("bob", clock)
    wire(a, b)
    a.outbox.deliver = None
    if knows_master:
        a.keys.masters[b.user_id] = BOB_MASTER
    try:
        txn = f"master-{case}"
        bob = await _keys_exchanged(a, b, txn, clock, until="mac")
        mac = _bob_mac(case, bob, b)
        a.put_raw(b.user_id, "m.key.verification.mac", mac)
        if verified is None:
            await eventually(lambda: a.manager.state_of(txn) is State.CANCELLED)
            assert a.outbox.cancels(txn) == ["m.key_mismatch"]
            assert not a.keys.verified
            assert not a.of(VerificationDone)
            return
        await eventually(lambda: len(a.outbox.of_type("done", txn)) == 1)
        a.put_raw(b.user_id, "m.key.verification.done", {"transaction_id": txn})
        await eventually(lambda: a.manager.state_of(txn) is State.DONE)
        assert a.outbox.cancels(txn) == []
        assert (b.user_id, b.device_id) in a.keys.verified
        (done,) = a.of(VerificationDone)
        assert sorted(done.verified_keys) == sorted(verified)
    finally:
        await close_sides(a, b)


@pytest.mark.handler_errors
async def test_failed_send_cancels_and_ends_the_transaction(
    tmp_path: Path, clock: FakeClock
) -> None:
    """An action that raises (outbox closed) still ends the transaction: outcome, lifecycle
    event, restart row, timers and the attempt are all released; a cancel goes out if it can."""
    store = await Store.open(tmp_path / "s.sqlite3")
    a = await make_side("alice", clock, store=store)
    b = await make_side("bob", clock)
    wire(a, b)
    a.outbox.deliver = None  # only look at what alice sends
    a.outbox.fail_types.add("m.key.verification.ready")
    try:
        a.put_raw(b.user_id, "m.key.verification.request", _request(b, "r1", clock))
        await eventually(lambda: a.manager.state_of("r1") is State.CANCELLED)
        outcome = await a.manager.wait_finished("r1", timeout=5)
        assert isinstance(outcome, VerificationCancelled)
        assert outcome.code == "m.user" and outcome.by_us
        await eventually(lambda: len(a.of(VerificationCancelled)) == 1)
        assert a.outbox.cancels("r1") == ["m.user"]  # the cancel could still be sent
        assert await store.fetchall("SELECT * FROM verification_inflight") == []
        assert a.manager.list_in_progress() == []
        assert a.manager._txns.timers.deadline("r1") is None
        assert a.metrics.get("verifications_total").get("cancelled", "m.user") == 1  # type: ignore[union-attr]
        # The attempt was released: the device's next request is not a concurrent attempt.
        a.outbox.fail_types.clear()
        a.put_raw(b.user_id, "m.key.verification.request", _request(b, "r2", clock))
        await eventually(lambda: a.manager.state_of("r2") is State.READY)
    finally:
        await close_sides(a, b)
        await store.close()


@pytest.mark.handler_errors
async def test_failed_send_without_cancel_still_ends(clock: FakeClock) -> None:
    a = await make_side("alice", clock)
    b = await make_side("bob", clock)
    wire(a, b)
    a.outbox.deliver = None
    a.outbox.fail_types.update({"m.key.verification.ready", "m.key.verification.cancel"})
    try:
        a.put_raw(b.user_id, "m.key.verification.request", _request(b, "r1", clock))
        await eventually(lambda: a.manager.state_of("r1") is State.CANCELLED)
        outcome = await a.manager.wait_finished("r1", timeout=5)
        assert isinstance(outcome, VerificationCancelled) and outcome.code == "m.user"
        await eventually(lambda: len(a.of(VerificationCancelled)) == 1)
        assert a.outbox.cancels("r1") == []
        assert a.manager.list_in_progress() == []
        a.outbox.fail_types.clear()
        a.put_raw(b.user_id, "m.key.verification.request", _request(b, "r2", clock))
        await eventually(lambda: a.manager.state_of("r2") is State.READY)
    finally:
        await close_sides(a, b)


async def test_unmarkable_device_cancels_instead_of_done(clock: FakeClock) -> None:
    """mark_verified failing (device unknown to the trust store): m.user, no VerificationDone."""
    a = await make_side("alice", clock)
    b = await make_side("bob", clock)
    wire(a, b)
    refuse = AsyncMock(return_value=False)
    a.keys.mark_verified = refuse  # type: ignore[method-assign]
    try:
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: a.manager.state_of(txn) is State.CANCELLED)
        refuse.assert_awaited_once_with(b.user_id, b.device_id)
        assert not a.of(VerificationDone)
        assert not a.outbox.of_type("done", txn)
        [cancelled] = a.of(VerificationCancelled)
        assert (cancelled.code, cancelled.reason, cancelled.by_us) == (
            "m.user",
            MARK_FAILED_REASON,
            True,
        )
        [sent] = a.outbox.of_type("cancel", txn)
        assert (sent[3]["code"], sent[3]["reason"]) == ("m.user", MARK_FAILED_REASON)
        await eventually(lambda: b.manager.state_of(txn) is State.CANCELLED)
        assert not b.of(VerificationDone)
    finally:
        await close_sides(a, b)


async def test_confirm_task_failure_is_logged_and_counted(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    a = await make_side("alice", clock)
    b = await make_side("bob", clock)
    wire(a, b)
    # The confirm callback says yes; sending our MAC then fails inside the spawned task.
    a.outbox.fail_types.add("m.key.verification.mac")
    try:
        with caplog.at_level(logging.ERROR, logger="bot_toolkit.verification.engine"):
            txn = await b.manager.request_verification(a.user_id, a.device_id)
            await eventually(lambda: a.manager.state_of(txn) is State.CANCELLED)
            await eventually(
                lambda: a.metrics.get("verification_task_errors_total").total() == 1  # type: ignore[union-attr]
            )
        [record] = [r for r in caplog.records if "task" in r.getMessage()]
        assert txn in record.getMessage() and record.exc_info is not None
        assert isinstance(record.exc_info[1], OutboxClosed)
    finally:
        await close_sides(a, b)


async def test_idle_and_join_cover_a_confirmation_still_running(clock: FakeClock) -> None:
    """``idle`` / ``join()``: the public way to know no confirmation (or trust refresh) runs.

    A join that times out cancels nothing: the confirmation goes on and the flow finishes."""
    asked, answer = asyncio.Event(), asyncio.Event()

    async def confirm(prompt: SasPrompt) -> bool:
        asked.set()
        await answer.wait()
        return True

    slow = VerificationPolicy(allowed_users=["@*:test"], confirm=confirm)
    async with wired_sides(clock, alice=slow) as (a, b):
        assert a.manager.idle and await a.manager.join(0)
        txn = await b.manager.request_verification(a.user_id, a.device_id)
        await asyncio.wait_for(asked.wait(), 10)
        assert not a.manager.idle
        assert not await a.manager.join(0.01)  # still asking: not idle, not cancelled
        answer.set()
        assert await a.manager.join(10)
        assert a.manager.idle
        await settle(a, b)
        assert _done(a, txn) and _done(b, txn)


def test_metric_code_label_is_bounded() -> None:
    assert code_label("m.key_mismatch") == "m.key_mismatch"
    assert code_label("m.user") == "m.user"
    assert code_label("x" * 255) == "other"
    assert code_label("org.example.custom") == "other"


async def test_peer_chosen_cancel_code_is_not_a_label(
    pair: tuple[Side, Side], clock: FakeClock
) -> None:
    a, b = pair
    operator = a.manager.policy
    assert operator.auto_accept
    code = "org.example." + secrets.token_hex(40)
    a.outbox.deliver = None
    a.put_raw(b.user_id, "m.key.verification.request", _request(b, "c1", clock))
    await eventually(lambda: a.manager.state_of("c1") is State.READY)
    a.put_raw(
        b.user_id,
        "m.key.verification.cancel",
        {"transaction_id": "c1", "code": code, "reason": "bye"},
    )
    await eventually(lambda: a.manager.state_of("c1") is State.CANCELLED)
    [cancelled] = a.of(VerificationCancelled)
    assert cancelled.code == code  # the event keeps the peer's code
    total = a.metrics.get("verifications_total")
    assert total is not None
    assert total.get("cancelled", "other") == 1
    assert total.get("cancelled", code) == 0
    assert code not in a.metrics.render()


async def test_error_cap_is_per_user_not_per_claimed_device(
    pair: tuple[Side, Side], clock: FakeClock
) -> None:
    """from_device is the sender's choice: rotating it must not buy more cancels."""
    a, b = pair
    a.outbox.deliver = None
    cap = a.manager.policy.max_error_replies
    for i in range(3 * cap + 5):
        a.put_raw(
            b.user_id,
            "m.key.verification.ready",
            {"transaction_id": f"x{i}", "from_device": f"DEV{i}", "methods": ["m.sas.v1"]},
        )
    await settle(a)
    assert len(a.outbox.cancels()) == cap
    assert len({s[2] for s in a.outbox.of_type("cancel")}) == cap


async def test_transaction_cancelled_at_restart_stays_cancelled(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The SIGKILL scenario of issue 11: the bot dies after its ready; the restarted bot cancels
    the transaction ("verifier restarted"); the peer's start for it, arriving after that (also
    after a second restart), is ignored like any event of a cancelled transaction: no accept, no
    new start-first flow, no second cancel."""
    store = await Store.open(tmp_path / "s.sqlite3")
    operator = VerificationPolicy(allowed_users=["@*:test"], confirm=None)
    try:
        a = await make_side("alice", clock, policy=operator, store=store)
        b = await make_side("bob", clock, policy=operator)
        a.keys.known[(b.user_id, b.device_id)] = b.keys.ed25519
        txn = "killed-mid-flow"
        a.put_raw(b.user_id, "m.key.verification.request", _request(b, txn, clock))
        await eventually(lambda: a.manager.state_of(txn) is State.READY)
        await close_sides(a, b)  # "SIGKILL": nothing is cleaned up

        for run in range(2):
            restarted = await make_side("alice", clock, policy=operator, store=store)
            try:
                expected = [txn] if run == 0 else []
                assert [s[3]["transaction_id"] for s in restarted.outbox.of_type("cancel")] == (
                    expected
                )
                assert restarted.manager.state_of(txn) is State.CANCELLED
                bob = _scripted_starter(restarted, b, txn)
                restarted.put_raw(b.user_id, "m.key.verification.start", bob.start_content())
                restarted.put_raw(
                    b.user_id,
                    "m.key.verification.ready",
                    {"transaction_id": txn, "from_device": b.device_id, "methods": ["m.sas.v1"]},
                )
                await settle(restarted)
                assert restarted.outbox.of_type("accept") == []
                assert len(restarted.outbox.of_type("cancel")) == len(expected)
                assert restarted.manager.state_of(txn) is State.CANCELLED
                assert restarted.manager.list_in_progress() == []
                assert not restarted.of(VerificationRequested)
            finally:
                await close_sides(restarted)
        # Past the id's retention it is forgotten (then an unknown id, like any other).
        clock.advance(601)
        restarted = await make_side("alice", clock, policy=operator, store=store)
        try:
            assert restarted.manager.state_of(txn) is None
            assert await store.fetchall("SELECT * FROM verification_cancelled") == []
        finally:
            await close_sides(restarted)
    finally:
        await store.close()


async def test_restart_forgets_only_the_rows_it_cancelled(tmp_path: Path, clock: FakeClock) -> None:
    """A transaction begun before ``start()`` ran keeps its restart row."""
    store = await Store.open(tmp_path / "s.sqlite3")
    operator = VerificationPolicy(allowed_users=["@*:test"], confirm=None)
    try:
        a = await make_side("alice", clock, policy=operator, store=store)
        b = await make_side("bob", clock, policy=operator)
        wire(a, b)
        old = await b.manager.request_verification(a.user_id, a.device_id)
        await eventually(lambda: a.manager.state_of(old) is State.KEYS_EXCHANGED)
        await close_sides(a, b)  # "crash"

        restarted = await make_side("alice", clock, policy=operator, store=store, start=False)
        restarted.keys.known[(b.user_id, "BOB2")] = "ed-bob2"
        try:
            restarted.put_raw(
                b.user_id,
                "m.key.verification.request",
                {**_request(b, "new-one", clock), "from_device": "BOB2"},
            )
            await eventually(lambda: restarted.manager.state_of("new-one") is State.READY)
            assert await restarted.manager.start() == 1
            assert [s[3]["transaction_id"] for s in restarted.outbox.of_type("cancel")] == [old]
            rows = await store.fetchall("SELECT txn, device_id FROM verification_inflight")
            assert rows == [("new-one", "BOB2")]
        finally:
            await close_sides(restarted)
    finally:
        await store.close()


async def test_same_txn_from_two_senders_releases_the_loser_attempt(
    pair: tuple[Side, Side], clock: FakeClock
) -> None:
    """Carol's request is held for her keys while bob's request with the same id creates the
    transaction: carol is told user_mismatch, and her attempt does not linger (her next
    request is not refused as a concurrent attempt)."""
    a, b = pair
    a.outbox.deliver = None
    carol, carol_dev = "@carol:test", "CAROLDEV"
    a.keys.later[(carol, carol_dev)] = "ed-carol"
    a.keys.query_delay = 0.3
    carol_req = {**_request(b, "same", clock), "from_device": carol_dev}
    a.put_raw(carol, "m.key.verification.request", carol_req)
    await eventually(lambda: a.keys.queries == [carol])
    a.put_raw(b.user_id, "m.key.verification.request", _request(b, "same", clock))
    await eventually(lambda: a.manager.state_of("same") is State.READY)
    await eventually(lambda: a.outbox.cancels("same") == ["m.user_mismatch"])
    assert a.manager.state_of("same") is State.READY  # bob's transaction goes on
    a.put_raw(carol, "m.key.verification.request", {**carol_req, "transaction_id": "carol2"})
    await eventually(lambda: a.manager.state_of("carol2") is State.READY)
    assert a.outbox.cancels("carol2") == []


async def test_transaction_forgotten_while_waiting_for_its_lock(
    pair: tuple[Side, Side], clock: FakeClock
) -> None:
    a, b = pair
    a.outbox.deliver = None
    req = _request(b, "gone", clock)
    a.put_raw(b.user_id, "m.key.verification.request", req)
    await eventually(lambda: a.manager.state_of("gone") is State.READY)
    assert await a.manager.cancel("gone")
    errors = a.metrics.get("handler_errors_total")
    assert errors is not None
    lock = a.manager._txns.lock("gone")
    async with lock:
        waiting = asyncio.Event()
        acquire = lock.acquire

        async def acquire_watched() -> bool:
            waiting.set()  # the handler asks for the lock we hold
            return await acquire()

        lock.acquire = acquire_watched  # type: ignore[method-assign]
        try:
            a.put_raw(b.user_id, "m.key.verification.request", req)  # waits for the lock
            async with asyncio.timeout(10):
                await waiting.wait()
        finally:
            del lock.acquire
        clock.advance(601)
        await a.manager.check_timeouts()  # forgets the expired id
        assert a.manager.state_of("gone") is None
    await settle(a)
    assert errors.total() == 0
    assert a.manager.state_of("gone") is None


async def test_request_with_no_common_method_is_left_to_the_operator(
    pair: tuple[Side, Side], clock: FakeClock
) -> None:
    """Spec: not cancelled (another of the user's devices may support it), shown, never
    accepted; it lapses silently or the operator refuses it with m.user."""
    a, b = pair
    a.outbox.deliver = None
    assert a.manager.policy.auto_accept
    qr_only = {**_request(b, "qr", clock), "methods": ["m.qr_code.show.v1", "m.reciprocate.v1"]}
    a.put_raw(b.user_id, "m.key.verification.request", qr_only)
    await eventually(lambda: a.manager.state_of("qr") is State.REQUESTED_IN)
    await settle(a)
    assert a.manager.state_of("qr") is State.REQUESTED_IN
    assert a.outbox.sent == []  # neither ready nor cancel
    [info] = a.manager.list_in_progress()
    assert (info.id, info.state) == ("qr", "requested_in")
    assert not await a.manager.confirm("qr")  # cannot be accepted
    assert a.outbox.sent == []
    # It lapses silently (2 min after receipt)...
    clock.advance(121)
    await a.manager.check_timeouts()
    assert a.manager.state_of("qr") is State.CANCELLED
    assert a.outbox.sent == []
    # ...or the operator refuses it with m.user.
    a.put_raw(
        b.user_id,
        "m.key.verification.request",
        {**qr_only, "transaction_id": "qr2", "timestamp": int(clock() * 1000)},
    )
    await eventually(lambda: a.manager.state_of("qr2") is State.REQUESTED_IN)
    assert await a.manager.cancel("qr2")
    assert a.outbox.cancels("qr2") == ["m.user"]


def test_each_module_logs_under_its_own_name() -> None:
    from bot_toolkit.verification import (  # noqa: PLC0415
        engine,
        inbound,
        manager,
        peer_keys,
        persistence,
    )

    for module in (engine, inbound, manager, peer_keys, persistence):
        assert module.log.name == module.__name__


async def test_cancelled_step_still_ends_the_transaction(clock: FakeClock) -> None:
    """The task running a step is cancelled mid-send: the transaction is cancelled and ends."""
    operator = VerificationPolicy(allowed_users=["@*:test"], confirm=None, auto_accept=False)
    a = await make_side("alice", clock, policy=operator)
    b = await make_side("bob", clock)
    wire(a, b)
    a.outbox.deliver = None
    a.outbox.hang_types.add("m.key.verification.ready")
    try:
        a.put_raw(b.user_id, "m.key.verification.request", _request(b, "h1", clock))
        await eventually(lambda: a.manager.state_of("h1") is State.REQUESTED_IN)
        step = asyncio.ensure_future(a.manager.confirm("h1"))
        await eventually(lambda: a.manager.state_of("h1") is State.READY)
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        assert a.manager.state_of("h1") is State.CANCELLED
        outcome = await a.manager.wait_finished("h1", timeout=5)
        assert isinstance(outcome, VerificationCancelled) and outcome.code == "m.user"
        assert a.outbox.cancels("h1") == ["m.user"]
        assert a.manager.list_in_progress() == []
    finally:
        await close_sides(a, b)
