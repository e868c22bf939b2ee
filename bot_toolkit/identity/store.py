"""The bot's own copy of its private cross-signing keys: one JSON file, mode 0600.

``<data_dir>/identity.json``::

    {"version": 1, "user_id": ..., "master": <seed b64>, "self_signing": ..., "user_signing": ...,
     "published": bool, "storage_key": <b64 or null>, "storage_key_id": <str or null>}

``published`` is False between generating keys and the homeserver accepting them: a restart then
uploads the same keys again instead of making new ones (never a half-made identity).
``storage_key`` (the new secret storage key) is kept until the keys are in secret storage
(``storage_key_id`` set: still to write) and the operator has the recovery key
(:meth:`~bot_toolkit.identity.service.Identity.acknowledge_recovery_key`). Writes are atomic
(temporary file, fsync, rename). Nothing here logs key material.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from bot_toolkit.encoding import Base64Error, decode_b64, unpadded_b64
from bot_toolkit.identity.errors import IdentityError
from bot_toolkit.identity.keys import CrossSigningKeys
from bot_toolkit.identity.signing import SigningKey
from bot_toolkit.install_secret import write_private

__all__ = [
    "IDENTITY_FILE",
    "RECOVERY_KEY_FILE",
    "IdentityStore",
    "StoredIdentity",
    "write_secret_file",
]

log = logging.getLogger("bot_toolkit.identity.store")

IDENTITY_FILE: Final = "identity.json"
RECOVERY_KEY_FILE: Final = "recovery-key.txt"
_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class StoredIdentity:
    """What the store holds. ``repr`` shows no key material."""

    keys: CrossSigningKeys
    published: bool = False
    storage_key: bytes | None = None
    storage_key_id: str | None = None

    def __repr__(self) -> str:
        return (
            f"StoredIdentity({self.keys!r}, published={self.published}, "
            f"storage_pending={self.storage_key is not None})"
        )

    def with_(self, **changes: Any) -> StoredIdentity:
        """A copy with fields changed."""
        return replace(self, **changes)


def write_secret_file(path: Path, text: str) -> None:
    """Write ``text`` atomically to ``path`` with mode 0600 (the temporary file too), the file
    and its directory fsynced (see :func:`bot_toolkit.install_secret.write_private`)."""
    write_private(path, text.encode())


class IdentityStore:
    """Load and save :class:`StoredIdentity` in ``<data_dir>/identity.json``."""

    def __init__(self, data_dir: Path | str) -> None:
        self.path = Path(data_dir) / IDENTITY_FILE

    def load(self, user_id: str) -> StoredIdentity | None:
        """The stored identity of ``user_id``; ``None`` when there is none.

        A file for another user is ignored (with a warning). A file other users can read is
        tightened to 0600 (with a warning). Raises :class:`IdentityError` for a corrupt file.
        """
        try:
            mode = self.path.stat().st_mode
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise IdentityError(f"identity store {self.path}: {e.strerror or e}") from None
        if stat.S_IMODE(mode) & 0o077:
            log.warning("identity store %s was readable by others; setting mode 0600", self.path)
            os.chmod(self.path, 0o600)
        try:
            data = json.loads(text)
            if data.get("version") != _VERSION:
                raise ValueError("unknown version")
            if data["user_id"] != user_id:
                log.warning(
                    "identity store %s is for %s, not %s: ignoring it",
                    self.path,
                    str(data["user_id"])[:100],
                    user_id,
                )
                return None
            keys = CrossSigningKeys(
                user_id,
                SigningKey.from_b64(data["master"]),
                SigningKey.from_b64(data["self_signing"]),
                SigningKey.from_b64(data["user_signing"]),
            )
            storage = data.get("storage_key")
            return StoredIdentity(
                keys,
                bool(data.get("published")),
                decode_b64(storage) if isinstance(storage, str) else None,
                data.get("storage_key_id") if isinstance(data.get("storage_key_id"), str) else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError, Base64Error):
            raise IdentityError(
                f"identity store {self.path} is corrupt; move it away and recover with the "
                "recovery key (bot-toolkit identity recover)"
            ) from None

    def save(self, stored: StoredIdentity) -> None:
        """Write ``stored`` atomically with mode 0600 (the directory made 0700 if missing)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = stored.keys
        data = {
            "version": _VERSION,
            "user_id": keys.user_id,
            "master": keys.master.seed_b64(),
            "self_signing": keys.self_signing.seed_b64(),
            "user_signing": keys.user_signing.seed_b64(),
            "published": stored.published,
            "storage_key": None if stored.storage_key is None else unpadded_b64(stored.storage_key),
            "storage_key_id": stored.storage_key_id,
        }
        write_secret_file(self.path, json.dumps(data, indent=1))

    def remove(self) -> bool:
        """Delete the file (``identity reset``); whether there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True
