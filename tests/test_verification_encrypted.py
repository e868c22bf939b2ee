"""Verification events that arrive Olm-encrypted work the same as plaintext ones.

Against the real Synapse, with real nio clients and real Olm:

* the bot is the production wiring (:func:`tests.verification_helpers.running_bot`: nio with
  encryption, the plugin with ``intercept_verification=True``, an Outbox over HttpTransport and
  a VerificationManager that auto-confirms);
* the peer is a second nio client running bot_toolkit too (:class:`bot_toolkit.BotToolkit`,
  verification on, key sharing off), except that its outbox sends through
  :class:`EncryptingTransport`, which Olm-encrypts every message, so every peer -> bot
  verification event is an ``m.room.encrypted`` to-device event whose decrypted payload has the
  verification type. The bot answers in plaintext (its Outbox), which the peer's own plugin and
  dispatcher receive.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nio import AsyncClient

from bot_toolkit import BotToolkit, Settings
from bot_toolkit.events import (
    KeyVerificationCancel,
    KeyVerificationKey,
    OlmEncrypted,
    ToDeviceEvent,
    VerificationEvent,
)
from bot_toolkit.verification import (
    VerificationCancelled,
    VerificationDone,
    VerificationManager,
    VerificationPolicy,
)
from tests.nio_helpers import (
    close_clients,
    know_each_other,
    make_client,
    send_olm,
    send_plaintext,
    syncing,
    wait_until,
)
from tests.synapse import LocalSynapse
from tests.verification_helpers import Bot, auto_confirm, running_bot

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(120)]

T = 30.0
"""Bound of every single wait (seconds)."""

KEY = "m.key.verification.key"


# ------------------------------------------------------------------------------ the peer


@dataclass
class Sent:
    """One message the peer's outbox sent encrypted."""

    event_type: str
    user_id: str
    device_id: str
    content: dict[str, Any]


class EncryptingTransport:
    """An outbox transport (:class:`bot_toolkit.outbox.Transport`) that Olm-encrypts every
    message of a request.

    Each (user, device, content) becomes one ``m.room.encrypted`` to-device message (nio's Olm,
    through :func:`tests.nio_helpers.send_olm`) whose decrypted payload has ``type=event_type``.
    Device ``*`` means every device of the user that ``client`` knows. Requests are serialised,
    so the Olm ratchet and the wire order follow the outbox's order (one lane per recipient).
    The HTTP transaction ids are nio's own, not ``txn_id``.
    """

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.sent: list[Sent] = []
        self._lock = asyncio.Lock()

    async def send_to_device(
        self, event_type: str, txn_id: str, messages: Mapping[str, Mapping[str, Any]]
    ) -> None:
        async with self._lock:
            for user_id, devices in messages.items():
                for device_id, content in devices.items():
                    for target in self._devices(user_id, device_id):
                        await send_olm(self.client, user_id, target, event_type, content)
                        self.sent.append(Sent(event_type, user_id, target, dict(content)))

    def _devices(self, user_id: str, device_id: str) -> list[str]:
        if device_id != "*":
            return [device_id]
        known = self.client.device_store[user_id]
        return [d for d in known if (user_id, d) != (self.client.user_id, self.client.device_id)]


@dataclass
class Peer:
    """The peer client with its verification manager and what its dispatcher saw."""

    client: AsyncClient
    manager: VerificationManager
    transport: EncryptingTransport
    seen: list[ToDeviceEvent] = field(default_factory=list)
    lifecycle: list[object] = field(default_factory=list)

    @property
    def curve25519(self) -> str:
        return str(self.client.olm.account.identity_keys["curve25519"])


@contextlib.asynccontextmanager
async def running_peer(
    client: AsyncClient, policy: VerificationPolicy, data_dir: Path
) -> AsyncIterator[Peer]:
    """``client`` as a syncing verifier (bot_toolkit on it, its data in ``data_dir``) whose
    verification messages all go out Olm-encrypted. The client stays open on exit."""
    transport = EncryptingTransport(client)
    toolkit = BotToolkit(
        client,
        data_dir,
        verification=policy,
        key_sharing=None,
        settings=Settings(handler_timeout=60.0, drain_timeout=5.0, flush_deadline=5.0),
        transport=transport,
        close_client=False,
    )
    seen: list[ToDeviceEvent] = []
    lifecycle: list[object] = []

    @toolkit.on(ToDeviceEvent)
    async def record(event: ToDeviceEvent) -> None:
        seen.append(event)

    async def record_lifecycle(event: object) -> None:
        lifecycle.append(event)

    for cls in (VerificationDone, VerificationCancelled):
        toolkit.on(cls)(record_lifecycle)
    async with toolkit:
        peer = Peer(client, toolkit.verification, transport, seen, lifecycle)
        async with syncing(client):
            yield peer


def record_verification(bot: Bot) -> list[ToDeviceEvent]:
    """Every verification event (and failed Olm envelope) the bot's dispatcher handles."""
    seen: list[ToDeviceEvent] = []

    async def record(event: ToDeviceEvent) -> None:
        seen.append(event)

    bot.dispatcher.register(VerificationEvent, record)
    bot.dispatcher.register(OlmEncrypted, record)
    return seen


@pytest.fixture
async def peer_client(synapse: LocalSynapse, tmp_path: Path) -> AsyncIterator[AsyncClient]:
    client = await make_client(synapse, tmp_path)
    try:
        yield client
    finally:
        await close_clients(client)


# ------------------------------------------------------------------------------ the tests


async def test_encrypted_verification_from_peer_completes(
    synapse: LocalSynapse, tmp_path: Path, peer_client: AsyncClient
) -> None:
    bot_policy = VerificationPolicy(allowed_users=[peer_client.user_id], confirm=auto_confirm())
    async with running_bot(synapse, tmp_path, policy=bot_policy) as bot:
        bot_seen = record_verification(bot)
        await know_each_other(bot.client, peer_client)
        peer_policy = VerificationPolicy(allowed_users=[bot.user_id], confirm=auto_confirm())
        async with running_peer(peer_client, peer_policy, tmp_path / "peer") as peer:
            txn = await peer.manager.request_verification(bot.user_id, bot.device_id)
            try:
                outcome = await peer.manager.wait_finished(txn, T)
            except TimeoutError:
                pytest.fail(
                    f"verification {txn} not finished on the peer after {T}s (peer state "
                    f"{peer.manager.state_of(txn)}, bot saw {len(bot_seen)} verification events)"
                )
            assert isinstance(outcome, VerificationDone), f"peer's side ended with {outcome!r}"
            await wait_until(
                lambda: bool(bot.of(VerificationDone) or bot.of(VerificationCancelled)),
                within=T,
                what="the bot finishes the verification",
            )
            assert bot.of(VerificationCancelled) == [], bot.of(VerificationCancelled)
            assert peer.lifecycle and all(isinstance(e, VerificationDone) for e in peer.lifecycle)
            (done,) = bot.of(VerificationDone)
            assert done.transaction_id == txn
            assert (done.user_id, done.device_id) == (peer_client.user_id, peer_client.device_id)

            # Both trust stores say so.
            assert bot.client.device_store[peer_client.user_id][peer_client.device_id].verified
            assert peer_client.device_store[bot.user_id][bot.device_id].verified

            # Every peer message went out encrypted, to the bot's device only ...
            sent_types = [s.event_type for s in peer.transport.sent]
            assert {"m.key.verification.request", KEY, "m.key.verification.mac"} <= set(
                sent_types
            ), sent_types
            assert {(s.user_id, s.device_id) for s in peer.transport.sent} == {
                (bot.user_id, bot.device_id)
            }
            # ... and the bot handled each of them as a decrypted payload from the peer.
            from_peer = [e for e in bot_seen if e.sender == peer_client.user_id]
            assert not [e for e in from_peer if isinstance(e, OlmEncrypted)], from_peer
            assert [e for e in from_peer if e.decrypted_from != peer.curve25519] == []
            assert len(from_peer) >= 4, from_peer
            assert sorted(e.event_type for e in from_peer) == sorted(sent_types)
            # The bot's replies reached the peer's dispatcher (plaintext, through its Outbox).
            assert [e for e in peer.seen if isinstance(e, VerificationEvent)]


async def test_encrypted_key_for_unknown_transaction_is_refused_like_plaintext(
    synapse: LocalSynapse, tmp_path: Path, peer_client: AsyncClient
) -> None:
    bot_policy = VerificationPolicy(allowed_users=[peer_client.user_id], confirm=auto_confirm())
    async with running_bot(synapse, tmp_path, policy=bot_policy) as bot:
        bot_seen = record_verification(bot)
        await know_each_other(bot.client, peer_client)
        # The peer only listens: its dispatcher records what the bot sends it.
        peer_policy = VerificationPolicy(allowed_users=[bot.user_id], confirm=auto_confirm())
        async with running_peer(peer_client, peer_policy, tmp_path / "peer") as peer:
            to = (bot.user_id, bot.device_id)
            key = "hBRVUNwOgxPcrZNPJ5aPtjgOIOKrWnvYDTrvwCSjE2Y"  # any 32 bytes, unpadded base64
            await send_olm(peer_client, *to, KEY, {"transaction_id": "enc-unknown", "key": key})
            await send_plaintext(
                peer_client, *to, KEY, {"transaction_id": "plain-unknown", "key": key}
            )

            def cancels() -> dict[str, KeyVerificationCancel]:
                return {
                    e.transaction_id or "": e
                    for e in peer.seen
                    if isinstance(e, KeyVerificationCancel) and e.sender == bot.user_id
                }

            await wait_until(
                lambda: {"enc-unknown", "plain-unknown"} <= cancels().keys(),
                within=T,
                what="the bot cancels both unknown transactions",
            )
            # The bot handled the encrypted key as a decrypted payload, the other as plaintext.
            keys = {
                e.transaction_id: e.decrypted_from
                for e in bot_seen
                if isinstance(e, KeyVerificationKey)
            }
            assert keys == {"enc-unknown": peer.curve25519, "plain-unknown": None}, bot_seen
            encrypted, plaintext = cancels()["enc-unknown"], cancels()["plain-unknown"]
            assert encrypted.code == "m.unknown_transaction", encrypted
            assert (encrypted.code, encrypted.reason) == (plaintext.code, plaintext.reason)
            assert len(cancels()) == 2, peer.seen
            assert bot.manager.list_in_progress() == []
