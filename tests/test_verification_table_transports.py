"""The one transition table drives both transports: every pair, and the in-room differences.

The expected in-room differences are written out here independently of the module; every other
pair must have the same outcome for both transports (tests/test_verification_table.py checks the
to-device table itself).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot_toolkit.verification import table as tbl
from bot_toolkit.verification.table import (
    CancelCode,
    Ignore,
    Input,
    NotifyOthers,
    Outcome,
    ReplyCancel,
    SendCancel,
    State,
    Transport,
    transition,
)

S, In = State, Input
LIVE_BUT_NEW = [s for s in S if s not in tbl.TERMINAL_STATES and s is not S.NEW]

EXPECTED_IN_ROOM: dict[tuple[State, Input], tuple[State, tuple[type, ...]]] = {
    # No m.accepted / m.user fan-out in a room.
    (S.REQUESTED_OUT, In.READY): (S.READY, ()),
    (S.REQUESTED_OUT, In.CANCEL): (S.CANCELLED, ()),
    # Unknown flows: silence; no start-first flow in a room.
    **{
        (S.NEW, inp): (S.NEW, (Ignore,))
        for inp in (
            In.READY,
            In.ACCEPT,
            In.KEY,
            In.MAC,
            In.DONE,
            In.START,
            In.UNKNOWN_METHOD,
            In.MALFORMED,
        )
    },
    # A third room member is never answered and never changes the flow.
    **{(s, In.WRONG_USER): (s, (Ignore,)) for s in LIVE_BUT_NEW},
}


@pytest.mark.parametrize(
    ("state", "inp"), list(itertools.product(list(S), list(In))), ids=lambda v: v.name
)
def test_every_pair_in_room(state: State, inp: Input) -> None:
    room = transition(state, inp, Transport.IN_ROOM)
    to_device = transition(state, inp, Transport.TO_DEVICE)
    assert to_device == transition(state, inp)  # to-device stays the default
    want = EXPECTED_IN_ROOM.get((state, inp))
    if want is None:
        assert room == to_device
    else:
        assert room != to_device
        assert room.next_state is want[0]
        assert tuple(type(a) for a in room.actions) == want[1]


def test_differences_are_exactly_the_listed_ones() -> None:
    assert set(tbl.IN_ROOM_DIFFERENCES) == set(EXPECTED_IN_ROOM)


def test_in_room_request_creates_a_flow_and_refusals_still_answer() -> None:
    # What still goes into the room for an unknown flow: a refused or concurrent request.
    assert transition(S.NEW, In.REQUEST, Transport.IN_ROOM) == Outcome(S.REQUESTED_IN)
    assert transition(S.NEW, In.LOCAL_CANCEL, Transport.IN_ROOM).cancel_code is CancelCode.USER
    assert (
        transition(S.NEW, In.CONCURRENT_ATTEMPT, Transport.IN_ROOM).cancel_code is CancelCode.USER
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list(In)), max_size=40))
def test_in_room_invariants_on_random_sequences(inputs: list[Input]) -> None:
    state = S.NEW
    cancels = 0
    for inp in inputs:
        outcome = transition(state, inp, Transport.IN_ROOM)
        assert not any(isinstance(a, NotifyOthers) for a in outcome.actions)
        if inp is In.CANCEL:
            assert not any(isinstance(a, SendCancel | ReplyCancel) for a in outcome.actions)
        if inp is In.WRONG_USER:
            assert outcome.next_state is state and not outcome.cancel_code
        cancels += sum(isinstance(a, SendCancel) for a in outcome.actions)
        state = outcome.next_state
    assert cancels <= 1
