"""The outbox: the one path for outbound to-device messages.

``await outbox.send(event_type, {user_id: {device_id: content}})`` packs the messages into
``PUT /sendToDevice/{eventType}/{txnId}`` requests of at most ``batch_size`` messages (a message is
one ``(user, device)`` pair), gives each request a transaction id once, stores the requests and
only then returns their transaction ids. Worker tasks send them, at most ``concurrency`` at a time.

Delivery guarantees:

* **Persisted before sent.** A request is committed to the :class:`~bot_toolkit.store.Store`
  before its first attempt and deleted only after the homeserver answered 2xx (or refused it
  permanently). After a crash, :meth:`Outbox.start` sends what is left with the *original*
  transaction ids, and the homeserver drops the repeats, so every message arrives once. (Synapse
  remembers a transaction id per device in memory for at least 30 minutes: a request that was
  accepted but whose deletion a crash prevented, a window of milliseconds, can still arrive twice
  if the bot restarts after longer than that, or after Synapse itself restarted.)
* **Batched writes.** ``send()`` calls that arrive while a commit is running are packed together
  and committed in the next single transaction (group commit); deletions of accepted requests ride
  along in the same commits. Concurrent calls of one event type can share a request, so ``send()``
  may return transaction ids that another call's messages also use.
* **Per-device order.** Two requests that address the same ``(user, device)`` are sent in the
  order the messages were given to ``send()``: the later one waits until the earlier one is
  accepted or refused. Requests with no device in common go out concurrently. (The ``"*"``
  all-devices id is ordered only against other ``"*"`` messages to that user.)
* **Retries.** 429 (honouring ``retry_after_ms`` / ``Retry-After``), 5xx, timeouts and broken
  connections are retried with the same transaction id. The delay before retry ``n`` is drawn
  uniformly from ``[b/2, b]`` where ``b = min(backoff_max, backoff_initial * 2**(n-1))`` ("equal
  jitter"); after a 429 it is ``max(retry_after, that)``: never earlier than the server asked,
  even when the server asks for longer than ``backoff_max``. A 429 also holds back every worker's
  next attempt until ``retry_after`` has passed. There is no attempt limit: an undelivered
  request stays queued (and persisted) until it is accepted, refused or the outbox closes.
* **Bounded.** At most ``max_pending`` messages wait (queued or being sent). A ``send()`` that
  would go beyond raises :class:`OutboxFull` (nothing of it is queued; nothing queued is dropped):
  the caller learns it at once, and it is logged. The refused messages are counted in
  ``outbox_refused_messages_total{event_type}``; once a refusal came with the queue at 90 % of the
  bound or more, the gauge ``outbox_full`` is 1 and :meth:`Outbox.is_full` true (``/readyz``
  fails) until the queue is back under 90 %.
* **Permanent failures.** Any other answer (4xx but 429, and non-2xx below 400) is not retried: it
  is logged with the reason, counted, removed from the store, and an :class:`OutboxSendFailed`
  event is put on the dispatcher when one is attached.

Metrics (in the given :class:`~bot_toolkit.metrics.Metrics`): gauge ``outbox_queue_depth``
(requests not yet accepted or refused), counters ``outbox_requests_sent_total{event_type}``
(requests the homeserver accepted), ``outbox_retries_total{reason}`` (reason ``429``, ``5xx``,
``timeout``, ``connection``, or ``other`` for an unexpected transport exception),
``outbox_permanent_failures_total{event_type,status}`` and ``outbox_messages_total{event_type}``
(messages the homeserver accepted).

Message contents are never logged; access tokens are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

from ._tasks import TaskSet
from .metrics import Metrics
from .store import Store

__all__ = [
    "HttpTransport",
    "Outbox",
    "OutboxClosed",
    "OutboxFull",
    "OutboxSendFailed",
    "PermanentSendError",
    "ToDeviceMessages",
    "TransientSendError",
    "Transport",
]

log = logging.getLogger("bot_toolkit.outbox")

ToDeviceMessages = Mapping[str, Mapping[str, Mapping[str, Any]]]
"""``{user_id: {device_id: content}}``, the ``messages`` of one sendToDevice request."""

_COMPONENT = "outbox"
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE outbox_requests (
            seq INTEGER PRIMARY KEY,
            txn_id TEXT NOT NULL UNIQUE,
            event_type TEXT NOT NULL,
            messages BLOB NOT NULL,
            message_count INTEGER NOT NULL,
            created_at REAL NOT NULL
        )"""
    ]
}


# ------------------------------------------------------------------------------ errors, events


class TransientSendError(Exception):
    """A send that may succeed when repeated with the same transaction id.

    ``reason`` is one of ``"429"``, ``"5xx"``, ``"timeout"``, ``"connection"``; ``retry_after`` is
    the server's requested wait in seconds (429 only).
    """

    def __init__(self, reason: str, retry_after: float | None = None, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.retry_after = retry_after
        self.detail = detail


class PermanentSendError(Exception):
    """The homeserver refused the request; repeating it will not help."""

    def __init__(self, status: int, errcode: str | None, error: str | None) -> None:
        super().__init__(f"{status} {errcode or '-'}: {error or ''}")
        self.status = status
        self.errcode = errcode
        self.error = error


class OutboxClosed(RuntimeError):
    """``send()`` was called on an outbox that is not started, closing or closed."""


class OutboxFull(RuntimeError):
    """``send()`` was refused: the outbox holds ``max_pending`` messages already (the homeserver
    keeps failing, or messages come faster than it accepts them). Nothing of the call was
    queued; try again later."""


class OutboxSendFailed(msgspec.Struct, frozen=True, kw_only=True):
    """A local event (not from the wire): the homeserver permanently refused an outbox request.

    ``event_type`` is the type of the messages that were not delivered, ``recipients`` the
    ``(user_id, device_id)`` pairs they were addressed to.
    """

    event_type: str
    txn_id: str
    status: int
    errcode: str | None
    error: str | None
    recipients: tuple[tuple[str, str], ...]


class Transport(Protocol):
    """Sends one sendToDevice request; raises :class:`TransientSendError` or
    :class:`PermanentSendError` when it was not accepted."""

    async def send_to_device(
        self, event_type: str, txn_id: str, messages: ToDeviceMessages
    ) -> None: ...


class EventSink(Protocol):
    """Where :class:`OutboxSendFailed` events go: a ``Dispatcher`` fits."""

    def put_nowait(self, event: object) -> bool: ...


# ------------------------------------------------------------------------------ HTTP transport


class _ErrorBody(msgspec.Struct):
    errcode: str | None = None
    error: str | None = None
    retry_after_ms: int | float | None = None


class HttpTransport:
    """:class:`Transport` over aiohttp against a homeserver's client-server API.

    ``session`` is used as given and not closed here; without one, the transport makes its own
    and :meth:`close` closes it. ``timeout`` (seconds, per request) is optional because the
    :class:`Outbox` enforces its own ``request_timeout``.

    aiohttp itself resends an idempotent request (PUT) once, at once, when the server drops the
    connection; that resend carries the same transaction id, so it is as safe as the outbox's own
    retries, but only a second failure reaches the outbox (and its retry counter).
    """

    def __init__(
        self,
        homeserver: str,
        access_token: str,
        session: aiohttp.ClientSession | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        self.homeserver = homeserver.rstrip("/")
        self._token = access_token
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def __repr__(self) -> str:  # never show the token
        return f"HttpTransport(homeserver={self.homeserver!r})"

    def _session_for_call(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        """Close the session this transport created (a given session is left open)."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> HttpTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        return text.replace(self._token, "<redacted>") if self._token else text

    async def send_to_device(
        self, event_type: str, txn_id: str, messages: ToDeviceMessages
    ) -> None:
        """PUT the messages; returns on 2xx, raises the classified error otherwise."""
        url = URL(
            f"{self.homeserver}/_matrix/client/v3/sendToDevice/"
            f"{quote(event_type, safe='')}/{quote(txn_id, safe='')}",
            encoded=True,
        )
        body = msgspec.json.encode({"messages": messages})
        headers = {"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"}
        try:
            async with self._session_for_call().put(
                url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as resp:
                status = resp.status
                raw = await resp.read()
                retry_header = resp.headers.get("Retry-After")
        except TimeoutError as exc:  # includes aiohttp's ServerTimeoutError
            raise TransientSendError("timeout", detail=self._describe(exc)) from None
        except (aiohttp.ClientError, OSError) as exc:
            # ClientConnectionError, ServerDisconnectedError, ClientPayloadError, resets ...
            raise TransientSendError("connection", detail=self._describe(exc)) from None
        if 200 <= status < 300:
            return
        try:
            err = msgspec.json.decode(raw, type=_ErrorBody)
        except msgspec.DecodeError:
            err = _ErrorBody()
        if status == 429:
            retry_after: float | None = None
            if err.retry_after_ms is not None:
                retry_after = max(0.0, float(err.retry_after_ms) / 1000)
            elif retry_header is not None:
                with contextlib.suppress(ValueError):
                    retry_after = max(0.0, float(retry_header))
            raise TransientSendError("429", retry_after, f"429 {err.errcode or '-'}")
        if status >= 500:
            raise TransientSendError("5xx", detail=f"{status} {err.errcode or '-'}")
        raise PermanentSendError(status, err.errcode, err.error)


# ------------------------------------------------------------------------------ packing


@dataclass(slots=True)
class _Planned:
    event_type: str
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    count: int = 0


def _pack(
    submissions: Sequence[tuple[str, dict[str, dict[str, Any]]]], batch_size: int
) -> tuple[list[_Planned], list[list[int]]]:
    """Pack submissions, in order, into requests of at most ``batch_size`` messages.

    A message goes into the earliest request of its event type that has room and comes after
    every request already holding a message for the same device, so the request order keeps each
    device's message order. Returns the requests and, per submission, the indices it used.
    """
    planned: list[_Planned] = []
    open_by_type: dict[str, list[int]] = {}  # sorted indices of requests with room
    last: dict[tuple[str, str], int] = {}
    used_by: list[list[int]] = []
    for event_type, messages in submissions:
        opens = open_by_type.setdefault(event_type, [])
        used: dict[int, None] = {}
        for user, devices in messages.items():
            for device, content in devices.items():
                key = (user, device)
                pos = bisect_left(opens, last.get(key, -1) + 1)
                if pos == len(opens):
                    opens.append(len(planned))
                    planned.append(_Planned(event_type))
                idx = opens[pos]
                req = planned[idx]
                req.messages.setdefault(user, {})[device] = content
                req.count += 1
                if req.count >= batch_size:
                    del opens[pos]
                last[key] = idx
                used[idx] = None
        used_by.append(list(used))
    return planned, used_by


# ------------------------------------------------------------------------------ the outbox


@dataclass(slots=True, eq=False)
class _Request:
    seq: int
    txn_id: str
    event_type: str
    messages: dict[str, dict[str, Any]]
    count: int
    blocked: int = 0  # lanes in which an earlier request is still pending
    attempts: int = 0
    queued_at: float = 0.0  # clock() when admitted (for oldest_pending_age)

    def recipients(self) -> list[tuple[str, str]]:
        return [(u, d) for u, devices in self.messages.items() for d in devices]


@dataclass(slots=True, eq=False)
class _Submission:
    event_type: str
    messages: dict[str, dict[str, Any]]
    future: asyncio.Future[list[str]]
    txn_id: str | None = None  # the caller's own id: one request of its own, idempotent
    count: int = 0  # messages


def _new_txn_id() -> str:
    return f"bt{time.time_ns():x}{secrets.token_hex(6)}"


_Decoded = dict[str, dict[str, dict[str, Any]]]


class Outbox:
    """Batches, persists and reliably sends to-device messages (see the module docs).

    Args:
        transport: sends one request (:class:`HttpTransport` in production).
        store: the bot's :class:`~bot_toolkit.store.Store`; the outbox creates its own table.
        metrics: registry for the outbox metrics (a private one when ``None``).
        batch_size: most messages in one request.
        concurrency: most requests in flight at once.
        backoff_initial, backoff_max: retry delay bounds in seconds (see the module docs).
        request_timeout: seconds one attempt may take before it is abandoned and retried.
        max_pending: most messages waiting at once (see :class:`OutboxFull`).
        dispatcher: receives an :class:`OutboxSendFailed` for each permanently refused request.
        clock, sleep, rng: injectable for tests (``time.monotonic``, ``asyncio.sleep``, a
            ``random.Random``).
    """

    def __init__(
        self,
        transport: Transport,
        store: Store,
        metrics: Metrics | None = None,
        *,
        batch_size: int = 250,
        concurrency: int = 20,
        backoff_initial: float = 0.5,
        backoff_max: float = 60.0,
        request_timeout: float = 30.0,
        max_pending: int = 100_000,
        dispatcher: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if batch_size < 1 or concurrency < 1 or max_pending < 1:
            raise ValueError("batch_size, concurrency and max_pending must be at least 1")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self._transport = transport
        self._store = store
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.request_timeout = request_timeout
        self.max_pending = max_pending
        self._dispatcher = dispatcher
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()

        metrics = metrics or Metrics()
        self._m_depth = metrics.gauge("outbox_queue_depth", "Outbox requests not yet accepted")
        self._m_sent = metrics.counter(
            "outbox_requests_sent_total",
            "Outbox requests accepted by the homeserver",
            ["event_type"],
        )
        self._m_retries = metrics.counter(
            "outbox_retries_total", "Outbox request attempts that will be retried", ["reason"]
        )
        self._m_failed = metrics.counter(
            "outbox_permanent_failures_total",
            "Outbox requests permanently refused by the homeserver",
            ["event_type", "status"],
        )
        self._m_messages = metrics.counter(
            "outbox_messages_total", "To-device messages accepted by the homeserver", ["event_type"]
        )
        self._m_refused = metrics.counter(
            "outbox_refused_messages_total",
            "To-device messages refused by send() because the outbox was full",
            ["event_type"],
        )
        self._m_full = metrics.gauge(
            "outbox_full", "1 while the outbox is full and refuses new messages"
        )
        self._admitted_messages = 0  # in admitted requests (not yet accepted or refused)
        self._writing_messages = 0  # in the submissions of the running store write
        self._full = False

        self._state = "new"  # new -> running -> closing -> closed
        self._requests: dict[str, _Request] = {}
        self._lanes: dict[tuple[str, str], deque[_Request]] = {}
        self._ready: asyncio.Queue[_Request] = asyncio.Queue()
        self._submissions: list[_Submission] = []
        self._finished: list[str] = []  # txn ids to delete from the store
        self._writing = False
        self._writer_stop = False
        self._wake_writer = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks = TaskSet(log, "outbox")  # the writer and the workers
        self._writer: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._closing: asyncio.Future[None] | None = None
        self._next_seq = 1
        self._not_before = 0.0  # no attempt starts before this clock() value (after a 429)

    # -------------------------------------------------------------- lifecycle

    @property
    def queue_depth(self) -> int:
        """Requests not yet accepted or refused (persisted ones included)."""
        return len(self._requests)

    @property
    def idle(self) -> bool:
        """Whether every request is accepted or refused and the store is up to date (what
        :meth:`flush` waits for)."""
        return self._idle.is_set()

    def pending_messages(self) -> int:
        """Messages waiting: queued, being stored, or being sent."""
        queued = sum(s.count for s in self._submissions)
        return self._admitted_messages + self._writing_messages + queued

    def is_full(self) -> bool:
        """Whether the outbox refused a ``send()`` and is not yet back under 90 % of its bound."""
        return self._full

    def oldest_pending_age(self) -> float | None:
        """Seconds the oldest request not yet accepted has been queued (``None`` when empty).

        Requests recovered from the store count from the moment they were loaded.
        """
        for req in self._requests.values():  # admission order: the first one is the oldest
            return max(0.0, self._clock() - req.queued_at)
        return None

    async def start(self) -> int:
        """Create the table if needed, load unsent requests, start sending.

        Returns how many stored requests were recovered; they keep their transaction ids.
        """
        if self._state != "new":
            raise RuntimeError("an Outbox can be started once")
        await self._store.migrate(_COMPONENT, _MIGRATIONS)
        rows = await self._store.fetchall(
            "SELECT seq, txn_id, event_type, messages, message_count "
            "FROM outbox_requests ORDER BY seq"
        )
        for seq, txn_id, event_type, body, count in rows:
            messages = msgspec.json.decode(body, type=_Decoded)
            self._admit(_Request(seq, txn_id, event_type, messages, count))
            self._next_seq = seq + 1
        if rows:
            log.info("outbox: recovered %d unsent requests from the store", len(rows))
        self._state = "running"
        self._writer = self._tasks.spawn(self._write_loop(), "outbox-writer")
        self._workers = [
            self._tasks.spawn(self._work_loop(), f"outbox-worker-{i}")
            for i in range(self.concurrency)
        ]
        return len(rows)

    async def flush(self, timeout: float | None) -> bool:  # noqa: ASYNC109
        """Wait until every request is accepted or refused and the store is up to date.

        Returns ``False`` when ``timeout`` seconds passed first (nothing is cancelled).
        """
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, deadline: float = 10.0) -> int:
        """Graceful shutdown: refuse new messages, flush for up to ``deadline`` seconds, stop.

        Requests still unsent at the deadline are cancelled mid-flight if need be and stay in the
        store for the next :meth:`start`. Returns how many were left there. The store and the
        transport stay open (they belong to the caller).
        """
        if self._closing is not None:  # closed, or another close() is running: wait for it
            await asyncio.shield(self._closing)
            return len(self._requests)
        self._closing = asyncio.get_running_loop().create_future()
        try:
            return await self._close(deadline)
        finally:
            self._closing.set_result(None)

    async def _close(self, deadline: float) -> int:
        if self._state == "new":
            self._state = "closed"
            return 0
        self._state = "closing"
        drained = await self.flush(deadline)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        # The writer is never cancelled mid-commit: it finishes pending inserts and deletions.
        self._writer_stop = True
        self._wake_writer.set()
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        self._state = "closed"
        left = len(self._requests)
        if drained:
            log.info("outbox: closed, everything delivered")
        else:
            log.warning("outbox: closed at the deadline; %d requests stay persisted", left)
        return left

    async def __aenter__(self) -> Outbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -------------------------------------------------------------- sending

    async def send(
        self, event_type: str, messages: ToDeviceMessages, *, txn_id: str | None = None
    ) -> list[str]:
        """Queue ``messages`` of ``event_type``; returns once they are persisted.

        Returns the transaction ids of the requests that carry them (possibly shared with other
        ``send()`` calls made at the same time). The messages are copied: later changes to the
        given mapping are not seen. A caller cancelled before the commit started queues nothing;
        one cancelled during the commit may still have its messages sent.

        ``txn_id`` lets a caller that records its own transaction id *before* sending (the
        withheld-notice ledger does) get exactly-once delivery across crashes: the messages go
        out as one request under that id, never packed with others, and a repeated ``send()``
        with an id that is still queued adds nothing. After a crash the caller resends with the
        same id and the homeserver drops the repeat. The messages must then fit one request
        (at most ``batch_size``).

        Raises:
            OutboxClosed: the outbox is not started, or is closing.
            TypeError, ValueError: the messages are not ``{str: {str: JSON object}}``, or a
                ``txn_id`` is empty or its messages exceed ``batch_size``.
            Exception: whatever the store raised; then nothing was queued.
        """
        if self._state != "running":
            raise OutboxClosed(f"the outbox is {self._state}; it takes no messages")
        if not isinstance(event_type, str) or not event_type:
            raise ValueError("event_type must be a non-empty string")
        try:
            snapshot = msgspec.json.decode(msgspec.json.encode(messages), type=_Decoded)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"messages must be {{user: {{device: object}}}}: {exc}") from None
        if not any(snapshot.values()):
            return []
        if txn_id is not None:
            if not isinstance(txn_id, str) or not txn_id:
                raise ValueError("txn_id must be a non-empty string")
            count = sum(len(devices) for devices in snapshot.values())
            if count > self.batch_size:
                raise ValueError(
                    f"{count} messages do not fit one request of at most {self.batch_size}"
                )
            if txn_id in self._requests:
                return [txn_id]  # already queued: sending it again would add nothing
        count = sum(len(devices) for devices in snapshot.values())
        waiting = self.pending_messages()
        if waiting + count > self.max_pending:
            self._m_refused.inc(event_type[:64], amount=count)
            log.error(
                "outbox: full (%d messages waiting, bound %d): refused %d %.64s messages",
                waiting,
                self.max_pending,
                count,
                event_type,
            )
            if waiting >= 0.9 * self.max_pending:  # not for one oversized call alone
                self._full = True
                self._m_full.set(value=1)
            raise OutboxFull(f"the outbox holds {waiting} messages (bound {self.max_pending})")
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._submissions.append(_Submission(event_type, snapshot, future, txn_id, count))
        self._idle.clear()
        self._wake_writer.set()
        return await future

    def _admit(self, req: _Request) -> None:
        req.queued_at = self._clock()
        self._requests[req.txn_id] = req
        for key in req.recipients():
            lane = self._lanes.get(key)
            if lane is None:
                self._lanes[key] = deque((req,))
            else:
                lane.append(req)
                req.blocked += 1
        if req.blocked == 0:
            self._ready.put_nowait(req)
        self._admitted_messages += req.count
        self._m_depth.set(value=len(self._requests))
        self._idle.clear()

    def _finish(self, req: _Request) -> None:
        """The request was accepted or refused: forget it, unblock the next in its lanes."""
        del self._requests[req.txn_id]
        self._finished.append(req.txn_id)
        self._wake_writer.set()
        for key in req.recipients():
            lane = self._lanes[key]
            lane.popleft()
            if lane:
                nxt = lane[0]
                nxt.blocked -= 1
                if nxt.blocked == 0:
                    self._ready.put_nowait(nxt)
            else:
                del self._lanes[key]
        self._admitted_messages -= req.count
        self._m_depth.set(value=len(self._requests))
        if self._full and self.pending_messages() < 0.9 * self.max_pending:
            self._full = False
            self._m_full.set(value=0)
            log.info("outbox: no longer full (%d messages waiting)", self.pending_messages())

    def _check_idle(self) -> None:
        if not (self._requests or self._submissions or self._finished or self._writing):
            self._idle.set()

    # -------------------------------------------------------------- the writer (group commit)

    async def _write_loop(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            ok = True
            if self._submissions or self._finished:
                self._writing = True
                try:
                    ok = await self._write_round()
                finally:
                    self._writing = False
            self._check_idle()
            if self._writer_stop and (not ok or not (self._submissions or self._finished)):
                return  # after a failed final write, what is left is resent after a restart

    async def _write_round(self) -> bool:
        subs = [s for s in self._submissions if not s.future.done()]  # drop cancelled callers
        self._submissions = []
        done, self._finished = self._finished, []
        self._writing_messages = sum(s.count for s in subs)
        try:
            return await self._write_subs(subs, done)
        finally:
            self._writing_messages = 0

    async def _write_subs(self, subs: list[_Submission], done: list[str]) -> bool:
        try:
            packed = [s for s in subs if s.txn_id is None]
            planned, used_by = _pack([(s.event_type, s.messages) for s in packed], self.batch_size)
            requests = [
                _Request(self._next_seq + i, _new_txn_id(), p.event_type, p.messages, p.count)
                for i, p in enumerate(planned)
            ]
            own = self._own_id_requests(subs, self._next_seq + len(requests))
            requests += own
            now = time.time()
            rows = [
                (r.seq, r.txn_id, r.event_type, msgspec.json.encode(r.messages), r.count, now)
                for r in requests
            ]
            async with self._store.transaction() as conn:
                # Deletions first: a caller may resend (with its own txn_id) a request that was
                # accepted a moment ago and whose row is deleted only in this round.
                if done:
                    await conn.executemany(
                        "DELETE FROM outbox_requests WHERE txn_id = ?", [(t,) for t in done]
                    )
                if rows:
                    await conn.executemany(
                        "INSERT INTO outbox_requests "
                        "(seq, txn_id, event_type, messages, message_count, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        rows,
                    )
        except Exception as exc:
            log.error(
                "outbox: store write failed (%d send() calls, %d deletions): %s",
                len(subs),
                len(done),
                exc,
            )
            for s in subs:
                if not s.future.done():
                    s.future.set_exception(exc)
            self._finished[:0] = done  # try the deletions again with the next write
            return False
        self._next_seq += len(requests)
        for r in requests:
            self._admit(r)
        for s, used in zip(packed, used_by, strict=True):
            if not s.future.done():
                s.future.set_result([requests[i].txn_id for i in used])
        for s in subs:
            if s.txn_id is not None and not s.future.done():
                s.future.set_result([s.txn_id])
        if rows:
            log.debug("outbox: stored %d requests from %d send() calls", len(rows), len(subs))
        return True

    def _own_id_requests(self, subs: Sequence[_Submission], first_seq: int) -> list[_Request]:
        """One request per caller-chosen transaction id not already queued (first one wins)."""
        out: list[_Request] = []
        seen: set[str] = set()
        for s in subs:
            txn = s.txn_id
            if txn is None or txn in seen or txn in self._requests:
                continue
            seen.add(txn)
            count = sum(len(devices) for devices in s.messages.values())
            out.append(_Request(first_seq + len(out), txn, s.event_type, s.messages, count))
        return out

    # -------------------------------------------------------------- the workers

    async def _work_loop(self) -> None:
        while True:
            req = await self._ready.get()
            await self._deliver(req)

    def _backoff(self, attempt: int) -> float:
        base: float = min(self.backoff_max, self.backoff_initial * 2 ** min(attempt - 1, 62))
        return base * (0.5 + 0.5 * self._rng.random())

    async def _deliver(self, req: _Request) -> None:
        while True:
            wait = self._not_before - self._clock()
            if wait > 0:
                await self._sleep(wait)
            retry_after: float | None = None
            try:
                async with asyncio.timeout(self.request_timeout):
                    await self._transport.send_to_device(req.event_type, req.txn_id, req.messages)
            except PermanentSendError as exc:
                self._refused(req, exc)
                return
            except TransientSendError as exc:
                reason, retry_after, detail = exc.reason, exc.retry_after, exc.detail
            except TimeoutError:
                reason, detail = "timeout", f"no answer within {self.request_timeout}s"
            except (OSError, aiohttp.ClientError) as exc:
                reason, detail = "connection", type(exc).__name__
            except Exception as exc:
                reason, detail = "other", type(exc).__name__
                log.warning("outbox: unexpected transport error for %s", req.txn_id, exc_info=True)
            else:
                self._m_sent.inc(req.event_type)
                self._m_messages.inc(req.event_type, amount=req.count)
                self._finish(req)
                return
            req.attempts += 1
            self._m_retries.inc(reason)
            delay = self._backoff(req.attempts)
            if retry_after is not None:
                delay = max(delay, retry_after)
                self._not_before = max(self._not_before, self._clock() + retry_after)
            log.info(
                "outbox: %s request %s attempt %d failed (%s: %s); retrying in %.2fs",
                req.event_type,
                req.txn_id,
                req.attempts,
                reason,
                detail,
                delay,
            )
            await self._sleep(delay)

    def _refused(self, req: _Request, exc: PermanentSendError) -> None:
        log.error(
            "outbox: homeserver refused %s request %s (%d messages): %d %s %s; not retried",
            req.event_type,
            req.txn_id,
            req.count,
            exc.status,
            exc.errcode,
            exc.error,
        )
        self._m_failed.inc(req.event_type, str(exc.status))
        event = OutboxSendFailed(
            event_type=req.event_type,
            txn_id=req.txn_id,
            status=exc.status,
            errcode=exc.errcode,
            error=exc.error,
            recipients=tuple(req.recipients()),
        )
        self._finish(req)
        if self._dispatcher is not None:
            try:
                if not self._dispatcher.put_nowait(event):
                    log.warning("outbox: dispatcher full; OutboxSendFailed %s dropped", req.txn_id)
            except Exception:
                log.warning(
                    "outbox: could not hand OutboxSendFailed %s to the dispatcher",
                    req.txn_id,
                    exc_info=True,
                )
