"""Tests for bot_toolkit.verification.table: the transition table and the policy helpers.

The expected outcome of every (state, input) pair is computed by ``expected()`` below, written
from the specification's rules (and the decisions documented in the module), not read from the
module's own tables.
"""

from __future__ import annotations

import ast
import itertools
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot_toolkit._types import DeviceId, TransactionId, UserId
from bot_toolkit.verification import table as tbl
from bot_toolkit.verification.policy import (
    AttemptTracker,
    ErrorReplyLimiter,
    TransactionTimers,
    accepted_notice_targets,
    request_is_fresh,
    request_prompt_lapse,
)
from bot_toolkit.verification.table import (
    Action,
    CancelCode,
    Ignore,
    Input,
    MarkVerified,
    NotifyOthers,
    Outcome,
    Party,
    RejectLocal,
    ReplyCancel,
    SendAccept,
    SendCancel,
    SendDone,
    SendKey,
    SendMac,
    SendReady,
    SendRequest,
    SendStart,
    ShowSas,
    StartRace,
    State,
    classify_start,
    start_race,
    transition,
)
from tests.fakes import FakeClock

S, In, C = State, Input, CancelCode

# ------------------------------------------------------------------------------------------
# Independent expectations.

LIVE = [s for s in S if s not in (S.DONE, S.CANCELLED)]


def cancel(code: CancelCode) -> tuple[State, tuple[Action, ...]]:
    return (S.CANCELLED, (SendCancel(code),))


# The moves of the flows, from the spec's sequence: request -> ready -> start -> accept ->
# key, key -> (SAS shown) -> mac, mac -> done, done; plus the start-first flow without done.
FLOW: dict[tuple[State, Input], tuple[State, tuple[Action, ...]]] = {
    (S.REQUESTED_IN, In.LOCAL_READY): (S.READY, (SendReady(),)),
    (S.REQUESTED_IN, In.TIMEOUT): (S.CANCELLED, ()),  # the prompt lapses silently
    (S.REQUESTED_OUT, In.READY): (S.READY, (NotifyOthers(C.ACCEPTED),)),
    (S.REQUESTED_OUT, In.UNKNOWN_METHOD): cancel(C.UNKNOWN_METHOD),
    (S.REQUESTED_OUT, In.CANCEL): (S.CANCELLED, (NotifyOthers(C.USER),)),
    (S.READY, In.START): (S.STARTED_IN, (SendAccept(),)),
    (S.READY, In.UNKNOWN_METHOD): cancel(C.UNKNOWN_METHOD),
    (S.READY, In.LOCAL_START): (S.STARTED_OUT, (SendStart(),)),
    (S.STARTED_OUT, In.ACCEPT): (S.ACCEPTED, (SendKey(),)),
    (S.STARTED_OUT, In.UNKNOWN_METHOD): cancel(C.UNKNOWN_METHOD),
    (S.STARTED_OUT, In.START_THEY_WIN): (S.STARTED_IN, (SendAccept(),)),
    (S.STARTED_OUT, In.START_WE_WIN): (S.STARTED_OUT, (Ignore(),)),
    (S.STARTED_IN, In.KEY): (S.KEYS_EXCHANGED, (SendKey(), ShowSas())),
    (S.LEGACY_STARTED_IN, In.KEY): (S.LEGACY_KEYS_EXCHANGED, (SendKey(), ShowSas())),
    (S.ACCEPTED, In.KEY): (S.KEYS_EXCHANGED, (ShowSas(),)),
    (S.ACCEPTED, In.COMMITMENT_MISMATCH): cancel(C.MISMATCHED_COMMITMENT),
    (S.KEYS_EXCHANGED, In.MAC): (S.MAC_RECEIVED, ()),
    (S.KEYS_EXCHANGED, In.MAC_MISMATCH): cancel(C.KEY_MISMATCH),
    (S.KEYS_EXCHANGED, In.LOCAL_CONFIRM): (S.MAC_SENT, (SendMac(),)),
    (S.KEYS_EXCHANGED, In.LOCAL_MISMATCH): cancel(C.MISMATCHED_SAS),
    (S.LEGACY_KEYS_EXCHANGED, In.MAC): (S.LEGACY_MAC_RECEIVED, ()),
    (S.LEGACY_KEYS_EXCHANGED, In.MAC_MISMATCH): cancel(C.KEY_MISMATCH),
    (S.LEGACY_KEYS_EXCHANGED, In.LOCAL_CONFIRM): (S.LEGACY_MAC_SENT, (SendMac(),)),
    (S.LEGACY_KEYS_EXCHANGED, In.LOCAL_MISMATCH): cancel(C.MISMATCHED_SAS),
    (S.MAC_SENT, In.MAC): (S.WAITING_DONE, (MarkVerified(), SendDone())),
    (S.MAC_SENT, In.MAC_MISMATCH): cancel(C.KEY_MISMATCH),
    (S.MAC_SENT, In.LOCAL_MISMATCH): cancel(C.MISMATCHED_SAS),
    (S.LEGACY_MAC_SENT, In.MAC): (S.DONE, (MarkVerified(),)),
    (S.LEGACY_MAC_SENT, In.MAC_MISMATCH): cancel(C.KEY_MISMATCH),
    (S.LEGACY_MAC_SENT, In.LOCAL_MISMATCH): cancel(C.MISMATCHED_SAS),
    (S.MAC_RECEIVED, In.LOCAL_CONFIRM): (S.WAITING_DONE, (SendMac(), MarkVerified(), SendDone())),
    (S.MAC_RECEIVED, In.LOCAL_MISMATCH): cancel(C.MISMATCHED_SAS),
    (S.LEGACY_MAC_RECEIVED, In.LOCAL_CONFIRM): (S.DONE, (SendMac(), MarkVerified())),
    (S.LEGACY_MAC_RECEIVED, In.LOCAL_MISMATCH): cancel(C.MISMATCHED_SAS),
    (S.WAITING_DONE, In.DONE): (S.DONE, ()),
}

UNKNOWN_TXN = ReplyCancel(C.UNKNOWN_TRANSACTION)
# Unknown transaction id: cancel with m.unknown_transaction except request/start (which create
# a transaction) and cancel (never answered); impossible inputs are ignored.
NEW_ROW: dict[Input, tuple[State, tuple[Action, ...]]] = {
    In.REQUEST: (S.REQUESTED_IN, ()),
    In.START: (S.LEGACY_STARTED_IN, (SendAccept(),)),
    In.CANCEL: (S.NEW, (Ignore(),)),
    In.READY: (S.NEW, (UNKNOWN_TXN,)),
    In.ACCEPT: (S.NEW, (UNKNOWN_TXN,)),
    In.KEY: (S.NEW, (UNKNOWN_TXN,)),
    In.MAC: (S.NEW, (UNKNOWN_TXN,)),
    In.DONE: (S.NEW, (UNKNOWN_TXN,)),
    In.UNKNOWN_METHOD: (S.NEW, (ReplyCancel(C.UNKNOWN_METHOD),)),
    In.MALFORMED: (S.NEW, (ReplyCancel(C.INVALID_MESSAGE),)),
    In.CONCURRENT_ATTEMPT: (S.NEW, (ReplyCancel(C.USER),)),
    In.LOCAL_CANCEL: (S.NEW, (ReplyCancel(C.USER),)),
    In.LOCAL_REQUEST: (S.REQUESTED_OUT, (SendRequest(),)),
    In.START_THEY_WIN: (S.NEW, (Ignore(),)),
    In.START_WE_WIN: (S.NEW, (Ignore(),)),
    In.START_METHOD_CONFLICT: (S.NEW, (Ignore(),)),
    In.COMMITMENT_MISMATCH: (S.NEW, (Ignore(),)),
    In.MAC_MISMATCH: (S.NEW, (Ignore(),)),
    In.WRONG_USER: (S.NEW, (Ignore(),)),
    In.OTHER_DEVICE: (S.NEW, (Ignore(),)),
    In.DUPLICATE: (S.NEW, (Ignore(),)),
    In.TIMEOUT: (S.NEW, (Ignore(),)),
    In.LOCAL_START: (S.NEW, (RejectLocal(),)),
    In.LOCAL_READY: (S.NEW, (RejectLocal(),)),
    In.LOCAL_CONFIRM: (S.NEW, (RejectLocal(),)),
    In.LOCAL_MISMATCH: (S.NEW, (RejectLocal(),)),
}

LOCAL = {In.LOCAL_REQUEST, In.LOCAL_READY, In.LOCAL_START, In.LOCAL_CONFIRM, In.LOCAL_MISMATCH}


def expected(state: State, inp: Input) -> tuple[State, tuple[Action, ...]]:
    if state in (S.DONE, S.CANCELLED):
        return (state, (Ignore(),))  # nothing is ever sent after the end
    if state is S.NEW:
        return NEW_ROW[inp]
    if (state, inp) in FLOW:
        return FLOW[(state, inp)]
    if inp is In.CANCEL:
        return (S.CANCELLED, ())  # never answer a cancel
    if inp is In.TIMEOUT:
        return cancel(C.TIMEOUT)
    if inp is In.LOCAL_CANCEL:
        return cancel(C.USER)
    if inp is In.MALFORMED:
        return cancel(C.INVALID_MESSAGE)
    if inp is In.WRONG_USER:
        return (state, (ReplyCancel(C.USER_MISMATCH),))
    if inp in (In.OTHER_DEVICE, In.DUPLICATE):
        return (state, (Ignore(),))
    if inp is In.CONCURRENT_ATTEMPT:
        return cancel(C.USER)
    if inp in LOCAL:
        return (state, (RejectLocal(),))
    return cancel(C.UNEXPECTED_MESSAGE)


ALL_PAIRS = list(itertools.product(list(S), list(In)))


def test_cartesian_product_size() -> None:
    assert len(S) == 17
    assert len(In) == 26
    assert len(ALL_PAIRS) == 17 * 26


@pytest.mark.parametrize(("state", "inp"), ALL_PAIRS, ids=lambda v: v.name)
def test_every_pair(state: State, inp: Input) -> None:
    outcome = transition(state, inp)
    assert (outcome.next_state, outcome.actions) == expected(state, inp)
    if state in tbl.TERMINAL_STATES:
        assert tbl.TRANSITIONS[state] == {}
    else:
        assert tbl.TRANSITIONS[state][inp] == outcome


def test_out_of_sequence_table_is_exact() -> None:
    for state in LIVE:
        if state is S.NEW:
            continue
        unexpected = {inp for inp in In if expected(state, inp) == cancel(C.UNEXPECTED_MESSAGE)}
        assert tbl.OUT_OF_SEQUENCE[state] == unexpected, state


def test_check_complete_passes_and_catches_a_hole(monkeypatch: pytest.MonkeyPatch) -> None:
    tbl.check_complete()
    broken = {s: dict(row) for s, row in tbl.TRANSITIONS.items()}
    del broken[S.READY][In.KEY]
    monkeypatch.setattr(tbl, "TRANSITIONS", broken)
    with pytest.raises(RuntimeError, match="READY"):
        tbl.check_complete()


def test_check_complete_catches_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    oos = dict(tbl.OUT_OF_SEQUENCE)
    oos[S.READY] = oos[S.READY] | {In.START}
    monkeypatch.setattr(tbl, "OUT_OF_SEQUENCE", oos)
    with pytest.raises(RuntimeError, match="both a move and out of sequence"):
        tbl.check_complete()


def test_cancel_code_of_outcome() -> None:
    assert transition(S.READY, In.KEY).cancel_code is C.UNEXPECTED_MESSAGE
    assert transition(S.NEW, In.KEY).cancel_code is C.UNKNOWN_TRANSACTION
    assert transition(S.READY, In.START).cancel_code is None


def test_table_module_imports_no_events_no_crypto() -> None:
    source = Path(tbl.__file__).read_text("utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {
        "__future__",
        "enum",
        "time",
        "collections",
        "collections.abc",
        "dataclasses",
        "types",
        "typing",
        ".._types",
        "..codes",
    }, imported


def test_table_and_events_share_one_cancel_code_enum() -> None:
    from bot_toolkit import events  # noqa: PLC0415

    assert C is events.CancelCode


# ------------------------------------------------------------------------------------------
# Invariants over random input sequences.

SENDS_TO_PEER = (SendCancel, ReplyCancel)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(list(In)), max_size=40))
def test_invariants_on_random_sequences(inputs: list[Input]) -> None:
    state = S.NEW
    counts: dict[type, int] = {}
    confirmed = mac_ok = False
    for inp in inputs:
        outcome = transition(state, inp)
        if state in tbl.TERMINAL_STATES:
            assert outcome.next_state is state
            assert all(isinstance(a, Ignore) for a in outcome.actions)
        if inp is In.CANCEL:
            assert not any(isinstance(a, SENDS_TO_PEER) for a in outcome.actions)
        for action in outcome.actions:
            counts[type(action)] = counts.get(type(action), 0) + 1
            if isinstance(action, MarkVerified):
                assert confirmed or inp is In.LOCAL_CONFIRM
                assert mac_ok or inp is In.MAC
        if outcome.next_state not in (state, S.CANCELLED):
            confirmed |= inp is In.LOCAL_CONFIRM
            mac_ok |= inp is In.MAC
        state = outcome.next_state
    # One transaction: at most one key, one accept, one start, one MAC, one SAS, one cancel.
    for once in (SendKey, SendAccept, SendStart, SendMac, ShowSas, MarkVerified, SendDone):
        assert counts.get(once, 0) <= 1, once
    assert counts.get(SendCancel, 0) <= 1


# ------------------------------------------------------------------------------------------
# Two state machines talking to each other.

WIRE = {
    SendRequest: In.REQUEST,
    SendReady: In.READY,
    SendStart: In.START,
    SendAccept: In.ACCEPT,
    SendKey: In.KEY,
    SendMac: In.MAC,
    SendDone: In.DONE,
    SendCancel: In.CANCEL,
}


@dataclass
class Device:
    party: Party
    method: str = "m.sas.v1"
    state: State = S.NEW
    actions: list[Action] = field(default_factory=list)
    inbox: deque[Input] = field(default_factory=deque)
    peer: Device | None = None

    def feed(self, inp: Input) -> Outcome:
        if inp is In.START:
            assert self.peer is not None
            inp = classify_start(
                self.state,
                us=self.party,
                them=self.peer.party,
                their_method=self.peer.method,
                our_method=self.method if self.state is S.STARTED_OUT else None,
                acceptable=True,
            )
        outcome = transition(self.state, inp)
        self.state = outcome.next_state
        self.actions.extend(outcome.actions)
        assert self.peer is not None
        for action in outcome.actions:
            wire = WIRE.get(type(action))
            if wire is not None:
                self.peer.inbox.append(wire)
        return outcome

    def at(self, state: State) -> bool:
        return self.state is state

    def sent(self) -> list[type]:
        return [type(a) for a in self.actions if type(a) in WIRE]


def pair(a: Party, b: Party) -> tuple[Device, Device]:
    da, db = Device(a), Device(b)
    da.peer, db.peer = db, da
    return da, db


def pump(*devices: Device) -> None:
    while any(d.inbox for d in devices):
        for d in devices:
            while d.inbox:
                d.feed(d.inbox.popleft())


ALICE = Party(UserId("@alice:example.org"), DeviceId("ALICEDEV"))
BOT = Party(UserId("@bot:example.org"), DeviceId("BOTDEV"))


def test_happy_path_bot_answers_a_request() -> None:
    element, bot = pair(ALICE, BOT)
    element.feed(In.LOCAL_REQUEST)
    pump(element, bot)
    assert bot.at(S.REQUESTED_IN)
    bot.feed(In.LOCAL_READY)
    pump(element, bot)
    assert element.at(S.READY) and bot.at(S.READY)
    element.feed(In.LOCAL_START)
    pump(element, bot)
    assert element.at(S.KEYS_EXCHANGED) and bot.at(S.KEYS_EXCHANGED)
    assert ShowSas() in element.actions and ShowSas() in bot.actions
    bot.feed(In.LOCAL_CONFIRM)
    pump(element, bot)
    assert element.at(S.MAC_RECEIVED) and bot.at(S.MAC_SENT)
    element.feed(In.LOCAL_CONFIRM)
    pump(element, bot)
    assert element.at(S.DONE) and bot.at(S.DONE)
    assert bot.sent() == [SendReady, SendAccept, SendKey, SendMac, SendDone]
    assert element.sent() == [SendRequest, SendStart, SendKey, SendMac, SendDone]
    assert bot.actions.count(MarkVerified()) == 1 == element.actions.count(MarkVerified())
    assert element.actions[1] == NotifyOthers(C.ACCEPTED)


def test_happy_path_bot_requests_and_starts() -> None:
    bot, element = pair(BOT, ALICE)
    bot.feed(In.LOCAL_REQUEST)
    pump(bot, element)
    element.feed(In.LOCAL_READY)
    pump(bot, element)
    bot.feed(In.LOCAL_START)
    pump(bot, element)
    assert bot.at(S.KEYS_EXCHANGED) and element.at(S.KEYS_EXCHANGED)
    # Both confirm before either MAC arrives.
    bot.feed(In.LOCAL_CONFIRM)
    element.feed(In.LOCAL_CONFIRM)
    assert bot.at(S.MAC_SENT) and element.at(S.MAC_SENT)
    pump(bot, element)
    assert bot.at(S.DONE) and element.at(S.DONE)
    assert bot.sent() == [SendRequest, SendStart, SendKey, SendMac, SendDone]


@pytest.mark.parametrize(
    ("a", "b", "winner"),
    [
        (ALICE, BOT, "a"),  # @alice < @bot
        (BOT, ALICE, "b"),
        # Same user: the smaller device id wins.
        (Party(UserId("@u:x"), DeviceId("AAAA")), Party(UserId("@u:x"), DeviceId("BBBB")), "a"),
        (Party(UserId("@u:x"), DeviceId("ZZ")), Party(UserId("@u:x"), DeviceId("YY")), "b"),
    ],
)
def test_start_race(a: Party, b: Party, winner: str) -> None:
    da, db = pair(a, b)
    da.feed(In.LOCAL_REQUEST)
    pump(da, db)
    db.feed(In.LOCAL_READY)
    pump(da, db)
    # Both start before seeing the other's start.
    da.feed(In.LOCAL_START)
    db.feed(In.LOCAL_START)
    pump(da, db)
    win, lose = (da, db) if winner == "a" else (db, da)
    assert win.actions.count(Ignore()) == 1  # the loser's start, ignored
    assert SendAccept() in lose.actions and SendAccept() not in win.actions
    assert win.at(S.KEYS_EXCHANGED) and lose.at(S.KEYS_EXCHANGED)
    da.feed(In.LOCAL_CONFIRM)
    db.feed(In.LOCAL_CONFIRM)
    pump(da, db)
    assert da.at(S.DONE) and db.at(S.DONE)
    assert da.sent().count(SendKey) == 1 == db.sent().count(SendKey)


def test_start_race_with_different_methods_cancels_without_a_loop() -> None:
    da, db = pair(ALICE, BOT)
    db.method = "m.reciprocate.v1"
    da.feed(In.LOCAL_REQUEST)
    pump(da, db)
    db.feed(In.LOCAL_READY)
    pump(da, db)
    da.feed(In.LOCAL_START)
    db.feed(In.LOCAL_START)
    pump(da, db)
    assert da.at(S.CANCELLED) and db.at(S.CANCELLED)
    assert SendCancel(C.UNEXPECTED_MESSAGE) in da.actions
    assert SendCancel(C.UNEXPECTED_MESSAGE) in db.actions
    assert da.sent().count(SendCancel) == 1 == db.sent().count(SendCancel)


def test_legacy_start_first_flow() -> None:
    steps = [
        (In.START, S.LEGACY_STARTED_IN, (SendAccept(),)),
        (In.KEY, S.LEGACY_KEYS_EXCHANGED, (SendKey(), ShowSas())),
        (In.LOCAL_CONFIRM, S.LEGACY_MAC_SENT, (SendMac(),)),
        (In.MAC, S.DONE, (MarkVerified(),)),  # no done in the start-first flow
    ]
    state = S.NEW
    for inp, nxt, actions in steps:
        outcome = transition(state, inp)
        assert (outcome.next_state, outcome.actions) == (nxt, actions)
        state = nxt
    # Their MAC before our confirmation.
    state = transition(transition(S.NEW, In.START).next_state, In.KEY).next_state
    state = transition(state, In.MAC).next_state
    assert state is S.LEGACY_MAC_RECEIVED
    final = transition(state, In.LOCAL_CONFIRM)
    assert final == Outcome(S.DONE, (SendMac(), MarkVerified()))


def test_request_declined_by_one_device_notifies_the_others() -> None:
    outcome = transition(S.REQUESTED_OUT, In.CANCEL)
    assert outcome == Outcome(S.CANCELLED, (NotifyOthers(C.USER),))
    assert outcome.cancel_code is None  # nothing goes back to the device that cancelled


# ------------------------------------------------------------------------------------------
# Start race and classification helpers.


def test_start_race_helper() -> None:
    assert start_race(ALICE, BOT, "m.sas.v1", "m.sas.v1") is StartRace.WE_WIN
    assert start_race(BOT, ALICE, "m.sas.v1", "m.sas.v1") is StartRace.THEY_WIN
    assert start_race(ALICE, BOT, "m.sas.v1", "m.reciprocate.v1") is StartRace.METHOD_CONFLICT
    same_a = Party(UserId("@u:x"), DeviceId("A"))
    same_b = Party(UserId("@u:x"), DeviceId("B"))
    assert start_race(same_a, same_b, "m.sas.v1", "m.sas.v1") is StartRace.WE_WIN
    assert start_race(same_b, same_a, "m.sas.v1", "m.sas.v1") is StartRace.THEY_WIN
    # User id decides before device id.
    lo = Party(UserId("@a:x"), DeviceId("ZZZ"))
    hi = Party(UserId("@b:x"), DeviceId("AAA"))
    assert start_race(lo, hi, "m.sas.v1", "m.sas.v1") is StartRace.WE_WIN
    with pytest.raises(ValueError):
        start_race(ALICE, ALICE, "m.sas.v1", "m.sas.v1")


def test_classify_start() -> None:
    def classify(state: State, *, us: Party, acceptable: bool, theirs: str = "m.sas.v1") -> Input:
        them = BOT if us == ALICE else ALICE
        return classify_start(
            state,
            us=us,
            them=them,
            their_method=theirs,
            our_method="m.sas.v1",
            acceptable=acceptable,
        )

    assert classify(S.READY, us=BOT, acceptable=True) is In.START
    assert classify(S.READY, us=BOT, acceptable=False) is In.UNKNOWN_METHOD
    assert classify(S.NEW, us=BOT, acceptable=True) is In.START
    assert classify(S.STARTED_OUT, us=BOT, acceptable=True) is In.START_THEY_WIN
    assert classify(S.STARTED_OUT, us=BOT, acceptable=False) is In.UNKNOWN_METHOD
    assert classify(S.STARTED_OUT, us=ALICE, acceptable=False) is In.START_WE_WIN
    assert (
        classify(S.STARTED_OUT, us=ALICE, acceptable=True, theirs="m.reciprocate.v1")
        is In.START_METHOD_CONFLICT
    )
    with pytest.raises(ValueError):
        classify_start(
            S.STARTED_OUT,
            us=BOT,
            them=ALICE,
            their_method="m.sas.v1",
            our_method=None,
            acceptable=True,
        )


# ------------------------------------------------------------------------------------------
# Policy helpers, with injected clocks.


NOW = 1_700_000_000.0  # wall clock seconds
NOW_MS = int(NOW * 1000)


@pytest.mark.parametrize(
    ("offset_ms", "fresh"),
    [
        (0, True),
        (-600_000, True),  # exactly 10 minutes old
        (-600_001, False),
        (300_000, True),  # exactly 5 minutes in the future
        (300_001, False),
        (-3_600_000, False),
        (86_400_000, False),
    ],
)
def test_request_age(offset_ms: int, fresh: bool) -> None:
    assert request_is_fresh(NOW_MS + offset_ms, NOW) is fresh


def test_request_prompt_lapse() -> None:
    assert request_prompt_lapse(NOW_MS, NOW) == 120.0  # 2 min after receipt comes first
    assert request_prompt_lapse(NOW_MS - 540_000, NOW) == pytest.approx(60.0)  # 9 min old
    assert request_prompt_lapse(NOW_MS - 700_000, NOW) == 0.0
    assert request_prompt_lapse(NOW_MS + 200_000, NOW) == 120.0


def test_timers_overall_timeout() -> None:
    clock = FakeClock(1_000.0)
    timers = TransactionTimers(clock)
    txn = TransactionId("t1")
    timers.begin(txn)
    for _ in range(9):
        clock.advance(60)
        timers.touch(txn)
    assert timers.timed_out() == ()
    clock.advance(59.9)
    timers.touch(txn)
    assert timers.timed_out() == ()
    clock.advance(0.1)  # 10 minutes since creation, although busy
    assert timers.timed_out() == (txn,)


def test_timers_idle_timeout_and_touch() -> None:
    clock = FakeClock(1_000.0)
    timers = TransactionTimers(clock, verification=600, idle=60)
    a, b = TransactionId("a"), TransactionId("b")
    timers.begin(a)
    timers.begin(b)
    clock.advance(50)
    timers.touch(a)
    clock.advance(10)
    assert timers.timed_out() == (b,)
    assert timers.deadline(a) == clock.now + 50


def test_timers_request_lapse() -> None:
    clock = FakeClock(1_000.0)
    timers = TransactionTimers(clock)
    txn = TransactionId("r")
    timers.begin(txn, lapse_in=request_prompt_lapse(NOW_MS, NOW))
    clock.advance(119)
    assert timers.timed_out() == ()
    clock.advance(1)
    assert timers.timed_out() == (txn,)
    timers.clear_lapse(txn)  # answered: only the 10-minute rules remain
    assert timers.timed_out() == ()


def test_timers_finished_ids_kept_then_forgotten() -> None:
    clock = FakeClock(1_000.0)
    timers = TransactionTimers(clock)
    txn = TransactionId("f")
    timers.begin(txn)
    clock.advance(30)
    timers.finish(txn)
    assert timers.deadline(txn) is None
    clock.advance(1_000)
    assert timers.timed_out() == ()  # finished transactions never time out
    clock.advance(-1_000 + 599)
    assert timers.expired() == ()
    assert txn in timers
    clock.advance(1)
    assert timers.expired() == (txn,)
    assert txn not in timers


def test_error_reply_limiter() -> None:
    clock = FakeClock(1_000.0)
    limiter = ErrorReplyLimiter(limit=3, window=60, clock=clock)
    assert [limiter.allow(ALICE) for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow(BOT)  # another peer has its own budget
    clock.advance(59)
    assert not limiter.allow(ALICE)
    clock.advance(1)
    assert limiter.allow(ALICE)


def test_error_reply_limiter_stops_a_loop_between_two_buggy_clients() -> None:
    clock = FakeClock(1_000.0)
    ours = ErrorReplyLimiter(limit=5, window=60, clock=clock)
    sent = 0
    for _ in range(1_000):  # a peer that answers every cancel with an error
        if ours.allow(ALICE):
            sent += 1
        clock.advance(0.01)
    assert sent == 5


def test_error_reply_limiter_bounded_memory() -> None:
    limiter = ErrorReplyLimiter(limit=1, window=60, clock=FakeClock(1_000.0), max_peers=2)
    peers = [Party(UserId(f"@u{i}:x"), DeviceId("D")) for i in range(3)]
    for p in peers:
        assert limiter.allow(p)
    assert limiter.allow(peers[0])  # evicted, so it starts afresh
    with pytest.raises(ValueError):
        ErrorReplyLimiter(limit=0)


def test_attempt_tracker() -> None:
    tracker = AttemptTracker()
    t1, t2, t3 = TransactionId("t1"), TransactionId("t2"), TransactionId("t3")
    assert tracker.begin(ALICE, t1) == ()
    assert tracker.begin(ALICE, t1) == ()  # the same transaction again is not a new attempt
    assert tracker.begin(BOT, t3) == ()  # another device is independent
    assert tracker.begin(ALICE, t2) == (t1,)  # cancel t1 and t2
    assert tracker.live(ALICE) == {t1}  # t2 was not registered
    same_user_other_device = Party(ALICE.user_id, DeviceId("OTHER"))
    assert tracker.begin(same_user_other_device, t2) == ()
    tracker.end(t1)
    assert tracker.begin(ALICE, TransactionId("t4")) == ()


def test_concurrent_attempts_cancel_all() -> None:
    # The manager's recipe: the old attempts get CONCURRENT_ATTEMPT, the new one is refused.
    for state in (S.REQUESTED_IN, S.READY, S.KEYS_EXCHANGED):
        assert transition(state, In.CONCURRENT_ATTEMPT) == Outcome(
            S.CANCELLED, (SendCancel(C.USER),)
        )
    assert transition(S.NEW, In.CONCURRENT_ATTEMPT) == Outcome(S.NEW, (ReplyCancel(C.USER),))


def test_accepted_notice_targets() -> None:
    devices = [DeviceId("A"), DeviceId("B"), DeviceId("C")]
    assert accepted_notice_targets(devices, DeviceId("B")) == ("A", "C")
    assert accepted_notice_targets([DeviceId("B")], DeviceId("B")) == ()
    with pytest.raises(ValueError):
        accepted_notice_targets([DeviceId("*")], DeviceId("B"))
