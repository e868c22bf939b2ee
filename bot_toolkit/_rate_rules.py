"""In-memory rate rules for key sharing: claim backoff, per-sender budgets, notice de-duplication.

Bounded (least recently used out), clocks injected. Public through :mod:`bot_toolkit.withheld`.
"""

from __future__ import annotations

import time
from typing import Final

from bot_toolkit._bounded import BoundedMap
from bot_toolkit._withheld_wire import Clock, PeerDevice, WithheldMetrics

CLAIM_BACKOFF_BASE: Final = 15.0
"""Seconds to wait after the first failed one-time-key claim for a device."""
CLAIM_BACKOFF_CAP: Final = 15 * 60.0
"""The longest wait between claims for one device."""

SENDER_BURST: Final = 10
"""Answers (withheld replies, device-list queries) one sender user may cause at once."""
SENDER_REFILL: Final = 30.0
"""Seconds after which a sender user may cause one more answer, up to :data:`SENDER_BURST`."""
SENDER_TRACKED: Final = 10_000
"""Sender users whose budget is remembered; the least recently seen is forgotten first."""


class ClaimBackoff:
    """Spacing of one-time-key claims for devices whose last claim returned no key.

    After the n-th failure in a row the next claim waits ``base * 2**(n-1)`` seconds, at most
    ``cap``: 15 s, 30 s, 1 min, ... 15 min. A success forgets the device. In memory only: after
    a restart the first claim is tried again (and the ledger keeps the notice silent).
    """

    def __init__(
        self,
        clock: Clock = time.monotonic,
        *,
        base: float = CLAIM_BACKOFF_BASE,
        cap: float = CLAIM_BACKOFF_CAP,
        max_entries: int = 100_000,
    ) -> None:
        self._clock = clock
        self.base = base
        self.cap = cap
        # device -> (failures in a row, time the next claim is allowed)
        self._state: BoundedMap[PeerDevice, tuple[int, float]] = BoundedMap(max_entries)

    def due(self, device: PeerDevice) -> bool:
        """Whether a claim for ``device`` may be made now."""
        state = self._state.get(device)
        return state is None or self._clock() >= state[1]

    def failures(self, device: PeerDevice) -> int:
        """Failed claims in a row for ``device``."""
        state = self._state.get(device)
        return 0 if state is None else state[0]

    def failed(self, device: PeerDevice) -> float:
        """Record a failed claim; returns the wait before the next one."""
        failures = self.failures(device) + 1
        delay = min(self.base * float(2 ** (failures - 1)), self.cap)
        self._state[device] = (failures, self._clock() + delay)
        return delay

    def succeeded(self, device: PeerDevice) -> None:
        """Forget ``device``: its next failure starts again at ``base``."""
        self._state.pop(device, None)


class SenderRateLimit:
    """A token bucket per sender user for work that any Matrix user can make the bot do.

    Each sender starts with ``burst`` tokens and gets one more every ``refill`` seconds, up to
    ``burst``; :meth:`allow` takes one. In memory, for at most ``max_senders`` senders (least
    recently seen forgotten first; a forgotten sender starts with a full bucket again).
    """

    def __init__(
        self,
        clock: Clock = time.monotonic,
        *,
        burst: int = SENDER_BURST,
        refill: float = SENDER_REFILL,
        max_senders: int = SENDER_TRACKED,
    ) -> None:
        if burst < 1 or refill <= 0 or max_senders < 1:
            raise ValueError("burst and max_senders must be >= 1, refill > 0")
        self._clock = clock
        self.burst = burst
        self.refill = refill
        # sender -> (tokens, time they were counted)
        self._buckets: BoundedMap[str, tuple[float, float]] = BoundedMap(max_senders)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, sender: str) -> bool:
        """Take one token of ``sender``; False (nothing taken) when its bucket is empty."""
        now = self._clock()
        state = self._buckets.pop(sender, None)
        if state is None:
            tokens = float(self.burst)
        else:
            tokens, since = state
            tokens = min(float(self.burst), tokens + max(0.0, now - since) / self.refill)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[sender] = (tokens, now)
        return allowed


class WithheldDeduper:
    """Send ``m.blacklisted`` / ``m.unverified`` once per device and Megolm session.

    In memory, bounded (least recently used out). nio 0.26 keeps outbound Megolm sessions in
    memory only, so after a restart every session id is new and nothing here needs to survive.
    """

    def __init__(self, metrics: WithheldMetrics | None = None, *, max_entries: int = 100_000):
        self._metrics = metrics or WithheldMetrics(None)
        self._seen: BoundedMap[tuple[PeerDevice, str, str], None] = BoundedMap(max_entries)

    def first(self, device: PeerDevice, session_id: str, code: str) -> bool:
        """True the first time for (device, session, code); later calls count a suppression."""
        key = (device, session_id, code)
        if key in self._seen:
            self._seen.touch(key)
            self._metrics.suppressed.inc(code)
            return False
        self._seen[key] = None
        return True

    def forget(self, device: PeerDevice, session_id: str, code: str) -> None:
        """Undo :meth:`first` (the send failed before the outbox took it)."""
        self._seen.pop((device, session_id, code), None)


# ---------------------------------------------------------------------------------------------
# The persistent m.no_olm ledger
