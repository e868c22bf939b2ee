"""Lifecycle events of the verification manager, and what its confirmation policy is shown.

The :class:`~bot_toolkit.verification.manager.VerificationManager` puts these local events (they
never come from the wire) into the dispatcher with ``put_nowait``, so a bot registers handlers for
them like for any to-device event::

    @dispatcher.on(SasReady)
    async def show(event: SasReady) -> None: ...

Each carries ``transaction_id`` (the dispatcher orders the events of one transaction) and the
peer's ``user_id`` / ``device_id``. Nothing secret is in them: the SAS emoji and decimals are
meant to be shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "SasPrompt",
    "SasReady",
    "VerificationCancelled",
    "VerificationDone",
    "VerificationRequested",
    "format_sas",
]


def format_sas(emoji: Sequence[tuple[str, str]], decimals: Sequence[int] | None) -> str:
    """The SAS as one line of text: ``"🐶 Dog, 🔑 Key, ..."`` and/or ``"1234 5678 9012"``."""
    parts = []
    if emoji:
        parts.append(", ".join(f"{e} {name}" for e, name in emoji))
    if decimals:
        parts.append(" ".join(str(d) for d in decimals))
    return " | ".join(parts)


@dataclass(frozen=True, slots=True)
class VerificationRequested:
    """A verification transaction began: a request came in (``incoming``) or we sent one.

    Also raised for a start without a request (the deprecated start-first flow).
    """

    transaction_id: str
    user_id: str
    device_id: str | None
    """The peer device; ``None`` for our own request until a device answers."""
    incoming: bool
    room_id: str | None = None
    """The room of an in-room flow (then ``transaction_id`` is the request's event id)."""


class _ShowsSas:
    """``text``: the SAS of an event that carries one, as one line to show a person."""

    __slots__ = ()
    emoji: tuple[tuple[str, str], ...]
    decimals: tuple[int, int, int] | None

    @property
    def text(self) -> str:
        """The SAS as one line: ``"🐶 Dog, 🔑 Key, ... | 1234 5678 9012"``."""
        return format_sas(self.emoji, self.decimals)


@dataclass(frozen=True, slots=True)
class SasReady(_ShowsSas):
    """Keys are exchanged: both sides now show this SAS and wait for a decision."""

    transaction_id: str
    user_id: str
    device_id: str
    emoji: tuple[tuple[str, str], ...]
    """``(emoji, English description)`` pairs; empty when emoji were not agreed."""
    decimals: tuple[int, int, int] | None
    """The three numbers; ``None`` when decimals were not agreed."""
    room_id: str | None = None
    """The room of an in-room flow, else ``None``."""


@dataclass(frozen=True, slots=True)
class VerificationDone:
    """The peer device was verified (and marked verified in nio's store)."""

    transaction_id: str
    user_id: str
    device_id: str
    verified_keys: tuple[str, ...]
    """The key ids the peer's MAC verified (its device key, maybe its master key)."""
    room_id: str | None = None
    """The room of an in-room flow, else ``None``."""


@dataclass(frozen=True, slots=True)
class VerificationCancelled:
    """The transaction ended without verification.

    ``by_us``: we cancelled (timeout, error, policy, operator); ``False`` when the peer did.
    """

    transaction_id: str
    user_id: str
    device_id: str | None
    code: str
    reason: str
    by_us: bool
    room_id: str | None = None
    """The room of an in-room flow, else ``None``."""


@dataclass(frozen=True, slots=True)
class SasPrompt(_ShowsSas):
    """What the policy's ``confirm`` callback is asked to compare (same data as SasReady)."""

    transaction_id: str
    user_id: str
    device_id: str
    emoji: tuple[tuple[str, str], ...]
    decimals: tuple[int, int, int] | None
