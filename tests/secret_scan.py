"""Look for key material in a log: every secret the bot's stores hold, and anything that
unpickles (or imports) as an Olm account, Olm session or Megolm session.

Used on the DEBUG logs of whole runs (verification and key sharing) by the end-to-end tests.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import vodozemac
from nio.crypto import InboundGroupSession, OlmAccount, Session

from bot_toolkit._nio_store import NIO_DEFAULT_PICKLE_KEY
from bot_toolkit.install_secret import store_secret

__all__ = ["assert_no_key_material", "stored_secrets"]

_TOKENS = (re.compile(r"[A-Za-z0-9+/]{32,}={0,2}"), re.compile(r"[A-Za-z0-9_-]{32,}"))
"""Base64 runs (standard and URL-safe alphabets) long enough to be key material."""
_CHUNK = 32


def _nio_pickles(nio_dir: Path) -> Iterator[tuple[str, str]]:
    for db in sorted(nio_dir.glob("*.db")):
        with sqlite3.connect(db) as conn:
            for table, column in (
                ("accounts", "account"),
                ("olmsessions", "session"),
                ("megolminboundsessions", "session"),
            ):
                for (value,) in conn.execute(f"SELECT {column} FROM {table}"):
                    text = value.decode() if isinstance(value, bytes) else str(value)
                    yield f"nio {table}", text


def stored_secrets(data_dir: Path) -> list[tuple[str, str]]:
    """(label, value) of every secret the bot keeps in ``data_dir``."""
    found: list[tuple[str, str]] = list(_nio_pickles(data_dir / "nio"))
    found.append(("store.key", store_secret(data_dir, {})))
    session = data_dir / "session.json"
    if session.exists():
        token = json.loads(session.read_text()).get("access_token")
        if token:
            found.append(("access token", token))
    identity = data_dir / "identity.json"
    if identity.exists():
        data = json.loads(identity.read_text())
        for key in ("master", "self_signing", "user_signing", "storage_key"):
            if isinstance(data.get(key), str):
                found.append((f"identity {key}", data[key]))
    recovery = data_dir / "recovery-key.txt"
    if recovery.exists():
        text = recovery.read_text().strip()
        found += [("recovery key", text), ("recovery key", text.replace(" ", ""))]
    return found


def _opens(candidate: str, keys: tuple[str, ...]) -> str | None:
    """What ``candidate`` turns out to be when it unpickles or imports, else ``None``."""
    raw = candidate.encode()
    for key in keys:
        attempts = (
            ("Olm account pickle", lambda k=key: OlmAccount.from_pickle(raw, k, True)),
            ("Olm session pickle", lambda k=key: Session.from_pickle(raw, datetime.now(), k)),
            (
                "Megolm session pickle",
                lambda k=key: InboundGroupSession.from_pickle(raw, "", "", "", k),
            ),
        )
        for what, attempt in attempts:
            try:
                attempt()
            except Exception:
                continue
            return what
    for what, importer in (
        ("Megolm session key", vodozemac.SessionKey),
        ("Megolm exported session key", vodozemac.ExportedSessionKey),
    ):
        try:
            importer(candidate)
        except Exception:
            continue
        return what
    return None


def assert_no_key_material(log: str, data_dir: Path) -> int:
    """Fail when ``log`` holds any stored secret (or a 32-character piece of one) or any
    string that unpickles/imports as Olm or Megolm key material. Returns the number of
    candidate strings tried."""
    secrets = stored_secrets(data_dir)
    assert any(label == "nio accounts" for label, _ in secrets), "no nio account found"
    for label, secret in secrets:
        pieces = [secret[i : i + _CHUNK] for i in range(0, max(1, len(secret) - _CHUNK + 1), 16)]
        leaked = [p for p in pieces if len(p) >= 16 and p in log]
        assert not leaked, f"{label} appears in the log: {leaked[0]!r}"
    keys = (store_secret(data_dir, {}), NIO_DEFAULT_PICKLE_KEY)
    candidates = {found for pattern in _TOKENS for found in pattern.findall(log)}
    for candidate in candidates:
        what = _opens(candidate, keys)
        assert what is None, f"the log holds a {what}: {candidate[:24]}..."
    return len(candidates)
