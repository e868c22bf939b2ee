"""Bounded, concurrent, ordered dispatch of typed to-device events to async handlers.

A :class:`Dispatcher` takes events through :meth:`Dispatcher.put` (or :meth:`Dispatcher.put_raw`
for wire dicts) and hands each one to every handler registered for its class or a base class.

Ordering: events share an *ordering key*, ``(sender, transaction_id)`` when the event has a
transaction id, else ``(sender,)``. The events of one key are handled one after another in arrival
order (the next one starts once every handler of the previous one has finished); different keys run
in parallel, at most ``concurrency`` events at a time.

Implementation: ``concurrency`` long-lived worker tasks take keys from a ready list, handle one
event of the key, and put the key back at the end of the list while it has more events (round
robin). There is no task per event; an event with several handlers runs the first one in the worker
and the others in short-lived tasks so that one slow handler does not hold up its siblings. Handler
time limits are enforced by one watchdog task that cancels a handler past its deadline, instead of a
timer per handler call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from bot_toolkit._tasks import TaskSet
from bot_toolkit.metrics import Metrics

if TYPE_CHECKING:
    from bot_toolkit._decode_report import DecodeErrorReporter
    from bot_toolkit.events import ToDeviceEvent

__all__ = [
    "CallNext",
    "CloseSummary",
    "Dispatcher",
    "DispatcherClosed",
    "HandlerCancelled",
    "HandlerTimeout",
]

logger = logging.getLogger("bot_toolkit.dispatcher")

E = TypeVar("E")
X = TypeVar("X", bound=BaseException)
HandlerT = TypeVar("HandlerT", bound=Callable[..., Awaitable[None]])

CallNext = Callable[[Any], Awaitable[None]]
"""What a middleware receives as ``call_next``: ``await call_next(event)`` runs the rest."""

_YIELD_EVERY: Final = 32
"""A worker yields to the event loop after this many events handled without a pause."""
_CANCEL_GRACE: Final = 1.0
"""Seconds :meth:`Dispatcher.close` waits for cancelled tasks to finish."""
_MAX_LOGGED_DECODE_ERRORS: Final = 1024
"""Distinct (event_type, path, reason) triples logged; later new ones are only counted."""


class DispatcherClosed(RuntimeError):
    """Raised by ``put``/``put_nowait``/``start`` once :meth:`Dispatcher.close` has begun."""


class HandlerCancelled(RuntimeError):
    """A handler raised ``CancelledError`` although nothing cancelled it.

    Treated like any other handler failure (logged, counted, passed to error handlers), so such a
    handler cannot take its worker down with it.
    """

    def __init__(self) -> None:
        super().__init__("handler raised CancelledError without being cancelled")


class HandlerTimeout(TimeoutError):
    """A handler ran longer than ``handler_timeout`` and was cancelled.

    Passed to error handlers (``on_error(TimeoutError)`` or ``on_error(HandlerTimeout)``).
    """

    def __init__(self, timeout: float) -> None:
        super().__init__(f"handler did not finish within {timeout:g}s")
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class CloseSummary:
    """What :meth:`Dispatcher.close` did: events handled during shutdown, and events given up."""

    drained: int
    abandoned: int


def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
    """Resolve the first of ``waiters`` still waiting (the ones before it gave up: dropped)."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


@dataclass(frozen=True, slots=True)
class _Handler:
    func: Callable[[Any], Awaitable[None]]
    filters: tuple[Callable[[Any], bool], ...]
    name: str


def _name(func: object) -> str:
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"{module}.{qualname}" if module else str(qualname)


def _check_async(func: object, arity: int, what: str) -> None:
    """Fail at registration unless ``func`` is ``async def`` taking ``arity`` positional args."""
    is_async = inspect.iscoroutinefunction(func) or (
        callable(func)
        and not inspect.isroutine(func)
        and not isinstance(func, type)
        and inspect.iscoroutinefunction(type(func).__call__)  # instance with async __call__
    )
    if not is_async:
        raise TypeError(f"{what} must be an async function (async def), got {func!r}")
    try:
        inspect.signature(func).bind(*([None] * arity))  # type: ignore[arg-type]
    except TypeError as exc:
        raise TypeError(
            f"{what} {_name(func)} must accept {arity} positional argument(s): {exc}"
        ) from None
    except ValueError:  # no signature available: trust it
        pass


def _ordering_key(event: object) -> Hashable:
    txn = getattr(event, "transaction_id", None)
    sender = getattr(event, "sender", None)
    return (sender,) if txn is None else (sender, txn)


def _event_label(cls: type) -> str:
    label = getattr(cls, "event_type", None)
    return label if isinstance(label, str) and label else cls.__name__


class Dispatcher:
    """Routes events to async handlers with bounded concurrency and per-key ordering.

    Args:
        metrics: registry for the dispatcher's counters (a private one when ``None``).
        concurrency: how many events are handled at once (the number of worker tasks). The
            handlers of one event run concurrently with each other, so with several handlers per
            event more handler calls than this may be running.
        queue_size: how many events may wait, across all keys, before ``put`` waits.
        handler_timeout: seconds after which a handler (or error handler) is cancelled and
            counted as a timeout; enforced to within about an eighth of it. ``None``: no limit.
            Middleware is not timed.

    Not thread-safe: call every method from the event loop that runs the dispatcher.
    """

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        concurrency: int = 64,
        queue_size: int = 10_000,
        handler_timeout: float | None = 60.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if handler_timeout is not None and handler_timeout <= 0:
            raise ValueError("handler_timeout must be positive or None")
        self.metrics = metrics if metrics is not None else Metrics()
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.handler_timeout = handler_timeout

        self._handlers: dict[type, list[_Handler]] = {}
        self._routes: dict[type, tuple[_Handler, ...]] = {}
        self._labels: dict[type, str] = {}
        self._middleware: list[Callable[[Any, CallNext], Awaitable[None]]] = []
        self._chain: CallNext = self._run_handlers
        self._error_handlers: dict[type[BaseException], list[_Handler]] = {}
        self._handled_listeners: list[Callable[[object], None]] = []

        self._pending: dict[Hashable, deque[object]] = {}  # key -> its waiting events
        self._ready: deque[Hashable] = deque()  # keys with events and no worker on them
        self._queued = 0  # events waiting, all keys
        self._in_flight = 0  # events being handled
        self._handled = 0
        self._drained: asyncio.Event | None = None  # set by a worker once idle; only while joined
        self._idle: deque[asyncio.Future[None]] = deque()  # idle workers
        self._putters: deque[asyncio.Future[None]] = deque()  # put() calls waiting for room
        self._tasks = TaskSet(logger, "dispatcher")  # workers, watchdog, sibling handlers
        self._workers: list[asyncio.Task[Any]] = []  # also in _tasks
        self._deadlines: dict[asyncio.Task[Any], float] = {}  # task -> when its handler expires
        self._expired: dict[asyncio.Task[Any], int] = {}  # task -> cancels the watchdog issued
        self._started = False
        self._closed = False
        self._close_result: asyncio.Future[CloseSummary] | None = None

        m = self.metrics
        self._m_dispatched = m.counter(
            "events_dispatched_total", "Events handed to handlers", ["event_type"]
        )
        self._m_errors = m.counter(
            "handler_errors_total",
            "Handler failures (kind: exception or timeout)",
            ["handler", "event_type", "kind"],
        )
        self._decode_report: DecodeErrorReporter | None = None
        self._m_decode = m.counter(
            "decode_errors_total", "To-device events that failed to decode", ["event_type"]
        )
        self._m_dropped = m.counter(
            "events_dropped_total", "Events refused by put_nowait on a full queue", ["event_type"]
        )
        ref = weakref.ref(self)
        m.gauge(
            "dispatcher_queue_depth",
            "Events queued and not yet started",
            read=lambda: float(d._queued) if (d := ref()) is not None else 0.0,
        )

    # ----------------------------------------------------------------- registration

    def register(
        self,
        event_cls: type[E],
        handler: Callable[[E], Awaitable[None]],
        *filters: Callable[[E], bool],
    ) -> None:
        """Call ``handler(event)`` for events of ``event_cls`` or a subclass passing all filters.

        Raises:
            TypeError: ``event_cls`` is not a class, ``handler`` is not an ``async def`` taking one
                positional argument, or a filter is not a plain (sync) callable.
        """
        if not isinstance(event_cls, type):
            raise TypeError(f"event class must be a class, got {event_cls!r}")
        _check_async(handler, 1, "handler")
        for f in filters:
            if not callable(f) or inspect.iscoroutinefunction(f):
                raise TypeError(f"filter must be a sync callable (event) -> bool, got {f!r}")
        entry = _Handler(handler, tuple(filters), _name(handler))
        self._handlers.setdefault(event_cls, []).append(entry)
        self._routes.clear()

    def on(
        self, event_cls: type[E], *filters: Callable[[E], bool]
    ) -> Callable[[HandlerT], HandlerT]:
        """Decorator form of :meth:`register`; returns the handler unchanged."""

        def decorate(handler: HandlerT) -> HandlerT:
            self.register(event_cls, handler, *filters)
            return handler

        return decorate

    def middleware(self, mw: HandlerT) -> HandlerT:
        """Add ``async def mw(event, call_next)`` around handling; the first added is outermost.

        A middleware drops an event by returning without awaiting ``call_next(event)``.
        Usable as a decorator (returns ``mw`` unchanged).
        """
        _check_async(mw, 2, "middleware")
        self._middleware.append(mw)
        chain: CallNext = self._run_handlers
        for outer in reversed(self._middleware):
            chain = _bind(outer, chain)
        self._chain = chain
        return mw

    def add_handled_listener(self, listener: Callable[[object], None]) -> Callable[[], None]:
        """Call ``listener(event)`` once every handler (and middleware) of an event is done,
        whatever they did; returns a function that removes it. An exception from the listener
        is logged. (The durable inbound queue forgets an event there.)"""
        self._handled_listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._handled_listeners.remove(listener)

        return remove

    def on_error(self, exc_cls: type[X]) -> Callable[[HandlerT], HandlerT]:
        """Decorator: ``async def eh(event, exc)`` for handler failures of ``exc_cls``.

        The most specific class in the exception's MRO with error handlers wins; all of its
        error handlers run. Timeouts arrive as :class:`HandlerTimeout` (a ``TimeoutError``).
        Without a matching error handler the failure is logged.
        """
        if not (isinstance(exc_cls, type) and issubclass(exc_cls, BaseException)):
            raise TypeError(f"on_error needs an exception class, got {exc_cls!r}")

        def decorate(handler: HandlerT) -> HandlerT:
            _check_async(handler, 2, "error handler")
            self._error_handlers.setdefault(exc_cls, []).append(
                _Handler(handler, (), _name(handler))
            )
            return handler

        return decorate

    def _route(self, cls: type) -> tuple[_Handler, ...]:
        found: list[_Handler] = []
        for base in cls.__mro__:
            found.extend(self._handlers.get(base, ()))
        route = self._routes[cls] = tuple(found)
        return route

    def _label(self, cls: type) -> str:
        label = self._labels.get(cls)
        if label is None:
            label = self._labels[cls] = _event_label(cls)
        return label

    # ----------------------------------------------------------------- feeding

    def _enqueue(self, event: object) -> None:
        key = _ordering_key(event)
        queue = self._pending.get(key)
        if queue is None:
            self._pending[key] = deque((event,))
            self._ready.append(key)
            _wake_one(self._idle)
        else:
            queue.append(event)
        self._queued += 1

    async def put(self, event: object) -> None:
        """Queue ``event``; waits while ``queue_size`` events are already waiting.

        Before :meth:`start` events are only queued. A handler should prefer :meth:`put_nowait`:
        one that waits here for room holds its worker meanwhile.

        Raises:
            DispatcherClosed: the dispatcher is closing or closed.
        """
        if self._queued >= self.queue_size or self._closed:
            loop = asyncio.get_running_loop()
            while True:
                if self._closed:
                    raise DispatcherClosed("dispatcher is closed; no new events accepted")
                if self._queued < self.queue_size:
                    break
                waiter: asyncio.Future[None] = loop.create_future()
                self._putters.append(waiter)
                try:
                    await waiter
                except BaseException:
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self._putters.remove(waiter)
                    if self._queued < self.queue_size:
                        self._wake_putter()  # pass on a wake-up we may have taken
                    raise
        self._enqueue(event)

    def put_nowait(self, event: object) -> bool:
        """Queue ``event`` if there is room; otherwise count a drop and return ``False``.

        Raises:
            DispatcherClosed: the dispatcher is closing or closed.
        """
        if self._closed:
            raise DispatcherClosed("dispatcher is closed; no new events accepted")
        if self._queued >= self.queue_size:
            self._m_dropped.inc(self._label(type(event)))
            return False
        self._enqueue(event)
        return True

    async def put_raw(
        self,
        raw: Mapping[str, Any] | bytes | bytearray | memoryview | str,
        *,
        decrypted_from: str | None = None,
    ) -> ToDeviceEvent | None:
        """Decode a wire to-device event and :meth:`put` it; returns the event, or ``None``.

        A decode failure never raises: it is counted in ``decode_errors_total`` and logged at
        WARNING once per distinct (event type, path, reason). ``DispatcherClosed`` still raises.
        """
        # imported lazily: nothing else in the dispatcher needs the event schema
        from bot_toolkit._decode_report import DecodeErrorReporter  # noqa: PLC0415
        from bot_toolkit.events import DecodeError, decode  # noqa: PLC0415

        try:
            event = decode(raw, decrypted_from=decrypted_from)
        except DecodeError as exc:  # decode() raises nothing else
            if self._decode_report is None:
                self._decode_report = DecodeErrorReporter(
                    self._m_decode, logger, limit=_MAX_LOGGED_DECODE_ERRORS
                )
            sender = raw.get("sender") if isinstance(raw, Mapping) else None
            self._decode_report.report(exc, sender)
            return None
        await self.put(event)
        return event

    def _wake_putter(self) -> None:
        _wake_one(self._putters)

    def _wake_joiners(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.set()

    @property
    def idle(self) -> bool:
        """``True`` while nothing is queued and nothing is being handled (what :meth:`join` awaits).

        With several parts that feed each other (a handler's send is another dispatcher's
        event), a test settles them by awaiting each one's ``join`` in turn until one pass finds
        every part ``idle`` at the same moment. Like :meth:`join`, it does not look at tasks
        that handlers started themselves.
        """
        return not self._queued and not self._in_flight

    async def join(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until nothing is queued and nothing is being handled.

        Returns ``True`` once the dispatcher is idle (at once if it already is), ``False`` if it
        is still busy after ``timeout`` seconds (``None``: no limit). Events put while waiting
        are waited for too: ``True`` means idle at the moment ``join`` returns. Before
        :meth:`start` queued events are not handled, so ``join`` waits for ``start`` (or times
        out); after :meth:`close` the dispatcher is idle (what was not handled was abandoned).
        Handlers' own background work (tasks they started) is not waited for.
        """
        if self.idle:
            return True
        try:
            async with asyncio.timeout(timeout):
                while self._queued or self._in_flight:
                    drained = self._drained
                    if drained is None:
                        drained = self._drained = asyncio.Event()
                    await drained.wait()
        except TimeoutError:
            return False
        return True

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the workers (idempotent).

        Raises:
            DispatcherClosed: the dispatcher is closing or closed.
        """
        if self._closed:
            raise DispatcherClosed("dispatcher is closed; it cannot be restarted")
        self._start_workers()

    def _start_workers(self) -> None:
        if self._started:
            return
        self._started = True
        for i in range(self.concurrency):
            worker = self._tasks.spawn(self._worker(), f"bot_toolkit.dispatcher.worker-{i}")
            self._workers.append(worker)
        if self.handler_timeout is not None:
            watchdog = self._watchdog(self.handler_timeout)
            self._tasks.spawn(watchdog, "bot_toolkit.dispatcher.watchdog")

    async def close(self, timeout: float = 10.0) -> CloseSummary:  # noqa: ASYNC109
        """Stop accepting events, handle those already queued, and stop every task.

        Events still queued or running after ``timeout`` seconds are cancelled and reported as
        abandoned. Calling ``close`` again returns the first call's summary.
        """
        if self._close_result is not None:
            return await asyncio.shield(self._close_result)
        result: asyncio.Future[CloseSummary] = asyncio.get_running_loop().create_future()
        self._close_result = result
        self._closed = True
        for waiter in self._putters:
            if not waiter.done():
                waiter.set_result(None)  # they see _closed and raise DispatcherClosed
        self._putters.clear()
        handled_before = self._handled
        try:
            if self._queued:
                self._start_workers()
            for waiter in self._idle:
                if not waiter.done():
                    waiter.set_result(None)  # idle workers see _closed and exit
            self._idle.clear()
            if self._workers:
                await asyncio.wait(self._workers, timeout=timeout)
            abandoned = self._queued + self._in_flight
            await self._tasks.cancel(grace=_CANCEL_GRACE)
        except BaseException:
            for task in self._tasks:
                task.cancel()
            result.cancel()
            raise
        self._pending.clear()
        self._ready.clear()
        self._queued = 0
        self._in_flight = 0  # what was still running was cancelled: counted as abandoned
        self._wake_joiners()
        summary = CloseSummary(drained=self._handled - handled_before, abandoned=abandoned)
        if abandoned:
            logger.warning(
                "dispatcher closed after %gs: %d events handled, %d abandoned",
                timeout,
                summary.drained,
                abandoned,
            )
        result.set_result(summary)
        return summary

    async def __aenter__(self) -> Dispatcher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ----------------------------------------------------------------- handling

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        ready, pending = self._ready, self._pending
        budget = _YIELD_EVERY
        while True:
            if not ready:
                if self._closed:
                    return
                waiter: asyncio.Future[None] = loop.create_future()
                self._idle.append(waiter)
                try:
                    await waiter
                finally:
                    if not waiter.done():
                        waiter.cancel()
                budget = _YIELD_EVERY
                continue
            key = ready.popleft()
            queue = pending[key]
            event = queue.popleft()
            self._queued -= 1
            if self._putters:
                self._wake_putter()
            self._in_flight += 1
            cls = type(event)
            self._m_dispatched.inc(self._labels.get(cls) or self._label(cls))
            try:
                await self._chain(event)
            except Exception as exc:  # only middleware gets here: _run_handlers never raises
                await self._failed(self._middleware_name(exc), event, exc)
            for listener in self._handled_listeners:
                try:
                    listener(event)
                except Exception:
                    logger.exception("a handled-event listener failed")
            self._in_flight -= 1
            self._handled += 1
            if queue:
                ready.append(key)
            else:
                del pending[key]
                if self._drained is not None and not self._in_flight and not self._queued:
                    self._wake_joiners()
            budget -= 1
            if not budget:
                budget = _YIELD_EVERY
                await asyncio.sleep(0)

    async def _run_handlers(self, event: object) -> None:
        cls = type(event)
        route = self._routes.get(cls)
        if route is None:
            route = self._route(cls)
        if not route:
            return
        if len(route) == 1 and not route[0].filters:
            await self._call(route[0], event)
            return
        selected: list[_Handler] = []
        for handler in route:
            try:
                for accept in handler.filters:
                    if not accept(event):
                        break
                else:
                    selected.append(handler)
            except Exception as exc:
                await self._failed(handler.name, event, exc)
        if not selected:
            return
        siblings = [self._tasks.spawn(self._call(h, event)) for h in selected[1:]]
        try:
            await self._call(selected[0], event)
        finally:
            for sibling in siblings:
                await sibling  # never raises; cancelled with us if we are cancelled

    async def _call(self, handler: _Handler, event: object) -> None:
        exc = await self._invoke(handler.func, event)
        if exc is not None:
            await self._failed(handler.name, event, exc)

    async def _invoke(self, func: Callable[..., Awaitable[None]], *args: Any) -> Exception | None:
        """Await ``func(*args)`` under the deadline; return what it raised, or ``None``.

        A timeout comes back as :class:`HandlerTimeout`. Cancellation from outside propagates.
        """
        timeout = self.handler_timeout
        task = asyncio.current_task()
        assert task is not None
        if timeout is None:
            try:
                await func(*args)
            except Exception as exc:
                return exc
            except asyncio.CancelledError:
                if task.cancelling():  # really cancelled (close()): keep going out
                    raise
                return HandlerCancelled()
            return None
        deadlines = self._deadlines
        deadlines[task] = task.get_loop().time() + timeout
        outcome: BaseException | None = None
        try:
            await func(*args)
        except BaseException as exc:
            outcome = exc
        del deadlines[task]
        fired = self._expired.pop(task, 0)
        if fired:
            for _ in range(fired):
                task.uncancel()
            if task.cancelling():  # also cancelled from outside (close): keep going out
                raise outcome if outcome is not None else asyncio.CancelledError()
            return HandlerTimeout(timeout)
        if outcome is None or isinstance(outcome, Exception):
            return outcome
        if isinstance(outcome, asyncio.CancelledError) and not task.cancelling():
            return HandlerCancelled()
        raise outcome

    async def _watchdog(self, limit: float) -> None:
        tick = min(max(limit / 8, 0.005), 1.0)
        deadlines, expired = self._deadlines, self._expired
        while True:
            await asyncio.sleep(tick)
            if not deadlines:
                continue
            now = asyncio.get_running_loop().time()
            late = [task for task, deadline in deadlines.items() if deadline <= now]
            for task in late:
                expired[task] = expired.get(task, 0) + 1
                deadlines[task] = now + limit  # cancel again if it swallows this one
                task.cancel()

    async def _failed(self, name: str, event: object, exc: Exception) -> None:
        kind = "timeout" if isinstance(exc, HandlerTimeout) else "exception"
        label = self._label(type(event))
        self._m_errors.inc(name, label, kind)
        error_handlers: list[_Handler] = []
        for base in type(exc).__mro__:
            error_handlers = self._error_handlers.get(base, [])
            if error_handlers:
                break
        if not error_handlers:
            _log_failure(name, label, event, exc)
            return
        for eh in list(error_handlers):
            eh_exc = await self._invoke(eh.func, event, exc)
            if eh_exc is not None:
                eh_kind = "timeout" if isinstance(eh_exc, HandlerTimeout) else "exception"
                self._m_errors.inc(eh.name, label, eh_kind)
                _log_failure(eh.name, label, event, eh_exc)

    def _middleware_name(self, exc: BaseException) -> str:
        codes = {}
        for mw in self._middleware:
            code = getattr(mw, "__code__", None) or getattr(type(mw).__call__, "__code__", None)
            if code is not None:
                codes[code] = _name(mw)
        name = "middleware"
        tb = exc.__traceback__
        while tb is not None:
            name = codes.get(tb.tb_frame.f_code, name)
            tb = tb.tb_next
        return name


def _bind(mw: Callable[[Any, CallNext], Awaitable[None]], call_next: CallNext) -> CallNext:
    return lambda event: mw(event, call_next)


def _log_failure(name: str, label: str, event: object, exc: Exception) -> None:
    """Log a handler failure by handler, event type and key; never the event's content."""
    sender = getattr(event, "sender", None)
    txn = getattr(event, "transaction_id", None)
    if isinstance(exc, HandlerTimeout):
        logger.error(
            "handler %s timed out after %gs on %s (sender %s, transaction %s)",
            name,
            exc.timeout,
            label,
            sender,
            txn,
        )
    else:
        logger.error(
            "handler %s failed on %s (sender %s, transaction %s)",
            name,
            label,
            sender,
            txn,
            exc_info=exc,
        )
