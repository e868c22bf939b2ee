"""The nio plugin's hand-over of to-device events to the dispatcher, one sync's batch at a time.

Inside :meth:`Handover.batch` (nio handling one sync's to-device section) the emitted events are
collected in wire order; when nio has finished they are committed to the durable inbound queue,
if one is in use (:class:`~bot_toolkit._inbound_link.InboundLink`), then handed to the dispatcher
with ``await put``. A full dispatcher therefore slows the sync loop (the homeserver keeps
undelivered to-device messages), but for at most ``backpressure_timeout`` seconds per sync; what
still does not fit is dropped, counted in ``nio_to_device_dropped_total`` and logged. An event
emitted outside a batch (nio called a hook from elsewhere) is handed over at once, without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from bot_toolkit.dispatcher import Dispatcher, DispatcherClosed
from bot_toolkit.events import ToDeviceEvent
from bot_toolkit.metrics import Metrics
from bot_toolkit.undecodable import UndecodableEvent

if TYPE_CHECKING:
    from bot_toolkit._inbound_link import InboundLink

__all__ = ["Handover"]

# The plugin's parts log under one name (users filter on it).
logger = logging.getLogger("bot_toolkit.nio_plugin")


class Handover:
    """The hand-over of one :class:`~bot_toolkit.nio_plugin.NioPlugin`.

    ``inbound()`` is the plugin's link to its durable inbound queue (``None`` without one);
    ``on_error(where)`` is the plugin's log-and-count of an unexpected error.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        metrics: Metrics,
        *,
        backpressure_timeout: float,
        inbound: Callable[[], InboundLink | None],
        on_error: Callable[[str], None],
    ) -> None:
        self.dispatcher = dispatcher
        self.backpressure_timeout = backpressure_timeout
        self._inbound = inbound
        self._error = on_error
        self._m_events = metrics.counter(
            "nio_to_device_total",
            "To-device events the nio plugin handed to the dispatcher",
            ["source"],  # plaintext, decrypted, undecrypted, undecodable
        )
        self.dropped = metrics.counter(
            "nio_to_device_dropped_total",
            "To-device events the nio plugin could not hand over",
            ["reason"],  # queue_full, closed, unparsed, error
        )
        self._batch: list[ToDeviceEvent] | None = None
        self._received: list[tuple[int, Mapping[str, Any] | None, str | None]] = []
        """Per event of the batch being handled: wire position, raw form, Olm sender key."""
        self._wire_index = -1

    def next_wire_event(self) -> None:
        """nio starts on the next wire event of the batch (the position of what is emitted)."""
        self._wire_index += 1

    def emit(
        self,
        event: ToDeviceEvent,
        source: str,
        raw: Mapping[str, Any] | None = None,
        decrypted_from: str | None = None,
    ) -> None:
        """Count ``event`` (by ``source``) and add it to the batch, or hand it over now."""
        if isinstance(event, UndecodableEvent):
            source = "undecodable"
        self._m_events.inc(source)
        if self._batch is not None:
            self._batch.append(event)
            self._received.append((self._wire_index, raw, decrypted_from))
        else:  # outside a sync's to-device section (nio called its hooks from elsewhere)
            self._hand_over_nowait([event], 0)

    @contextlib.asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        """Collect what is emitted inside into one batch and hand it over when the block ends
        (at once, without waiting, when it raises)."""
        batch: list[ToDeviceEvent] = []
        outer, self._batch = self._batch, batch
        self._received, self._wire_index = [], -1
        try:
            yield
        except BaseException:
            self._batch = outer
            self._hand_over_nowait(batch, 0)
            raise
        self._batch = outer
        inbound = self._inbound()
        if inbound is not None:
            batch = await inbound.persist(batch, self._received)
        await self._hand_over(batch)

    async def _hand_over(self, batch: list[ToDeviceEvent]) -> None:
        """``await put`` each event, waiting at most ``backpressure_timeout`` in all."""
        if not batch:
            return
        done = 0
        try:
            async with asyncio.timeout(self.backpressure_timeout):
                for event in batch:
                    await self.dispatcher.put(event)
                    done += 1
        except TimeoutError:
            logger.warning(
                "dispatcher still full after %.1fs; %d to-device events of this sync left",
                self.backpressure_timeout,
                len(batch) - done,
            )
        except DispatcherClosed:
            self._drop(len(batch) - done, "closed")
            return
        except Exception:
            self._error("put")
        self._hand_over_nowait(batch, done)

    def _hand_over_nowait(self, batch: list[ToDeviceEvent], start: int) -> None:
        lost: dict[str, int] = {}
        for event in batch[start:]:
            try:
                if self.dispatcher.put_nowait(event):
                    continue
                reason = "queue_full"
            except DispatcherClosed:
                reason = "closed"
            except Exception:
                self._error("put_nowait")
                reason = "error"
            lost[reason] = lost.get(reason, 0) + 1
        for reason, count in lost.items():
            self._drop(count, reason)

    def _drop(self, count: int, reason: str) -> None:
        if count <= 0:
            return
        self.dropped.inc(reason, amount=count)
        logger.warning("dropped %d to-device events (%s)", count, reason)
