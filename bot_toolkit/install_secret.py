"""The per-install secret that protects the bot's stores at rest, and private-file writing.

nio pickles the bot's Olm account (its identity keys) and its Olm and Megolm sessions with a
"pickle key"; left at nio's public default, a copy of nio's database is a copy of the bot's
identity. :func:`store_secret` gives every install its own secret instead:

* ``BOT_TOOLKIT_STORE_PASSPHRASE`` when set (non-empty): an operator-chosen passphrase, kept out
  of the data directory (e.g. in a secret manager), so a copy of the data directory alone is not
  enough;
* otherwise ``<data_dir>/store.key``: 32 random bytes (URL-safe base64), created on first use
  with mode 0600, written atomically and fsynced (file and directory).

The same secret is meant for every store of the install that holds keys (nio's, and the
cross-signing keys of :mod:`bot_toolkit.identity`). Changing it needs the old one: see
:func:`bot_toolkit.bot` start-up, which moves an install from nio's default key to its own.

:func:`write_private` is the one way files holding secrets are written here: a temporary file
created 0600, fsynced, renamed over the target, then the directory fsynced so the rename itself
survives a power cut.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

__all__ = [
    "STORE_KEY_FILE",
    "STORE_PASSPHRASE_ENV",
    "fsync_dir",
    "store_secret",
    "write_private",
]

log = logging.getLogger("bot_toolkit.install_secret")

STORE_PASSPHRASE_ENV: Final = "BOT_TOOLKIT_STORE_PASSPHRASE"
"""Environment variable with an operator-chosen store passphrase (wins over the key file)."""

STORE_KEY_FILE: Final = "store.key"
"""The generated per-install key in the data directory (mode 0600)."""


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so renames and creations in it are durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # e.g. filesystems that refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, owner-only (0600), durable once this returns."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.chmod(path, 0o600)
    fsync_dir(path.parent)


def store_secret(data_dir: Path, environ: Mapping[str, str] | None = None) -> str:
    """The install's store secret: the passphrase from the environment, else the key file's
    content (created on first use). Never logged."""
    env = os.environ if environ is None else environ
    passphrase = env.get(STORE_PASSPHRASE_ENV, "")
    if passphrase:
        return passphrase
    path = data_dir / STORE_KEY_FILE
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        write_private(path, secrets.token_urlsafe(32).encode())
        log.info("created a per-install store key in %s (mode 0600)", path)
    else:
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s was readable by others; made it owner-only (0600)", path)
            os.chmod(path, 0o600)
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ValueError(f"{path} is empty: restore it from a backup, or remove it with the stores")
    return key
