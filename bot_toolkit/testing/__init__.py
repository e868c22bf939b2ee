"""Helpers for testing bots built on bot_toolkit.

* :class:`LocalSynapse`: a throwaway local Synapse homeserver (127.0.0.1, SQLite) for
  integration tests, with :meth:`LocalSynapse.register` for users.
* :class:`FakeClock`, :class:`FakeOutbox`, :func:`offline_client`, :func:`offline_pair`
  (:mod:`bot_toolkit.testing.fakes`): stand-ins for unit tests without a homeserver.
"""

from __future__ import annotations

from .fakes import FakeClock, FakeOutbox, SentMessage, offline_client, offline_pair
from .synapse import LocalSynapse, RegisteredUser, SynapseError

__all__ = [
    "FakeClock",
    "FakeOutbox",
    "LocalSynapse",
    "RegisteredUser",
    "SentMessage",
    "SynapseError",
    "offline_client",
    "offline_pair",
]
