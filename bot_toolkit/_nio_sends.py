"""nio's own to-device sends go through the outbox; nio's misread ``soft_logout`` is contained.

Part of :class:`~bot_toolkit.key_sharing.KeySharing`, installed with its hooks:

* ``client.to_device`` and ``client.send_to_device_messages``: every to-device message nio
  queues itself (forwarded keys, key requests and their cancellations, ``m.dummy``, ...) is
  stored in the :class:`~bot_toolkit.outbox.Outbox`, which delivers it with retries; nio treats
  it as sent once stored;
* ``client.receive_response``: an error response whose ``soft_logout`` flag is not a real
  ``M_UNKNOWN_TOKEN`` does not make nio drop the access token (counted in
  ``nio_soft_logout_ignored_total``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nio import ErrorResponse, ToDeviceError, ToDeviceMessage, ToDeviceResponse

from bot_toolkit._nio_adapter import contain_soft_logout
from bot_toolkit._sharing_context import SharingContext

__all__ = ["NioSends"]

log = logging.getLogger("bot_toolkit.key_sharing")


class NioSends:
    """The send hooks of one :class:`~bot_toolkit.key_sharing.KeySharing` (they pass calls
    through to nio once its hooks are detached)."""

    def __init__(self, ctx: SharingContext) -> None:
        self.client = ctx.client
        self._ctx = ctx
        self._nio_queued: set[int] = set()  # ids of nio's to-device messages being handed over
        self._m_soft_logout = ctx.metrics.counter(
            "nio_soft_logout_ignored_total",
            "nio error responses whose soft_logout flag was not a real M_UNKNOWN_TOKEN",
            [],
        )

    def wrap_to_device(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        """The replacement for ``client.to_device``: the message goes to the outbox."""

        async def to_device(message: ToDeviceMessage, tx_id: str | None = None) -> Any:
            if not self._ctx.attached():
                return await original(message, tx_id)
            return await self._queue_nio_message(message, tx_id)

        return to_device

    def wrap_send_to_device_messages(
        self, original: Callable[[], Awaitable[Any]]
    ) -> Callable[[], Awaitable[Any]]:
        """The replacement for ``client.send_to_device_messages``: nio's queue to the outbox."""

        async def send_to_device_messages() -> Any:
            if not self._ctx.attached():
                return await original()
            # Two callers (sync_forever and the bot's loop) may run this at once: a message
            # being handed over is not handed over twice.
            pending = [
                m for m in self.client.outgoing_to_device_messages if id(m) not in self._nio_queued
            ]
            self._nio_queued.update(id(m) for m in pending)
            try:
                return list(
                    await asyncio.gather(*(self._queue_nio_message(m, None) for m in pending))
                )
            finally:
                self._nio_queued.difference_update(id(m) for m in pending)

        return send_to_device_messages

    async def _queue_nio_message(self, message: ToDeviceMessage, tx_id: str | None) -> Any:
        """Store one of nio's to-device messages (forwarded keys, key requests and their
        cancellations, ``m.dummy``, ...) in the outbox; nio treats it as sent once stored."""
        messages = message.as_dict()["messages"]
        try:
            await self._ctx.outbox.send(
                message.type, messages, txn_id=None if tx_id is None else str(tx_id)
            )
        except Exception as exc:
            log.warning(
                "could not store nio's %s to-device message: %s", message.type, type(exc).__name__
            )
            error = ToDeviceError(f"not stored in the outbox: {type(exc).__name__}")
            error.to_device_message = message
            return error
        response = ToDeviceResponse(message)
        await self.client.receive_response(response)  # nio: remove from its queue, follow-ups
        return response

    def wrap_receive_response(
        self, original: Callable[[Any], Awaitable[None]]
    ) -> Callable[[Any], Awaitable[None]]:
        """The replacement for ``client.receive_response``: ``soft_logout`` contained."""

        async def receive_response(response: Any) -> None:
            if self._ctx.attached() and isinstance(response, ErrorResponse):
                self._contain_soft_logout(response)
            await original(response)

        return receive_response

    def _contain_soft_logout(self, response: ErrorResponse) -> None:
        flag = response.soft_logout
        if not contain_soft_logout(response):
            return
        self._m_soft_logout.inc()
        log.warning(
            "nio read soft_logout (a %s) from a %s with errcode %s; the access token is kept",
            type(flag).__name__,
            type(response).__name__,
            response.status_code,
        )
