"""Shared fixtures: one real Synapse homeserver per test session, started on first use, and
the handler-error guard (a handler that fails during a test fails the test)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from bot_toolkit.dispatcher import Dispatcher
from tests.synapse import LocalSynapse

HANDLER_ERRORS_MARKER = "handler_errors"
"""``@pytest.mark.handler_errors``: the test expects dispatcher handlers to fail (the guard
below then lets them)."""


@pytest.fixture(autouse=True)
def _handler_errors_fail_the_test(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """A dispatcher handler (or error handler) that raises or times out fails the test.

    Every :class:`~bot_toolkit.dispatcher.Dispatcher` in the test process counts such failures
    in ``handler_errors_total`` and logs them, which a test would not notice. This guard records
    each one and fails the test at teardown, naming the handler, the event and the exception.
    Tests that expect failing handlers opt out with ``@pytest.mark.handler_errors``.
    """
    if request.node.get_closest_marker(HANDLER_ERRORS_MARKER) is not None:
        yield
        return
    failures: list[str] = []
    original = Dispatcher._failed

    async def recording(self: Dispatcher, name: str, event: object, exc: Exception) -> None:
        failures.append(f"{name} on {type(event).__name__}: {type(exc).__name__}: {exc}"[:300])
        await original(self, name, event, exc)

    monkeypatch.setattr(Dispatcher, "_failed", recording)
    yield
    if failures:
        pytest.fail(
            f"{len(failures)} dispatcher handler failure(s) during the test (mark it "
            f"@pytest.mark.{HANDLER_ERRORS_MARKER} if it expects them): " + "; ".join(failures),
            pytrace=False,
        )


@pytest.fixture(scope="session")
def synapse() -> Iterator[LocalSynapse]:
    """A real Synapse on 127.0.0.1 with SQLite, stopped at the end of the session.

    Synapse is a test extra: it is imported, never installed, here.
    """
    server = LocalSynapse()
    server.start()
    try:
        yield server
    finally:
        if os.environ.get("BOT_TOOLKIT_KEEP_SYNAPSE_LOG"):
            print(server.log_path.read_text(errors="replace")[-5000:])
        server.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the matrix-js-sdk peers' logs of a passing session; keep (and name) them otherwise."""
    peers = sys.modules.get("tests.interop_peer")
    if peers is None:
        return
    kept = peers.remove_session_logs(keep=exitstatus != 0)
    if kept is not None:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"matrix-js-sdk peer logs kept in {kept}")
