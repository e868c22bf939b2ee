"""Restart cancels: the live transactions kept in the :class:`~bot_toolkit.store.Store`.

The ephemeral SAS keys are never persisted, so a transaction cannot survive a restart. Each live
transaction's (txn, peer user, peer device, deadline) is kept in the ``verification_inflight``
table; on start-up every unexpired one gets ``m.key.verification.cancel`` (``m.user``,
:data:`RESTART_REASON`) so the peer's UI does not hang; expired ones are dropped.

A transaction cancelled that way stays cancelled: its id moves to the ``verification_cancelled``
table (kept :data:`~bot_toolkit.verification.policy.TRANSACTION_IDLE_TIMEOUT` seconds, across
further restarts too) and the manager holds it as a finished transaction, so a late ``start``
or ``ready`` of the peer for it is ignored like any event of a cancelled transaction instead of
beginning a new (start-first) flow.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

from .table import CancelCode

__all__ = ["RESTART_REASON", "InflightStore", "StoreLike"]

log = logging.getLogger("bot_toolkit.verification.persistence")

RESTART_REASON: Final = "verifier restarted"
"""The reason of the ``m.user`` cancel sent on start-up for transactions left by a restart."""

_DELETE_TXN: Final = (
    "DELETE FROM verification_inflight WHERE txn = ?",
    "DELETE FROM verification_room_inflight WHERE txn = ?",
)
"""Forget one transaction's live rows (parameter: its id)."""

_COMPONENT: Final = "verification"
_MIGRATIONS: Final[dict[int, list[str]]] = {
    1: [
        """
        CREATE TABLE verification_inflight (
            txn TEXT NOT NULL,
            user_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            deadline REAL NOT NULL,
            PRIMARY KEY (txn, user_id, device_id)
        )
        """
    ],
    2: [
        """
        CREATE TABLE verification_cancelled (
            txn TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            until REAL NOT NULL
        )
        """
    ],
    3: [
        """
        CREATE TABLE verification_room_inflight (
            txn TEXT PRIMARY KEY,
            room_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            deadline REAL NOT NULL
        )
        """
    ],
}

CancelMessages = dict[str, dict[str, dict[str, Any]]]
"""``{user: {device: cancel content}}``: one to-device send."""


class StoreLike(Protocol):
    """What the manager needs of the :class:`~bot_toolkit.store.Store`."""

    async def migrate(self, component: str, migrations: Mapping[int, Iterable[str]]) -> int: ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]: ...


class InflightStore:
    """The ``verification_inflight`` table; every method is a no-op without a store."""

    def __init__(self, store: StoreLike | None) -> None:
        self.store = store

    async def restart_cancels(self, now: float) -> dict[str, CancelMessages]:
        """Migrate, then the cancels owed for the unexpired transactions of the last run, by id.

        Expired ones are logged, left out and forgotten. Call :meth:`forget` with the ids
        returned once their cancels were sent (only those: rows this run added meanwhile stay).
        """
        if self.store is None:
            return {}
        await self.store.migrate(_COMPONENT, _MIGRATIONS)
        rows = await self.store.fetchall(
            "SELECT txn, user_id, device_id, deadline FROM verification_inflight"
        )
        by_txn: dict[str, CancelMessages] = {}
        expired: set[str] = set()
        for txn, user_id, device_id, deadline in rows:
            if float(deadline) <= now:
                log.info("dropping expired verification %s left by a restart", txn)
                expired.add(str(txn))
                continue
            by_txn.setdefault(str(txn), {}).setdefault(str(user_id), {})[str(device_id)] = {
                "transaction_id": str(txn),
                "code": str(CancelCode.USER),
                "reason": RESTART_REASON,
            }
        await self.forget(expired - by_txn.keys())
        return by_txn

    async def room_restart_cancels(self, now: float) -> dict[str, tuple[str, str]]:
        """The unexpired in-room flows of the last run: ``{flow id: (room id, user)}``; expired
        ones are forgotten. Call after :meth:`restart_cancels` (which migrates), and
        :meth:`forget` with the ids dealt with."""
        if self.store is None:
            return {}
        rows = await self.store.fetchall(
            "SELECT txn, room_id, user_id, deadline FROM verification_room_inflight"
        )
        live = {str(t): (str(r), str(u)) for t, r, u, d in rows if float(d) > now}
        await self.forget({str(t) for t, *_ in rows} - live.keys())
        return live

    async def add_room(self, txn: str, room_id: str, user: str, deadline: float) -> None:
        """Keep a live in-room flow (logged, never raised, on failure)."""
        sql = (
            "INSERT OR REPLACE INTO verification_room_inflight "
            "(txn, room_id, user_id, deadline) VALUES (?, ?, ?, ?)"
        )
        await self._write_logged("persist", txn, [(sql, (txn, room_id, user, deadline))])

    async def cancelled(self, now: float) -> dict[str, str]:
        """Transactions cancelled at an earlier restart and still remembered: ``{txn: user}``.

        Forgets those past their time. Call after :meth:`restart_cancels` (which migrates).
        """
        if self.store is None:
            return {}
        async with self.store.transaction() as conn:
            await conn.execute("DELETE FROM verification_cancelled WHERE until <= ?", (now,))
        rows = await self.store.fetchall("SELECT txn, user_id FROM verification_cancelled")
        return {str(txn): str(user) for txn, user in rows}

    async def mark_cancelled(self, cancelled: Mapping[str, str], until: float) -> None:
        """These transactions (``{txn: user}``) were cancelled at this restart: forget their
        live rows and remember their ids until ``until``, in one store transaction."""
        if self.store is None or not cancelled:
            return
        async with self.store.transaction() as conn:
            for txn, user in sorted(cancelled.items()):
                await conn.execute("DELETE FROM verification_inflight WHERE txn = ?", (txn,))
                await conn.execute(
                    "INSERT OR REPLACE INTO verification_cancelled (txn, user_id, until) "
                    "VALUES (?, ?, ?)",
                    (txn, user, until),
                )

    async def forget(self, txns: Iterable[str]) -> None:
        """Delete the rows of these transactions (those a restart dealt with)."""
        if self.store is None:
            return
        ids = sorted(set(txns))
        if not ids:
            return
        async with self.store.transaction() as conn:
            for txn in ids:
                for sql in _DELETE_TXN:
                    await conn.execute(sql, (txn,))

    async def clear(self) -> None:
        """Forget every kept transaction."""
        if self.store is None:
            return
        async with self.store.transaction() as conn:
            await conn.execute("DELETE FROM verification_inflight")
            await conn.execute("DELETE FROM verification_cancelled")
            await conn.execute("DELETE FROM verification_room_inflight")

    async def add(self, txn: str, user: str, devices: Sequence[str], deadline: float) -> None:
        """Keep a live transaction (logged, never raised, on failure)."""
        sql = (
            "INSERT OR REPLACE INTO verification_inflight "
            "(txn, user_id, device_id, deadline) VALUES (?, ?, ?, ?)"
        )
        await self._write_logged("persist", txn, [(sql, (txn, user, d, deadline)) for d in devices])

    async def remove(self, txn: str) -> None:
        """Forget a finished transaction (logged, never raised, on failure)."""
        await self._write_logged("forget", txn, [(sql, (txn,)) for sql in _DELETE_TXN])

    async def _write_logged(
        self, what: str, txn: str, statements: Iterable[tuple[str, Sequence[Any]]]
    ) -> None:
        """Run ``statements`` in one store transaction; a failure is logged, never raised."""
        if self.store is None:
            return
        try:
            async with self.store.transaction() as conn:
                for sql, params in statements:
                    await conn.execute(sql, params)
        except Exception:
            log.exception("could not %s verification %s", what, txn)
