"""Device-key queries that peers cause: capped, bounded in time, negatively cached, shared.

Any Matrix user can make the bot look up device keys (an ``m.no_olm`` naming a device the bot
does not know, a verification request from an unknown device). A ``/keys/query`` for a user on
a slow or hostile homeserver can take as long as the homeserver's federation timeout, so such
queries must never run inline in a dispatcher handler or in the sync loop, and one user must not
be able to cause more than one query per :data:`NEGATIVE_TTL`. :class:`KeyQueries` gives:

* one instance per nio client (:meth:`KeyQueries.of`), so the cap is global to the client;
* at most ``concurrency`` queries at once; a query (waiting for its slot included) is cancelled
  after ``timeout`` seconds, so a caller never waits longer;
* one query per user in flight (callers for the same user share it);
* a per-user negative cache: a user queried less than ``negative_ttl`` seconds ago is not
  queried again (callers get ``False`` at once), for at most ``max_users`` users (least recently
  queried forgotten first).

What a query does is injected (``query(user_id)``); :func:`nio_query` queries one user and
hands the answer to nio.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from bot_toolkit._bounded import BoundedMap
from bot_toolkit._client_http import homeserver_json
from bot_toolkit._single_flight import SingleFlight
from bot_toolkit.metrics import Metrics

__all__ = [
    "CONCURRENCY",
    "NEGATIVE_TTL",
    "QUERY_TIMEOUT",
    "KeyQueries",
    "KeyQueryFailed",
    "nio_query",
    "nio_query_users",
]

log = logging.getLogger("bot_toolkit.key_queries")

CONCURRENCY: Final = 4
"""Key queries caused by peers that may run at once (per client)."""
QUERY_TIMEOUT: Final = 10.0
"""Seconds a caller waits for one query."""
NEGATIVE_TTL: Final = 60.0
"""Seconds during which a user just queried is not queried again."""
MAX_USERS: Final = 10_000
"""Users the negative cache remembers."""
REMOTE_TIMEOUT_MS: Final = 5_000
"""The ``timeout`` of our ``/keys/query`` requests: how long the homeserver may wait for other
homeservers (the spec recommends 10 s; less, so :data:`QUERY_TIMEOUT` is not reached first)."""

_BY_CLIENT: weakref.WeakKeyDictionary[Any, KeyQueries] = weakref.WeakKeyDictionary()


async def nio_query(client: Any, user_id: str) -> None:
    """Download ``user_id``'s device keys into nio's device store (nio then tracks the user).

    One ``/keys/query`` for this user alone (see :func:`nio_query_users`), rather than nio's
    ``keys_query()``: that one asks for every user in nio's shared ``users_for_key_query`` at
    once (and the sync loop waits for it).
    """
    await nio_query_users(client, [user_id])


async def nio_query_users(client: Any, user_ids: Sequence[str]) -> None:
    """Download the device keys of ``user_ids`` with one ``/keys/query``, handed to nio.

    The request's ``timeout`` tells the homeserver to wait at most :data:`REMOTE_TIMEOUT_MS`
    for other homeservers: a slow or hostile one then comes back in ``failures`` (its users stay
    in nio's ``users_for_key_query`` for a later round) instead of holding up the whole answer.
    """
    from nio import KeysQueryResponse  # noqa: PLC0415

    if client.olm is None or not user_ids:
        return
    body = {"device_keys": {user: [] for user in user_ids}, "timeout": REMOTE_TIMEOUT_MS}
    status, answer = await homeserver_json(client, "POST", "/_matrix/client/v3/keys/query", body)
    if status != 200 or not isinstance(answer, dict):
        raise KeyQueryFailed(f"HTTP {status}")
    response = KeysQueryResponse.from_dict(answer)
    if not isinstance(response, KeysQueryResponse):
        raise KeyQueryFailed(type(response).__name__)
    await client.receive_response(response)


class KeyQueryFailed(RuntimeError):
    """The homeserver did not answer a key query with device keys."""


class KeyQueries:
    """Key queries caused by peers for one client; see the module docs."""

    def __init__(
        self,
        query: Callable[[str], Awaitable[None]],
        *,
        concurrency: int = CONCURRENCY,
        timeout: float = QUERY_TIMEOUT,
        negative_ttl: float = NEGATIVE_TTL,
        max_users: int = MAX_USERS,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        if concurrency < 1 or timeout <= 0 or negative_ttl < 0 or max_users < 1:
            raise ValueError("concurrency and max_users >= 1, timeout > 0, negative_ttl >= 0")
        self._query = query
        self._slots = asyncio.Semaphore(concurrency)
        self.timeout = timeout
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._queried: BoundedMap[str, float] = BoundedMap(max_users)
        self._in_flight: SingleFlight[str, None] = SingleFlight()
        self._m = (metrics or Metrics()).counter(
            "key_queries_total",
            "Device-key queries caused by peers (result: done, cached, timeout, failed)",
            ["result"],
        )

    @classmethod
    def of(cls, client: Any, metrics: Metrics | None = None) -> KeyQueries:
        """The client's shared instance (made on first use, querying through nio)."""
        found = _BY_CLIENT.get(client)
        if found is None:

            async def query(user_id: str) -> None:
                await nio_query(client, user_id)

            found = cls(query, metrics=metrics)
            _BY_CLIENT[client] = found
        return found

    @property
    def in_flight(self) -> int:
        """Queries running or waiting for a slot."""
        return len(self._in_flight)

    def recently_queried(self, user_id: str) -> bool:
        """Whether ``user_id`` was queried less than ``negative_ttl`` seconds ago."""
        at = self._queried.get(user_id)
        return at is not None and self._clock() - at < self.negative_ttl

    async def query(self, user_id: str, *, force: bool = False) -> bool:
        """Query ``user_id``'s keys unless that was done recently; True when a query finished.

        ``force`` skips the negative cache (nio asks because the user's device list changed).
        Never raises for a failed or slow query: it logs, counts and returns False.
        """
        if user_id not in self._in_flight:
            if not force and self.recently_queried(user_id):
                self._m.inc("cached")
                return False
            self._queried[user_id] = self._clock()
        try:  # bounded by the query's own timeout; failures are counted and logged in _run
            await self._in_flight.share(user_id, lambda: self._run(user_id))
        except Exception:
            return False
        return True

    async def _run(self, user_id: str) -> None:
        try:
            async with asyncio.timeout(self.timeout), self._slots:  # waiting for a slot counts
                await self._query(user_id)
        except TimeoutError:
            self._m.inc("timeout")
            log.warning("keys of %.255s did not arrive within %.1fs", user_id, self.timeout)
            raise
        except Exception as exc:
            self._m.inc("failed")
            log.warning("keys query for %.255s failed: %s", user_id, type(exc).__name__)
            raise
        self._m.inc("done")

    async def close(self) -> None:
        """Cancel the queries still running."""
        await self._in_flight.cancel()
