"""Our own identity and peers' device keys, read from a ``nio.AsyncClient``'s Olm machine.

Re-exported by :mod:`bot_toolkit.nio_plugin` (the public home of these names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nio import AsyncClient

from bot_toolkit._types import DeviceId, UserId

__all__ = [
    "DeviceKeys",
    "EncryptionNotReady",
    "OwnIdentity",
    "device_by_curve25519",
    "device_keys",
    "device_verified",
    "our_identity",
    "sign_with_device",
]


class EncryptionNotReady(RuntimeError):
    """The client has no Olm machine yet (encryption disabled, or before login/``load_store``)."""


@dataclass(frozen=True, slots=True)
class OwnIdentity:
    """Our own device: ids and public identity keys (unpadded base64)."""

    user_id: UserId
    device_id: DeviceId
    ed25519: str
    curve25519: str


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    """A peer device's public identity keys as nio's device store knows them."""

    user_id: UserId
    device_id: DeviceId
    ed25519: str
    curve25519: str


def _olm(client: Any) -> Any:
    olm = getattr(client, "olm", None)
    if olm is None:
        raise EncryptionNotReady(
            "the nio client has no Olm machine: enable encryption and log in (or call "
            "restore_login/load_store) first"
        )
    return olm


def our_identity(client: AsyncClient) -> OwnIdentity:
    """User id, device id and identity keys of the client's own device.

    Raises:
        EncryptionNotReady: the client has no Olm machine yet.
    """
    keys = _olm(client).account.identity_keys
    return OwnIdentity(
        UserId(client.user_id), DeviceId(client.device_id), keys["ed25519"], keys["curve25519"]
    )


def _known_device(olm: Any, user_id: str, device_id: str) -> Any:
    store = olm.device_store
    if user_id not in store.users:  # store[user] would insert an empty entry
        return None
    device = store[user_id].get(device_id)
    return None if device is None or device.deleted else device


def device_keys(client: AsyncClient, user_id: str, device_id: str) -> DeviceKeys | None:
    """The identity keys of a peer device from nio's device store; ``None`` when unknown.

    Deleted devices count as unknown. The store is filled by key queries (nio runs one for
    users it shares an encrypted room with; add a user to ``client.users_for_key_query`` and
    call ``client.keys_query()`` for others).

    Raises:
        EncryptionNotReady: the client has no Olm machine yet.
    """
    device = _known_device(_olm(client), user_id, device_id)
    if device is None:
        return None
    ed25519, curve25519 = device.keys.get("ed25519"), device.keys.get("curve25519")
    if not (isinstance(ed25519, str) and isinstance(curve25519, str)):
        return None
    return DeviceKeys(UserId(user_id), DeviceId(device_id), ed25519, curve25519)


def sign_with_device(client: AsyncClient, message: bytes) -> str:
    """Sign ``message`` (canonical JSON) with our device's Ed25519 key; unpadded base64.

    Used to sign our own master cross-signing key with the device key.

    Raises:
        EncryptionNotReady: the client has no Olm machine yet.
    """
    return str(_olm(client).account.sign(message.decode("utf-8")))


def device_verified(client: AsyncClient, user_id: str, device_id: str) -> bool:
    """Whether nio's store marks the device verified (by a SAS with this device).

    Raises:
        EncryptionNotReady: the client has no Olm machine yet.
    """
    olm = _olm(client)
    device = _known_device(olm, user_id, device_id)
    return device is not None and bool(olm.is_device_verified(device))


def device_by_curve25519(
    client: AsyncClient, user_id: str, curve25519: str
) -> tuple[str, str] | None:
    """(device id, ed25519 key) of ``user_id``'s device with this curve25519 key, from nio's
    device store; ``None`` when unknown (or deleted).

    Raises:
        EncryptionNotReady: the client has no Olm machine yet.
    """
    olm = _olm(client)
    store = olm.device_store
    if user_id not in store.users:
        return None
    for device in store.active_user_devices(user_id):
        if device.curve25519 == curve25519 and isinstance(device.ed25519, str):
            return str(device.device_id), device.ed25519
    return None
