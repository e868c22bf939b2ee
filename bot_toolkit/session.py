"""The standalone bot's session file: ``<data_dir>/session.json`` (user id, device id, access
token, homeserver), written atomically and owner-only (0600); ``repr`` never shows the token."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from bot_toolkit.install_secret import write_private

__all__ = ["Session"]

log = logging.getLogger("bot_toolkit.session")


@dataclass(frozen=True, slots=True)
class Session:
    """What ``<data_dir>/session.json`` holds. ``repr`` never shows the token."""

    user_id: str
    device_id: str
    access_token: str | None = None
    homeserver: str | None = None

    def __repr__(self) -> str:
        return f"Session(user_id={self.user_id!r}, device_id={self.device_id!r})"

    @classmethod
    def load(cls, path: Path) -> Session | None:
        """The session in ``path``; None when there is none or it cannot be read (logged)."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable session file %s: %s", path, type(e).__name__)
            return None
        if not isinstance(raw, dict):
            return None
        user_id, device_id = raw.get("user_id"), raw.get("device_id")
        token, homeserver = raw.get("access_token"), raw.get("homeserver")
        if not (isinstance(user_id, str) and isinstance(device_id, str) and device_id):
            log.warning("ignoring session file %s without user and device id", path)
            return None
        return cls(
            user_id,
            device_id,
            token if isinstance(token, str) and token else None,
            homeserver if isinstance(homeserver, str) else None,
        )

    def save(self, path: Path) -> None:
        """Write atomically, owner-only (0600), the file and its directory fsynced."""
        data = {"user_id": self.user_id, "device_id": self.device_id}
        if self.access_token:
            data["access_token"] = self.access_token
        if self.homeserver:
            data["homeserver"] = self.homeserver
        write_private(path, json.dumps(data, indent=1).encode())
