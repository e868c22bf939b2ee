"""The two byte encodings Matrix signs and hashes over: canonical JSON and unpadded base64.

One home for them (the SAS maths, cross-signing and secret storage all use these).
"""

from __future__ import annotations

import base64
import binascii
import json

__all__ = ["Base64Error", "canonical_json", "decode_b64", "unpadded_b64"]


class Base64Error(ValueError):
    """A string is not valid (padded or unpadded) standard base64."""


def unpadded_b64(data: bytes) -> str:
    """Standard base64 without ``=`` padding (the spec's "unpadded base64")."""
    return base64.b64encode(data).decode("ascii").rstrip("=")


def decode_b64(text: str) -> bytes:
    """Decode standard base64, padded or not (the spec asks readers to accept both).

    Raises :class:`Base64Error` on any other character or an impossible length.
    """
    if not isinstance(text, str):
        raise Base64Error(f"expected a base64 string, got {type(text).__name__}")
    stripped = text.rstrip("=")
    if len(text) - len(stripped) > 2 or len(stripped) % 4 == 1:
        raise Base64Error("impossible base64 length")
    try:
        return base64.b64decode(stripped + "=" * (-len(stripped) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise Base64Error("not valid base64") from None


def canonical_json(value: object) -> bytes:
    """Matrix canonical JSON: sorted keys, no insignificant whitespace, UTF-8, no escaping."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
