"""The bot's one SQLite database, shared by every component that keeps state.

One file, ``<data_dir>/bot_toolkit.sqlite3``, opened through :mod:`aiosqlite` (one connection, one
worker thread). Each component owns its tables and brings them up to date with
:meth:`Store.migrate`, which records a schema version per component in ``schema_versions``; the
outbox, the withheld-notice ledger and verification state each migrate their own tables and never
touch another's.

Durability: the journal is WAL. With ``synchronous="FULL"`` (the default) a committed transaction
is on disk before ``commit`` returns, so it survives a process kill *and* a power loss or OS crash.
With ``synchronous="NORMAL"`` a commit survives the process being killed (SIGKILL included: the
WAL frames are already in the operating system's page cache), but the last commits can be lost if
the machine itself goes down. Callers that batch their writes (the outbox does) pay the ``fsync``
once per batch, so FULL costs little.

The file is created readable by its owner only: it can hold outbound message contents until the
homeserver has accepted them. At DEBUG, aiosqlite would log every call with its parameters:
:mod:`bot_toolkit.log_guard` (imported here) keeps only the operation's name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from bot_toolkit import log_guard  # noqa: F401 - SQL parameters never reach a log

__all__ = ["DEFAULT_FILENAME", "Store", "StoreError"]

log = logging.getLogger("bot_toolkit.store")

DEFAULT_FILENAME = "bot_toolkit.sqlite3"
"""The database's file name inside the bot's data directory."""

Synchronous = Literal["NORMAL", "FULL"]

_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS schema_versions (
    component TEXT PRIMARY KEY NOT NULL,
    version INTEGER NOT NULL
)
"""


def _create_private(file: Path) -> None:
    """Create the file owner-only before SQLite does; its -wal and -shm files copy the mode."""
    file.parent.mkdir(parents=True, exist_ok=True)
    if not file.exists():
        os.close(os.open(file, os.O_CREAT | os.O_WRONLY, 0o600))


class StoreError(RuntimeError):
    """The store is closed, its schema is newer than this code understands, or a migration
    statement failed (the database error is the ``__cause__``)."""


class Store:
    """One SQLite database file, with per-component schema migrations.

    Create it with :meth:`open` (or :meth:`open_in` for a data directory), not the constructor.
    Reads go through :meth:`fetchall`; every write goes through :meth:`transaction`, which
    serialises transactions on the single connection.
    """

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn: aiosqlite.Connection | None = conn
        self.path = path
        self._lock = asyncio.Lock()
        self.commits = 0
        """How many write transactions were committed (for tests and batching diagnostics)."""

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, synchronous: Synchronous = "FULL"
    ) -> Store:
        """Open (creating when missing) the database at ``path``."""
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        file = Path(path)
        await asyncio.to_thread(_create_private, file)
        # isolation_level=None: no implicit transactions; transaction() issues BEGIN itself.
        conn = await aiosqlite.connect(file, isolation_level=None)
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute(f"PRAGMA synchronous={synchronous}")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA busy_timeout=5000")
            await conn.execute(_SCHEMA_TABLE)
        except BaseException:
            await conn.close()
            raise
        log.debug("opened store %s (WAL, synchronous=%s)", file, synchronous)
        return cls(conn, file)

    @classmethod
    async def open_in(
        cls, data_dir: str | os.PathLike[str], *, synchronous: Synchronous = "FULL"
    ) -> Store:
        """Open ``<data_dir>/bot_toolkit.sqlite3``."""
        return await cls.open(Path(data_dir) / DEFAULT_FILENAME, synchronous=synchronous)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._conn is None

    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError("the store is closed")
        return self._conn

    async def close(self) -> None:
        """Close the connection; waits for a running transaction to end. Idempotent."""
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """``async with store.transaction() as conn:`` one write transaction.

        Committed when the block ends, rolled back when it raises. Transactions run one at a
        time. A task cancelled inside the block still rolls back before the cancellation
        propagates, so the connection is never left inside a transaction.
        """
        async with self._lock:
            conn = self._connection()
            try:
                await conn.execute("BEGIN IMMEDIATE")
                yield conn
                await asyncio.shield(conn.commit())
            except BaseException:
                # sqlite3's rollback() is a no-op outside a transaction, and aiosqlite runs it
                # after anything already queued (a BEGIN or COMMIT that a cancellation
                # interrupted), so this always leaves the connection idle.
                await asyncio.shield(conn.rollback())
                raise
            self.commits += 1

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one read query and return every row."""
        rows = await self._connection().execute_fetchall(sql, params)
        return [tuple(r) for r in rows]

    async def schema_version(self, component: str) -> int:
        """The schema version recorded for ``component`` (0 when it has none yet)."""
        rows = await self.fetchall(
            "SELECT version FROM schema_versions WHERE component = ?", (component,)
        )
        return int(rows[0][0]) if rows else 0

    async def migrate(self, component: str, migrations: Mapping[int, Iterable[str]]) -> int:
        """Bring ``component``'s tables to the newest version in ``migrations``.

        ``migrations`` maps versions 1, 2, 3, ... to the SQL statements that take the schema from
        the previous version to that one. Each missing version is applied in its own transaction
        together with its version record, so a crash leaves the schema at a whole version.
        Returns the version now in force.

        Raises:
            ValueError: the versions are not 1..n.
            StoreError: the database holds a newer version than ``migrations`` knows (a downgrade),
                or a statement of a migration failed: the message names the component and the
                version, that version's transaction is rolled back and not recorded (earlier
                versions applied by this call stay), and the ``sqlite3.Error`` is the cause.
        """
        versions = sorted(migrations)
        if versions != list(range(1, len(versions) + 1)):
            raise ValueError(f"{component}: migration versions must be 1..n, got {versions}")
        target = len(versions)
        current = await self.schema_version(component)
        if current > target:
            raise StoreError(
                f"{component}: the database has schema version {current}, this code knows {target}"
            )
        for version in range(current + 1, target + 1):
            async with self.transaction() as conn:
                for statement in migrations[version]:
                    try:
                        await conn.execute(statement)
                    except sqlite3.Error as exc:
                        raise StoreError(f"{component} v{version}: {exc}") from exc
                await conn.execute(
                    "INSERT INTO schema_versions (component, version) VALUES (?, ?) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    (component, version),
                )
            log.info("store: %s schema now at version %d", component, version)
        return target
