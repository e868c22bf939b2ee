"""The nio plugin's guard on device-key queries: per-user queries, and malformed devices skipped.

Two hooks of :class:`~bot_toolkit.nio_plugin.NioPlugin`, installed by it:

* ``client.keys_query()`` queries each pending user on its own through the client's
  :class:`~bot_toolkit.key_queries.KeyQueries` and waits at most :data:`KEY_QUERY_WAIT` seconds
  (see the :mod:`bot_toolkit.nio_plugin` docs for why nio's own query can stop the sync loop);
* ``client.olm._handle_key_query(response)`` first removes devices whose keys are malformed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from nio import AsyncClient, KeysQueryError, KeysQueryResponse

from bot_toolkit._olm_checks import device_keys_problem
from bot_toolkit._tasks import TaskSet
from bot_toolkit.key_queries import KeyQueries
from bot_toolkit.metrics import Counter, Metrics

__all__ = ["KEY_QUERY_WAIT", "KeyQueryGuard"]

logger = logging.getLogger("bot_toolkit.nio_plugin")

KEY_QUERY_WAIT: Final = 3.0
"""Seconds a ``client.keys_query()`` caller (nio's sync loop, ``room_send``) waits for the
per-user queries it started; slower ones go on in the background."""


class KeyQueryGuard:
    """The key-query hooks of one :class:`~bot_toolkit.nio_plugin.NioPlugin`.

    ``attached`` tells whether the plugin's hooks are active; ``errors`` is the plugin's
    ``nio_plugin_errors_total`` and ``on_error(where)`` its log-and-count of an unexpected error.
    """

    def __init__(
        self,
        client: AsyncClient,
        metrics: Metrics,
        *,
        errors: Counter,
        on_error: Callable[[str], None],
        attached: Callable[[], bool],
    ) -> None:
        self.client = client
        self.metrics = metrics
        self._m_errors = errors
        self._error = on_error
        self._attached = attached
        self._m_skipped = metrics.counter(
            "nio_devices_skipped_total",
            "Devices left out of a key query answer because their keys are malformed",
            ["reason"],
        )
        self._query_tasks = TaskSet(logger, "key query", lambda _e: errors.inc("keys_query"))

    def wrap_keys_query(self, original: Callable[[], Awaitable[Any]]) -> Callable[[], Any]:
        """The replacement for ``client.keys_query``."""
        client = self.client

        async def keys_query() -> Any:
            if client.olm is None or not self._attached():
                return await original()
            # Checked when the query runs, not when it was scheduled (see the module docs).
            if not client.users_for_key_query:
                self._m_errors.inc("keys_query_race")
                return KeysQueryError("No key query required.")
            return await self._query_each(sorted(client.users_for_key_query))

        return keys_query

    async def _query_each(self, users: list[str]) -> Any:
        """nio's ``keys_query()``, one user at a time, never holding the caller long.

        nio queries every pending user in one request and its sync loop waits for the answer,
        so one slow homeserver (any room member's, say a hostile one) would stop the bot. Here
        each user is queried on its own through the client's
        :class:`~bot_toolkit.key_queries.KeyQueries` (capped, bounded in time, each answer
        handed to nio as it comes); the caller waits at most :data:`KEY_QUERY_WAIT` seconds.
        """
        queries = KeyQueries.of(self.client, self.metrics)
        tasks = [self._query_tasks.spawn(queries.query(u, force=True)) for u in users]
        done, pending = await asyncio.wait(tasks, timeout=KEY_QUERY_WAIT)
        if pending or not all(t.result() for t in done):
            self._m_errors.inc("keys_query_slow")
            return KeysQueryError(f"keys of {len(pending)} users still coming, or failed")
        return KeysQueryResponse.from_dict({"device_keys": {}, "failures": {}})

    def wrap_handle_key_query(self, original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """The replacement for ``client.olm._handle_key_query``."""

        def handle_key_query(response: Any) -> Any:
            if self._attached():
                self._skip_malformed_devices(response)
            return original(response)

        return handle_key_query

    def _skip_malformed_devices(self, response: Any) -> None:
        """Remove devices with malformed keys from a ``/keys/query`` answer before nio reads it.

        nio 0.26 checks each device's self-signature with its ed25519 key; a key that is not a
        curve point raises out of the whole answer, so one bad device of one user would hide
        every device of every user queried with it (and a bad curve25519 key breaks sharing a
        room key later). Such a device is skipped, counted and logged: it never enters nio's
        device store, so it is never given a key.
        """
        try:
            for user_id, devices in response.device_keys.items():
                if not isinstance(devices, dict):
                    continue
                for device_id in list(devices):
                    reason = device_keys_problem(str(device_id), devices[device_id])
                    if reason is None:
                        continue
                    del devices[device_id]
                    self._m_skipped.inc(reason)
                    logger.warning("skipped device %.64s of %.255s: %s", device_id, user_id, reason)
        except Exception:
            self._error("skip_malformed_devices")
