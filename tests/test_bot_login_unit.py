"""The standalone bot's login and retry parts on their own (the whole login runs against a real
Synapse in test_bot_e2e.py): which ``/login`` failures are fatal, and the backoff between
attempts while the homeserver is unreachable."""

from __future__ import annotations

import random
from pathlib import Path

import aiohttp
import pytest

from bot_toolkit._bot_homeserver import Backoff, BotError, Transient
from bot_toolkit._bot_login import is_fatal_login_error
from bot_toolkit.http_api import BotState
from bot_toolkit.metrics import Metrics


@pytest.mark.parametrize(
    ("errcode", "status"),
    [
        ("M_FORBIDDEN", 403),  # wrong password
        ("M_USER_DEACTIVATED", 403),
        ("M_INVALID_USERNAME", 400),
        ("M_UNKNOWN_TOKEN", 401),
        ("M_FORBIDDEN", None),  # the errcode alone says it
        ("M_UNKNOWN", 400),  # any other 4xx but 429
        (None, 404),
    ],
)
def test_a_refused_login_is_fatal(errcode: str | None, status: int | None) -> None:
    assert is_fatal_login_error(errcode, status)


@pytest.mark.parametrize(
    ("errcode", "status"),
    [
        ("M_LIMIT_EXCEEDED", 429),  # rate limited: later
        (None, 429),
        ("M_UNKNOWN", 500),
        (None, 502),  # an HTML 502 from a proxy
        (None, None),  # no answer at all
        ("M_UNKNOWN", "400"),  # not a number: not a status
    ],
)
def test_a_login_that_may_work_later_is_retried(errcode: str | None, status: object) -> None:
    assert not is_fatal_login_error(errcode, status)


class _Sleeps:
    """Records the delays instead of sleeping; a retry loop that never ends fails the test."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) > 10:
            raise AssertionError(f"still retrying after {self.delays}")


def _backoff(max_delay: float) -> tuple[Backoff, BotState, Metrics, _Sleeps]:
    state, metrics, sleeps = BotState(), Metrics(), _Sleeps()
    errors = metrics.counter("sync_errors_total", "failures", ["reason"])
    return Backoff(state, max_delay, errors, sleep=sleeps), state, metrics, sleeps


@pytest.mark.parametrize(
    ("jitter", "expected"),
    [(0.8, [0.8, 1.6, 2.4, 2.4]), (1.2, [1.2, 2.4, 3.0, 3.0])],
    ids=["low", "high"],
)
async def test_retrying_waits_longer_each_time_up_to_the_cap_then_resets(
    monkeypatch: pytest.MonkeyPatch, jitter: float, expected: list[float]
) -> None:
    # The jitter at one end of its ±20 % range (random.uniform(0.8, 1.2)).
    monkeypatch.setattr(random, "uniform", lambda low, high: {0.8: low, 1.2: high}[jitter])
    backoff, state, metrics, sleeps = _backoff(max_delay=3.0)
    failures: list[BaseException] = [
        Transient("login answered 502"),
        aiohttp.ClientConnectionError("refused"),
        TimeoutError(),
        OSError("unreachable"),
    ]

    async def attempt() -> str:
        if failures:
            raise failures.pop(0)
        return "client"

    assert await backoff.retrying("login", attempt) == "client"
    # 1 s, 2 s, then 4 s and 8 s capped at 3 s; jittered, never past the cap.
    assert sleeps.delays == pytest.approx(expected)
    errors = metrics.get("sync_errors_total")
    assert errors is not None and errors.get("login") == 4
    assert backoff.attempt == 0  # the next failure starts again at 1 s
    assert state.last_error == "login: OSError: unreachable"  # what /readyz shows


async def test_retrying_lets_a_fatal_error_through_at_once() -> None:
    backoff, state, metrics, sleeps = _backoff(max_delay=3.0)

    async def attempt() -> str:
        raise BotError("login as @bot:x refused: M_FORBIDDEN Invalid password")

    with pytest.raises(BotError, match="refused: M_FORBIDDEN"):
        await backoff.retrying("login", attempt)
    errors = metrics.get("sync_errors_total")
    assert sleeps.delays == [] and errors is not None and errors.get("login") == 0
    assert state.last_error is None


async def test_a_session_file_that_cannot_be_written_closes_the_new_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token login: the homeserver (a stand-in answering ``/whoami``) accepts the token, the
    store opens, then writing ``session.json`` fails: the error goes up and the client that was
    just restored is closed, not left behind."""
    from aiohttp import web  # noqa: PLC0415
    from aiohttp.test_utils import TestServer  # noqa: PLC0415
    from nio import AsyncClient  # noqa: PLC0415

    from bot_toolkit._bot_homeserver import Homeserver  # noqa: PLC0415
    from bot_toolkit._bot_login import SESSION_FILE, BotLogin  # noqa: PLC0415
    from bot_toolkit.config import MatrixConfig, Secret  # noqa: PLC0415

    async def whoami(_request: web.Request) -> web.Response:
        return web.json_response({"user_id": "@bot:example.org", "device_id": "BOTDEV"})

    app = web.Application()
    app.router.add_get("/_matrix/client/v3/account/whoami", whoami)
    closed: list[AsyncClient] = []
    original_close = AsyncClient.close

    async def recording_close(self: AsyncClient) -> None:
        closed.append(self)
        await original_close(self)

    monkeypatch.setattr(AsyncClient, "close", recording_close)
    monkeypatch.setenv("BOT_TOOLKIT_STORE_PASSPHRASE", "test passphrase")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        url = str(server.make_url("")).rstrip("/")
        matrix = MatrixConfig(
            homeserver=url, user_id="@bot:example.org", access_token=Secret("syt_token")
        )
        state = BotState()
        login = BotLogin(
            matrix,
            data_dir,
            Homeserver(session, url),
            Backoff(state, 1.0, Metrics().counter("t_errors", "t", ("step",))),
            state,
        )
        (data_dir / SESSION_FILE).mkdir()  # the rename onto it fails
        with pytest.raises(OSError):
            await login.login()
    assert [c.device_id for c in closed] == ["BOTDEV"]
