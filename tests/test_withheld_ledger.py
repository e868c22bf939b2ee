"""Unit tests of bot_toolkit.withheld: the m.no_olm ledger rules, backoff, dedupe and policy.

No network. Clocks are injected, so nothing sleeps; the store is a real SQLite file in tmp_path,
closed and reopened to play a restart.
"""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot_toolkit.events import RoomKeyWithheld, WithheldCode, decode
from bot_toolkit.metrics import Metrics
from bot_toolkit.store import Store
from bot_toolkit.withheld import (
    CLAIM_BACKOFF_CAP,
    ClaimBackoff,
    DeviceTrust,
    DummyThrottle,
    NoOlmLedger,
    PeerDevice,
    SenderRateLimit,
    ShareWith,
    SharingPolicy,
    WithheldDeduper,
    WithheldError,
    WithheldMetrics,
    withheld_content,
)
from tests.fakes import FakeClock

ALICE = PeerDevice("@alice:example.org", "ALICEDEV", "curveA")
ALICE_NEW_KEY = PeerDevice("@alice:example.org", "ALICEDEV", "curveA2")
BOB = PeerDevice("@bob:example.org", "BOBDEV", "curveB")


class Bot:
    """One bot 'process': a store, metrics and a ledger; restart() plays a process restart."""

    def __init__(self, path: Path, clock: FakeClock) -> None:
        self.path = path
        self.clock = clock
        self.counter = 0

    def txn(self) -> str:
        self.counter += 1
        return f"txn-{self.counter}"

    async def start(self) -> NoOlmLedger:
        self.store = await Store.open(self.path)
        self.metrics = Metrics()
        self.wm = WithheldMetrics(self.metrics)
        self.ledger = await NoOlmLedger.open(
            self.store, self.wm, clock=self.clock, new_txn_id=self.txn
        )
        return self.ledger

    async def restart(self) -> NoOlmLedger:
        await self.store.close()
        return await self.start()

    def suppressed(self) -> float:
        return self.wm.suppressed.get(WithheldCode.NO_OLM)


@pytest.fixture
async def bot(tmp_path: Path) -> AsyncIterator[Bot]:
    b = Bot(tmp_path / "bot.sqlite3", FakeClock(1_700_000_000.0))
    await b.start()
    yield b
    await b.store.close()


async def notify(ledger: NoOlmLedger, device: PeerDevice) -> str | None:
    """A failure as the key-sharing hook reports it: decide, and if told, mark as sent."""
    txn = await ledger.decide(device)
    if txn is not None:
        await ledger.mark_sent(device, txn)
    return txn


# -- the five rules ------------------------------------------------------------------------------


async def test_first_failure_gives_a_notice(bot: Bot) -> None:
    txn = await bot.ledger.decide(ALICE)
    assert txn == "txn-1"
    entry = await bot.ledger.entry(ALICE)
    assert entry is not None
    assert (entry.state, entry.txn_id, entry.notices) == ("pending", "txn-1", 1)
    assert entry.last_notice_at == bot.clock.now
    await bot.ledger.mark_sent(ALICE, txn)
    entry = await bot.ledger.entry(ALICE)
    assert entry is not None and entry.state == "sent"
    assert await bot.ledger.pending() == []


async def test_repeated_failures_stay_silent_and_are_counted(bot: Bot) -> None:
    assert await notify(bot.ledger, ALICE) is not None
    for _ in range(5):
        bot.clock.advance(3600)
        assert await notify(bot.ledger, ALICE) is None
    entry = await bot.ledger.entry(ALICE)
    assert entry is not None
    assert (entry.notices, entry.suppressed) == (1, 5)
    assert bot.suppressed() == 5
    assert 'bot_toolkit_withheld_suppressed_total{code="m.no_olm"} 5' in bot.metrics.render()


async def test_session_established_allows_exactly_one_more_notice(bot: Bot) -> None:
    assert await notify(bot.ledger, ALICE) == "txn-1"
    assert await notify(bot.ledger, ALICE) is None
    bot.clock.advance(10)
    assert await bot.ledger.session_established("curveA") == 1
    entry = await bot.ledger.entry(ALICE)
    assert entry is not None and entry.session_since_notice and entry.session_at == bot.clock.now
    assert await notify(bot.ledger, ALICE) == "txn-2"
    assert await notify(bot.ledger, ALICE) is None
    entry = await bot.ledger.entry(ALICE)
    assert entry is not None and (entry.notices, entry.suppressed) == (2, 2)


async def test_new_identity_key_counts_as_a_new_device(bot: Bot) -> None:
    assert await notify(bot.ledger, ALICE) is not None
    assert await notify(bot.ledger, ALICE) is None
    # Same user, same device id, new curve25519 key: a new device.
    assert await notify(bot.ledger, ALICE_NEW_KEY) is not None
    assert await notify(bot.ledger, ALICE_NEW_KEY) is None
    # A session with the new key does not re-arm the old one, and the other way round.
    await bot.ledger.session_established("curveA2")
    assert await notify(bot.ledger, ALICE) is None
    assert await notify(bot.ledger, ALICE_NEW_KEY) is not None


async def test_restart_keeps_the_ledger(bot: Bot) -> None:
    assert await notify(bot.ledger, ALICE) is not None
    assert await notify(bot.ledger, BOB) is not None
    await bot.ledger.session_established("curveB")
    ledger = await bot.restart()
    assert await notify(ledger, ALICE) is None
    assert bot.suppressed() == 1
    # Bob's re-arming survived the restart too.
    assert await notify(ledger, BOB) is not None
    assert await notify(ledger, BOB) is None
    # The in-memory filter came back from the store.
    assert ledger.armed("curveA") and ledger.armed("curveB")


# -- crash safety --------------------------------------------------------------------------------


async def test_crash_between_record_and_send_resends_with_the_same_txn(bot: Bot) -> None:
    txn = await bot.ledger.decide(ALICE)  # recorded; the process dies before the send
    assert txn is not None
    ledger = await bot.restart()
    assert await ledger.pending() == [(ALICE, txn)]
    # A new failure after the restart does not produce a second notice...
    assert await ledger.decide(ALICE) is None
    # ...the recovery resends the recorded one with its id, then marks it.
    await ledger.mark_sent(ALICE, txn)
    assert await ledger.pending() == []
    entry = await ledger.entry(ALICE)
    assert entry is not None and (entry.notices, entry.txn_id) == (1, txn)


async def test_mark_sent_of_an_older_txn_does_not_mark_the_newer_one(bot: Bot) -> None:
    first = await notify(bot.ledger, ALICE)
    await bot.ledger.session_established("curveA")
    second = await bot.ledger.decide(ALICE)
    assert first and second and first != second
    await bot.ledger.mark_sent(ALICE, first)
    assert await bot.ledger.pending() == [(ALICE, second)]


# -- edges of the rules --------------------------------------------------------------------------


async def test_session_before_any_notice_changes_nothing(bot: Bot) -> None:
    assert await bot.ledger.session_established("curveA") == 0
    assert await bot.ledger.entries() == []
    assert await notify(bot.ledger, ALICE) is not None


async def test_session_while_the_notice_is_pending_rearms(bot: Bot) -> None:
    txn = await bot.ledger.decide(ALICE)
    assert txn is not None
    assert await bot.ledger.session_established("curveA") == 1
    assert await bot.ledger.decide(ALICE) is not None


async def test_session_established_narrowed_by_user_and_device(bot: Bot) -> None:
    await notify(bot.ledger, ALICE)
    assert await bot.ledger.session_established("curveA", user_id="@mallory:example.org") == 0
    # A narrow that matched nothing leaves the device armed.
    assert bot.ledger.armed("curveA")
    assert await notify(bot.ledger, ALICE) is None
    assert (
        await bot.ledger.session_established(
            "curveA", user_id=ALICE.user_id, device_id=ALICE.device_id
        )
        == 1
    )
    assert not bot.ledger.armed("curveA")
    assert await notify(bot.ledger, ALICE) is not None


async def test_second_session_event_is_a_noop(bot: Bot) -> None:
    await notify(bot.ledger, ALICE)
    assert await bot.ledger.session_established("curveA") == 1
    assert not bot.ledger.armed("curveA")
    commits = bot.store.commits
    assert await bot.ledger.session_established("curveA") == 0
    assert bot.store.commits == commits  # the hot path does not touch the database


# -- claim backoff -------------------------------------------------------------------------------


def test_claim_backoff_doubles_from_15s_up_to_15min() -> None:
    clock = FakeClock(0.0)
    backoff = ClaimBackoff(clock)
    assert backoff.due(ALICE)
    delays = [backoff.failed(ALICE) for _ in range(9)]
    assert delays == [15, 30, 60, 120, 240, 480, 900, 900, 900]
    assert delays[-1] == CLAIM_BACKOFF_CAP


def test_claim_backoff_is_per_device_and_respects_the_clock() -> None:
    clock = FakeClock(0.0)
    backoff = ClaimBackoff(clock)
    backoff.failed(ALICE)
    assert not backoff.due(ALICE)
    assert backoff.due(BOB)
    assert backoff.due(ALICE_NEW_KEY)  # a new identity key is a new device
    clock.advance(14.9)
    assert not backoff.due(ALICE)
    clock.advance(0.1)
    assert backoff.due(ALICE)
    assert backoff.failed(ALICE) == 30
    clock.advance(29)
    assert not backoff.due(ALICE)
    backoff.succeeded(ALICE)
    assert backoff.due(ALICE) and backoff.failures(ALICE) == 0
    assert backoff.failed(ALICE) == 15


def test_claim_backoff_is_bounded() -> None:
    backoff = ClaimBackoff(FakeClock(0.0), max_entries=2)
    backoff.failed(ALICE)
    backoff.failed(BOB)
    backoff.failed(ALICE_NEW_KEY)
    assert backoff.failures(ALICE) == 0  # evicted first
    assert backoff.failures(BOB) == 1


# -- dedupe of m.blacklisted / m.unverified ------------------------------------------------------


def test_deduper_once_per_device_session_and_code() -> None:
    metrics = WithheldMetrics(Metrics())
    dedupe = WithheldDeduper(metrics)
    assert dedupe.first(ALICE, "S1", WithheldCode.UNVERIFIED)
    assert not dedupe.first(ALICE, "S1", WithheldCode.UNVERIFIED)
    assert dedupe.first(ALICE, "S2", WithheldCode.UNVERIFIED)
    assert dedupe.first(ALICE, "S1", WithheldCode.BLACKLISTED)
    assert dedupe.first(BOB, "S1", WithheldCode.UNVERIFIED)
    assert metrics.suppressed.get(WithheldCode.UNVERIFIED) == 1
    dedupe.forget(BOB, "S1", WithheldCode.UNVERIFIED)
    assert dedupe.first(BOB, "S1", WithheldCode.UNVERIFIED)


# -- m.dummy throttle ----------------------------------------------------------------------------


async def test_dummy_throttle_once_per_hour_and_persisted(bot: Bot) -> None:
    throttle = await DummyThrottle.open(bot.store, clock=bot.clock)
    assert await throttle.acquire(ALICE)
    assert not await throttle.acquire(ALICE)
    assert await throttle.acquire(BOB)
    assert await throttle.acquire(ALICE_NEW_KEY)
    bot.clock.advance(3599)
    await bot.restart()
    throttle = await DummyThrottle.open(bot.store, clock=bot.clock)
    assert not await throttle.acquire(ALICE)
    bot.clock.advance(1)
    assert await throttle.acquire(ALICE)
    await throttle.release(ALICE)
    assert await throttle.acquire(ALICE)


# -- policy and the wire content -----------------------------------------------------------------


def test_policy_sharing_rules() -> None:
    verified_only = SharingPolicy(share_with=ShareWith.VERIFIED)
    assert verified_only.check_share(DeviceTrust(verified=True))
    with pytest.raises(WithheldError) as err:
        verified_only.check_share(DeviceTrust(verified=False))
    assert err.value.code == WithheldCode.UNVERIFIED
    with pytest.raises(WithheldError) as err:
        verified_only.check_share(DeviceTrust(verified=True, blacklisted=True))
    assert err.value.code == WithheldCode.BLACKLISTED

    everyone = SharingPolicy(share_with="all")  # type: ignore[arg-type]
    assert everyone.share_with is ShareWith.ALL
    assert everyone.check_share(DeviceTrust(verified=False))
    with pytest.raises(WithheldError):
        everyone.check_share(DeviceTrust(blacklisted=True))

    quiet = SharingPolicy(notify_blacklisted=False)
    assert quiet.check_share(DeviceTrust(blacklisted=True)) is False
    silent = SharingPolicy(send_withheld=False)
    assert silent.check_share(DeviceTrust(verified=False)) is False
    assert silent.withholds(DeviceTrust(verified=False))
    assert not everyone.withholds(DeviceTrust(verified=False))


def test_policy_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="share_with"):
        SharingPolicy(share_with="friends")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no_olm_notices"):
        SharingPolicy(no_olm_notices="yes")  # type: ignore[arg-type]


def test_policy_key_requests() -> None:
    policy = SharingPolicy(own_devices=frozenset({"BACKUP"}))
    own = "@bot:example.org"
    ok = DeviceTrust(verified=True)

    def code(**kw: object) -> str | None:
        args: dict[str, object] = {
            "own_user_id": own,
            "requester_user_id": own,
            "requester": ok,
            "have_session": True,
            "requester_device_id": "BACKUP",
        }
        args.update(kw)
        try:
            policy.check_key_request(**args)  # type: ignore[arg-type]
        except WithheldError as e:
            return e.code
        return None

    assert code() is None  # nio forwards the key itself
    assert code(have_session=False) == WithheldCode.UNAVAILABLE
    assert code(requester_user_id="@eve:example.org") == WithheldCode.UNAUTHORISED
    # authorisation first: an outsider never learns whether we hold the key
    assert code(requester_user_id="@eve:example.org", have_session=False) == "m.unauthorised"
    assert code(requester=None) == WithheldCode.UNAUTHORISED
    assert code(requester=DeviceTrust(verified=False)) == WithheldCode.UNAUTHORISED
    assert code(requester=DeviceTrust(verified=True, blacklisted=True)) == "m.unauthorised"
    # A verified device of our own user that the operator did not name: never a key.
    assert code(requester_device_id="NEWDEVICE") == WithheldCode.UNAUTHORISED
    assert code(requester_device_id="NEWDEVICE", have_session=False) == "m.unauthorised"
    assert code(requester_device_id=None) == WithheldCode.UNAUTHORISED
    assert code(requester=DeviceTrust(verified=True, unlisted_own=True)) == "m.unauthorised"
    assert SharingPolicy().own_devices == frozenset()


def test_policy_never_shares_with_unlisted_own_devices() -> None:
    unlisted = DeviceTrust(verified=True, unlisted_own=True)
    for share_with in ("all", "verified"):
        policy = SharingPolicy(share_with=share_with)  # type: ignore[arg-type]
        with pytest.raises(WithheldError) as refused:
            policy.check_share(unlisted)
        assert refused.value.code == WithheldCode.UNAUTHORISED
        assert policy.withholds(unlisted)
        assert SharingPolicy(share_with=share_with, send_withheld=False).withholds(unlisted)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="own_devices"):
        SharingPolicy(own_devices="BACKUP")  # type: ignore[arg-type]


def test_no_olm_content_has_no_room_or_session() -> None:
    content = withheld_content(
        WithheldError(WithheldCode.NO_OLM),
        sender_key="ourcurve",
        from_device="BOTDEV",
        room_id="!r:example.org",
        session_id="S",
    )
    assert content["code"] == "m.no_olm"
    assert "room_id" not in content and "session_id" not in content
    assert content["algorithm"] == "m.megolm.v1.aes-sha2"
    assert content["sender_key"] == "ourcurve" and content["from_device"] == "BOTDEV"
    event = decode({"type": "m.room_key.withheld", "sender": "@bot:x", "content": content})
    assert isinstance(event, RoomKeyWithheld) and event.code == WithheldCode.NO_OLM


def test_other_codes_need_room_and_session() -> None:
    with pytest.raises(ValueError, match="room_id"):
        withheld_content(WithheldError("m.unverified"), sender_key="k", from_device=None)
    content = withheld_content(
        WithheldError(WithheldCode.UNAVAILABLE, "not here"),
        sender_key="k",
        from_device=None,
        room_id="!r:x",
        session_id="S",
    )
    assert content == {
        "algorithm": "m.megolm.v1.aes-sha2",
        "sender_key": "k",
        "code": "m.unavailable",
        "reason": "not here",
        "room_id": "!r:x",
        "session_id": "S",
    }
    event = decode({"type": "m.room_key.withheld", "sender": "@bot:x", "content": content})
    assert isinstance(event, RoomKeyWithheld) and event.session_id == "S"


def test_withheld_error_carries_the_code() -> None:
    err = WithheldError("com.example.custom", "because")
    assert (err.code, err.reason) == ("com.example.custom", "because")
    assert WithheldError(WithheldCode.BLACKLISTED).reason
    with pytest.raises(ValueError):
        WithheldError(WithheldCode.HISTORY_NOT_SHARED)
    again = pickle.loads(pickle.dumps(err))
    assert (again.code, again.reason) == (err.code, err.reason)


def test_sender_rate_limit_refills_and_remembers_a_bounded_number_of_senders() -> None:
    clock = FakeClock(0.0)
    limit = SenderRateLimit(clock, burst=3, refill=10.0, max_senders=5)
    assert [limit.allow("@a:x") for _ in range(5)] == [True, True, True, False, False]
    assert limit.allow("@b:x")
    clock.advance(25.0)  # two tokens and a half
    assert [limit.allow("@a:x") for _ in range(3)] == [True, True, False]
    clock.advance(1000.0)  # never more than the burst
    assert [limit.allow("@a:x") for _ in range(4)] == [True, True, True, False]
    for n in range(1000):
        limit.allow(f"@spam{n}:x")
    assert len(limit) == 5
    with pytest.raises(ValueError):
        SenderRateLimit(burst=0)
