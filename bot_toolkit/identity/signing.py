"""Ed25519 signing keys and signed JSON objects (spec: "Signing JSON" in the appendices).

A :class:`SigningKey` is one Ed25519 key pair held by ``cryptography`` (vodozemac exposes no
Ed25519 secret key type, so cross-signing keys cannot live there). The private half is reachable
only through :meth:`SigningKey.seed` (for the bot's own store and secret storage); ``repr`` never
shows it.

Signing a JSON object: remove ``signatures`` and ``unsigned``, encode as canonical JSON, sign,
then add the unpadded base64 signature under ``signatures[user_id]["ed25519:<key id>"]``.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from bot_toolkit.encoding import Base64Error, canonical_json, decode_b64, unpadded_b64

__all__ = [
    "SignatureError",
    "SigningKey",
    "add_signature",
    "signable_bytes",
    "verify_signature",
]

_SEED_LEN = 32


class SignatureError(ValueError):
    """A signature is missing, malformed or does not verify."""


class SigningKey:
    """One Ed25519 key pair; the public key in unpadded base64 is also its key id."""

    __slots__ = ("_private", "public_key")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != _SEED_LEN:
            raise ValueError(f"an Ed25519 seed is {_SEED_LEN} bytes, not {len(seed)}")
        self._private = Ed25519PrivateKey.from_private_bytes(seed)
        raw = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key: str = unpadded_b64(raw)
        """The public key, unpadded base64."""

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key pair."""
        return cls(secrets.token_bytes(_SEED_LEN))

    @classmethod
    def from_b64(cls, text: str) -> SigningKey:
        """From the unpadded (or padded) base64 seed, the form secret storage keeps it in.

        Raises :class:`ValueError` for anything that is not a 32-byte seed.
        """
        try:
            return cls(decode_b64(text))
        except Base64Error as e:
            raise ValueError(f"not a base64 Ed25519 seed: {e}") from None

    @property
    def key_id(self) -> str:
        """``ed25519:<public key>``, the id under which the key is published and signs."""
        return f"ed25519:{self.public_key}"

    def seed(self) -> bytes:
        """The 32-byte private seed. Handle as a secret: never log it."""
        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def seed_b64(self) -> str:
        """The private seed in unpadded base64 (the secret-storage form). A secret."""
        return unpadded_b64(self.seed())

    def sign(self, message: bytes) -> str:
        """Ed25519 signature of ``message``, unpadded base64."""
        return unpadded_b64(self._private.sign(message))

    def sign_json(self, obj: Mapping[str, Any], user_id: str) -> dict[str, Any]:
        """A copy of ``obj`` with this key's signature added for ``user_id``."""
        return add_signature(obj, user_id, self.key_id, self.sign(signable_bytes(obj)))

    def __repr__(self) -> str:
        return f"SigningKey(public_key={self.public_key!r})"


def signable_bytes(obj: Mapping[str, Any]) -> bytes:
    """The canonical JSON a signature covers: ``obj`` without ``signatures`` and ``unsigned``."""
    return canonical_json({k: v for k, v in obj.items() if k not in ("signatures", "unsigned")})


def add_signature(
    obj: Mapping[str, Any], user_id: str, key_id: str, signature: str
) -> dict[str, Any]:
    """A deep copy of ``obj`` with ``signatures[user_id][key_id] = signature`` (others kept)."""
    out = copy.deepcopy(dict(obj))
    sigs = out.get("signatures")
    out["signatures"] = sigs = dict(sigs) if isinstance(sigs, Mapping) else {}
    mine = sigs.get(user_id)
    sigs[user_id] = {**(dict(mine) if isinstance(mine, Mapping) else {}), key_id: signature}
    return out


def verify_signature(obj: Mapping[str, Any], user_id: str, key_id: str, public_key: str) -> None:
    """Check ``obj``'s signature by ``user_id``'s ``key_id`` against ``public_key`` (base64).

    Raises :class:`SignatureError` when it is missing, malformed or wrong.
    """
    sigs = obj.get("signatures")
    sig = sigs.get(user_id, {}).get(key_id) if isinstance(sigs, Mapping) else None
    if not isinstance(sig, str):
        raise SignatureError(f"no signature by {key_id[:60]}")
    try:
        raw_key = decode_b64(public_key)
        raw_sig = decode_b64(sig)
        Ed25519PublicKey.from_public_bytes(raw_key).verify(raw_sig, signable_bytes(obj))
    except (Base64Error, ValueError, InvalidSignature):
        raise SignatureError(f"the signature by {key_id[:60]} does not verify") from None
