"""Real, encrypted ``nio.AsyncClient``s against the test Synapse, and what tests do with them.

* :func:`make_client`: register a user (or take one), log in with a fresh crypto store, upload
  device keys and run a first sync.
* :func:`syncing`: ``sync_forever`` in a background task for the length of an ``async with``.
* :func:`sync_until` / :func:`wait_until`: bounded waiting.
* :func:`share_encrypted_room`, :func:`know_each_other`: make two clients track each other.
* :func:`send_olm`: an Olm-encrypted to-device event of any type (or a hand-made payload, to
  test validation); :func:`send_plaintext`: a plaintext one.

Every wait is bounded; every failed request raises :class:`NioRequestFailed`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    KeysClaimResponse,
    KeysQueryResponse,
    KeysUploadResponse,
    RoomCreateResponse,
    SyncResponse,
    ToDeviceMessage,
    ToDeviceResponse,
)

from tests.synapse import LocalSynapse, RegisteredUser

__all__ = [
    "OLM_ALGORITHM",
    "NioRequestFailed",
    "close_clients",
    "know_each_other",
    "make_client",
    "olm_payload",
    "send_olm",
    "send_plaintext",
    "share_encrypted_room",
    "stored_trust",
    "sync_until",
    "syncing",
    "wait_until",
]

OLM_ALGORITHM = "m.olm.v1.curve25519-aes-sha2"


class NioRequestFailed(AssertionError):
    """A nio request returned an error response instead of the expected one."""


def _expect(response: Any, expected: type) -> Any:
    if not isinstance(response, expected):
        raise NioRequestFailed(f"expected {expected.__name__}, got {response!r}")
    return response


async def make_client(
    synapse: LocalSynapse, tmp_path: Path, user: RegisteredUser | None = None
) -> AsyncClient:
    """A logged-in nio client with encryption: keys uploaded, first sync done.

    ``user`` defaults to a newly registered one. The crypto store lives under ``tmp_path`` in a
    directory of its own, so several clients can share one ``tmp_path``. Close it with
    :func:`close_clients` (or ``await client.close()``).
    """
    user = user or synapse.register()
    store = tmp_path / "nio-stores" / f"{user.user_id.lstrip('@')}-{user.device_id}"
    store.mkdir(parents=True, exist_ok=True)
    config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
    client = AsyncClient(
        synapse.url, user.user_id, device_id=user.device_id, store_path=str(store), config=config
    )
    try:
        client.restore_login(user.user_id, user.device_id, user.access_token)
        client.load_store()  # restore_login loads it already; a no-op then
        if client.olm is None:
            raise AssertionError("nio has no Olm machine: is matrix-nio[e2e] installed?")
        if client.should_upload_keys:
            _expect(await client.keys_upload(), KeysUploadResponse)
        _expect(await client.sync(timeout=0, full_state=True), SyncResponse)
    except BaseException:
        await client.close()
        raise
    return client


def stored_trust(
    url: str,
    user_id: str,
    device_id: str,
    access_token: str,
    store_path: str | Path,
    *,
    devices: list[tuple[str, str]],
    pickle_key: str = "DEFAULT_KEY",
) -> list[bool]:
    """Whether each of ``devices`` is verified in the nio crypto store at ``store_path``
    (pickled with ``pickle_key``: the standalone bot uses its install's own).

    A fresh client reads the store from disk (``restore_login`` loads it; no request is made),
    as the bot does after a restart.
    """
    client = AsyncClient(
        url,
        user_id,
        device_id=device_id,
        store_path=str(store_path),
        config=AsyncClientConfig(
            encryption_enabled=True, store_sync_tokens=True, pickle_key=pickle_key
        ),
    )
    client.restore_login(user_id, device_id, access_token)
    return [bool(client.device_store[u][d].verified) for u, d in devices]


async def close_clients(*clients: AsyncClient) -> None:
    """Close the HTTP sessions of ``clients`` (errors ignored)."""
    for client in clients:
        with contextlib.suppress(Exception):
            await client.close()


@contextlib.asynccontextmanager
async def syncing(
    client: AsyncClient, *, poll_ms: int = 300, stop_timeout: float = 10.0
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``client.sync_forever`` in a task while the block runs; yields the task.

    ``poll_ms`` is the long-poll timeout, so the loop turns at least that often. On exit the
    task is cancelled and awaited (at most ``stop_timeout`` seconds); if it had died, its
    exception is raised here.
    """
    task: asyncio.Task[None] = asyncio.create_task(
        client.sync_forever(timeout=poll_ms), name=f"sync_forever {client.user_id}"
    )
    try:
        yield task
    finally:
        died = task.done() and not task.cancelled() and task.exception() is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), stop_timeout)
        if died:
            raise AssertionError(f"{task.get_name()} died") from task.exception()


async def wait_until(
    predicate: Callable[[], bool], *, within: float = 20.0, interval: float = 0.05, what: str = ""
) -> None:
    """Poll ``predicate`` until it is true; ``TimeoutError`` after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() >= deadline:
            raise TimeoutError(f"not true after {within}s: {what or predicate!r}")
        await asyncio.sleep(interval)


async def sync_until(
    client: AsyncClient,
    predicate: Callable[[], bool],
    *,
    within: float = 20.0,
    poll_ms: int = 200,
    what: str = "",
) -> None:
    """Sync ``client`` by hand (``client.sync``) until ``predicate`` holds, at most ``within`` s.

    Hand-made syncs neither send queued to-device messages nor upload/claim keys: use
    :func:`syncing` for a client that must behave like a running bot.
    """
    deadline = asyncio.get_running_loop().time() + within
    while True:
        _expect(await client.sync(timeout=poll_ms), SyncResponse)
        if predicate():
            return
        if asyncio.get_running_loop().time() >= deadline:
            raise TimeoutError(f"not true after {within}s of syncing: {what or predicate!r}")


async def share_encrypted_room(a: AsyncClient, b: AsyncClient, *, within: float = 20.0) -> str:
    """``a`` creates an encrypted room and invites ``b``, who joins; returns the room id.

    Both clients have synced the room (as encrypted, with both members) when this returns.
    """
    encryption = {
        "type": "m.room.encryption",
        "state_key": "",
        "content": {"algorithm": "m.megolm.v1.aes-sha2"},
    }
    created = _expect(
        await a.room_create(invite=[b.user_id], initial_state=[encryption]), RoomCreateResponse
    )
    room_id: str = created.room_id
    _expect(await b.join(room_id), JoinResponse)
    for client, other in ((a, b), (b, a)):

        def ready(client: AsyncClient = client, other: AsyncClient = other) -> bool:
            room = client.rooms.get(room_id)
            return bool(room and room.encrypted and other.user_id in room.users)

        await sync_until(client, ready, within=within, what=f"{client.user_id} sees {room_id}")
    return room_id


async def know_each_other(*clients: AsyncClient) -> None:
    """Every client downloads the device keys of every other one (``/keys/query``)."""
    for client in clients:
        others = {c.user_id for c in clients if c is not client}
        client.users_for_key_query.update(others)
        _expect(await client.keys_query(), KeysQueryResponse)
        for other in clients:
            if other is not client and other.device_id not in client.device_store[other.user_id]:
                raise NioRequestFailed(f"{client.user_id} did not get {other.device_id}'s keys")


async def _olm_session(client: AsyncClient, device: Any) -> Any:
    """An outbound Olm session to ``device``, claiming a one-time key when there is none."""
    session = client.olm.session_store.get(device.curve25519)
    if session is None:
        _expect(await client.keys_claim({device.user_id: [device.device_id]}), KeysClaimResponse)
        session = client.olm.session_store.get(device.curve25519)
        if session is None:
            raise NioRequestFailed(f"no Olm session with {device.user_id} {device.device_id}")
    return session


def olm_payload(
    sender: AsyncClient, device: Any, event_type: str, content: Mapping[str, Any]
) -> dict[str, Any]:
    """The plaintext of an Olm message from ``sender`` to ``device``, as the spec describes it."""
    return {
        "type": event_type,
        "content": dict(content),
        "sender": sender.user_id,
        "sender_device": sender.device_id,
        "keys": {"ed25519": sender.olm.account.identity_keys["ed25519"]},
        "recipient": device.user_id,
        "recipient_keys": {"ed25519": device.ed25519},
    }


async def send_olm(
    sender: AsyncClient,
    user_id: str,
    device_id: str,
    event_type: str,
    content: Mapping[str, Any],
    *,
    payload: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> None:
    """Send an Olm-encrypted to-device event of any type from ``sender`` to one device.

    ``sender`` must know the device (:func:`know_each_other`); an Olm session is established
    with ``/keys/claim`` when there is none. Without ``payload`` nio builds and encrypts the
    payload itself (``Olm._olm_encrypt``). With ``payload``, the spec payload from
    :func:`olm_payload` is passed through it first, so a test can forge fields.
    """
    olm = sender.olm
    device = olm.device_store[user_id].get(device_id)
    if device is None:
        raise NioRequestFailed(f"{sender.user_id} does not know {user_id} {device_id}")
    session = await _olm_session(sender, device)
    if payload is None:
        envelope = olm._olm_encrypt(session, device, event_type, dict(content))
    else:
        plaintext = json.dumps(payload(olm_payload(sender, device, event_type, content)))
        message_type, ciphertext = session.encrypt(plaintext).to_parts()
        olm.store.save_session(device.curve25519, session)
        envelope = {
            "algorithm": OLM_ALGORITHM,
            "sender_key": olm.account.identity_keys["curve25519"],
            "ciphertext": {
                device.curve25519: {
                    "type": message_type,
                    "body": base64.b64encode(ciphertext).decode().rstrip("="),
                }
            },
        }
    message = ToDeviceMessage("m.room.encrypted", user_id, device_id, envelope)
    _expect(await sender.to_device(message), ToDeviceResponse)


async def send_plaintext(
    sender: AsyncClient, user_id: str, device_id: str, event_type: str, content: Mapping[str, Any]
) -> None:
    """Send a plaintext to-device event from ``sender`` to one device."""
    message = ToDeviceMessage(event_type, user_id, device_id, dict(content))
    _expect(await sender.to_device(message), ToDeviceResponse)
