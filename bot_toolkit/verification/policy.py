"""Verification policy: who may verify the bot, and the pure cross-transaction rules.

* :class:`VerificationPolicy`: the operator's configuration (allowed users, how a SAS is
  confirmed, limits).
* Request freshness and prompt lapse, the per-transaction timers, the per-peer error-reply cap,
  concurrent attempts from one device and the ``m.accepted`` notice targets: pure helpers with
  injected clocks, no I/O, consulted by the
  :class:`~bot_toolkit.verification.manager.VerificationManager` before it feeds the
  transition table (:mod:`bot_toolkit.verification.table`).
"""

from __future__ import annotations

import fnmatch
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Final

from .._bounded import BoundedMap
from .._types import DeviceId, TransactionId
from .lifecycle import SasPrompt
from .table import Party

__all__ = [
    "REQUEST_MAX_AGE",
    "REQUEST_MAX_FUTURE",
    "REQUEST_PROMPT_AFTER_RECEIPT",
    "TRANSACTION_IDLE_TIMEOUT",
    "VERIFICATION_TIMEOUT",
    "AttemptTracker",
    "ConfirmCallback",
    "ErrorReplyLimiter",
    "TransactionTimers",
    "VerificationPolicy",
    "accepted_notice_targets",
    "request_is_fresh",
    "request_prompt_lapse",
]

ConfirmCallback = Callable[[SasPrompt], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class VerificationPolicy:
    """Who may verify the bot, and how a SAS is confirmed.

    ``allowed_users``: a predicate on the user id, or user ids / glob patterns
    (``@*:example.org``); others are refused with ``m.user``. ``confirm``: called with the SAS
    (emoji with descriptions, decimals); True = the SAS matches, False = it does not
    (``m.mismatched_sas``). ``None`` is operator mode: the SAS waits for :meth:`confirm` /
    :meth:`cancel` (the admin API). ``auto_accept``: answer allowed requests with ready at once
    (else the operator's ``confirm(id)`` does it). ``start_as_requester``: after our own request
    was answered, send the start ourselves. ``own_devices``: device ids of the bot's own user
    that may verify it (the operator's opt-in, by name); every other device of the bot's account
    is refused, whatever ``allowed_users`` says.
    """

    allowed_users: Callable[[str], bool] | Sequence[str] = ()
    confirm: ConfirmCallback | None = None
    auto_accept: bool = True
    start_as_requester: bool = True
    key_query_timeout: float = 15.0
    max_error_replies: int = 5
    error_window: float = 60.0
    attempt_cooldown: float = 5.0
    """Seconds after a device's concurrent attempts were cancelled during which its new
    attempts are refused too (so a burst of requests ends with all of them cancelled)."""
    timeout: float = 600.0
    """Seconds before an unfinished verification is cancelled with ``m.timeout``. The spec asks
    implementations to time out within 10 minutes, so more than 600 is refused."""
    own_devices: Collection[str] = ()

    def __post_init__(self) -> None:
        if not 0 < self.timeout <= 600.0:
            raise ValueError(f"timeout must be in (0, 600] seconds, got {self.timeout}")
        if isinstance(self.own_devices, str):
            raise ValueError("own_devices: expected a collection of device ids, got a string")
        object.__setattr__(self, "own_devices", frozenset(self.own_devices))

    def allows_device(self, own_user_id: str, user_id: str, device_id: str) -> bool:
        """Whether this device may verify the bot: an allowed user, and for the bot's own
        account only the devices named in :attr:`own_devices`."""
        if user_id == own_user_id:
            return device_id in self.own_devices
        return self.allows(user_id)

    def allows(self, user_id: str) -> bool:
        """Whether ``user_id`` may verify the bot."""
        rule = self.allowed_users
        if callable(rule):
            return bool(rule(user_id))
        return any(fnmatch.fnmatchcase(user_id, pattern) for pattern in rule)


REQUEST_MAX_AGE: Final = 600.0
"""Seconds: a request whose ``timestamp`` is older is ignored."""
REQUEST_MAX_FUTURE: Final = 300.0
"""Seconds: a request whose ``timestamp`` is further in the future is ignored."""
REQUEST_PROMPT_AFTER_RECEIPT: Final = 120.0
"""Seconds after receipt at which an unanswered request prompt lapses (spec)."""
VERIFICATION_TIMEOUT: Final = 600.0
"""Seconds: a verification not completed within this time is cancelled with ``m.timeout``."""
TRANSACTION_IDLE_TIMEOUT: Final = 600.0
"""Seconds: a transaction id unused (nothing sent or received) for this long expires."""


def request_is_fresh(timestamp_ms: int, now: float) -> bool:
    """Whether a request's ``timestamp`` (POSIX ms) is acceptable at wall-clock ``now`` (s).

    The request schema: ignore it if "in the future by more than 5 minutes or more than 10
    minutes in the past".
    """
    age = now - timestamp_ms / 1000.0
    return -REQUEST_MAX_FUTURE <= age <= REQUEST_MAX_AGE


def request_prompt_lapse(timestamp_ms: int, now: float) -> float:
    """Seconds from ``now`` (wall clock, at receipt) until an unanswered request lapses.

    "10 minutes after the timestamp or 2 minutes after [receipt], whichever comes first".
    Never negative.
    """
    until_stale = timestamp_ms / 1000.0 + REQUEST_MAX_AGE - now
    return max(0.0, min(until_stale, REQUEST_PROMPT_AFTER_RECEIPT))


def accepted_notice_targets(
    recipients: Collection[DeviceId], answered_by: DeviceId
) -> tuple[DeviceId, ...]:
    """The devices that get ``m.accepted`` (or ``m.user``) once ``answered_by`` answered.

    ``recipients`` must be the explicit device ids the request went to: a ``*`` would include
    the device that answered.
    """
    if "*" in recipients:
        raise ValueError("send requests to explicit device ids, not '*'")
    return tuple(sorted(d for d in set(recipients) if d != answered_by))


class TransactionTimers:
    """Deadlines for live transactions and retention of finished transaction ids.

    A live transaction times out (feed ``Input.TIMEOUT``) at the earliest of: ``verification``
    seconds after it began, ``idle`` seconds after the last event sent or received, and an
    optional extra ``lapse_at`` (the request prompt lapse). A finished transaction id is kept
    ``idle`` seconds after its last use, so late events are ignored rather than answered with
    ``m.unknown_transaction``; then it can be forgotten.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        verification: float = VERIFICATION_TIMEOUT,
        idle: float = TRANSACTION_IDLE_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._verification = verification
        self._idle = idle
        self._created: dict[TransactionId, float] = {}
        self._last: dict[TransactionId, float] = {}
        self._lapse: dict[TransactionId, float] = {}
        self._finished: set[TransactionId] = set()

    def begin(self, txn: TransactionId, *, lapse_in: float | None = None) -> None:
        """Start the clocks for a new live transaction (``lapse_in`` seconds: extra deadline)."""
        now = self._clock()
        self._created[txn] = now
        self._last[txn] = now
        self._finished.discard(txn)
        if lapse_in is not None:
            self._lapse[txn] = now + lapse_in
        else:
            self._lapse.pop(txn, None)

    def touch(self, txn: TransactionId) -> None:
        """Record that an event of ``txn`` was just sent or received."""
        if txn in self._last:
            self._last[txn] = self._clock()

    def clear_lapse(self, txn: TransactionId) -> None:
        """Drop the extra deadline (the request was answered)."""
        self._lapse.pop(txn, None)

    def finish(self, txn: TransactionId) -> None:
        """The transaction reached a terminal state: stop its timeout, keep its id for a while."""
        if txn in self._last:
            self._finished.add(txn)
            self._last[txn] = self._clock()
            self._lapse.pop(txn, None)

    def deadline(self, txn: TransactionId) -> float | None:
        """When a live ``txn`` times out (clock units), or ``None`` if unknown or finished."""
        if txn not in self._created or txn in self._finished:
            return None
        candidates = [self._created[txn] + self._verification, self._last[txn] + self._idle]
        if txn in self._lapse:
            candidates.append(self._lapse[txn])
        return min(candidates)

    def timed_out(self) -> tuple[TransactionId, ...]:
        """Live transactions past their deadline (feed each ``Input.TIMEOUT``)."""
        now = self._clock()
        return tuple(
            sorted(t for t in self._created if (d := self.deadline(t)) is not None and now >= d)
        )

    def expired(self) -> tuple[TransactionId, ...]:
        """Finished transactions unused for ``idle`` seconds; they are forgotten here too."""
        now = self._clock()
        gone = sorted(t for t in self._finished if now >= self._last[t] + self._idle)
        for t in gone:
            self._finished.discard(t)
            self._created.pop(t, None)
            self._last.pop(t, None)
            self._lapse.pop(t, None)
        return tuple(gone)

    def __contains__(self, txn: object) -> bool:
        return txn in self._created


class ErrorReplyLimiter:
    """At most ``limit`` cancels per peer per ``window`` seconds; beyond that, silence.

    A peer is any hashable key; the engine uses the sender's user id (a device id is chosen by
    the sender, so keying by it would let one user rotate ``from_device`` past the cap).

    Consult ``allow()`` before sending any cancel caused by an inbound event (``SendCancel``,
    ``ReplyCancel``): the state still changes, only the message is dropped. Two buggy clients
    answering each other's errors thus stop after a few messages. Memory is bounded by
    ``max_peers`` (least recently seen peers are dropped first).
    """

    def __init__(
        self,
        *,
        limit: int = 5,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_peers: int = 10_000,
    ) -> None:
        if limit < 1 or window <= 0 or max_peers < 1:
            raise ValueError("limit, window and max_peers must be positive")
        self._limit = limit
        self._window = window
        self._clock = clock
        self._sent: BoundedMap[Hashable, deque[float]] = BoundedMap(max_peers)

    def allow(self, peer: Hashable) -> bool:
        """Whether a cancel to ``peer`` may go out now; records it when allowed."""
        now = self._clock()
        times = self._sent.get(peer)
        if times is None:
            times = deque()
            self._sent[peer] = times
        else:
            self._sent.touch(peer)
        while times and now - times[0] >= self._window:
            times.popleft()
        if len(times) >= self._limit:
            return False
        times.append(now)
        return True


class AttemptTracker:
    """Live verification attempts started by each peer device.

    "When the same device attempts to initiate multiple verification attempts, the recipient
    should cancel all attempts with that device." Here "multiple" means: a peer device starts a
    new transaction (an inbound request, or a start without a request) while another transaction
    it started is still live. Our own requests are not counted. A repeat of the same transaction
    id is not a new attempt.
    """

    def __init__(self) -> None:
        self._by_peer: dict[Party, set[TransactionId]] = {}
        self._peer_of: dict[TransactionId, Party] = {}

    def begin(self, peer: Party, txn: TransactionId) -> tuple[TransactionId, ...]:
        """Register an attempt by ``peer``.

        Returns the peer's *other* live attempts. If that is not empty, ``txn`` is NOT registered:
        the caller cancels all of them (feed ``Input.CONCURRENT_ATTEMPT`` to each and to the new
        one, then ``end()`` them).
        """
        live = self._by_peer.get(peer, set())
        if txn in live:
            return ()
        others = tuple(sorted(live))
        if others:
            return others
        self._by_peer.setdefault(peer, set()).add(txn)
        self._peer_of.setdefault(txn, peer)  # the first registration owns the id
        return ()

    def end(self, txn: TransactionId) -> None:
        """The attempt ended (terminal state)."""
        peer = self._peer_of.pop(txn, None)
        if peer is not None:
            live = self._by_peer.get(peer)
            if live is not None:
                live.discard(txn)
                if not live:
                    del self._by_peer[peer]

    def end_for(self, peer: Party, txn: TransactionId) -> None:
        """Drop ``peer``'s registration of ``txn`` only (another peer may own the id)."""
        live = self._by_peer.get(peer)
        if live is not None:
            live.discard(txn)
            if not live:
                del self._by_peer[peer]
        if self._peer_of.get(txn) == peer:
            del self._peer_of[txn]

    def live(self, peer: Party) -> frozenset[TransactionId]:
        """The peer's live attempts."""
        return frozenset(self._by_peer.get(peer, ()))
