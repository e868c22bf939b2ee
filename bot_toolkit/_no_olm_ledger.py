"""The persisted ``m.no_olm`` ledger and the ``m.dummy`` throttle (the withheld tables).

Public through :mod:`bot_toolkit.withheld`, whose docstring states the ledger's rules.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiosqlite

from bot_toolkit._withheld_wire import Clock, PeerDevice, WithheldMetrics
from bot_toolkit.events import WithheldCode
from bot_toolkit.store import Store

log = logging.getLogger("bot_toolkit.withheld")

DUMMY_INTERVAL: Final = 60 * 60.0
"""At most one new Olm session (and ``m.dummy``) per peer device in this many seconds (spec)."""

_COMPONENT: Final = "withheld"
_MIGRATIONS: Final[dict[int, list[str]]] = {
    1: [
        """
        CREATE TABLE withheld_no_olm (
            user_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            curve25519 TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'sent')),
            txn_id TEXT NOT NULL,
            session_since_notice INTEGER NOT NULL DEFAULT 0,
            notices INTEGER NOT NULL DEFAULT 1,
            suppressed INTEGER NOT NULL DEFAULT 0,
            last_notice_at REAL NOT NULL,
            session_at REAL,
            PRIMARY KEY (user_id, device_id, curve25519)
        )
        """,
        "CREATE INDEX withheld_no_olm_curve ON withheld_no_olm (curve25519)",
        """
        CREATE TABLE withheld_dummy (
            user_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            curve25519 TEXT NOT NULL,
            sent_at REAL NOT NULL,
            PRIMARY KEY (user_id, device_id, curve25519)
        )
        """,
    ],
}


_BY_DEVICE: Final = "WHERE user_id = ? AND device_id = ? AND curve25519 = ?"
"""Selects one device's row (parameters: :func:`_device_key`)."""


def _device_key(device: PeerDevice) -> tuple[str, str, str]:
    return (device.user_id, device.device_id, device.curve25519)


async def _first_row(conn: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> Any:
    """The first row ``sql`` selects inside a transaction (``None`` when there is none)."""
    cursor = await conn.execute(sql, params)
    row = await cursor.fetchone()
    await cursor.close()
    return row


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One device's row in the ledger."""

    device: PeerDevice
    state: str
    """``pending`` (decided, the outbox may not have it yet) or ``sent`` (the outbox has it)."""
    txn_id: str
    """The transaction id of the latest notice."""
    session_since_notice: bool
    """An Olm session with the device has existed since the latest notice: one more is allowed."""
    notices: int
    """Notices decided for this device so far."""
    suppressed: int
    """Failures that stayed silent."""
    last_notice_at: float
    session_at: float | None


_ENTRY_COLUMNS = (
    "user_id, device_id, curve25519, state, txn_id, session_since_notice, notices, suppressed, "
    "last_notice_at, session_at"
)


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    return LedgerEntry(
        device=PeerDevice(row[0], row[1], row[2]),
        state=row[3],
        txn_id=row[4],
        session_since_notice=bool(row[5]),
        notices=int(row[6]),
        suppressed=int(row[7]),
        last_notice_at=float(row[8]),
        session_at=None if row[9] is None else float(row[9]),
    )


class NoOlmLedger:
    """Which devices were told ``m.no_olm``, and whether they may be told again.

    Rules (per :class:`PeerDevice`): the first failure to set up an Olm session gives a notice;
    later failures stay silent; once an Olm session with the device has existed (we opened one
    after a successful claim, or it opened one to us), the next failure gives one more notice.

    Create with ``await NoOlmLedger.open(store, ...)``. Every change is one committed
    transaction; decisions for the same device are serialised.
    """

    def __init__(
        self,
        store: Store,
        metrics: WithheldMetrics | None = None,
        *,
        clock: Clock = time.time,
        new_txn_id: Callable[[], str] | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics or WithheldMetrics(None)
        self._clock = clock
        self._new_txn_id = new_txn_id or (lambda: f"bt-noolm-{uuid.uuid4().hex}")
        self._lock = asyncio.Lock()
        # curve25519 keys of devices told m.no_olm and not re-armed since: the only ones for which
        # a new Olm session changes anything (a cheap filter for the hot decrypt path).
        self._armed: set[str] = set()

    @classmethod
    async def open(
        cls,
        store: Store,
        metrics: WithheldMetrics | None = None,
        *,
        clock: Clock = time.time,
        new_txn_id: Callable[[], str] | None = None,
    ) -> NoOlmLedger:
        """Migrate the ledger's tables and load the in-memory filter."""
        await store.migrate(_COMPONENT, _MIGRATIONS)
        ledger = cls(store, metrics, clock=clock, new_txn_id=new_txn_id)
        rows = await store.fetchall(
            "SELECT curve25519 FROM withheld_no_olm WHERE session_since_notice = 0"
        )
        ledger._armed = {row[0] for row in rows}
        return ledger

    async def entry(self, device: PeerDevice) -> LedgerEntry | None:
        """The ledger row for ``device``, if any."""
        rows = await self._store.fetchall(
            f"SELECT {_ENTRY_COLUMNS} FROM withheld_no_olm {_BY_DEVICE}", _device_key(device)
        )
        return _entry(rows[0]) if rows else None

    async def entries(self) -> list[LedgerEntry]:
        """Every row (for diagnostics)."""
        rows = await self._store.fetchall(
            f"SELECT {_ENTRY_COLUMNS} FROM withheld_no_olm ORDER BY user_id, device_id"
        )
        return [_entry(r) for r in rows]

    async def decide(self, device: PeerDevice) -> str | None:
        """A failure to set up an Olm session with ``device``: notify or stay silent?

        Returns the transaction id to send the notice with (already committed as ``pending``), or
        ``None`` when the device was told before and no session has existed since (the
        suppression is counted in ``withheld_suppressed_total{code="m.no_olm"}``).
        """
        async with self._lock:
            now = self._clock()
            async with self._store.transaction() as conn:
                row = await _first_row(
                    conn,
                    f"SELECT session_since_notice FROM withheld_no_olm {_BY_DEVICE}",
                    _device_key(device),
                )
                if row is not None and not row[0]:
                    await conn.execute(
                        f"UPDATE withheld_no_olm SET suppressed = suppressed + 1 {_BY_DEVICE}",
                        _device_key(device),
                    )
                    txn_id = None
                else:
                    txn_id = self._new_txn_id()
                    await conn.execute(
                        "INSERT INTO withheld_no_olm (user_id, device_id, curve25519, state, "
                        "txn_id, session_since_notice, notices, suppressed, last_notice_at) "
                        "VALUES (?, ?, ?, 'pending', ?, 0, 1, 0, ?) "
                        "ON CONFLICT (user_id, device_id, curve25519) DO UPDATE SET "
                        "state = 'pending', txn_id = excluded.txn_id, session_since_notice = 0, "
                        "notices = notices + 1, last_notice_at = excluded.last_notice_at",
                        (*_device_key(device), txn_id, now),
                    )
        if txn_id is None:
            self._metrics.suppressed.inc(WithheldCode.NO_OLM)
            log.debug("m.no_olm to %s %s suppressed", device.user_id, device.device_id)
        else:
            self._armed.add(device.curve25519)
            log.info("m.no_olm to %s %s decided (%s)", device.user_id, device.device_id, txn_id)
        return txn_id

    async def mark_sent(self, device: PeerDevice, txn_id: str) -> None:
        """The outbox holds the notice sent with ``txn_id``."""
        async with self._lock, self._store.transaction() as conn:
            await conn.execute(
                f"UPDATE withheld_no_olm SET state = 'sent' {_BY_DEVICE} AND txn_id = ?",
                (*_device_key(device), txn_id),
            )

    async def pending(self) -> list[tuple[PeerDevice, str]]:
        """Decided notices whose hand-over to the outbox was not recorded: send them again with
        the same transaction id, then :meth:`mark_sent`."""
        rows = await self._store.fetchall(
            "SELECT user_id, device_id, curve25519, txn_id FROM withheld_no_olm "
            "WHERE state = 'pending' ORDER BY last_notice_at"
        )
        return [(PeerDevice(r[0], r[1], r[2]), r[3]) for r in rows]

    def armed(self, curve25519: str) -> bool:
        """Whether a new session with the device of this key would change the ledger."""
        return curve25519 in self._armed

    async def session_established(
        self, curve25519: str, *, user_id: str | None = None, device_id: str | None = None
    ) -> int:
        """An Olm session with the device of ``curve25519`` exists: allow it one more notice.

        ``user_id``/``device_id`` narrow the match when known. Returns how many rows changed.
        """
        if curve25519 not in self._armed:
            return 0
        sql = (
            "UPDATE withheld_no_olm SET session_since_notice = 1, session_at = ? "
            "WHERE curve25519 = ? AND session_since_notice = 0"
        )
        params: list[Any] = [self._clock(), curve25519]
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(device_id)
        async with self._lock, self._store.transaction() as conn:
            cursor = await conn.execute(sql, params)
            changed = cursor.rowcount
            await cursor.close()
            still_armed = (
                await _first_row(
                    conn,
                    "SELECT 1 FROM withheld_no_olm "
                    "WHERE curve25519 = ? AND session_since_notice = 0 LIMIT 1",
                    (curve25519,),
                )
                is not None
            )
        if not still_armed:
            self._armed.discard(curve25519)
        if changed:
            log.info("Olm session with %s exists: one more m.no_olm allowed", curve25519)
        return int(changed)


class DummyThrottle:
    """At most one new Olm session plus ``m.dummy`` per peer device per hour (persisted)."""

    def __init__(
        self, store: Store, *, clock: Clock = time.time, interval: float = DUMMY_INTERVAL
    ) -> None:
        self._store = store
        self._clock = clock
        self.interval = interval
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, store: Store, *, clock: Clock = time.time, interval: float = DUMMY_INTERVAL
    ) -> DummyThrottle:
        """Migrate the (shared) withheld tables and return the throttle."""
        await store.migrate(_COMPONENT, _MIGRATIONS)
        return cls(store, clock=clock, interval=interval)

    async def acquire(self, device: PeerDevice) -> bool:
        """True (and recorded) when a new session may be opened with ``device`` now."""
        async with self._lock:
            now = self._clock()
            async with self._store.transaction() as conn:
                row = await _first_row(
                    conn, f"SELECT sent_at FROM withheld_dummy {_BY_DEVICE}", _device_key(device)
                )
                if row is not None and now - float(row[0]) < self.interval:
                    return False
                await conn.execute(
                    "INSERT INTO withheld_dummy (user_id, device_id, curve25519, sent_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (user_id, device_id, curve25519) "
                    "DO UPDATE SET sent_at = excluded.sent_at",
                    (*_device_key(device), now),
                )
            return True

    async def release(self, device: PeerDevice) -> None:
        """Forget the last acquisition (nothing was sent after all)."""
        async with self._lock, self._store.transaction() as conn:
            await conn.execute(f"DELETE FROM withheld_dummy {_BY_DEVICE}", _device_key(device))
