"""The key verification state machine, as one explicit transition table for both transports.

Everything that changes the state of one verification transaction lives in this module, in the
tables below; nothing else assigns a :class:`State`. The module does no I/O and imports nothing from
the rest of bot_toolkit except the id types, so it can be driven and tested on its own.

How the I/O side (the manager) uses it:

1. It turns each inbound event, each local decision and each timer into one :class:`Input`. Checks
   that need data (is the sender the expected one, is this an identical repeat, does the commitment
   match, does the MAC verify, can we agree on methods, who wins a start race) are done by the
   manager with the pure helpers here and in :mod:`bot_toolkit.verification.sas`; their *outcome*
   is what it feeds in (``Input.MAC_MISMATCH``, ``Input.DUPLICATE``, ...).
2. ``transition(state, input)`` returns an :class:`Outcome`: the next state and a tuple of actions.
   Actions are plain descriptions (:class:`SendKey`, :class:`SendCancel`, ...); the manager performs
   them in order. Which cancel code goes out is decided here and only here.

Rules, from the specification's key verification framework and SAS module (see
the project's protocol notes for where implementations differ; we follow the specification):

* a received cancel is never answered; anything received in a terminal state is ignored silently;
* an event out of sequence cancels with ``m.unexpected_message``; the pairs that do so are listed
  explicitly in ``OUT_OF_SEQUENCE`` and checked at import against the moves in ``_MOVES``;
* an event with an unknown transaction id is answered with ``m.unknown_transaction``, except a
  request or start (they create a transaction) and a cancel (never answered): row ``State.NEW``;
* both sides sent a start with the same method: the start of the smaller user id (same user: the
  smaller device id) wins, the other is ignored; different methods: ``m.unexpected_message``;
* an identical repeat of an event already handled is ignored (``Input.DUPLICATE``);
* a start without a request (deprecated start-first flow) is handled in the ``LEGACY_*`` states,
  which end without ``m.key.verification.done`` (that flow predates it).

Both transports (:class:`Transport`) share the table. In a room (the flow id is the request's event
id) the spec differs in a few places; those are listed in ``IN_ROOM_DIFFERENCES`` and nowhere else:

* no ``m.accepted`` / ``m.user`` fan-out to the request's other recipients (there is one request
  event in the room; the peer's other devices see the ready themselves);
* an event from a third room member is ignored, not answered: a cancel from us into the room would
  relate to the flow and end it for the peer, so a third member could end it;
* an event relating to an unknown flow gets nothing (it may relate to any event in the room, e.g.
  another user's flow); there is no start-first flow in a room, so a start creates nothing.

The pure cross-transaction policy the manager consults (request age, timeouts, the error-reply
cap, concurrent attempts from one device, ``m.accepted`` targets) is in
:mod:`bot_toolkit.verification.policy`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, NamedTuple

from .._types import DeviceId, UserId
from ..codes import CancelCode

__all__ = [
    "ALWAYS_INPUTS",
    "EVENT_INPUTS",
    "IN_ROOM_DIFFERENCES",
    "IN_ROOM_TRANSITIONS",
    "LOCAL_STEPS",
    "OUT_OF_SEQUENCE",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Action",
    "CancelCode",
    "Ignore",
    "Input",
    "MarkVerified",
    "NotifyOthers",
    "Outcome",
    "Party",
    "RejectLocal",
    "ReplyCancel",
    "SendAccept",
    "SendCancel",
    "SendDone",
    "SendKey",
    "SendMac",
    "SendReady",
    "SendRequest",
    "SendStart",
    "ShowSas",
    "StartRace",
    "State",
    "Transport",
    "check_complete",
    "classify_start",
    "start_race",
    "transition",
]


class Transport(enum.Enum):
    """How a flow's events travel."""

    TO_DEVICE = "to_device"
    """``m.key.verification.*`` to-device messages; the flow id is ``transaction_id``."""
    IN_ROOM = "in_room"
    """Room events relating (``m.reference``) to an ``m.room.message`` request; the flow id is
    the request's event id."""


class State(enum.Enum):
    """Where one verification transaction stands, from our side."""

    NEW = "new"
    """No transaction with this id exists (yet): the row for unknown transaction ids."""
    REQUESTED_IN = "requested_in"
    """We received a request and have not answered it."""
    REQUESTED_OUT = "requested_out"
    """We sent a request; no device has answered."""
    READY = "ready"
    """Request answered with ready; either side may now send a start."""
    STARTED_OUT = "started_out"
    """We sent a start; waiting for the accept."""
    STARTED_IN = "started_in"
    """We accepted their start (after a request); waiting for their key."""
    ACCEPTED = "accepted"
    """Our start was accepted and we sent our key; waiting for their key."""
    KEYS_EXCHANGED = "keys_exchanged"
    """Keys exchanged, SAS shown; waiting for the local decision and for their MAC."""
    MAC_SENT = "mac_sent"
    """The SAS was confirmed locally and our MAC sent; waiting for their MAC."""
    MAC_RECEIVED = "mac_received"
    """Their MAC arrived and verified; waiting for the local decision."""
    WAITING_DONE = "waiting_done"
    """Both MACs done, keys marked verified, our done sent; waiting for their done."""
    LEGACY_STARTED_IN = "legacy_started_in"
    """Like ``STARTED_IN`` for a start that came without a request (deprecated start-first flow)."""
    LEGACY_KEYS_EXCHANGED = "legacy_keys_exchanged"
    """Like ``KEYS_EXCHANGED`` in the start-first flow."""
    LEGACY_MAC_SENT = "legacy_mac_sent"
    """Like ``MAC_SENT`` in the start-first flow."""
    LEGACY_MAC_RECEIVED = "legacy_mac_received"
    """Like ``MAC_RECEIVED`` in the start-first flow."""
    DONE = "done"
    """Terminal: verified."""
    CANCELLED = "cancelled"
    """Terminal: cancelled by either side, by a timeout, or by an error."""


class Input(enum.Enum):
    """Everything that can happen to a transaction.

    Inbound events are fed only when well formed, from the expected party, and not a duplicate;
    otherwise the manager feeds the matching check outcome instead.
    """

    # Inbound events.
    REQUEST = "request"
    READY = "ready"
    START = "start"
    """Their start, acceptable (``m.sas.v1`` with a common method), and no start of ours pending."""
    ACCEPT = "accept"
    KEY = "key"
    """Their key; when we sent the start, its commitment has been checked and matches."""
    MAC = "mac"
    """Their MAC; it has been verified (see ``SasSession.verify_mac``)."""
    DONE = "done"
    CANCEL = "cancel"
    """A cancel from the peer device (in ``REQUESTED_OUT``: from any device the request went
    to), even a malformed one: cancels are never answered. From another device: ``OTHER_DEVICE``.
    """

    # Start race (see classify_start): their start while ours is pending (state STARTED_OUT).
    START_THEY_WIN = "start_they_win"
    START_WE_WIN = "start_we_win"
    START_METHOD_CONFLICT = "start_method_conflict"

    # Outcomes of checks on an inbound event, fed instead of the event.
    UNKNOWN_METHOD = "unknown_method"
    """A ready/start/accept with no method, key agreement, hash, MAC or SAS method we can use."""
    COMMITMENT_MISMATCH = "commitment_mismatch"
    MAC_MISMATCH = "mac_mismatch"
    WRONG_USER = "wrong_user"
    """An event for this transaction from a user who is not the peer."""
    OTHER_DEVICE = "other_device"
    """An event for this transaction from another device of the peer user (not the one chosen)."""
    MALFORMED = "malformed"
    """An event for this transaction that failed to decode or is internally inconsistent."""
    DUPLICATE = "duplicate"
    """An identical repeat (same type, same sender device, same content) of an event handled."""
    CONCURRENT_ATTEMPT = "concurrent_attempt"
    """The peer device has another attempt in progress (see AttemptTracker): cancel them all."""

    # Local decisions and timers.
    LOCAL_REQUEST = "local_request"
    LOCAL_READY = "local_ready"
    LOCAL_START = "local_start"
    LOCAL_CONFIRM = "local_confirm"
    """The user (or the bot's policy) says the SAS matches."""
    LOCAL_MISMATCH = "local_mismatch"
    """The user says the SAS does not match."""
    LOCAL_CANCEL = "local_cancel"
    """The user or policy cancels; in ``NEW`` it refuses the inbound request/start."""
    TIMEOUT = "timeout"


# --------------------------------------------------------------------------------------------
# Actions: what the manager must do, in order. Pure descriptions, compared by value.


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Send ``m.key.verification.request`` to the peer user's devices (explicit device ids)."""


@dataclass(frozen=True, slots=True)
class SendReady:
    """Send ``m.key.verification.ready`` to the requesting device."""


@dataclass(frozen=True, slots=True)
class SendStart:
    """Send our ``m.key.verification.start`` (``SasSession.start_content``)."""


@dataclass(frozen=True, slots=True)
class SendAccept:
    """Send ``m.key.verification.accept`` for their start (``SasSession.accept``)."""


@dataclass(frozen=True, slots=True)
class SendKey:
    """Send our ephemeral key (``SasSession.our_key_event_content``)."""


@dataclass(frozen=True, slots=True)
class ShowSas:
    """Show the SAS (emoji and/or decimals, as agreed) and ask for a local decision."""


@dataclass(frozen=True, slots=True)
class SendMac:
    """Send our ``m.key.verification.mac`` (``SasSession.mac_content``)."""


@dataclass(frozen=True, slots=True)
class MarkVerified:
    """Mark the peer's keys that their MAC verified as verified."""


@dataclass(frozen=True, slots=True)
class SendDone:
    """Send ``m.key.verification.done``."""


@dataclass(frozen=True, slots=True)
class SendCancel:
    """Cancel the transaction: send ``code`` to the peer device.

    While no peer device is chosen (``REQUESTED_OUT``) it goes to every device the request went to.
    """

    code: CancelCode


@dataclass(frozen=True, slots=True)
class ReplyCancel:
    """Send ``code`` to the sender of the triggering event only; the transaction is untouched."""

    code: CancelCode


@dataclass(frozen=True, slots=True)
class NotifyOthers:
    """Send ``code`` to the request's recipients other than the answering device."""

    code: CancelCode


@dataclass(frozen=True, slots=True)
class Ignore:
    """Nothing to do; ``reason`` is for logs and is not part of equality."""

    reason: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class RejectLocal:
    """A local step that is not possible now: report it to the caller; nothing is sent."""

    reason: str = field(default="", compare=False)


Action = (
    SendRequest
    | SendReady
    | SendStart
    | SendAccept
    | SendKey
    | ShowSas
    | SendMac
    | MarkVerified
    | SendDone
    | SendCancel
    | ReplyCancel
    | NotifyOthers
    | Ignore
    | RejectLocal
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one transition."""

    next_state: State
    actions: tuple[Action, ...] = ()

    @property
    def cancel_code(self) -> CancelCode | None:
        """The code of the cancel this outcome sends to the peer or sender, if any."""
        for action in self.actions:
            if isinstance(action, SendCancel | ReplyCancel):
                return action.code
        return None


# --------------------------------------------------------------------------------------------
# The table.

TERMINAL_STATES: Final = frozenset({State.DONE, State.CANCELLED})

EVENT_INPUTS: Final = frozenset(
    {
        Input.REQUEST,
        Input.READY,
        Input.START,
        Input.ACCEPT,
        Input.KEY,
        Input.MAC,
        Input.DONE,
        Input.START_THEY_WIN,
        Input.START_WE_WIN,
        Input.START_METHOD_CONFLICT,
        Input.UNKNOWN_METHOD,
        Input.COMMITMENT_MISMATCH,
        Input.MAC_MISMATCH,
    }
)
"""Inputs that advance the flow where expected and are out of sequence everywhere else."""

ALWAYS_INPUTS: Final = frozenset(
    {
        Input.CANCEL,
        Input.TIMEOUT,
        Input.LOCAL_CANCEL,
        Input.MALFORMED,
        Input.WRONG_USER,
        Input.OTHER_DEVICE,
        Input.DUPLICATE,
        Input.CONCURRENT_ATTEMPT,
    }
)
"""Inputs with the same outcome in every live state (unless a state's moves say otherwise)."""

LOCAL_STEPS: Final = frozenset(
    {
        Input.LOCAL_REQUEST,
        Input.LOCAL_READY,
        Input.LOCAL_START,
        Input.LOCAL_CONFIRM,
        Input.LOCAL_MISMATCH,
    }
)
"""Local steps: refused (:class:`RejectLocal`, nothing sent) where not listed as a move."""

_S = State
_I = Input


def _cancel(code: CancelCode) -> Outcome:
    return Outcome(State.CANCELLED, (SendCancel(code),))


def _stay(state: State, action: Action) -> Outcome:
    return Outcome(state, (action,))


def _always(state: State) -> dict[Input, Outcome]:
    """The outcome of each ``ALWAYS_INPUTS`` member in a live state."""
    return {
        _I.CANCEL: Outcome(_S.CANCELLED),
        _I.TIMEOUT: _cancel(CancelCode.TIMEOUT),
        _I.LOCAL_CANCEL: _cancel(CancelCode.USER),
        _I.MALFORMED: _cancel(CancelCode.INVALID_MESSAGE),
        # A third party must not be able to end our transaction: answer it, keep going.
        _I.WRONG_USER: _stay(state, ReplyCancel(CancelCode.USER_MISMATCH)),
        # Another device of the peer user: it was told m.accepted (or never took part).
        _I.OTHER_DEVICE: _stay(state, Ignore("event from a device not in this transaction")),
        _I.DUPLICATE: _stay(state, Ignore("identical repeat")),
        # "the recipient should cancel all attempts with that device"; code as matrix-rust-sdk.
        _I.CONCURRENT_ATTEMPT: _cancel(CancelCode.USER),
    }


# The moves: for each live state, the inputs that do something other than the default
# (out of sequence for EVENT_INPUTS, _always() for ALWAYS_INPUTS, refusal for LOCAL_STEPS).
_MOVES: Final[dict[State, dict[Input, Outcome]]] = {
    _S.REQUESTED_IN: {
        _I.LOCAL_READY: Outcome(_S.READY, (SendReady(),)),
        # The spec dismisses an unanswered request prompt silently (10 min after its timestamp or
        # 2 min after receipt): a cancel here would also end the request for the user's other
        # devices.
        _I.TIMEOUT: Outcome(_S.CANCELLED),
    },
    _S.REQUESTED_OUT: {
        _I.READY: Outcome(_S.READY, (NotifyOthers(CancelCode.ACCEPTED),)),
        _I.UNKNOWN_METHOD: _cancel(CancelCode.UNKNOWN_METHOD),
        # One device declined: tell the request's other recipients (this does not answer the
        # cancel: the canceller gets nothing).
        _I.CANCEL: Outcome(_S.CANCELLED, (NotifyOthers(CancelCode.USER),)),
    },
    _S.READY: {
        _I.START: Outcome(_S.STARTED_IN, (SendAccept(),)),
        _I.UNKNOWN_METHOD: _cancel(CancelCode.UNKNOWN_METHOD),
        _I.LOCAL_START: Outcome(_S.STARTED_OUT, (SendStart(),)),
    },
    _S.STARTED_OUT: {
        _I.ACCEPT: Outcome(_S.ACCEPTED, (SendKey(),)),
        _I.UNKNOWN_METHOD: _cancel(CancelCode.UNKNOWN_METHOD),
        # As if only their start had been sent: ours is dropped, we accept theirs.
        _I.START_THEY_WIN: Outcome(_S.STARTED_IN, (SendAccept(),)),
        _I.START_WE_WIN: _stay(_S.STARTED_OUT, Ignore("their start lost the start race")),
    },
    _S.STARTED_IN: {
        _I.KEY: Outcome(_S.KEYS_EXCHANGED, (SendKey(), ShowSas())),
    },
    _S.LEGACY_STARTED_IN: {
        _I.KEY: Outcome(_S.LEGACY_KEYS_EXCHANGED, (SendKey(), ShowSas())),
    },
    _S.ACCEPTED: {
        _I.KEY: Outcome(_S.KEYS_EXCHANGED, (ShowSas(),)),
        _I.COMMITMENT_MISMATCH: _cancel(CancelCode.MISMATCHED_COMMITMENT),
    },
    _S.KEYS_EXCHANGED: {
        _I.MAC: Outcome(_S.MAC_RECEIVED),
        _I.MAC_MISMATCH: _cancel(CancelCode.KEY_MISMATCH),
        _I.LOCAL_CONFIRM: Outcome(_S.MAC_SENT, (SendMac(),)),
        _I.LOCAL_MISMATCH: _cancel(CancelCode.MISMATCHED_SAS),
    },
    _S.LEGACY_KEYS_EXCHANGED: {
        _I.MAC: Outcome(_S.LEGACY_MAC_RECEIVED),
        _I.MAC_MISMATCH: _cancel(CancelCode.KEY_MISMATCH),
        _I.LOCAL_CONFIRM: Outcome(_S.LEGACY_MAC_SENT, (SendMac(),)),
        _I.LOCAL_MISMATCH: _cancel(CancelCode.MISMATCHED_SAS),
    },
    _S.MAC_SENT: {
        _I.MAC: Outcome(_S.WAITING_DONE, (MarkVerified(), SendDone())),
        _I.MAC_MISMATCH: _cancel(CancelCode.KEY_MISMATCH),
        _I.LOCAL_MISMATCH: _cancel(CancelCode.MISMATCHED_SAS),
    },
    # The start-first flow predates m.key.verification.done: no done is sent or awaited.
    _S.LEGACY_MAC_SENT: {
        _I.MAC: Outcome(_S.DONE, (MarkVerified(),)),
        _I.MAC_MISMATCH: _cancel(CancelCode.KEY_MISMATCH),
        _I.LOCAL_MISMATCH: _cancel(CancelCode.MISMATCHED_SAS),
    },
    _S.MAC_RECEIVED: {
        _I.LOCAL_CONFIRM: Outcome(_S.WAITING_DONE, (SendMac(), MarkVerified(), SendDone())),
        _I.LOCAL_MISMATCH: _cancel(CancelCode.MISMATCHED_SAS),
    },
    _S.LEGACY_MAC_RECEIVED: {
        _I.LOCAL_CONFIRM: Outcome(_S.DONE, (SendMac(), MarkVerified())),
        _I.LOCAL_MISMATCH: _cancel(CancelCode.MISMATCHED_SAS),
    },
    _S.WAITING_DONE: {
        _I.DONE: Outcome(_S.DONE),
    },
}

_START_RACE = frozenset({_I.START_THEY_WIN, _I.START_WE_WIN, _I.START_METHOD_CONFLICT})

# Explicit: the event inputs that cancel with m.unexpected_message in each live state.
# check_complete() verifies that, per state, these and the moves cover EVENT_INPUTS exactly once.
OUT_OF_SEQUENCE: Final[Mapping[State, frozenset[Input]]] = MappingProxyType(
    {
        _S.REQUESTED_IN: frozenset(
            {_I.REQUEST, _I.READY, _I.START, _I.ACCEPT, _I.KEY, _I.MAC, _I.DONE}
            | _START_RACE
            | {_I.UNKNOWN_METHOD, _I.COMMITMENT_MISMATCH, _I.MAC_MISMATCH}
        ),
        _S.REQUESTED_OUT: frozenset(
            {_I.REQUEST, _I.START, _I.ACCEPT, _I.KEY, _I.MAC, _I.DONE}
            | _START_RACE
            | {_I.COMMITMENT_MISMATCH, _I.MAC_MISMATCH}
        ),
        _S.READY: frozenset(
            {_I.REQUEST, _I.READY, _I.ACCEPT, _I.KEY, _I.MAC, _I.DONE}
            | _START_RACE
            | {_I.COMMITMENT_MISMATCH, _I.MAC_MISMATCH}
        ),
        _S.STARTED_OUT: frozenset(
            # A plain START here means the race was not classified: treat it as a conflict.
            {_I.REQUEST, _I.READY, _I.START, _I.KEY, _I.MAC, _I.DONE}
            | {_I.START_METHOD_CONFLICT, _I.COMMITMENT_MISMATCH, _I.MAC_MISMATCH}
        ),
        _S.STARTED_IN: frozenset(
            {_I.REQUEST, _I.READY, _I.START, _I.ACCEPT, _I.MAC, _I.DONE}
            | _START_RACE
            | {_I.UNKNOWN_METHOD, _I.COMMITMENT_MISMATCH, _I.MAC_MISMATCH}
        ),
        _S.LEGACY_STARTED_IN: frozenset(
            {_I.REQUEST, _I.READY, _I.START, _I.ACCEPT, _I.MAC, _I.DONE}
            | _START_RACE
            | {_I.UNKNOWN_METHOD, _I.COMMITMENT_MISMATCH, _I.MAC_MISMATCH}
        ),
        _S.ACCEPTED: frozenset(
            {_I.REQUEST, _I.READY, _I.START, _I.ACCEPT, _I.MAC, _I.DONE}
            | _START_RACE
            | {_I.UNKNOWN_METHOD, _I.MAC_MISMATCH}
        ),
        _S.KEYS_EXCHANGED: frozenset(
            {_I.REQUEST, _I.READY, _I.START, _I.ACCEPT, _I.KEY, _I.DONE}
            | _START_RACE
            | {_I.UNKNOWN_METHOD, _I.COMMITMENT_MISMATCH}
        ),
        _S.LEGACY_KEYS_EXCHANGED: frozenset(
            {_I.REQUEST, _I.READY, _I.START, _I.ACCEPT, _I.KEY, _I.DONE}
            | _START_RACE
            | {_I.UNKNOWN_METHOD, _I.COMMITMENT_MISMATCH}
        ),
        _S.MAC_SENT: frozenset(
            {_I.REQUEST, _I.READY, _I.START, _I.ACCEPT, _I.KEY, _I.DONE}
            | _START_RACE
            | {_I.UNKNOWN_METHOD, _I.COMMITMENT_MISMATCH}
        ),
        _S.LEGACY_MAC_SENT: frozenset(
            {_I.REQUEST, _I.READY, _I.START, _I.ACCEPT, _I.KEY, _I.DONE}
            | _START_RACE
            | {_I.UNKNOWN_METHOD, _I.COMMITMENT_MISMATCH}
        ),
        _S.MAC_RECEIVED: frozenset(
            {_I.REQUEST, _I.READY, _I.START, _I.ACCEPT, _I.KEY, _I.MAC, _I.DONE}
            | _START_RACE
            | {_I.UNKNOWN_METHOD, _I.COMMITMENT_MISMATCH, _I.MAC_MISMATCH}
        ),
        _S.LEGACY_MAC_RECEIVED: frozenset(
            {_I.REQUEST, _I.READY, _I.START, _I.ACCEPT, _I.KEY, _I.MAC, _I.DONE}
            | _START_RACE
            | {_I.UNKNOWN_METHOD, _I.COMMITMENT_MISMATCH, _I.MAC_MISMATCH}
        ),
        _S.WAITING_DONE: frozenset(
            {_I.REQUEST, _I.READY, _I.START, _I.ACCEPT, _I.KEY, _I.MAC}
            | _START_RACE
            | {_I.UNKNOWN_METHOD, _I.COMMITMENT_MISMATCH, _I.MAC_MISMATCH}
        ),
    }
)

_NO_TXN = "needs an existing transaction"
_NOT_NOW = "not possible in this state"

# Unknown transaction ids (and the inputs that create a transaction). Written out in full.
_NEW_ROW: Final[dict[Input, Outcome]] = {
    _I.REQUEST: Outcome(_S.REQUESTED_IN),
    _I.START: Outcome(_S.LEGACY_STARTED_IN, (SendAccept(),)),
    _I.CANCEL: _stay(_S.NEW, Ignore("cancel for an unknown transaction")),
    _I.READY: _stay(_S.NEW, ReplyCancel(CancelCode.UNKNOWN_TRANSACTION)),
    _I.ACCEPT: _stay(_S.NEW, ReplyCancel(CancelCode.UNKNOWN_TRANSACTION)),
    _I.KEY: _stay(_S.NEW, ReplyCancel(CancelCode.UNKNOWN_TRANSACTION)),
    _I.MAC: _stay(_S.NEW, ReplyCancel(CancelCode.UNKNOWN_TRANSACTION)),
    _I.DONE: _stay(_S.NEW, ReplyCancel(CancelCode.UNKNOWN_TRANSACTION)),
    # A start without a request that we cannot handle (another method, no common SAS method).
    _I.UNKNOWN_METHOD: _stay(_S.NEW, ReplyCancel(CancelCode.UNKNOWN_METHOD)),
    # A malformed request or start (other event types with an unknown id are fed as their kind).
    _I.MALFORMED: _stay(_S.NEW, ReplyCancel(CancelCode.INVALID_MESSAGE)),
    # A new request/start from a device that already has an attempt in progress.
    _I.CONCURRENT_ATTEMPT: _stay(_S.NEW, ReplyCancel(CancelCode.USER)),
    # Refuse an inbound request/start by policy before any transaction exists.
    _I.LOCAL_CANCEL: _stay(_S.NEW, ReplyCancel(CancelCode.USER)),
    _I.LOCAL_REQUEST: Outcome(_S.REQUESTED_OUT, (SendRequest(),)),
    # Cannot happen without a transaction; stay silent.
    _I.START_THEY_WIN: _stay(_S.NEW, Ignore(_NO_TXN)),
    _I.START_WE_WIN: _stay(_S.NEW, Ignore(_NO_TXN)),
    _I.START_METHOD_CONFLICT: _stay(_S.NEW, Ignore(_NO_TXN)),
    _I.COMMITMENT_MISMATCH: _stay(_S.NEW, Ignore(_NO_TXN)),
    _I.MAC_MISMATCH: _stay(_S.NEW, Ignore(_NO_TXN)),
    _I.WRONG_USER: _stay(_S.NEW, Ignore(_NO_TXN)),
    _I.OTHER_DEVICE: _stay(_S.NEW, Ignore(_NO_TXN)),
    _I.DUPLICATE: _stay(_S.NEW, Ignore(_NO_TXN)),
    _I.TIMEOUT: _stay(_S.NEW, Ignore(_NO_TXN)),
    # Deprecated: "new clients should not begin verifications" with a bare start.
    _I.LOCAL_START: _stay(_S.NEW, RejectLocal("send a request first")),
    _I.LOCAL_READY: _stay(_S.NEW, RejectLocal(_NO_TXN)),
    _I.LOCAL_CONFIRM: _stay(_S.NEW, RejectLocal(_NO_TXN)),
    _I.LOCAL_MISMATCH: _stay(_S.NEW, RejectLocal(_NO_TXN)),
}


def _build() -> dict[State, Mapping[Input, Outcome]]:
    table: dict[State, Mapping[Input, Outcome]] = {_S.NEW: MappingProxyType(dict(_NEW_ROW))}
    for state, moves in _MOVES.items():
        row: dict[Input, Outcome] = {}
        for inp in Input:
            if inp in moves:
                row[inp] = moves[inp]
            elif inp in OUT_OF_SEQUENCE[state]:
                row[inp] = _cancel(CancelCode.UNEXPECTED_MESSAGE)
            elif inp in ALWAYS_INPUTS:
                row[inp] = _always(state)[inp]
            elif inp in LOCAL_STEPS:
                row[inp] = _stay(state, RejectLocal(_NOT_NOW))
        table[state] = MappingProxyType(row)
    for state in TERMINAL_STATES:
        table[state] = MappingProxyType({})
    return table


TRANSITIONS: Final[Mapping[State, Mapping[Input, Outcome]]] = MappingProxyType(_build())
"""``TRANSITIONS[state][input] -> Outcome`` for to-device flows. Terminal states map to nothing
(see transition())."""

_THIRD_MEMBER = "event from a third room member: never answered, never changes the flow"
_UNKNOWN_FLOW = "relates to no flow of ours"


def _room_differences() -> dict[tuple[State, Input], Outcome]:
    diff: dict[tuple[State, Input], Outcome] = {
        # One request event in the room: the peer's other devices see the ready or cancel
        # themselves (spec), so nothing is sent to them.
        (_S.REQUESTED_OUT, _I.READY): Outcome(_S.READY),
        (_S.REQUESTED_OUT, _I.CANCEL): Outcome(_S.CANCELLED),
        # Unknown flow ids: silence (no m.unknown_transaction into a room), and no start-first
        # flow in a room.
        (_S.NEW, _I.START): _stay(_S.NEW, Ignore("no start-first flow in a room")),
        (_S.NEW, _I.UNKNOWN_METHOD): _stay(_S.NEW, Ignore(_UNKNOWN_FLOW)),
        (_S.NEW, _I.MALFORMED): _stay(_S.NEW, Ignore("malformed request in a room")),
    }
    for inp in (_I.READY, _I.ACCEPT, _I.KEY, _I.MAC, _I.DONE):
        diff[(_S.NEW, inp)] = _stay(_S.NEW, Ignore(_UNKNOWN_FLOW))
    for state in _MOVES:
        diff[(state, _I.WRONG_USER)] = _stay(state, Ignore(_THIRD_MEMBER))
    return diff


IN_ROOM_DIFFERENCES: Final[Mapping[tuple[State, Input], Outcome]] = MappingProxyType(
    _room_differences()
)
"""Every pair whose outcome differs in a room, with the in-room outcome (see the module docs)."""


def _build_room() -> dict[State, Mapping[Input, Outcome]]:
    table: dict[State, Mapping[Input, Outcome]] = {}
    for state, row in TRANSITIONS.items():
        merged = dict(row)
        for (s, inp), outcome in IN_ROOM_DIFFERENCES.items():
            if s is state:
                merged[inp] = outcome
        table[state] = MappingProxyType(merged)
    return table


IN_ROOM_TRANSITIONS: Final[Mapping[State, Mapping[Input, Outcome]]] = MappingProxyType(
    _build_room()
)
"""``TRANSITIONS`` with ``IN_ROOM_DIFFERENCES`` applied: the table of in-room flows."""

_TERMINAL_OUTCOME = {s: Outcome(s, (Ignore("transaction already finished"),)) for s in State}


def transition(state: State, inp: Input, transport: Transport = Transport.TO_DEVICE) -> Outcome:
    """Return what ``inp`` does in ``state`` for a flow over ``transport``. Total: every pair
    has an outcome.

    In a terminal state everything is ignored silently (no cancel is ever sent after the end).
    """
    if state in TERMINAL_STATES:
        return _TERMINAL_OUTCOME[state]
    if transport is Transport.IN_ROOM:
        return IN_ROOM_TRANSITIONS[state][inp]
    return TRANSITIONS[state][inp]


def check_complete() -> None:
    """Check the table for holes and contradictions; raises ``RuntimeError``. Runs at import."""
    problems: list[str] = []
    live = [s for s in State if s not in TERMINAL_STATES]
    if set(_MOVES) != set(live) - {State.NEW} or set(OUT_OF_SEQUENCE) != set(_MOVES):
        problems.append("every live state except NEW needs a moves row and an out-of-sequence row")
    if set(Input) != EVENT_INPUTS | ALWAYS_INPUTS | LOCAL_STEPS or (
        len(EVENT_INPUTS) + len(ALWAYS_INPUTS) + len(LOCAL_STEPS) != len(Input)
    ):
        problems.append("input groups must partition Input")
    for state in _MOVES:
        moves, oos = _MOVES.get(state, {}), OUT_OF_SEQUENCE.get(state, frozenset())
        if overlap := set(moves) & oos:
            names = sorted(i.name for i in overlap)
            problems.append(f"{state}: both a move and out of sequence: {names}")
        if hole := EVENT_INPUTS - set(moves) - oos:
            names = sorted(i.name for i in hole)
            problems.append(f"{state}: event inputs with no outcome: {names}")
        if stray := oos - EVENT_INPUTS:
            problems.append(f"{state}: non-event inputs marked out of sequence: {stray}")
    for state in State:
        row = TRANSITIONS.get(state)
        if row is None:
            problems.append(f"{state}: no row")
        elif state in TERMINAL_STATES:
            if row:
                problems.append(f"{state}: terminal state with transitions")
        elif missing := set(Input) - set(row):
            problems.append(f"{state}: no outcome for {sorted(i.name for i in missing)}")
        for inp, outcome in (row or {}).items():
            if inp is Input.CANCEL and any(
                isinstance(a, SendCancel | ReplyCancel) for a in outcome.actions
            ):
                problems.append(f"{state}: a received cancel is answered")
            sends = [a for a in outcome.actions if isinstance(a, SendCancel)]
            if sends and outcome.next_state is not State.CANCELLED:
                problems.append(f"{state}/{inp}: SendCancel must end in CANCELLED")
    for (state, inp), outcome in _room_differences().items():
        if state in TERMINAL_STATES or inp not in TRANSITIONS.get(state, {}):
            problems.append(f"in-room difference for {state}/{inp} has no to-device pair")
        elif TRANSITIONS[state][inp] == outcome:
            problems.append(f"in-room difference for {state}/{inp} is no difference")
        if inp is Input.CANCEL and any(
            isinstance(a, SendCancel | ReplyCancel | NotifyOthers) for a in outcome.actions
        ):
            problems.append(f"{state}: a received cancel is answered in a room")
    if problems:
        raise RuntimeError("verification transition table: " + "; ".join(problems))


check_complete()


# --------------------------------------------------------------------------------------------
# Pure helpers the manager uses to turn events into inputs.


class Party(NamedTuple):
    """One side of a verification: a user and one of their devices."""

    user_id: UserId
    device_id: DeviceId


class StartRace(enum.Enum):
    """Result of comparing two crossing starts."""

    WE_WIN = "we_win"
    THEY_WIN = "they_win"
    METHOD_CONFLICT = "method_conflict"


def start_race(us: Party, them: Party, our_method: str, their_method: str) -> StartRace:
    """Decide between our pending start and theirs (spec: key verification framework).

    Different methods conflict. Otherwise the start from the lexicographically smaller user id
    wins; for the same user, the smaller device id (compared by code point, which for the UTF-8
    ids of the wire is also byte order).
    """
    if our_method != their_method:
        return StartRace.METHOD_CONFLICT
    if us == them:
        raise ValueError("a device cannot race against itself")
    return StartRace.WE_WIN if tuple(us) < tuple(them) else StartRace.THEY_WIN


def classify_start(
    state: State,
    *,
    us: Party,
    them: Party,
    their_method: str,
    our_method: str | None,
    acceptable: bool,
) -> Input:
    """The input for an inbound start.

    ``our_method`` is the method of the start we sent in this transaction, if any; it only
    matters in ``STARTED_OUT`` (our start pending). ``acceptable`` says whether we can handle
    their start (``negotiate_start`` found an agreement for ``m.sas.v1``).
    """
    if state is State.STARTED_OUT:
        if our_method is None:
            raise ValueError("STARTED_OUT without our start method")
        race = start_race(us, them, our_method, their_method)
        if race is StartRace.METHOD_CONFLICT:
            return Input.START_METHOD_CONFLICT
        if race is StartRace.WE_WIN:
            return Input.START_WE_WIN
        return Input.START_THEY_WIN if acceptable else Input.UNKNOWN_METHOD
    return Input.START if acceptable else Input.UNKNOWN_METHOD
