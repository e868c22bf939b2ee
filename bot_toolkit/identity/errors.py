"""Typed identity errors; ``str()`` is one line and never contains key material."""

from __future__ import annotations

__all__ = [
    "IdentityError",
    "IdentityMismatchError",
    "InteractiveAuthError",
    "NoSecretStorageError",
]


class IdentityError(RuntimeError):
    """The cross-signing identity cannot be set up or used (base class)."""


class InteractiveAuthError(IdentityError):
    """The homeserver wants interactive auth we cannot complete (no password, other stages)."""


class NoSecretStorageError(IdentityError):
    """The account has no (default) secret storage key, or a secret is missing from it."""


class IdentityMismatchError(IdentityError):
    """Keys we hold (locally, from secret storage or from another device) are not the ones the
    homeserver publishes for the user."""
