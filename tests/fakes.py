"""Test doubles shared by several test modules."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """A clock (a ``() -> float`` callable) that moves only when the test advances it.

    ``now`` is where it starts: pass ``time.time()`` or ``time.monotonic()`` when the code under
    test mixes it with the real wall or monotonic clock, any fixed number otherwise.
    """

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward (backward when negative)."""
        self.now += seconds
