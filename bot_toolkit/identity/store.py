"""The bot's own copy of its private cross-signing keys: one JSON file, mode 0600.

``<data_dir>/identity.json``::

    {"version": 2, "user_id": ..., "published": bool, "storage_key_id": <str or null>,
     "encrypted": {"master": {iv, ciphertext, mac}, "self_signing": ..., "user_signing": ...,
                   "storage_key": ... (while kept)}}

The private values are encrypted like secret-storage secrets (AES-CTR + HMAC-SHA-256, see
:mod:`bot_toolkit.identity.ssss`) under a key derived (HKDF) from the install's store secret
(:mod:`bot_toolkit.install_secret`: ``BOT_TOOLKIT_STORE_PASSPHRASE``, else ``store.key``), the
same secret that protects nio's store: with the passphrase kept outside the data directory, a
copy of the directory alone does not give the keys away. A version-1 file (plaintext seeds) is
read and rewritten encrypted.

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
from bot_toolkit.identity.ssss import BadMacError, decrypt_secret, derive_keys, encrypt_secret
from bot_toolkit.install_secret import (
    STORE_KEY_FILE,
    STORE_PASSPHRASE_ENV,
    store_secret,
    write_private,
)

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
_VERSION: Final = 2
_HKDF_INFO: Final = "bot_toolkit.identity_store"


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
            version = data.get("version")
            if version not in (1, _VERSION):
                raise ValueError("unknown version")
            if data["user_id"] != user_id:
                log.warning(
                    "identity store %s is for %s, not %s: ignoring it",
                    self.path,
                    str(data["user_id"])[:100],
                    user_id,
                )
                return None
            fields = data if version == 1 else self._decrypt(data["encrypted"])
            keys = CrossSigningKeys(
                user_id,
                SigningKey.from_b64(fields["master"]),
                SigningKey.from_b64(fields["self_signing"]),
                SigningKey.from_b64(fields["user_signing"]),
            )
            storage = fields.get("storage_key")
            stored = StoredIdentity(
                keys,
                bool(data.get("published")),
                decode_b64(storage) if isinstance(storage, str) else None,
                data.get("storage_key_id") if isinstance(data.get("storage_key_id"), str) else None,
            )
        except BadMacError:
            raise IdentityError(
                f"identity store {self.path} cannot be decrypted with this install's store "
                f"secret (was {STORE_PASSPHRASE_ENV} or {STORE_KEY_FILE} changed?)"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError, Base64Error):
            raise IdentityError(
                f"identity store {self.path} is corrupt; move it away and recover with the "
                "recovery key (bot-toolkit identity recover)"
            ) from None
        if version == 1:
            log.info("identity store %s: encrypting it with the install's store secret", self.path)
            self.save(stored)
        return stored

    def _key(self) -> bytes:
        """The file's encryption key: HKDF of the install's store secret (see
        :mod:`bot_toolkit.install_secret`; created on first use)."""
        secret = store_secret(self.path.parent)
        return derive_keys(secret.encode("utf-8"), _HKDF_INFO)[0]

    def _decrypt(self, encrypted: Any) -> dict[str, str]:
        key = self._key()
        return {
            name: decrypt_secret(key, f"{_HKDF_INFO}.{name}", value)
            for name, value in encrypted.items()
        }

    def save(self, stored: StoredIdentity) -> None:
        """Write ``stored`` atomically with mode 0600 (the directory made 0700 if missing); the
        private keys encrypted with the install's store secret."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = stored.keys
        private = {
            "master": keys.master.seed_b64(),
            "self_signing": keys.self_signing.seed_b64(),
            "user_signing": keys.user_signing.seed_b64(),
        }
        if stored.storage_key is not None:
            private["storage_key"] = unpadded_b64(stored.storage_key)
        key = self._key()
        data = {
            "version": _VERSION,
            "user_id": keys.user_id,
            "published": stored.published,
            "storage_key_id": stored.storage_key_id,
            "encrypted": {
                name: encrypt_secret(key, f"{_HKDF_INFO}.{name}", value)
                for name, value in private.items()
            },
        }
        write_secret_file(self.path, json.dumps(data, indent=1))

    def remove(self) -> bool:
        """Delete the file (``identity reset``); whether there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True
