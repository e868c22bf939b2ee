"""What the manager reports of one verification in progress (the admin API shows it as is)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["VerificationInfo"]


@dataclass(frozen=True, slots=True)
class VerificationInfo:
    """One verification in progress, as the admin API shows it."""

    id: str
    """The transaction id."""
    user_id: str
    """The other side's user id."""
    device_id: str
    """The other side's device id."""
    state: str
    """The verification's state, e.g. ``requested``, ``started``, ``keys_exchanged``."""
    emoji: tuple[tuple[str, str], ...] = ()
    """The SAS as ``(emoji, description)`` pairs once keys are exchanged; empty before."""
    decimals: tuple[int, int, int] | None = None
    """The SAS as three numbers once keys are exchanged."""
    deadline: float | None = None
    """When the verification times out, as Unix time (``time.time()``)."""
    room_id: str | None = None
    """The room of an in-room verification (``id`` is then the request's event id)."""
