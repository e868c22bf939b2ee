"""HTTP endpoints of the standalone bot (aiohttp): health, readiness, metrics, and an admin API.

- ``GET /healthz``: 200 ``{"status": "ok"}`` while the process serves requests.
- ``GET /readyz``: 200 when logged in, syncing recently and the outbox is neither stuck nor full;
  otherwise 503. The body is ``{"status", "checks": {name: {"ok"}}, "failing": [...]}``; each
  check also carries a ``"detail"`` text (which may hold internal error text) only for a caller
  that sends the admin bearer token.
- ``GET /metrics``: the :class:`~bot_toolkit.metrics.Metrics` registry in Prometheus text format.
- ``/readyz`` and ``/metrics`` answer only requests whose ``Host`` header names an allowed host
  (``allowed_hosts``; loopback names by default), 403 otherwise: a web page cannot read them
  through DNS rebinding.
- ``/admin/...``: needs ``Authorization: Bearer <admin token>``. A missing, wrong or malformed
  (not ASCII, not a bearer token, any bytes at all) header gets 401 before any handler runs, and is
  counted in ``admin_auth_failures_total``. With no admin token configured the admin API is
  disabled: 403.

  - ``GET /admin/verifications``: verifications in progress, with emoji and decimals once known;
  - ``GET /admin/verifications/{id}``: one of them;
  - ``POST /admin/verifications/{id}/confirm`` and ``.../cancel``: 200 when done, 404 for an
    unknown id, 409 when its state does not allow it.

The bot supplies a :class:`Readiness` (or uses :class:`BotState`) and a
:class:`VerificationController`; :class:`HttpServer` runs the app on a host and port.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bot_toolkit.config import LOOPBACK_HOSTS, Secret
from bot_toolkit.metrics import Metrics
from bot_toolkit.verification.info import VerificationInfo

__all__ = [
    "LOOPBACK_HOSTS",
    "METRICS_CONTENT_TYPE",
    "BotState",
    "HttpServer",
    "Readiness",
    "VerificationController",
    "VerificationInfo",
    "make_app",
]

log = logging.getLogger("bot_toolkit.http_api")
_server_log = logging.getLogger("bot_toolkit.http_api.server")


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs each request its parser rejects (a NUL in a header, a bad request line) with
    a traceback at ERROR: anyone who can connect could flood the log. One line at INFO instead,
    naming only the error class (the raw bytes stay out of the log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "HTTP: refused a malformed request (%s %d)"
            record.args = (type(exc).__name__, exc.code)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_server_log.addFilter(_MalformedRequestFilter())

METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class VerificationController(Protocol):
    """What the admin API needs from the verification manager."""

    def list_in_progress(self) -> Sequence[VerificationInfo]:
        """Every verification that is neither done nor cancelled."""
        ...

    async def confirm(self, verification_id: str) -> bool:
        """Confirm that the SAS matches (send our MAC).

        Raise :class:`KeyError` for an unknown id; return False when the state does not allow it.
        """
        ...

    async def cancel(self, verification_id: str) -> bool:
        """Cancel with ``m.user``; :class:`KeyError` for an unknown id, False when already over."""
        ...


class Readiness(Protocol):
    """What ``/readyz`` reads. Times come from the clock given to :func:`make_app`."""

    @property
    def logged_in(self) -> bool:
        """Whether the bot holds a working access token."""
        ...

    @property
    def last_sync_at(self) -> float | None:
        """Clock time of the last successful ``/sync`` (``time.monotonic()``), None before one."""
        ...

    @property
    def last_error(self) -> str | None:
        """Why the homeserver cannot be used right now (shown in /readyz), None when fine."""
        ...

    def outbox_oldest_pending_age(self) -> float | None:
        """Seconds the oldest unsent outbound message has waited; None when nothing waits."""
        ...

    def outbox_full(self) -> bool:
        """Whether the outbox is at its bound and refuses new messages."""
        ...


@dataclass(slots=True)
class BotState:
    """A ready-made :class:`Readiness` the bot updates as it goes."""

    logged_in: bool = False
    last_sync_at: float | None = None
    last_error: str | None = None
    outbox_age: Callable[[], float | None] = field(default=lambda: None)
    """Reads the outbox backlog age (see :meth:`Readiness.outbox_oldest_pending_age`)."""
    outbox_is_full: Callable[[], bool] = field(default=lambda: False)
    """Reads whether the outbox is at its bound (see :meth:`Readiness.outbox_full`)."""
    identity: Callable[[], str] | None = None
    """Reads the cross-signing identity state for ``/readyz`` (informational: a device that is
    not cross-signed does not make the bot unready)."""
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def outbox_oldest_pending_age(self) -> float | None:
        return self.outbox_age()

    def outbox_full(self) -> bool:
        return self.outbox_is_full()

    def synced(self) -> None:
        """Record a successful sync (clears :attr:`last_error`)."""
        self.last_sync_at = self.clock()
        self.last_error = None


_DONE: Final = {"confirm": "confirmed", "cancel": "cancelled"}

_HOST_CHECKED: Final = frozenset({"/readyz", "/metrics"})


def host_of(header: str) -> str:
    """The host name of a ``Host`` header value: lower case, no port, no IPv6 brackets."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else ""
    host, _, _ = value.partition(":")
    return host


def bearer_matches(header: str | None, token: bytes | None) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` as a bearer token.

    Total: any value (missing, not a bearer, non-ASCII, surrogate-escaped bytes) is just False.
    The comparison takes constant time in the token.
    """
    if header is None or token is None:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # aiohttp hands undecodable header bytes over as surrogates: encode them back, never raise.
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class _Api:
    def __init__(
        self,
        *,
        readiness: Readiness,
        metrics: Metrics,
        controller: VerificationController | None,
        admin_token: str | None,
        allowed_hosts: Sequence[str],
        sync_stale_after: float,
        outbox_stuck_after: float,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.readiness = readiness
        self.metrics = metrics
        self.controller = controller
        self.token = admin_token.encode() if admin_token else None
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = frozenset(h.lower().strip("[]") for h in allowed_hosts if h != "*")
        self.sync_stale_after = sync_stale_after
        self.outbox_stuck_after = outbox_stuck_after
        self.clock = clock
        self.wall_clock = wall_clock
        self.requests = metrics.counter(
            "http_requests_total", "HTTP requests by route and status", ("route", "status")
        )
        self.admin_actions = metrics.counter(
            "admin_actions_total", "Admin API actions by action and result", ("action", "result")
        )
        self.auth_failures = metrics.counter(
            "admin_auth_failures_total", "Admin API requests refused for a missing or bad token"
        )
        self.host_refusals = metrics.counter(
            "http_host_refused_total", "Requests refused for a Host header not allowed"
        )

    # ---- middleware

    @web.middleware
    async def count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        try:
            response = await handler(request)
        except web.HTTPException as e:
            self.requests.inc(name, str(e.status))
            raise
        self.requests.inc(name, str(response.status))
        return response

    @web.middleware
    async def admin_auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not (request.path == "/admin" or request.path.startswith("/admin/")):
            return await handler(request)
        if self.token is None:
            return web.json_response(
                {"error": "admin API disabled: set http.admin_token or BOT_TOOLKIT_ADMIN_TOKEN"},
                status=403,
            )
        if not self.authorized(request):
            self.auth_failures.inc()
            log.warning(
                "admin API: refused %.16s %.128s (missing or bad token)",
                request.method,
                request.path,
            )
            return web.json_response(
                {"error": "missing or invalid bearer token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="bot_toolkit admin"'},
            )
        return await handler(request)

    @web.middleware
    async def host_check(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _HOST_CHECKED or self.any_host:
            return await handler(request)
        header = request.headers.get("Host")
        if header is not None and host_of(header) in self.allowed_hosts:
            return await handler(request)
        self.host_refusals.inc()
        log.warning("HTTP: refused %.16s for a Host header not allowed", request.path)
        return web.json_response({"error": "host not allowed"}, status=403)

    def authorized(self, request: web.Request) -> bool:
        """Whether the request carries the admin bearer token."""
        return bearer_matches(request.headers.get("Authorization"), self.token)

    # ---- public endpoints

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        r = self.readiness
        checks: dict[str, dict[str, Any]] = {}
        error = r.last_error
        if r.logged_in:
            checks["logged_in"] = {"ok": True, "detail": "logged in"}
        else:
            checks["logged_in"] = {"ok": False, "detail": error or "not logged in yet"}
        last = r.last_sync_at
        if last is None:
            checks["sync"] = {"ok": False, "detail": error or "no successful sync yet"}
        else:
            age = max(0.0, self.clock() - last)
            ok = age <= self.sync_stale_after
            detail = f"last successful sync {age:.0f}s ago"
            if not ok and error:
                detail += f": {error}"
            checks["sync"] = {"ok": ok, "detail": detail}
        pending = r.outbox_oldest_pending_age()
        if r.outbox_full():
            checks["outbox"] = {"ok": False, "detail": "the outbox is full: new messages refused"}
        elif pending is None:
            checks["outbox"] = {"ok": True, "detail": "nothing waiting"}
        else:
            checks["outbox"] = {
                "ok": pending <= self.outbox_stuck_after,
                "detail": f"oldest unsent message waited {pending:.0f}s",
            }
        identity = getattr(r, "identity", None)
        if callable(identity):
            checks["identity"] = {"ok": True, "detail": identity()}
        failing = [name for name, check in checks.items() if not check["ok"]]
        if not self.authorized(request):
            # Details may hold internal error text: only for the operator.
            checks = {name: {"ok": check["ok"]} for name, check in checks.items()}
        body = {"status": "not ready" if failing else "ready", "checks": checks, "failing": failing}
        return web.json_response(body, status=503 if failing else 200)

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render().encode(), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    # ---- admin endpoints

    def _info(self, v: VerificationInfo) -> dict[str, Any]:
        return {
            "id": v.id,
            "user_id": v.user_id,
            "device_id": v.device_id,
            "state": v.state,
            "emoji": [{"emoji": e, "description": d} for e, d in v.emoji],
            "decimals": list(v.decimals) if v.decimals is not None else None,
            "deadline": _iso(v.deadline) if v.deadline is not None else None,
            "expires_in": (
                round(max(0.0, v.deadline - self.wall_clock()), 1)
                if v.deadline is not None
                else None
            ),
            # Only for in-room flows, so to-device entries keep their shape.
            **({"room_id": v.room_id} if v.room_id is not None else {}),
        }

    def _all(self) -> Sequence[VerificationInfo]:
        return self.controller.list_in_progress() if self.controller is not None else ()

    async def list_verifications(self, request: web.Request) -> web.Response:
        return web.json_response({"verifications": [self._info(v) for v in self._all()]})

    async def get_verification(self, request: web.Request) -> web.Response:
        vid = request.match_info["id"]
        for v in self._all():
            if v.id == vid:
                return web.json_response(self._info(v))
        return web.json_response({"error": f"no verification {vid!r} in progress"}, status=404)

    async def confirm(self, request: web.Request) -> web.Response:
        return await self._act(request, "confirm")

    async def cancel(self, request: web.Request) -> web.Response:
        return await self._act(request, "cancel")

    async def _act(self, request: web.Request, action: str) -> web.Response:
        vid = request.match_info["id"]
        if self.controller is None:
            return web.json_response({"error": f"no verification {vid!r} in progress"}, status=404)
        method = self.controller.confirm if action == "confirm" else self.controller.cancel
        try:
            done = await method(vid)
        except KeyError:
            self.admin_actions.inc(action, "unknown")
            return web.json_response({"error": f"no verification {vid!r} in progress"}, status=404)
        except Exception:
            self.admin_actions.inc(action, "error")
            log.exception("admin API: %s of verification %s failed", action, vid)
            return web.json_response({"error": f"{action} failed; see the bot's log"}, status=500)
        if not done:
            self.admin_actions.inc(action, "conflict")
            state = next((v.state for v in self._all() if v.id == vid), "finished")
            return web.json_response(
                {"error": f"cannot {action} verification {vid!r} in state {state!r}"}, status=409
            )
        self.admin_actions.inc(action, "ok")
        log.info("admin API: %s verification %s", action, vid)
        return web.json_response({"id": vid, "result": _DONE[action]})


def make_app(
    readiness: Readiness,
    metrics: Metrics,
    *,
    controller: VerificationController | None = None,
    admin_token: str | Secret | None = None,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    sync_stale_after: float = 120.0,
    outbox_stuck_after: float = 300.0,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> web.Application:
    """The aiohttp application.

    ``admin_token`` (a string or the config's :class:`~bot_toolkit.config.Secret`) None or empty
    disables the admin API (403). ``allowed_hosts``: the ``Host`` names ``/readyz`` and
    ``/metrics`` answer (``"*"``: any). ``controller`` None: no
    verification runs, so the list is empty and every id is unknown. ``clock`` must be the clock
    of :attr:`Readiness.last_sync_at`; ``wall_clock`` turns deadlines into ``expires_in``.
    """
    api = _Api(
        readiness=readiness,
        metrics=metrics,
        controller=controller,
        admin_token=admin_token.reveal() if isinstance(admin_token, Secret) else admin_token,
        allowed_hosts=allowed_hosts,
        sync_stale_after=sync_stale_after,
        outbox_stuck_after=outbox_stuck_after,
        clock=clock,
        wall_clock=wall_clock,
    )
    app = web.Application(middlewares=[api.count, api.host_check, api.admin_auth])
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics_text)
    app.router.add_get("/admin/verifications", api.list_verifications)
    app.router.add_get("/admin/verifications/{id}", api.get_verification)
    app.router.add_post("/admin/verifications/{id}/confirm", api.confirm)
    app.router.add_post("/admin/verifications/{id}/cancel", api.cancel)
    return app


class HttpServer:
    """Runs an app on ``host:port`` (port 0: any free port; see :attr:`port` after start)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve; raises :class:`OSError` when the address cannot be bound."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, logger=_server_log)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple):  # (host, port[, flowinfo, scope_id])
                self._port = int(address[1])
                break
        log.info("HTTP on %s:%d", self.host, self._port)

    @property
    def port(self) -> int:
        """The port served (the real one once started)."""
        return self._port

    async def stop(self) -> None:
        """Stop serving and close connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
