"""The errors a peer's SAS messages cause; each carries the wire cancel code and table input.

Raised by :mod:`~bot_toolkit.verification.negotiation` and :mod:`~bot_toolkit.verification.sas`;
the manager feeds ``exc.input`` to the transition table, which decides what is sent (as in
mautrix's ``RejectKeyShare(code=...)``: the refusal carries its code, one place acts on it).
"""

from __future__ import annotations

from typing import ClassVar

from .table import CancelCode, Input

__all__ = [
    "CommitmentMismatchError",
    "InvalidSasMessageError",
    "KeyMismatchError",
    "SasError",
    "SasStateError",
    "UnknownMethodError",
]


class SasError(Exception):
    """A peer's message failed an SAS check. ``code``: the cancel code; ``input``: table input."""

    code: ClassVar[CancelCode]
    input: ClassVar[Input]


class UnknownMethodError(SasError):
    """No common key agreement, hash, MAC or SAS method, or a choice we did not offer."""

    code = CancelCode.UNKNOWN_METHOD
    input = Input.UNKNOWN_METHOD


class CommitmentMismatchError(SasError):
    """Their key does not match the commitment of their accept."""

    code = CancelCode.MISMATCHED_COMMITMENT
    input = Input.COMMITMENT_MISMATCH


class KeyMismatchError(SasError):
    """Their MAC message does not verify."""

    code = CancelCode.KEY_MISMATCH
    input = Input.MAC_MISMATCH


class InvalidSasMessageError(SasError):
    """A field has the wrong type, or their key is not a usable Curve25519 public key."""

    code = CancelCode.INVALID_MESSAGE
    input = Input.MALFORMED


class SasStateError(RuntimeError):
    """The caller used a :class:`SasSession` out of order (a bug, not a peer's fault)."""
