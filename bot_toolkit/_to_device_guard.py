"""The nio plugin's guard around nio's handling of each wire to-device event.

Three things nio 0.26 gets wrong with what a peer sends, made up for:

* nio's parser drops a to-device event with an empty ``content`` (or an ``m.room.encrypted``
  one with an algorithm other than Olm) and leaves ``None`` in its place:
  :meth:`ToDeviceGuard.recover_unparsed` takes the raw events from the HTTP body nio read;
* some events must not reach nio at all (:meth:`ToDeviceGuard.keep_from_nio`), they are still
  dispatched;
* nio's ``defaultdict`` look-ups leave an empty entry for every new key a peer chooses:
  :meth:`ToDeviceGuard.drop_empty_entries` removes them after each event.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

from nio import AsyncClient

from bot_toolkit._nio_adapter import drop_empty_entries
from bot_toolkit._olm_checks import curve25519_problem
from bot_toolkit._olm_payloads import Envelope
from bot_toolkit.metrics import Metrics

__all__ = ["ToDeviceGuard"]

# The plugin's parts log under one name (users filter on it).
logger = logging.getLogger("bot_toolkit.nio_plugin")


class ToDeviceGuard:
    """The to-device guard of one :class:`~bot_toolkit.nio_plugin.NioPlugin`.

    ``trusted_own_devices`` are the devices of the client's own user whose room-key requests nio
    may serve; ``on_error(where)`` is the plugin's log-and-count of an unexpected error.
    """

    def __init__(
        self,
        client: AsyncClient,
        metrics: Metrics,
        *,
        trusted_own_devices: Collection[str],
        on_error: Callable[[str], None],
    ) -> None:
        self.client = client
        self.trusted_own_devices = frozenset(trusted_own_devices)
        self._error = on_error
        self._m_kept = metrics.counter(
            "nio_kept_from_nio_total",
            "To-device events handled without nio (reason: key_request, invalid_sender_key)",
            ["reason"],
        )

    async def recover_unparsed(self, response: Any) -> deque[object]:
        """The raw events nio's parser replaced by ``None``, from the HTTP body it read.

        nio drops a to-device event with an empty ``content`` (or an ``m.room.encrypted`` one
        with an unknown algorithm) while parsing, leaving ``None`` at its position. The body is
        re-read (aiohttp keeps it) only when that happened.
        """
        try:
            parsed = response.to_device_events
            missing = [i for i, event in enumerate(parsed) if event is None]
            if not missing:
                return deque()
            transport = getattr(response, "transport_response", None)
            if transport is not None:
                body = json.loads(await transport.read())
                raws = body.get("to_device", {}).get("events", [])
                if isinstance(raws, list) and len(raws) == len(parsed):
                    return deque(raws[i] for i in missing)
            logger.warning("cannot find the raw form of %d unparsed to-device events", len(missing))
        except Exception:
            self._error("recover_unparsed")
        return deque()

    def keep_from_nio(self, raw: object, envelope: Envelope | None) -> bool:
        """Whether nio must not see this wire event (it is still dispatched); counted if so.

        * An Olm envelope whose ``sender_key`` is not a Curve25519 key: nio would index its
          session store with it (a new empty entry per key) before failing.
        * A room-key request (or cancellation) from anyone but a trusted own device: nio
          forwards keys to verified devices of our own user, and keeps a cancellation's
          ``(sender, requesting_device_id)`` in a ``defaultdict`` for good. Our key-sharing
          handlers answer these requests from the dispatcher.
        """
        reason = self._kept_because(raw, envelope)
        if reason is None:
            return False
        self._m_kept.inc(reason)
        return True

    def _kept_because(self, raw: object, envelope: Envelope | None) -> str | None:
        if envelope is not None and curve25519_problem(envelope.sender_key) is not None:
            return "invalid_sender_key"
        if isinstance(raw, dict) and raw.get("type") == "m.room_key_request":
            content = raw.get("content")
            device = content.get("requesting_device_id") if isinstance(content, dict) else None
            if raw.get("sender") != self.client.user_id or device not in self.trusted_own_devices:
                return "key_request"
        return None

    def drop_empty_entries(self, raw: object, envelope: Envelope | None) -> None:
        """Remove the empty entries nio's ``defaultdict`` look-ups left for this event's keys.

        nio 0.26 indexes its device store by sender, its Olm session store by sender key and
        its waiting key requests by (sender, device) while handling an event, which inserts an
        empty entry for every new key a peer chooses. Empty entries carry no state, so
        removing them changes nothing but memory.
        """
        olm = self.client.olm
        if olm is None or not isinstance(raw, dict):
            return
        try:
            content = raw.get("content")
            device = content.get("requesting_device_id") if isinstance(content, dict) else None
            sender_key = envelope.sender_key if envelope is not None else None
            drop_empty_entries(olm, raw.get("sender"), sender_key, device)
        except Exception:
            self._error("drop_empty_entries")
