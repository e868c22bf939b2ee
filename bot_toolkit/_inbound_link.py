"""The nio plugin's side of the durable inbound queue (see :mod:`bot_toolkit.inbound_queue`).

:class:`InboundLink` holds nio's ``save_sync_token`` back (a hook installed through the nio
adapter) until the plugin has committed the batch, gives every event of the batch its stable
``inbound_id``, hands only the events not already stored to the dispatcher, forgets each event
once the dispatcher has handled it, and hands the events a previous run left back at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from bot_toolkit._json_depth import exceeds_depth
from bot_toolkit._nio_adapter import NioHooks
from bot_toolkit.events import ToDeviceEvent
from bot_toolkit.inbound_queue import InboundQueue, Received, inbound_id

if TYPE_CHECKING:
    from bot_toolkit.nio_plugin import NioPlugin

__all__ = ["InboundLink"]

log = logging.getLogger("bot_toolkit.inbound_queue")


class InboundLink:
    """Ties one :class:`~bot_toolkit.inbound_queue.InboundQueue` to one plugin's client."""

    def __init__(self, plugin: NioPlugin, queue: InboundQueue) -> None:
        self.plugin = plugin
        self.queue = queue
        client = plugin.client
        self._since: str | None = client.next_batch or client.loaded_sync_token
        self._batch_since: str | None = self._since
        self._pending_token: str | None = None
        self._save: Callable[[str], None] | None = None
        self._hooks = NioHooks()  # attached: linked
        self._hooks.install(client.store, "save_sync_token", self._wrap_save)
        self._unlisten = plugin.dispatcher.add_handled_listener(self._handled)

    def _wrap_save(self, original: Callable[[str], None]) -> Callable[[str], None]:
        self._save = original

        def save_sync_token(token: str) -> None:
            if not self._hooks.attached:
                original(token)
                return
            # nio calls this before it handles the batch: keep the token until the commit.
            self._batch_since, self._since = self._since, token
            self._pending_token = token

        return save_sync_token

    async def persist(
        self,
        batch: Sequence[ToDeviceEvent],
        received: Sequence[tuple[int, Mapping[str, Any] | None, str | None]],
    ) -> list[ToDeviceEvent]:
        """Commit the batch, then let nio save its token; returns the events to hand over."""
        token, self._pending_token = self._pending_token, None
        # Without a token save (store_sync_tokens off) ids rest on this batch's own token.
        since = self._batch_since if token is not None else f"next:{self.plugin.client.next_batch}"
        out: list[ToDeviceEvent] = []
        items: list[Received] = []
        parts: dict[int, int] = {}
        for event, (position, raw, decrypted_from) in zip(batch, received, strict=True):
            part = parts.get(position, 0)
            parts[position] = part + 1
            eid = inbound_id(since, position, part)
            out.append(msgspec.structs.replace(event, inbound_id=eid))
            if raw is not None and not exceeds_depth(raw.get("content")):
                items.append(Received(eid, raw, decrypted_from))
        new: set[str] | None
        try:
            new = await self.queue.commit(items)
        except Exception as exc:
            log.error(
                "inbound queue: could not store %d to-device events (%s); handling them in memory",
                len(items),
                type(exc).__name__,
            )
            new = None
        if token is not None and self._save is not None:
            self._save(token)
        if new is None:
            return out
        stored = {item.id for item in items}
        # An id stored before belongs to a batch delivered again: its event is queued already.
        return [e for e in out if e.inbound_id not in stored or e.inbound_id in new]

    def _handled(self, event: object) -> None:
        eid = getattr(event, "inbound_id", None)
        if isinstance(eid, str) and self._hooks.attached:
            self.queue.ack(eid)

    async def replay(self) -> int:
        """Hand the stored events to the dispatcher again (each decoded afresh)."""
        count = 0
        for item in await self.queue.replay():
            event = self.plugin.decode_stored(item.raw, item.decrypted_from)
            if event is None:  # undecodable and not dispatched: nothing will handle it
                self.queue.ack(item.id)
                continue
            await self.plugin.dispatcher.put(msgspec.structs.replace(event, inbound_id=item.id))
            count += 1
        return count

    def unlink(self) -> None:
        """Stop holding tokens back (nio saves them itself again) and stop acknowledging."""
        self._hooks.undo()
        self._unlisten()
        if self._pending_token is not None and self._save is not None:
            self._save(self._pending_token)
            self._pending_token = None

    async def close(self) -> None:
        await self.queue.close()
