"""Shared fixtures: one real Synapse homeserver per test session, started on first use."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.synapse import LocalSynapse


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
