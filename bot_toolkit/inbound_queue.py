"""The durable inbound queue: no to-device event is lost by a crash.

The homeserver deletes to-device events once a ``/sync`` acknowledges them (its ``since`` is the
batch's ``next_batch``), and nio 0.26 saves that token *before* its handlers ran. So a crash
between the two lost the batch for good (and decrypted Olm payloads cannot be decrypted twice).
With an :class:`InboundQueue` attached to the nio plugin, for each sync:

1. nio decrypts and the plugin decodes the batch (nothing is handed to handlers yet);
2. the batch is **committed** to the ``inbound_events`` table of the bot's
   :class:`~bot_toolkit.store.Store`, each event as it was received (a decrypted payload as
   decrypted), encrypted at rest with AES-256-GCM under a key derived from the install's store
   secret (:func:`bot_toolkit.install_secret.store_secret`): decrypted payloads can hold room keys
   and secrets;
3. only then is nio's sync token saved (the plugin holds nio's ``save_sync_token`` back until
   the commit); nio acknowledges the batch with its next ``/sync`` after that;
4. the events go to the dispatcher; an event's row is deleted once every handler of it returned
   (or failed: a handler error is not retried).

**The guarantee.** Every to-device event of a committed batch reaches the handlers at least
once: events still stored when the process stops (killed, crashed, or their handling cut short
at shutdown) are handed to the dispatcher again by :meth:`InboundQueue.replay` at the next start,
before the first sync. Each event carries a stable ``inbound_id`` (derived from the sync's
``since`` token and the event's position in the batch): the same event has the same id when it
is replayed, and when the homeserver delivers the same batch again (a crash after the commit,
before the token was saved), so a handler that must not act twice can remember the ids it has
handled. Events already stored are not handed over a second time by a redelivered batch. What
is not covered: an event nio itself cannot parse and whose raw form is lost (counted as
``nio_to_device_dropped_total{reason="unparsed"}``), and a store write that fails (logged,
counted; the batch is then handled as before, in memory).

Metrics: ``inbound_stored_total``, ``inbound_replayed_total``, ``inbound_store_errors_total``
and the gauge ``inbound_pending`` (stored, not yet handled).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bot_toolkit.metrics import Metrics
from bot_toolkit.store import Store

__all__ = ["InboundQueue", "Received", "StoredEvent", "inbound_id"]

log = logging.getLogger("bot_toolkit.inbound_queue")

_COMPONENT: Final = "inbound_queue"
_MIGRATIONS: Final[dict[int, list[str]]] = {
    1: [
        """CREATE TABLE inbound_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            blob BLOB NOT NULL,
            created_at REAL NOT NULL
        )"""
    ]
}
_HKDF_INFO: Final = b"bot_toolkit inbound queue v1"
_ACK_DELAY: Final = 0.05
"""Seconds acknowledged ids wait to be deleted together (one transaction for many)."""


def inbound_id(since: str | None, position: int, part: int = 0) -> str:
    """The stable id of the ``part``-th event handed over for the wire event at ``position`` of
    the batch a ``/sync`` with ``since`` returned (the same batch comes back for the same
    ``since``, in the same order)."""
    digest = hashlib.sha256(f"{since or ''}\x00{position}\x00{part}".encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Received:
    """One event of a batch as received: its id, the raw event (``type``, ``sender``,
    ``content``; a decrypted payload as decrypted) and the Olm sender key it came from."""

    id: str
    raw: Mapping[str, Any]
    decrypted_from: str | None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event :meth:`InboundQueue.replay` hands back, in arrival order."""

    id: str
    raw: dict[str, Any]
    decrypted_from: str | None


class _Row(msgspec.Struct, frozen=True):
    raw: dict[str, Any]
    decrypted_from: str | None = None


class InboundQueue:
    """The ``inbound_events`` table; see the module docs. Call :meth:`open` before use and
    :meth:`close` (flushes acknowledgements) at shutdown."""

    def __init__(self, store: Store, secret: str, metrics: Metrics | None = None) -> None:
        self.store = store
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
            secret.encode()
        )
        self._aead = AESGCM(key)
        self._acked: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._pending = 0
        m = metrics or Metrics()
        self._m_stored = m.counter(
            "inbound_stored_total", "To-device events committed to the store"
        )
        self._m_replayed = m.counter(
            "inbound_replayed_total", "Stored to-device events handed over again after a restart"
        )
        self._m_errors = m.counter(
            "inbound_store_errors_total", "Inbound queue store failures", ["op"]
        )
        m.gauge("inbound_pending", "Stored to-device events not yet handled", read=self._depth)

    def _depth(self) -> float:
        return float(self._pending)

    async def open(self) -> int:
        """Create the table if needed; returns how many events wait from the last run."""
        await self.store.migrate(_COMPONENT, _MIGRATIONS)
        rows = await self.store.fetchall("SELECT COUNT(*) FROM inbound_events")
        self._pending = int(rows[0][0])
        return self._pending

    def _seal(self, event_id: str, raw: Mapping[str, Any], decrypted_from: str | None) -> bytes:
        nonce = os.urandom(12)
        body = msgspec.json.encode(_Row(dict(raw), decrypted_from))
        return nonce + self._aead.encrypt(nonce, body, event_id.encode())

    def _open(self, event_id: str, blob: bytes) -> _Row:
        body = self._aead.decrypt(blob[:12], blob[12:], event_id.encode())
        return msgspec.json.decode(body, type=_Row)

    async def commit(self, batch: Sequence[Received]) -> set[str]:
        """Store the batch in one transaction; returns the ids that were new (ids already stored
        belong to a batch delivered again: their events are already queued).

        Raises what the store raises (then nothing was stored).
        """
        if not batch:
            return set()
        ids = [r.id for r in batch]
        marks = ",".join("?" * len(ids))
        now = time.time()
        rows = [(r.id, self._seal(r.id, r.raw, r.decrypted_from), now) for r in batch]
        try:
            async with self.store.transaction() as conn:
                cursor = await conn.execute(
                    f"SELECT id FROM inbound_events WHERE id IN ({marks})",
                    ids,
                )
                known = {str(row[0]) for row in await cursor.fetchall()}
                await conn.executemany(
                    "INSERT OR IGNORE INTO inbound_events (id, blob, created_at) VALUES (?, ?, ?)",
                    [row for row in rows if row[0] not in known],
                )
        except Exception:
            self._m_errors.inc("commit")
            raise
        new = set(ids) - known
        self._pending += len(new)
        self._m_stored.inc(amount=len(new))
        return new

    async def replay(self) -> list[StoredEvent]:
        """Every stored event, oldest first. A row that no longer opens (the store secret
        changed) is logged, counted and deleted."""
        rows = await self.store.fetchall("SELECT id, blob FROM inbound_events ORDER BY seq")
        out: list[StoredEvent] = []
        broken: list[str] = []
        for event_id, blob in rows:
            try:
                row = self._open(str(event_id), bytes(blob))
            except (InvalidTag, msgspec.DecodeError, ValueError):
                broken.append(str(event_id))
                continue
            out.append(StoredEvent(str(event_id), row.raw, row.decrypted_from))
        if broken:
            self._m_errors.inc("unreadable", amount=len(broken))
            log.error(
                "inbound queue: %d stored events cannot be read with this store secret; deleted",
                len(broken),
            )
            await self._delete(broken)
        self._m_replayed.inc(amount=len(out))
        if out:
            log.info("inbound queue: %d events left by the last run are handled again", len(out))
        return out

    def ack(self, event_id: str) -> None:
        """Every handler of this event returned: delete it (soon, with others)."""
        self._acked.add(event_id)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_later(), name="bot_toolkit.inbound_queue.ack"
            )

    async def _flush_later(self) -> None:
        await asyncio.sleep(_ACK_DELAY)
        await self.flush()

    async def flush(self) -> None:
        """Delete the acknowledged events now (failures are logged: they are replayed)."""
        while self._acked:
            ids, self._acked = sorted(self._acked), set()
            try:
                await self._delete(ids)
            except BaseException as exc:
                self._acked.update(ids)  # kept for the next flush (close() flushes again)
                if not isinstance(exc, Exception):
                    raise  # cancelled
                self._m_errors.inc("ack")
                log.error("inbound queue: could not forget %d handled events: %s", len(ids), exc)
                return

    async def _delete(self, ids: Sequence[str]) -> None:
        async with self.store.transaction() as conn:
            await conn.executemany("DELETE FROM inbound_events WHERE id = ?", [(i,) for i in ids])
        self._pending = max(0, self._pending - len(ids))

    async def close(self) -> None:
        """Flush the acknowledgements (events not acknowledged stay for the next start)."""
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        self._flusher = None
        await self.flush()
