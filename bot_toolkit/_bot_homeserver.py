"""How the standalone bot reaches its homeserver outside nio: a failure is fatal
(:class:`BotError`, one line) or transient (:class:`Transient` or a network error: retried with
capped, jittered exponential backoff and shown in ``/readyz``); one raw JSON request.

Part of the standalone bot (:mod:`bot_toolkit.bot`); library code never imports it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Final, TypeVar

import aiohttp

from bot_toolkit.http_api import BotState
from bot_toolkit.metrics import Counter

__all__ = ["TRANSIENT", "Backoff", "BotError", "Homeserver", "Transient", "describe"]

# The bot's log lines keep one logger name, whichever of its modules writes them.
log = logging.getLogger("bot_toolkit.bot")

HTTP_TIMEOUT: Final = 30.0
_FIRST_RETRY: Final = 1.0

T = TypeVar("T")


class BotError(RuntimeError):
    """A fatal problem the bot cannot retry its way out of; ``str()`` is one line."""

    one_line: ClassVar[bool] = True
    """The message says it all: the CLI logs and prints it without a traceback."""


class Transient(Exception):
    """The homeserver cannot be used right now (retry with backoff)."""


TRANSIENT: Final = (Transient, aiohttp.ClientError, OSError, TimeoutError)
"""What :meth:`Backoff.retrying` (and the sync loop) retry: the homeserver is unreachable or
answered "not now"."""


def describe(exc: BaseException) -> str:
    """``Type: message`` of ``exc`` on at most 300 characters (for ``/readyz`` and logs)."""
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


class Backoff:
    """Waits between attempts while the homeserver is unreachable.

    One failure count for the whole bot (login and sync loop): the delay doubles from 1 s per
    consecutive failure, capped at ``max_delay`` and jittered by ±20 %; each failure is recorded
    in ``state.last_error`` (``/readyz``) and counted in ``errors`` (label: what failed).
    ``sleep`` waits (tests pass one that records the delays).
    """

    def __init__(
        self,
        state: BotState,
        max_delay: float,
        errors: Counter,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.state = state
        self.max_delay = max_delay
        self.errors = errors
        self._sleep = sleep
        self.attempt = 0
        """Consecutive failures so far; the caller resets it to 0 after a success."""

    async def wait(self, what: str, exc: BaseException | str) -> None:
        """Record the failure for /readyz and sleep (exponential, capped, jittered)."""
        reason = exc if isinstance(exc, str) else describe(exc)
        self.state.last_error = f"{what}: {reason}"
        self.attempt += 1
        cap = self.max_delay
        delay = min(cap, _FIRST_RETRY * 2 ** min(self.attempt - 1, 30))
        delay = min(cap, delay * random.uniform(0.8, 1.2))
        log.warning("%s failed (%s); retrying in %.1fs", what, reason, delay)
        await self._sleep(delay)

    async def retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` until it does not raise :data:`TRANSIENT`; other errors propagate."""
        while True:
            try:
                result = await attempt()
            except TRANSIENT as e:
                self.errors.inc(what)
                await self.wait(what, e)
                continue
            self.attempt = 0
            return result


class Homeserver:
    """Raw JSON requests to the homeserver over the bot's own HTTP session (for what nio does
    not do, or does not do the way the bot needs: ``/whoami``, the SAS DM)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url

    async def request(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> tuple[int, Any]:
        """One JSON request to the homeserver: (status, body). Network errors raise."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(
            method,
            self.base_url + path,
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT),
            allow_redirects=False,
        ) as resp:
            text = await resp.text()
            try:
                data = json.loads(text) if text else {}
            except ValueError:
                data = {}
            return resp.status, data
