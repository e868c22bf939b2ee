"""bot_toolkit: typed to-device dispatch, verification and withheld notices for matrix-nio bots."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
