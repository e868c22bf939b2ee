"""Type aliases shared across bot_toolkit. Only aliases live here."""

from __future__ import annotations

from typing import NewType

__all__ = ["DeviceId", "RoomId", "TransactionId", "UserId"]

UserId = NewType("UserId", str)
"""A Matrix user id, e.g. ``@bot:example.org``."""

DeviceId = NewType("DeviceId", str)
"""A Matrix device id, e.g. ``ABCDEFGHIJ``."""

RoomId = NewType("RoomId", str)
"""A Matrix room id, e.g. ``!abc:example.org``."""

TransactionId = NewType("TransactionId", str)
"""A verification transaction id."""
