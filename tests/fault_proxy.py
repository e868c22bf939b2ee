"""A small scriptable aiohttp reverse proxy on 127.0.0.1 for fault-injection tests.

It sits in front of the real Synapse. Every request whose path contains ``match`` (by default
``/sendToDevice/``) takes the next :class:`Fault` from :attr:`FaultProxy.plan` (or asks
:attr:`FaultProxy.policy`, or falls back to passing through); every other request passes through.

Faults:

* ``pass``: forward to Synapse and relay its answer.
* ``429``: answer ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``; Synapse never sees the request.
* ``500``: answer 500; Synapse never sees the request.
* ``forward_500``: forward (Synapse processes it), then answer 500 instead of Synapse's answer.
* ``stall``: hold the request without forwarding for ``seconds``, then drop the connection.
* ``drop_before``: drop the connection without forwarding.
* ``drop_after``: forward, wait for Synapse's answer, then drop the connection without answering
  (the nasty case: the server did process it, the client cannot know).
* ``delay``: wait ``seconds``, then forward and relay (a slow homeserver).
* ``hold_response``: forward, then hold Synapse's answer for ``seconds`` before relaying it.
* ``reply``: answer ``status`` without forwarding, with a body of kind ``body``: ``json`` (a
  Matrix error, ``M_LIMIT_EXCEEDED`` with ``retry_after_ms`` for 429), ``html`` (what a reverse
  proxy such as nginx sends) or ``empty``.

Holds end early when :meth:`FaultProxy.release` is called or the proxy stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

__all__ = ["Fault", "FaultProxy", "Hit"]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-connection",
    "content-length",
    "host",
}


@dataclass(frozen=True, slots=True)
class Fault:
    """What the proxy does with one request."""

    kind: str
    seconds: float = 0.0
    retry_after_ms: int = 0
    status: int = 0
    body: str = "json"

    @staticmethod
    def passthrough() -> Fault:
        return Fault("pass")

    @staticmethod
    def rate_limited(retry_after_ms: int) -> Fault:
        return Fault("429", retry_after_ms=retry_after_ms)

    @staticmethod
    def server_error() -> Fault:
        return Fault("500")

    @staticmethod
    def forward_then_500() -> Fault:
        return Fault("forward_500")

    @staticmethod
    def stall(seconds: float) -> Fault:
        return Fault("stall", seconds=seconds)

    @staticmethod
    def drop_before() -> Fault:
        return Fault("drop_before")

    @staticmethod
    def drop_after() -> Fault:
        return Fault("drop_after")

    @staticmethod
    def delay(seconds: float) -> Fault:
        return Fault("delay", seconds=seconds)

    @staticmethod
    def hold_response(seconds: float) -> Fault:
        return Fault("hold_response", seconds=seconds)

    @staticmethod
    def reply(status: int, body: str = "json", retry_after_ms: int = 500) -> Fault:
        if body not in ("json", "html", "empty"):
            raise ValueError(f"body must be json, html or empty, not {body!r}")
        return Fault("reply", status=status, body=body, retry_after_ms=retry_after_ms)


def delay_while(flag: asyncio.Event, seconds: float) -> Callable[[int], Fault]:
    """A policy: requests pass through, but while ``flag`` is set each one is delayed
    ``seconds`` before it is forwarded (a homeserver that stalls on demand)."""
    return lambda _n: Fault.delay(seconds) if flag.is_set() else Fault.passthrough()


@dataclass(slots=True)
class Hit:
    """One matching request the proxy saw."""

    n: int
    at: float  # time.monotonic() when it arrived
    path: str
    txn_id: str
    messages: int
    fault: Fault
    forwarded: bool = False
    upstream_status: int | None = None


@dataclass
class FaultProxy:
    """The proxy. ``await start()`` gives :attr:`url`; ``await stop()`` ends it."""

    upstream: str
    match: str = "/sendToDevice/"
    plan: deque[Fault] = field(default_factory=deque)
    policy: Callable[[int], Fault] | None = None
    hits: list[Hit] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    url: str = ""

    def __post_init__(self) -> None:
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> FaultProxy:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=120), auto_decompress=False
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def release(self) -> None:
        """End every current and future hold at once."""
        self._release.set()

    def rearm(self) -> None:
        """Holds take their full time again (after :meth:`release`)."""
        self._release = asyncio.Event()

    def txn_ids(self, kind: str | None = None) -> list[str]:
        """Transaction ids of matching requests in arrival order (optionally of one fault kind)."""
        return [h.txn_id for h in self.hits if kind is None or h.fault.kind == kind]

    # ------------------------------------------------------------------ handling

    def _next_fault(self, n: int) -> Fault:
        if self.plan:
            return self.plan.popleft()
        if self.policy is not None:
            return self.policy(n)
        return Fault.passthrough()

    async def _hold(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._release.wait(), seconds)

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, bytes, str]:
        assert self._session is not None
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP
        )
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            data=body,
            headers=headers,
            allow_redirects=False,
        ) as resp:
            return resp.status, await resp.read(), resp.content_type

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=599)  # never reaches the client

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.match not in request.path:
            status, data, ctype = await self._forward(request, body)
            return web.Response(status=status, body=data, content_type=ctype)
        n = len(self.hits)
        fault = self._next_fault(n)
        try:
            count = sum(len(d) for d in json.loads(body)["messages"].values())
        except (ValueError, KeyError, AttributeError, TypeError):
            count = -1
        hit = Hit(n, time.monotonic(), request.path, request.path.rsplit("/", 1)[-1], count, fault)
        self.hits.append(hit)
        self.counts[fault.kind] += 1
        kind = fault.kind
        if kind == "429":
            return web.json_response(
                {
                    "errcode": "M_LIMIT_EXCEEDED",
                    "error": "Too Many Requests (injected)",
                    "retry_after_ms": fault.retry_after_ms,
                },
                status=429,
            )
        if kind == "500":
            return web.json_response(
                {"errcode": "M_UNKNOWN", "error": "Internal error (injected)"}, status=500
            )
        if kind == "reply":
            return _reply(fault)
        if kind == "drop_before":
            return self._drop(request)
        if kind == "stall":
            await self._hold(fault.seconds)
            return self._drop(request)
        if kind == "delay":
            await self._hold(fault.seconds)
        status, data, ctype = await self._forward(request, body)
        hit.forwarded, hit.upstream_status = True, status
        if kind == "drop_after":
            return self._drop(request)
        if kind == "forward_500":
            return web.json_response(
                {"errcode": "M_UNKNOWN", "error": "Internal error after processing (injected)"},
                status=500,
            )
        if kind == "hold_response":
            await self._hold(fault.seconds)
        return web.Response(status=status, body=data, content_type=ctype)


def _reply(fault: Fault) -> web.Response:
    """The canned answer of a ``reply`` fault."""
    if fault.body == "empty":
        return web.Response(status=fault.status)
    if fault.body == "html":
        html = (
            f"<html><head><title>{fault.status}</title></head><body><center><h1>"
            f"{fault.status}</h1></center><hr><center>nginx</center></body></html>"
        )
        return web.Response(status=fault.status, text=html, content_type="text/html")
    error: dict[str, object] = {"errcode": "M_UNKNOWN", "error": "injected"}
    if fault.status == 429:
        error = {
            "errcode": "M_LIMIT_EXCEEDED",
            "error": "Too Many Requests (injected)",
            "retry_after_ms": fault.retry_after_ms,
        }
    return web.json_response(error, status=fault.status)
