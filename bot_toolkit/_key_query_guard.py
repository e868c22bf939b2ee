"""The nio plugin's guard on device-key queries: bounded batches, and malformed devices skipped.

Two hooks of :class:`~bot_toolkit.nio_plugin.NioPlugin`, installed by it:

* ``client.keys_query()`` queries the pending users in batches of :data:`BATCH_USERS` (each
  bounded in time, a user never in two at once) and waits at most :data:`KEY_QUERY_WAIT`
  seconds (see the :mod:`bot_toolkit.nio_plugin` docs for why nio's own query can stop the sync
  loop);
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
from bot_toolkit.key_queries import QUERY_TIMEOUT, nio_query_users
from bot_toolkit.metrics import Counter, Metrics

__all__ = ["BATCH_USERS", "KEY_QUERY_WAIT", "KeyQueryGuard"]

logger = logging.getLogger("bot_toolkit.nio_plugin")

KEY_QUERY_WAIT: Final = 3.0
"""Seconds a ``client.keys_query()`` caller (nio's sync loop, ``room_send``) waits for the
batches it started; slower ones go on in the background."""
BATCH_USERS: Final = 100
"""Users asked for in one ``/keys/query`` of nio's pending users (a room of 10,000 members is
100 requests, not 10,000; one user per request made big rooms take minutes)."""


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
        self._querying: dict[str, asyncio.Task[bool]] = {}
        """Users in a batch still running, and that batch (a later ``keys_query()`` does not
        ask again: it waits for the same answer)."""

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
            return await self._query_batches(sorted(client.users_for_key_query))

        return keys_query

    async def _query_batches(self, users: list[str]) -> Any:
        """nio's ``keys_query()`` in bounded batches, never holding the caller long.

        nio queries every pending user in one request and its sync loop waits for the answer,
        so one slow homeserver (any room member's, say a hostile one) would stop the bot. Here
        the pending users not already being queried go out in batches of :data:`BATCH_USERS`,
        each a request the homeserver answers within its ``timeout`` (a slow remote homeserver's
        users come back as failures and stay pending) and that is cut after
        :data:`~bot_toolkit.key_queries.QUERY_TIMEOUT` seconds; each answer goes to nio as it
        comes, and the caller waits at most :data:`KEY_QUERY_WAIT` seconds, for its users'
        batches, also those an earlier caller started: ``room_send`` calls this right after the
        sync loop did, and must not share a room key before a new member's devices are known
        (they would get neither the key nor a withheld notice).
        """
        fresh = [u for u in users if u not in self._querying]
        for i in range(0, len(fresh), BATCH_USERS):
            batch = fresh[i : i + BATCH_USERS]
            task = self._query_tasks.spawn(self._query_batch(batch))
            self._querying.update(dict.fromkeys(batch, task))
        tasks = {self._querying[u] for u in users}  # each user is in a batch now
        done, pending = await asyncio.wait(tasks, timeout=KEY_QUERY_WAIT)
        if pending or not all(not t.cancelled() and t.result() for t in done):
            self._m_errors.inc("keys_query_slow")
            return KeysQueryError("keys of some users still coming, or failed")
        return KeysQueryResponse.from_dict({"device_keys": {}, "failures": {}})

    async def _query_batch(self, users: list[str]) -> bool:
        """One bounded ``/keys/query`` for ``users``; False (logged) when it failed or was slow."""
        try:
            async with asyncio.timeout(QUERY_TIMEOUT):
                await nio_query_users(self.client, users)
        except Exception as exc:  # TimeoutError included: they stay pending in nio
            logger.warning(
                "keys query for %d users failed: %s", len(users), type(exc).__name__ or "error"
            )
            return False
        finally:
            for user in users:
                self._querying.pop(user, None)
        return True

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
