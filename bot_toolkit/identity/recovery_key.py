"""The recovery key: a secret storage key as the spec's base58 text (appendices, "Cryptographic
key representation").

Bytes: ``0x8B 0x01`` + the 32-byte key + a parity byte (XOR of all preceding bytes); then base58
with the Bitcoin alphabet; shown in groups of 4 characters separated by spaces. Readers ignore
whitespace.
"""

from __future__ import annotations

import functools
from typing import Final

__all__ = ["RecoveryKeyError", "decode_recovery_key", "encode_recovery_key"]

PREFIX: Final = b"\x8b\x01"
_ALPHABET: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX: Final = {c: i for i, c in enumerate(_ALPHABET)}
_KEY_LEN: Final = 32


class RecoveryKeyError(ValueError):
    """Text that is not a well-formed recovery key (bad character, length, prefix or parity)."""


def _parity(data: bytes) -> int:
    return functools.reduce(lambda a, b: a ^ b, data, 0)


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_ALPHABET[rem])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def _b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        digit = _INDEX.get(c)
        if digit is None:
            raise RecoveryKeyError("a recovery key contains only base58 characters")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


def encode_recovery_key(key: bytes) -> str:
    """The recovery key text for a 32-byte secret storage key (groups of 4, space-separated)."""
    if len(key) != _KEY_LEN:
        raise ValueError(f"a secret storage key is {_KEY_LEN} bytes")
    raw = PREFIX + key
    text = _b58encode(raw + bytes([_parity(raw)]))
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def decode_recovery_key(text: str) -> bytes:
    """The 32-byte key from recovery key text. Raises :class:`RecoveryKeyError`.

    The error messages never repeat the text.
    """
    compact = "".join(text.split())
    if not compact or len(compact) > 100:
        raise RecoveryKeyError("a recovery key is about 48 base58 characters")
    raw = _b58decode(compact)
    if len(raw) != len(PREFIX) + _KEY_LEN + 1:
        raise RecoveryKeyError("wrong length for a recovery key")
    if not raw.startswith(PREFIX):
        raise RecoveryKeyError("not a recovery key (wrong prefix)")
    if _parity(raw) != 0:
        raise RecoveryKeyError("the recovery key's parity check failed (mistyped?)")
    return raw[len(PREFIX) : -1]
