"""Stand-ins for unit-testing a bot built on bot_toolkit, without a homeserver.

* :class:`FakeClock`: a clock that moves only when the test says so (pass it where a part takes
  ``clock=``: the verification manager, key sharing's claim backoff, the outbox).
* :class:`FakeOutbox`: records every to-device message instead of sending it, and can hand each
  one to a callback (e.g. another side's dispatcher); it fits wherever the verification manager
  or key sharing take an outbox.
* :func:`offline_client` / :func:`offline_pair`: real ``nio.AsyncClient`` objects with an Olm
  machine and a crypto store on disk but no server (a closed port as homeserver); the pair's
  device stores know each other's device keys, as after a key query. Enough to exercise
  decisions that read nio's device and trust state; sending needs a homeserver (see
  :class:`~bot_toolkit.testing.LocalSynapse`).

Integration tests should use the real parts (:class:`~bot_toolkit.testing.LocalSynapse`); these
are for unit tests and fault injection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nio import AsyncClient, AsyncClientConfig
from nio.crypto import OlmDevice

from bot_toolkit.outbox import OutboxClosed

__all__ = ["FakeClock", "FakeOutbox", "SentMessage", "offline_client", "offline_pair"]

_NO_SERVER = "http://127.0.0.1:9"
"""A homeserver URL nothing listens on (the discard port): any request fails fast."""


class FakeClock:
    """A clock (a ``() -> float`` callable) that moves only when the test advances it.

    ``now`` is where it starts: pass ``time.time()`` or ``time.monotonic()`` when the code under
    test mixes it with the real wall or monotonic clock, any fixed number otherwise.
    """

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward (backward when negative)."""
        self.now += seconds


@dataclass(frozen=True, slots=True)
class SentMessage:
    """One to-device message the :class:`FakeOutbox` was given."""

    event_type: str
    user_id: str
    device_id: str
    content: dict[str, Any]
    txn_id: str | None


class FakeOutbox:
    """Records what would be sent; see the module docs.

    Args:
        deliver: called with each recorded :class:`SentMessage` (after recording).
    """

    def __init__(self, deliver: Callable[[SentMessage], None] | None = None) -> None:
        self.sent: list[SentMessage] = []
        self.deliver = deliver
        self.fail_types: set[str] = set()
        """Event types whose sends raise :class:`~bot_toolkit.outbox.OutboxClosed` (nothing
        recorded), to test how the code under test copes."""

    async def send(
        self,
        event_type: str,
        messages: Mapping[str, Mapping[str, Mapping[str, Any]]],
        *,
        txn_id: str | None = None,
    ) -> list[str]:
        """Record one message per device; returns one transaction id, like the outbox."""
        if event_type in self.fail_types:
            raise OutboxClosed(f"FakeOutbox refuses {event_type} (fail_types)")
        for user_id, devices in messages.items():
            for device_id, content in devices.items():
                message = SentMessage(event_type, user_id, device_id, dict(content), txn_id)
                self.sent.append(message)
                if self.deliver is not None:
                    self.deliver(message)
        return [txn_id or f"fake-{len(self.sent)}"]

    def of_type(self, event_type: str) -> list[SentMessage]:
        """The recorded messages of one event type, in order."""
        return [m for m in self.sent if m.event_type == event_type]


def offline_client(
    store_dir: str | Path, user_id: str = "@bot:example.org", device_id: str = "BOTDEVICE"
) -> AsyncClient:
    """A logged-in, encryption-enabled nio client with its own crypto store and no server.

    ``store_dir`` is created when missing. Close it with ``await client.close()``.
    """
    path = Path(store_dir)
    path.mkdir(parents=True, exist_ok=True)
    config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
    client = AsyncClient(_NO_SERVER, user_id, device_id, str(path), config=config)
    client.restore_login(user_id, device_id, "offline-token")
    if client.olm is None:
        raise RuntimeError("nio has no encryption support here: install matrix-nio[e2e]")
    return client


def _device_of(client: AsyncClient) -> OlmDevice:
    olm: Any = client.olm
    keys = olm.account.identity_keys
    return OlmDevice(
        client.user_id,
        client.device_id,
        {"ed25519": keys["ed25519"], "curve25519": keys["curve25519"]},
    )


def offline_pair(
    tmp_path: str | Path,
    alice: tuple[str, str] = ("@alice:example.org", "ALICEDEVICE"),
    bob: tuple[str, str] = ("@bob:example.org", "BOBDEVICE"),
) -> tuple[AsyncClient, AsyncClient]:
    """Two :func:`offline_client` s whose device stores hold each other's device (unverified),
    as after a key query. Close both with ``await client.close()``."""
    root = Path(tmp_path)
    a = offline_client(root / "alice", *alice)
    b = offline_client(root / "bob", *bob)
    for client, other in ((a, b), (b, a)):
        olm: Any = client.olm
        olm.device_store.add(_device_of(other))
    return a, b
