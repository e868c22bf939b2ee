"""Test doubles shared by several test modules (the public ones live in bot_toolkit.testing)."""

from __future__ import annotations

from bot_toolkit.testing import FakeClock

__all__ = ["FakeClock"]
