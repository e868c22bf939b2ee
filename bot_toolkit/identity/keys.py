"""The three cross-signing keys of one user and their published (public) form.

Spec: "Cross-signing" in the end-to-end encryption module, and
``POST /_matrix/client/v3/keys/device_signing/upload``. The master key signs the self-signing and
user-signing keys; the self-signing key signs the user's devices; the user-signing key signs other
users' master keys. Key ids are ``ed25519:`` + the unpadded base64 public key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from bot_toolkit.identity.signing import SignatureError, SigningKey, verify_signature

__all__ = [
    "SECRET_NAMES",
    "CrossSigningKeys",
    "KeyMismatchError",
    "PublishedKeys",
    "public_key_of",
]

MASTER: Final = "master"
SELF_SIGNING: Final = "self_signing"
USER_SIGNING: Final = "user_signing"

SECRET_NAMES: Final[Mapping[str, str]] = {
    MASTER: "m.cross_signing.master",
    SELF_SIGNING: "m.cross_signing.self_signing",
    USER_SIGNING: "m.cross_signing.user_signing",
}
"""Secret-storage / secret-sharing names of the three private keys (spec)."""


class KeyMismatchError(ValueError):
    """Private keys do not match the public keys the homeserver publishes for the user."""


def public_key_of(key_json: Any, usage: str, user_id: str) -> str:
    """The one ed25519 public key of a published cross-signing key object.

    Raises :class:`ValueError` when the object is malformed, for another user or usage.
    """
    if not isinstance(key_json, Mapping):
        raise ValueError(f"{usage} key: not an object")
    if key_json.get("user_id") != user_id:
        raise ValueError(f"{usage} key: belongs to another user")
    usages = key_json.get("usage")
    if not isinstance(usages, list) or usage not in usages:
        raise ValueError(f"{usage} key: usage does not include {usage!r}")
    keys = key_json.get("keys")
    if not isinstance(keys, Mapping) or len(keys) != 1:
        raise ValueError(f"{usage} key: must hold exactly one key")
    ((key_id, public),) = keys.items()
    if not isinstance(public, str) or key_id != f"ed25519:{public}":
        raise ValueError(f"{usage} key: key id is not ed25519:<public key>")
    return public


@dataclass(frozen=True, slots=True)
class PublishedKeys:
    """The public cross-signing keys of a user, as ``/keys/query`` returns them, checked.

    ``user_signing`` is ``None`` for other users (only the owner sees it). Construction checks
    that the self-signing (and user-signing) keys carry a valid master-key signature.
    """

    user_id: str
    master: str
    self_signing: str
    user_signing: str | None
    master_json: Mapping[str, Any]

    @classmethod
    def from_query(cls, user_id: str, body: Mapping[str, Any]) -> PublishedKeys | None:
        """From a ``/keys/query`` response body; ``None`` when the user has no master key.

        Raises :class:`ValueError` when the keys are present but malformed or not signed by
        the master key.
        """

        def section(name: str) -> Any:
            part = body.get(name)
            return part.get(user_id) if isinstance(part, Mapping) else None

        master_json = section("master_keys")
        if master_json is None:
            return None
        master = public_key_of(master_json, MASTER, user_id)
        ssk_json = section("self_signing_keys")
        if ssk_json is None:
            raise ValueError("the user has a master key but no self-signing key")
        ssk = public_key_of(ssk_json, SELF_SIGNING, user_id)
        usk = None
        usk_json = section("user_signing_keys")
        if usk_json is not None:
            usk = public_key_of(usk_json, USER_SIGNING, user_id)
        try:
            verify_signature(ssk_json, user_id, f"ed25519:{master}", master)
            if usk_json is not None:
                verify_signature(usk_json, user_id, f"ed25519:{master}", master)
        except SignatureError as e:
            raise ValueError(f"cross-signing keys not signed by the master key: {e}") from None
        return cls(user_id, master, ssk, usk, master_json)

    def device_signed(self, device_json: Mapping[str, Any]) -> bool:
        """Whether a device's key object carries a valid signature by the self-signing key."""
        try:
            verify_signature(
                device_json, self.user_id, f"ed25519:{self.self_signing}", self.self_signing
            )
        except SignatureError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class CrossSigningKeys:
    """The three private cross-signing keys of ``user_id``. Never logged (``repr`` hides them)."""

    user_id: str
    master: SigningKey
    self_signing: SigningKey
    user_signing: SigningKey

    @classmethod
    def generate(cls, user_id: str) -> CrossSigningKeys:
        """Three new random keys."""
        return cls(user_id, SigningKey.generate(), SigningKey.generate(), SigningKey.generate())

    def by_usage(self) -> dict[str, SigningKey]:
        """``{"master": ..., "self_signing": ..., "user_signing": ...}``."""
        return {
            MASTER: self.master,
            SELF_SIGNING: self.self_signing,
            USER_SIGNING: self.user_signing,
        }

    def _key_json(self, usage: str, key: SigningKey) -> dict[str, Any]:
        return {"user_id": self.user_id, "usage": [usage], "keys": {key.key_id: key.public_key}}

    def master_json(self) -> dict[str, Any]:
        """The public master key object (unsigned; devices may sign it later)."""
        return self._key_json(MASTER, self.master)

    def upload_body(self) -> dict[str, Any]:
        """The body of ``POST /keys/device_signing/upload`` (without ``auth``)."""
        return {
            "master_key": self.master_json(),
            "self_signing_key": self.master.sign_json(
                self._key_json(SELF_SIGNING, self.self_signing), self.user_id
            ),
            "user_signing_key": self.master.sign_json(
                self._key_json(USER_SIGNING, self.user_signing), self.user_id
            ),
        }

    def check_against(self, published: PublishedKeys) -> None:
        """Raise :class:`KeyMismatchError` unless every key matches the published public key.

        The user-signing key is compared only when the homeserver showed it.
        """
        pairs = [(MASTER, self.master, published.master)]
        pairs.append((SELF_SIGNING, self.self_signing, published.self_signing))
        if published.user_signing is not None:
            pairs.append((USER_SIGNING, self.user_signing, published.user_signing))
        wrong = [usage for usage, key, public in pairs if key.public_key != public]
        if wrong:
            raise KeyMismatchError(
                "the private " + ", ".join(wrong) + " key(s) do not match the keys the "
                "homeserver publishes for " + self.user_id
            )

    def __repr__(self) -> str:
        return f"CrossSigningKeys({self.user_id!r}, master={self.master.public_key!r})"
