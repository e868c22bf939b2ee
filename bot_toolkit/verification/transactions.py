"""The manager's per-transaction records and the registry that holds them.

* :class:`Txn`: one transaction (peer, state, SAS session, what was seen, the outcome).
* :class:`Ctx`: the triggering event of one transition.
* :class:`Transactions`: the live and recently finished transactions by id, with their timers
  (overall timeout, idle expiry, request lapse), a striped lock per id, and the
  ``list_in_progress`` view for the admin API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from .._types import DeviceId, TransactionId, UserId
from ..events import ToDeviceEvent, encode_content
from .info import VerificationInfo
from .lifecycle import VerificationCancelled, VerificationDone
from .policy import VERIFICATION_TIMEOUT, TransactionTimers
from .sas import SasSession
from .table import TERMINAL_STATES, CancelCode, State, Transport

__all__ = ["Ctx", "Transactions", "Txn", "fingerprint"]

_LOCK_STRIPES: Final = 64


@dataclass(eq=False)
class Txn:
    """Everything the manager knows about one transaction (the state is the table's)."""

    txn: TransactionId
    peer_user: UserId
    peer_device: DeviceId | None
    initiated_by_us: bool
    recipients: tuple[DeviceId, ...] = ()
    state: State = State.NEW
    sas: SasSession | None = None
    their_start: dict[str, Any] | None = None
    our_start_method: str | None = None
    peer_ed25519: str | None = None
    seen: set[bytes] = field(default_factory=set)
    emoji: tuple[tuple[str, str], ...] = ()
    decimals: tuple[int, int, int] | None = None
    cancel_code: str | None = None
    cancel_reason: str = ""
    cancelled_by_us: bool = True
    lapse: float | None = None
    local_reason: str | None = None
    """The reason of our next cancel when it is not the code's usual one."""
    ended: bool = False
    """The engine recorded the outcome (it does so once)."""
    no_common_method: bool = False
    """An inbound request offering no method we support: never answered with ready."""
    room_id: str | None = None
    """The room of an in-room flow (``txn`` is then the request's event id); ``None``: to-device."""
    finished: asyncio.Future[VerificationDone | VerificationCancelled] | None = None

    @property
    def transport(self) -> Transport:
        """How this flow's events travel."""
        return Transport.TO_DEVICE if self.room_id is None else Transport.IN_ROOM


@dataclass(slots=True)
class Ctx:
    """The triggering event of a transition (``None`` fields for local inputs)."""

    sender: UserId | None = None
    sender_device: DeviceId | None = None
    inbound: bool = False
    cancel_code: str | None = None
    cancel_reason: str = ""
    room_id: str | None = None
    """The room the triggering event came from (in-room flows)."""


def fingerprint(event: ToDeviceEvent) -> bytes:
    """Identity of an event for duplicate detection: type, sender, content."""
    name = getattr(event, "event_type_name", None) or type(event).event_type
    content = encode_content(event)
    return msgspec.json.encode([name, event.sender, sorted(content.items())])


class Transactions:
    """Transactions by id, their timers and locks. Finished ones stay until their id expires."""

    def __init__(
        self, clock: Callable[[], float], *, verification_timeout: float = VERIFICATION_TIMEOUT
    ) -> None:
        self.timers = TransactionTimers(clock, verification=verification_timeout)
        self._txns: dict[TransactionId, Txn] = {}
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]

    def lock(self, txn: str) -> asyncio.Lock:
        """The lock that serialises work on ``txn`` (striped: ids may share one)."""
        return self._locks[hash(txn) % _LOCK_STRIPES]

    def get(self, txn: str) -> Txn | None:
        return self._txns.get(TransactionId(txn))

    def __getitem__(self, txn: str) -> Txn:
        return self._txns[TransactionId(txn)]

    def __contains__(self, txn: object) -> bool:
        return txn in self._txns

    def __iter__(self) -> Iterator[Txn]:
        return iter(list(self._txns.values()))

    def live(self, txn: str) -> Txn:
        """A transaction that has begun and not finished; ``KeyError`` otherwise."""
        t = self._txns.get(TransactionId(txn))
        if t is None or t.state is State.NEW or t.state in TERMINAL_STATES:
            raise KeyError(txn)
        return t

    def begin(self, t: Txn) -> None:
        """Register ``t`` (it left ``NEW``) and start its timers."""
        self._txns[t.txn] = t
        t.finished = asyncio.get_running_loop().create_future()
        self.timers.begin(t.txn, lapse_in=t.lapse)

    def cancelled_earlier(self, txn: TransactionId, user: UserId, reason: str) -> None:
        """Hold ``txn``, cancelled by an earlier run of the bot, as a finished transaction.

        Later events for it are then ignored like those of any cancelled transaction (the
        table's terminal states) instead of beginning a new flow; the id is forgotten with the
        other finished ones. No outcome is recorded: it was recorded (or lost) by that run.
        """
        if txn in self._txns:
            return
        t = Txn(txn, user, None, False, state=State.CANCELLED, ended=True)
        t.cancel_code, t.cancel_reason = str(CancelCode.USER), reason
        loop = asyncio.get_running_loop()
        t.finished = loop.create_future()
        t.finished.set_result(
            VerificationCancelled(txn, user, None, t.cancel_code, reason, by_us=True)
        )
        self._txns[txn] = t
        self.timers.begin(txn)
        self.timers.finish(txn)

    def touch(self, txn: TransactionId) -> None:
        """Something was sent or received in ``txn``: reset its idle timer."""
        if txn in self.timers:
            self.timers.touch(txn)

    def finish(self, txn: TransactionId) -> None:
        self.timers.finish(txn)

    def timed_out(self) -> tuple[TransactionId, ...]:
        """Live transactions past a deadline."""
        return self.timers.timed_out()

    def forget_expired(self) -> None:
        """Drop finished transactions whose ids expired."""
        for txn in self.timers.expired():
            self._txns.pop(txn, None)

    def in_progress(self) -> list[VerificationInfo]:
        """Every live transaction: id, peer, state, SAS once known, deadline (Unix time)."""
        out = []
        for t in sorted(self._txns.values(), key=lambda x: x.txn):
            if t.state in TERMINAL_STATES or t.state is State.NEW:
                continue
            out.append(
                VerificationInfo(
                    id=t.txn,
                    user_id=t.peer_user,
                    device_id=t.peer_device or ",".join(t.recipients) or "*",
                    state=t.state.value,
                    emoji=t.emoji,
                    decimals=t.decimals,
                    deadline=self.timers.deadline(t.txn),
                    room_id=t.room_id,
                )
            )
        return out
