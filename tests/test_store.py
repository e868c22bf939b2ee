"""Store: one SQLite file, WAL, per-component migrations, serialised transactions."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot_toolkit.store import DEFAULT_FILENAME, Store, StoreError


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open_in(tmp_path)
    try:
        yield s
    finally:
        await s.close()


async def test_open_in_data_dir_creates_private_wal_file(tmp_path: Path) -> None:
    data = tmp_path / "data" / "nested"
    async with await Store.open_in(data) as s:
        assert s.path == data / DEFAULT_FILENAME
        assert (await s.fetchall("PRAGMA journal_mode"))[0][0] == "wal"
        assert (await s.fetchall("PRAGMA synchronous"))[0][0] == 2  # FULL
        assert stat.S_IMODE(os.stat(s.path).st_mode) == 0o600
    assert s.closed


async def test_synchronous_normal_and_bad_values(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "x.sqlite3", synchronous="NORMAL") as s:
        assert (await s.fetchall("PRAGMA synchronous"))[0][0] == 1
    with pytest.raises(ValueError, match="synchronous"):
        await Store.open(tmp_path / "y.sqlite3", synchronous="OFF")  # type: ignore[arg-type]


async def test_migrate_applies_each_version_once_per_component(store: Store) -> None:
    v1 = {1: ["CREATE TABLE a (x INTEGER)"]}
    assert await store.migrate("alpha", v1) == 1
    assert await store.migrate("alpha", v1) == 1  # idempotent
    v2 = {**v1, 2: ["ALTER TABLE a ADD COLUMN y TEXT", "CREATE INDEX a_y ON a (y)"]}
    assert await store.migrate("alpha", v2) == 2
    assert await store.schema_version("alpha") == 2
    # another component keeps its own version
    assert await store.migrate("beta", {1: ["CREATE TABLE b (z TEXT)"]}) == 1
    assert await store.schema_version("beta") == 1
    async with store.transaction() as conn:
        await conn.execute("INSERT INTO a (x, y) VALUES (1, 'one')")
    assert await store.fetchall("SELECT x, y FROM a") == [(1, "one")]


async def test_migrate_refuses_downgrade_and_bad_numbering(store: Store) -> None:
    await store.migrate("c", {1: ["CREATE TABLE c1 (x)"], 2: ["CREATE TABLE c2 (x)"]})
    with pytest.raises(StoreError, match="schema version 2"):
        await store.migrate("c", {1: ["CREATE TABLE c1 (x)"]})
    with pytest.raises(ValueError, match=r"1\.\.n"):
        await store.migrate("d", {2: ["CREATE TABLE d (x)"]})


async def test_failed_migration_leaves_the_previous_version(store: Store) -> None:
    await store.migrate("e", {1: ["CREATE TABLE e (x)"]})
    broken = {1: ["CREATE TABLE e (x)"], 2: ["CREATE TABLE e2 (x)", "THIS IS NOT SQL"]}
    with pytest.raises(StoreError, match=r"^e v2: .*syntax") as failed:
        await store.migrate("e", broken)
    assert isinstance(failed.value.__cause__, sqlite3.OperationalError)
    assert await store.schema_version("e") == 1
    tables = await store.fetchall("SELECT name FROM sqlite_master WHERE name = 'e2'")
    assert tables == []  # rolled back with the version record
    # Several versions in one call: those before the failing one stay applied and recorded.
    steps = {
        1: ["CREATE TABLE f1 (x)"],
        2: ["CREATE TABLE f2 (x)"],
        3: ["INSERT INTO nope VALUES (1)"],
    }
    with pytest.raises(StoreError, match=r"^f v3: no such table: nope$") as failed:
        await store.migrate("f", steps)
    assert isinstance(failed.value.__cause__, sqlite3.OperationalError)
    assert await store.schema_version("f") == 2
    names = await store.fetchall("SELECT name FROM sqlite_master WHERE name LIKE 'f_' ORDER BY 1")
    assert names == [("f1",), ("f2",)]


async def test_transaction_commits_rolls_back_and_counts(store: Store) -> None:
    await store.migrate("t", {1: ["CREATE TABLE t (x INTEGER)"]})
    before = store.commits
    async with store.transaction() as conn:
        await conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(100)])
    assert store.commits == before + 1
    with pytest.raises(RuntimeError, match="boom"):
        async with store.transaction() as conn:
            await conn.execute("INSERT INTO t VALUES (1000)")
            raise RuntimeError("boom")
    assert store.commits == before + 1
    assert (await store.fetchall("SELECT count(*) FROM t"))[0][0] == 100


async def test_transactions_are_serialised(store: Store) -> None:
    await store.migrate("s", {1: ["CREATE TABLE s (k TEXT, v INTEGER)"]})
    events: list[str] = []

    async def txn(name: str) -> None:
        async with store.transaction() as conn:
            events.append(f"{name}-in")
            await conn.execute("INSERT INTO s VALUES (?, 1)", (name,))
            await asyncio.sleep(0.01)
            events.append(f"{name}-out")

    await asyncio.gather(txn("a"), txn("b"), txn("c"))
    assert len(events) == 6
    for i in range(0, 6, 2):  # never interleaved
        assert events[i].endswith("-in") and events[i + 1].endswith("-out")
        assert events[i][0] == events[i + 1][0]


async def test_cancelled_transaction_rolls_back_and_store_stays_usable(store: Store) -> None:
    await store.migrate("k", {1: ["CREATE TABLE k (x INTEGER)"]})
    started = asyncio.Event()

    async def slow() -> None:
        async with store.transaction() as conn:
            await conn.execute("INSERT INTO k VALUES (1)")
            started.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(slow())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with store.transaction() as conn:
        await conn.execute("INSERT INTO k VALUES (2)")
    assert await store.fetchall("SELECT x FROM k") == [(2,)]


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    s = await Store.open_in(tmp_path)
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await s.fetchall("SELECT 1")
    with pytest.raises(StoreError, match="closed"):
        async with s.transaction():
            pass


_KILLED_WRITER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from bot_toolkit.store import Store

    async def main():
        store = await Store.open(sys.argv[1], synchronous="NORMAL")
        await store.migrate("crash", {1: ["CREATE TABLE crash (x INTEGER)"]})
        async with store.transaction() as conn:
            await conn.executemany("INSERT INTO crash VALUES (?)", [(i,) for i in range(500)])
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint

    asyncio.run(main())
    """
)


async def test_committed_rows_survive_sigkill_with_synchronous_normal(tmp_path: Path) -> None:
    path = tmp_path / "killed.sqlite3"
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _KILLED_WRITER, str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    async with await Store.open(path) as s:
        assert (await s.fetchall("SELECT count(*) FROM crash"))[0][0] == 500
        assert await s.schema_version("crash") == 1
