"""Secret storage maths: ``m.secret_storage.v1.aes-hmac-sha2`` and ``m.pbkdf2`` (spec: "Secrets").

Pure functions, no I/O. Encrypting a secret named ``name`` with a 32-byte storage key:

1. HKDF-SHA-256(key, salt = 32 zero bytes, info = ``name``) -> 64 bytes: AES key | MAC key;
2. a random 16-byte IV with bit 63 cleared;
3. AES-CTR-256 of the UTF-8 secret;
4. HMAC-SHA-256(MAC key, ciphertext);
5. ``iv``, ``ciphertext`` and ``mac`` in unpadded base64 (readers accept padded base64 too).

A key description carries an optional key check: the same with ``name = ""`` over 32 zero bytes,
keeping only ``iv`` and ``mac``. Every failure is a :class:`SecretStorageError` subclass whose
message never contains key material.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bot_toolkit.encoding import Base64Error, decode_b64, unpadded_b64

__all__ = [
    "AES_HMAC_SHA2",
    "PBKDF2",
    "BadMacError",
    "KeyDescription",
    "MalformedSecretError",
    "SecretStorageError",
    "WrongKeyError",
    "check_key",
    "decrypt_secret",
    "derive_keys",
    "encrypt_secret",
    "key_check",
    "passphrase_key",
]

AES_HMAC_SHA2: Final = "m.secret_storage.v1.aes-hmac-sha2"
PBKDF2: Final = "m.pbkdf2"
KEY_LEN: Final = 32
_ZERO_SALT: Final = bytes(32)
_MAX_ITERATIONS: Final = 10_000_000  # a hostile key description must not stall us for hours


class SecretStorageError(ValueError):
    """Secret storage data cannot be used (base class)."""


class WrongKeyError(SecretStorageError):
    """The key does not match the key description's check (wrong recovery key or passphrase)."""


class BadMacError(SecretStorageError):
    """An encrypted secret's MAC does not match: wrong key, or the data was corrupted."""


class MalformedSecretError(SecretStorageError):
    """Secret-storage account data is malformed (missing fields, bad base64, bad algorithm)."""


def derive_keys(key: bytes, name: str) -> tuple[bytes, bytes]:
    """(AES key, MAC key) for secret ``name``: HKDF-SHA-256, zero salt, info = name."""
    okm = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=_ZERO_SALT, info=name.encode("utf-8")
    ).derive(key)
    return okm[:32], okm[32:]


def _random_iv() -> bytes:
    iv = bytearray(secrets.token_bytes(16))
    iv[8] &= 0x7F  # bit 63 cleared: AES-CTR implementations disagree on counter overflow
    return bytes(iv)


def _ctr(aes_key: bytes, iv: bytes, data: bytes) -> bytes:
    cipher = Cipher(algorithms.AES(aes_key), modes.CTR(iv)).encryptor()
    return cipher.update(data) + cipher.finalize()


def encrypt_secret(
    key: bytes, name: str, secret: str, *, iv: bytes | None = None
) -> dict[str, str]:
    """``{"iv", "ciphertext", "mac"}`` for ``secret`` (a string) under storage key ``key``."""
    if len(key) != KEY_LEN:
        raise ValueError(f"a secret storage key is {KEY_LEN} bytes")
    iv = _random_iv() if iv is None else iv
    aes_key, mac_key = derive_keys(key, name)
    ciphertext = _ctr(aes_key, iv, secret.encode("utf-8"))
    mac = hmac.new(mac_key, ciphertext, hashlib.sha256).digest()
    return {
        "iv": unpadded_b64(iv),
        "ciphertext": unpadded_b64(ciphertext),
        "mac": unpadded_b64(mac),
    }


def _field(data: Mapping[str, Any], name: str) -> bytes:
    value = data.get(name)
    if not isinstance(value, str):
        raise MalformedSecretError(f"{name!r} missing or not a string")
    try:
        return decode_b64(value)
    except Base64Error:
        raise MalformedSecretError(f"{name!r} is not base64") from None


def decrypt_secret(key: bytes, name: str, data: Mapping[str, Any]) -> str:
    """The secret ``name`` from its encrypted form (``iv``, ``ciphertext``, ``mac``).

    Raises :class:`MalformedSecretError` or :class:`BadMacError`.
    """
    if not isinstance(data, Mapping):
        raise MalformedSecretError("encrypted data is not an object")
    iv, ciphertext, mac = _field(data, "iv"), _field(data, "ciphertext"), _field(data, "mac")
    if len(iv) != 16:
        raise MalformedSecretError("'iv' is not 16 bytes")
    aes_key, mac_key = derive_keys(key, name)
    if not hmac.compare_digest(hmac.new(mac_key, ciphertext, hashlib.sha256).digest(), mac):
        raise BadMacError(f"the MAC of secret {name[:80]!r} does not match")
    try:
        return _ctr(aes_key, iv, ciphertext).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedSecretError(f"secret {name[:80]!r} is not UTF-8") from None


def key_check(key: bytes, *, iv: bytes | None = None) -> dict[str, str]:
    """``{"iv", "mac"}`` for a key description: 32 zero bytes encrypted with ``name = ""``."""
    encrypted = encrypt_secret(key, "", "\0" * 32, iv=iv)
    return {"iv": encrypted["iv"], "mac": encrypted["mac"]}


def passphrase_key(passphrase: str, salt: str, iterations: int, bits: int = 256) -> bytes:
    """The storage key from a passphrase: PBKDF2-HMAC-SHA-512 (``m.pbkdf2``)."""
    if not 0 < iterations <= _MAX_ITERATIONS:
        raise MalformedSecretError(f"m.pbkdf2 iterations out of range: {iterations}")
    if bits <= 0 or bits % 8:
        raise MalformedSecretError(f"m.pbkdf2 bits not a positive multiple of 8: {bits}")
    return hashlib.pbkdf2_hmac(
        "sha512", passphrase.encode("utf-8"), salt.encode("utf-8"), iterations, bits // 8
    )


@dataclass(frozen=True, slots=True)
class KeyDescription:
    """An ``m.secret_storage.key.<id>`` account-data object, checked on construction."""

    key_id: str
    name: str | None
    iv: str | None
    mac: str | None
    passphrase_salt: str | None
    passphrase_iterations: int | None
    passphrase_bits: int

    @classmethod
    def parse(cls, key_id: str, content: Any) -> KeyDescription:
        """Raises :class:`MalformedSecretError` for anything but an aes-hmac-sha2 description."""
        if not isinstance(content, Mapping):
            raise MalformedSecretError(f"key description {key_id[:80]!r} is not an object")
        if content.get("algorithm") != AES_HMAC_SHA2:
            raise MalformedSecretError(
                f"key {key_id[:80]!r} uses algorithm {str(content.get('algorithm'))[:80]!r}, "
                f"not {AES_HMAC_SHA2}"
            )
        iv, mac = content.get("iv"), content.get("mac")
        if (iv is None) != (mac is None) or not all(
            v is None or isinstance(v, str) for v in (iv, mac)
        ):
            raise MalformedSecretError(f"key {key_id[:80]!r}: 'iv' and 'mac' must be strings")
        salt = iterations = None
        bits = 256
        pp = content.get("passphrase")
        if pp is not None:
            if not isinstance(pp, Mapping) or pp.get("algorithm") != PBKDF2:
                raise MalformedSecretError(f"key {key_id[:80]!r}: unsupported passphrase")
            salt, iterations = pp.get("salt"), pp.get("iterations")
            bits = pp.get("bits", 256)
            if not isinstance(salt, str) or type(iterations) is not int or type(bits) is not int:
                raise MalformedSecretError(f"key {key_id[:80]!r}: malformed m.pbkdf2 parameters")
        name = content.get("name")
        return cls(key_id, name if isinstance(name, str) else None, iv, mac, salt, iterations, bits)

    def content(self) -> dict[str, Any]:
        """The account-data content of this description."""
        out: dict[str, Any] = {"algorithm": AES_HMAC_SHA2}
        if self.name is not None:
            out["name"] = self.name
        if self.iv is not None and self.mac is not None:
            out["iv"], out["mac"] = self.iv, self.mac
        if self.passphrase_salt is not None:
            out["passphrase"] = {
                "algorithm": PBKDF2,
                "salt": self.passphrase_salt,
                "iterations": self.passphrase_iterations,
                "bits": self.passphrase_bits,
            }
        return out

    def key_from_passphrase(self, passphrase: str) -> bytes:
        """The storage key for ``passphrase``; :class:`WrongKeyError` when there is none."""
        if self.passphrase_salt is None or self.passphrase_iterations is None:
            raise WrongKeyError(f"key {self.key_id[:80]!r} has no passphrase")
        return passphrase_key(
            passphrase, self.passphrase_salt, self.passphrase_iterations, self.passphrase_bits
        )


def check_key(key: bytes, description: KeyDescription) -> None:
    """Raise :class:`WrongKeyError` unless ``key`` passes the description's check.

    A description without ``iv``/``mac`` cannot be checked: the spec says to assume the key is
    right (a wrong one then fails at the first secret's MAC).
    """
    if description.iv is None or description.mac is None:
        return
    try:
        iv = decode_b64(description.iv)
        expected = decode_b64(description.mac)
    except Base64Error:
        raise MalformedSecretError(f"key {description.key_id[:80]!r}: bad iv/mac") from None
    if len(iv) != 16:
        raise MalformedSecretError(f"key {description.key_id[:80]!r}: iv is not 16 bytes")
    got = decode_b64(key_check(key, iv=iv)["mac"])
    if not hmac.compare_digest(got, expected):
        raise WrongKeyError(
            f"the key does not match secret storage key {description.key_id[:80]!r}"
        )
