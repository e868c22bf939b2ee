"""HTTP endpoints: health, readiness states, metrics format, and the token-guarded admin API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from bot_toolkit.config import Secret
from bot_toolkit.http_api import (
    METRICS_CONTENT_TYPE,
    BotState,
    HttpServer,
    VerificationInfo,
    make_app,
)
from bot_toolkit.metrics import Metrics
from tests.fakes import FakeClock

TOKEN = "s3cr3t-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class FakeController:
    """Records every call; ``a`` is in a state that allows both actions, ``b`` allows neither."""

    items: list[VerificationInfo] = field(
        default_factory=lambda: [
            VerificationInfo(
                id="a",
                user_id="@alice:example.org",
                device_id="ALICEDEV",
                state="keys_exchanged",
                emoji=(("🐶", "Dog"), ("🔑", "Key")),
                decimals=(1234, 5678, 910),
                deadline=2_000_000_000.0,
            ),
            VerificationInfo(id="b", user_id="@bob:example.org", device_id="BOBDEV", state="done"),
        ]
    )
    calls: list[tuple[str, str]] = field(default_factory=list)

    def list_in_progress(self) -> Sequence[VerificationInfo]:
        self.calls.append(("list", ""))
        return list(self.items)

    async def _act(self, action: str, vid: str) -> bool:
        self.calls.append((action, vid))
        for v in self.items:
            if v.id == vid:
                return v.state == "keys_exchanged"
        raise KeyError(vid)

    async def confirm(self, verification_id: str) -> bool:
        return await self._act("confirm", verification_id)

    async def cancel(self, verification_id: str) -> bool:
        return await self._act("cancel", verification_id)


@dataclass
class Env:
    client: TestClient[aiohttp.web.Request, aiohttp.web.Application]
    state: BotState
    clock: FakeClock
    controller: FakeController
    metrics: Metrics


async def _client(
    app: aiohttp.web.Application,
) -> TestClient[aiohttp.web.Request, aiohttp.web.Application]:
    client: TestClient[aiohttp.web.Request, aiohttp.web.Application] = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    clock = FakeClock(1000.0)
    state = BotState(clock=clock)
    controller = FakeController()
    metrics = Metrics()
    app = make_app(
        state,
        metrics,
        controller=controller,
        admin_token=TOKEN,
        sync_stale_after=60,
        outbox_stuck_after=300,
        clock=clock,
        wall_clock=lambda: 1_999_999_900.0,
    )
    client = await _client(app)
    try:
        yield Env(client, state, clock, controller, metrics)
    finally:
        await client.close()


# ---- health and readiness


async def test_healthz(env: Env) -> None:
    resp = await env.client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_readyz_before_login(env: Env) -> None:
    resp = await env.client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "not ready"
    assert body["failing"] == ["logged_in", "sync"]
    assert body["checks"]["outbox"]["ok"] is True


async def test_readyz_ready_then_stale_then_stuck(env: Env) -> None:
    env.state.logged_in = True
    env.state.synced()
    resp = await env.client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ready"

    env.clock.now += 61  # no sync for longer than sync_stale_after
    env.state.last_error = "homeserver unreachable: connection refused"
    resp = await env.client.get("/readyz", headers=AUTH)
    assert resp.status == 503
    body = await resp.json()
    assert body["failing"] == ["sync"]
    assert "connection refused" in body["checks"]["sync"]["detail"]

    env.state.synced()
    env.state.outbox_age = lambda: 301.0
    resp = await env.client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["failing"] == ["outbox"]

    env.state.outbox_age = lambda: 5.0
    assert (await env.client.get("/readyz")).status == 200


async def test_readyz_reports_homeserver_down_at_start(env: Env) -> None:
    env.state.last_error = "cannot reach https://hs: connection refused"
    body = await (await env.client.get("/readyz", headers=AUTH)).json()
    assert "connection refused" in body["checks"]["logged_in"]["detail"]


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}]
)
async def test_readyz_details_only_for_the_operator(env: Env, headers: dict[str, str]) -> None:
    """Internal error text is for the admin token holder; others see only which checks fail."""
    env.state.last_error = "cannot reach https://internal-hs.lan:8448: connection refused"
    resp = await env.client.get("/readyz", headers=headers)
    assert resp.status == 503
    body = await resp.json()
    assert body == {
        "status": "not ready",
        "checks": {"logged_in": {"ok": False}, "sync": {"ok": False}, "outbox": {"ok": True}},
        "failing": ["logged_in", "sync"],
    }
    assert "internal-hs" not in await resp.text()
    detailed = await (await env.client.get("/readyz", headers=AUTH)).json()
    assert "internal-hs" in detailed["checks"]["logged_in"]["detail"]
    assert detailed["failing"] == body["failing"]


async def test_readyz_fails_while_the_outbox_is_full(env: Env) -> None:
    env.state.logged_in = True
    env.state.synced()
    full = [True]
    env.state.outbox_is_full = lambda: full[0]
    resp = await env.client.get("/readyz", headers=AUTH)
    assert resp.status == 503
    body = await resp.json()
    assert body["failing"] == ["outbox"]
    assert "full" in body["checks"]["outbox"]["detail"]
    full[0] = False
    assert (await env.client.get("/readyz")).status == 200


# ---- Host allow-list


@pytest.mark.parametrize("path", ["/readyz", "/metrics"])
@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8080", True),
        ("localhost", True),
        ("LOCALHOST:1", True),
        ("[::1]:8080", True),
        ("bot.internal:9000", True),
        ("evil.example", False),
        ("127.0.0.1.evil.example", False),
        ("localhost.evil.example:8080", False),
        ("[::2]", False),
        ("", False),
    ],
)
async def test_host_header_allow_list(path: str, host: str, allowed: bool) -> None:
    """A page served from another origin reaches the bot only through DNS rebinding, which
    shows up as a foreign Host header: /readyz and /metrics refuse those (403)."""
    metrics = Metrics()
    app = make_app(
        BotState(),
        metrics,
        admin_token=TOKEN,
        allowed_hosts=("localhost", "127.0.0.1", "::1", "bot.internal"),
    )
    client = await _client(app)
    try:
        resp = await client.get(path, headers={"Host": host})
        assert (resp.status != 403) is allowed, (resp.status, await resp.text())
        refused = metrics.get("http_host_refused_total")
        assert refused is not None and refused.total() == (0 if allowed else 1)
        assert (await client.get("/healthz", headers={"Host": host})).status == 200
    finally:
        await client.close()


async def test_host_allow_list_wildcard() -> None:
    client = await _client(make_app(BotState(), Metrics(), allowed_hosts=("*",)))
    try:
        resp = await client.get("/metrics", headers={"Host": "prometheus-target.svc:8080"})
        assert resp.status == 200
    finally:
        await client.close()


# ---- metrics


async def test_metrics_prometheus_text(env: Env) -> None:
    env.metrics.counter("things_total", "Things", ("kind",)).inc("a")
    await env.client.get("/healthz")
    resp = await env.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == METRICS_CONTENT_TYPE
    text = await resp.text()
    assert "# TYPE bot_toolkit_things_total counter" in text
    assert 'bot_toolkit_things_total{kind="a"} 1' in text
    assert 'bot_toolkit_http_requests_total{route="/healthz",status="200"} 1' in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.split(" ")) == 2


# ---- admin API: authentication


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer "},
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/verifications"),
        ("GET", "/admin/verifications/a"),
        ("POST", "/admin/verifications/a/confirm"),
        ("POST", "/admin/verifications/a/cancel"),
        ("POST", "/admin/verifications/zzz/cancel"),
        ("GET", "/admin/nothing-here"),
    ],
)
async def test_admin_without_token_is_401_and_nothing_happens(
    env: Env, headers: dict[str, str], method: str, path: str
) -> None:
    resp = await env.client.request(method, path, headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert env.controller.calls == []
    assert env.metrics.get("admin_auth_failures_total").total() == 1  # type: ignore[union-attr]


async def test_admin_disabled_without_configured_token() -> None:
    controller = FakeController()
    for token in (None, ""):
        client = await _client(
            make_app(BotState(), Metrics(), controller=controller, admin_token=token)
        )
        try:
            for headers in ({}, {"Authorization": "Bearer "}, AUTH):
                resp = await client.post("/admin/verifications/a/confirm", headers=headers)
                assert resp.status == 403
                assert "admin_token" in (await resp.json())["error"]
        finally:
            await client.close()
    assert controller.calls == []


async def _raw_request(port: int, head: bytes) -> bytes:
    """Send ``head`` as the request head and return the status line (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


_HEADER_BYTES = st.binary(max_size=96).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").lstrip(b" \t")
)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(_HEADER_BYTES, _HEADER_BYTES.map(lambda b: b"Bearer " + b)))
def test_authorization_header_fuzz(value: bytes) -> None:
    """Any bytes in ``Authorization`` (non-UTF-8, controls, long): 401 and counted, or, for bytes
    HTTP forbids in a header (NUL, DEL, C0 controls), 400 from the HTTP parser before any
    handler. Never a 500 (the log side: test_malformed_request_logs_one_line)."""

    async def run() -> None:
        metrics = Metrics()
        server = HttpServer(make_app(BotState(), metrics, admin_token=TOKEN), "127.0.0.1", 0)
        await server.start()
        try:
            status = await _raw_request(
                server.port,
                b"GET /admin/verifications HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: " + value + b"\r\nConnection: close\r\n\r\n",
            )
        finally:
            await server.stop()
        code = int(status.split(b" ")[1])
        failures = metrics.get("admin_auth_failures_total")
        assert failures is not None
        forbidden = any((b < 0x20 and b != 0x09) or b == 0x7F for b in value)
        if forbidden:
            assert code in (400, 401), status
        else:
            assert code == 401, status
        assert failures.total() == (1 if code == 401 else 0)

    asyncio.run(run())


async def test_malformed_request_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    server = HttpServer(make_app(BotState(), Metrics(), admin_token=TOKEN), "127.0.0.1", 0)
    await server.start()
    try:
        with caplog.at_level(logging.DEBUG):
            status = await _raw_request(
                server.port,
                b"GET /admin/verifications HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Bearer \x00\x01\r\nConnection: close\r\n\r\n",
            )
    finally:
        await server.stop()
    assert status.startswith(b"HTTP/1.0 400") or status.startswith(b"HTTP/1.1 400")
    records = [r for r in caplog.records if r.name.startswith("bot_toolkit.http_api")]
    assert [(r.levelno, r.getMessage()) for r in records if "malformed" in r.getMessage()] == [
        (logging.INFO, "HTTP: refused a malformed request (BadHttpMessage 400)")
    ]
    assert not any(r.exc_info for r in caplog.records)


async def test_bearer_scheme_is_case_insensitive(env: Env) -> None:
    resp = await env.client.get(
        "/admin/verifications", headers={"Authorization": f"bearer {TOKEN}"}
    )
    assert resp.status == 200


# ---- admin API: verifications


async def test_list_verifications(env: Env) -> None:
    resp = await env.client.get("/admin/verifications", headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    first, second = body["verifications"]
    assert first == {
        "id": "a",
        "user_id": "@alice:example.org",
        "device_id": "ALICEDEV",
        "state": "keys_exchanged",
        "emoji": [{"emoji": "🐶", "description": "Dog"}, {"emoji": "🔑", "description": "Key"}],
        "decimals": [1234, 5678, 910],
        "deadline": "2033-05-18T03:33:20Z",
        "expires_in": 100.0,
    }
    assert second["emoji"] == [] and second["decimals"] is None and second["deadline"] is None


async def test_get_one(env: Env) -> None:
    assert (await env.client.get("/admin/verifications/a", headers=AUTH)).status == 200
    assert (await env.client.get("/admin/verifications/nope", headers=AUTH)).status == 404


async def test_confirm_and_cancel(env: Env) -> None:
    resp = await env.client.post("/admin/verifications/a/confirm", headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {"id": "a", "result": "confirmed"}
    resp = await env.client.post("/admin/verifications/a/cancel", headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {"id": "a", "result": "cancelled"}
    assert ("confirm", "a") in env.controller.calls
    assert ("cancel", "a") in env.controller.calls


async def test_unknown_id_404(env: Env) -> None:
    for action in ("confirm", "cancel"):
        resp = await env.client.post(f"/admin/verifications/nope/{action}", headers=AUTH)
        assert resp.status == 404
        assert "nope" in (await resp.json())["error"]


async def test_wrong_state_409(env: Env) -> None:
    resp = await env.client.post("/admin/verifications/b/confirm", headers=AUTH)
    assert resp.status == 409
    assert "'done'" in (await resp.json())["error"]


async def test_confirm_is_post_only(env: Env) -> None:
    resp = await env.client.get("/admin/verifications/a/confirm", headers=AUTH)
    assert resp.status == 405
    assert ("confirm", "a") not in env.controller.calls


async def test_controller_error_is_500_json(env: Env) -> None:
    async def boom(verification_id: str) -> bool:
        raise RuntimeError("nope")

    env.controller.confirm = boom  # type: ignore[method-assign]
    resp = await env.client.post("/admin/verifications/a/confirm", headers=AUTH)
    assert resp.status == 500
    assert "error" in await resp.json()


async def test_no_controller_means_nothing_in_progress() -> None:
    client = await _client(make_app(BotState(), Metrics(), admin_token=TOKEN))
    try:
        body = await (await client.get("/admin/verifications", headers=AUTH)).json()
        assert body == {"verifications": []}
        resp = await client.post("/admin/verifications/a/confirm", headers=AUTH)
        assert resp.status == 404
    finally:
        await client.close()


# ---- a real server on 127.0.0.1


async def test_http_server_on_loopback() -> None:
    info = VerificationInfo(id="x", user_id="@u:h", device_id="D", state="started")
    controller = FakeController(items=[replace(info)])
    server = HttpServer(
        make_app(BotState(), Metrics(), controller=controller, admin_token=TOKEN), "127.0.0.1", 0
    )
    await server.start()
    try:
        assert server.port > 0
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.port}"
            async with session.get(url + "/healthz") as resp:
                assert resp.status == 200
            async with session.get(url + "/admin/verifications") as resp:
                assert resp.status == 401
            async with session.get(url + "/admin/verifications", headers=AUTH) as resp:
                assert json.loads(await resp.text())["verifications"][0]["id"] == "x"
    finally:
        await server.stop()


async def test_admin_token_from_config_secret() -> None:
    client = await _client(make_app(BotState(), Metrics(), admin_token=Secret(TOKEN)))
    try:
        assert (await client.get("/admin/verifications", headers=AUTH)).status == 200
        assert (await client.get("/admin/verifications")).status == 401
    finally:
        await client.close()


async def test_admin_lists_in_room_flows_with_their_room() -> None:
    """An in-room flow: the id is the request's event id (``$``, ``:`` in the path), the entry
    carries ``room_id``; confirm reaches the controller with that id."""
    flow = "$Abc-_123:example.org"
    info = VerificationInfo(
        id=flow,
        user_id="@alice:example.org",
        device_id="ALICEDEV",
        state="keys_exchanged",
        emoji=(("🐶", "Dog"),),
        decimals=(1234, 5678, 910),
        room_id="!dm:example.org",
    )
    controller = FakeController(items=[info])
    client = await _client(
        make_app(BotState(), Metrics(), controller=controller, admin_token=TOKEN)
    )
    try:
        listed = (await (await client.get("/admin/verifications", headers=AUTH)).json())[
            "verifications"
        ]
        assert [(v["id"], v["room_id"], v["decimals"]) for v in listed] == [
            (flow, "!dm:example.org", [1234, 5678, 910])
        ]
        path = "/admin/verifications/" + quote(flow, safe="") + "/confirm"
        assert (await client.post(path, headers=AUTH)).status == 200
        assert ("confirm", flow) in controller.calls
    finally:
        await client.close()
