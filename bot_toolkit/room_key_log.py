"""Which devices the bot meant to have which of its Megolm sessions, from which message index.

Key sharing records a row per ``(session, device)`` here *before* the Olm-encrypted room keys are
handed to the outbox, so the record exists whenever a key may be on its way. Two readers:

* a ``m.room_key_request`` for one of the bot's own sessions is answered with the key (from the
  recorded index on, never earlier) when the requesting device, with the same identity key, is
  recorded for that session: the bot meant it to have the key, so ``m.unauthorised`` would be
  false;
* a permanently refused room-key request finds its session here (``room_key_requests``: the
  outbox transaction ids of each session's key messages, noted once the outbox stored them; a
  crash in between loses only that note), also after a restart.

The table is bounded in time: rows older than ``max_age`` (default 30 days) are deleted when the
log is opened. Nothing here touches nio.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from bot_toolkit.store import Store

__all__ = ["RoomKeyLog", "SharedKey"]

_COMPONENT: Final = "room_key_log"
_MIGRATIONS: Final = {
    1: [
        """CREATE TABLE room_key_shares (
            session_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            room_id TEXT NOT NULL,
            curve25519 TEXT NOT NULL,
            first_index INTEGER NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (session_id, user_id, device_id)
        )""",
        "CREATE INDEX room_key_shares_age ON room_key_shares (created_at)",
    ],
    2: [
        """CREATE TABLE room_key_requests (
            txn_id TEXT PRIMARY KEY NOT NULL,
            room_id TEXT NOT NULL,
            session_id TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX room_key_requests_age ON room_key_requests (created_at)",
    ],
}
_DEFAULT_MAX_AGE: Final = 30 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class SharedKey:
    """One device the bot meant to have one Megolm session, from ``first_index`` on."""

    room_id: str
    session_id: str
    user_id: str
    device_id: str
    curve25519: str
    first_index: int


class RoomKeyLog:
    """The ``room_key_shares`` table of the bot's store; open with :meth:`open`."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @classmethod
    async def open(cls, store: Store, *, max_age: float = _DEFAULT_MAX_AGE) -> RoomKeyLog:
        """Create or migrate the table and delete rows older than ``max_age`` seconds."""
        await store.migrate(_COMPONENT, _MIGRATIONS)
        cutoff = time.time() - max_age
        async with store.transaction() as conn:
            await conn.execute("DELETE FROM room_key_shares WHERE created_at < ?", (cutoff,))
            await conn.execute("DELETE FROM room_key_requests WHERE created_at < ?", (cutoff,))
        return cls(store)

    async def record(self, shares: Iterable[SharedKey]) -> None:
        """Remember ``shares`` (committed when this returns; a repeat keeps the lower index)."""
        now = time.time()
        rows = [
            (s.session_id, s.user_id, s.device_id, s.room_id, s.curve25519, s.first_index, now)
            for s in shares
        ]
        if not rows:
            return
        async with self._store.transaction() as conn:
            await conn.executemany(
                "INSERT INTO room_key_shares "
                "(session_id, user_id, device_id, room_id, curve25519, first_index, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (session_id, user_id, device_id) DO UPDATE SET "
                "first_index = min(first_index, excluded.first_index), "
                "curve25519 = excluded.curve25519",
                rows,
            )

    async def note_requests(self, txn_ids: Iterable[str], room_id: str, session_id: str) -> None:
        """Remember that the outbox requests ``txn_ids`` carry room keys of ``session_id``, so a
        refusal of one of them, even after a restart, finds its session."""
        now = time.time()
        rows = [(txn, room_id, session_id, now) for txn in txn_ids]
        async with self._store.transaction() as conn:
            await conn.executemany(
                "INSERT OR IGNORE INTO room_key_requests (txn_id, room_id, session_id, created_at) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )

    async def request_session(self, txn_id: str) -> tuple[str, str] | None:
        """``(room_id, session_id)`` of the room keys outbox request ``txn_id`` carries."""
        rows = await self._store.fetchall(
            "SELECT room_id, session_id FROM room_key_requests WHERE txn_id = ?", (txn_id,)
        )
        return None if not rows else (str(rows[0][0]), str(rows[0][1]))

    async def lookup(self, session_id: str, user_id: str, device_id: str) -> SharedKey | None:
        """The record of ``(user_id, device_id)`` for ``session_id``, or ``None``."""
        rows = await self._store.fetchall(
            "SELECT room_id, curve25519, first_index FROM room_key_shares "
            "WHERE session_id = ? AND user_id = ? AND device_id = ?",
            (session_id, user_id, device_id),
        )
        if not rows:
            return None
        room_id, curve, index = rows[0]
        return SharedKey(room_id, session_id, user_id, device_id, curve, int(index))
