"""Peer device keys: where they come from, and holding a verification until they arrive.

* :class:`KeySource`: what the manager needs of the key store and trust store;
  :class:`NioKeySource` is the nio implementation (device keys from nio's device store, the
  master cross-signing key from a raw ``/keys/query``, ``verify_device`` for the trust store).
* :class:`PeerKeys`: a request or start from a device whose keys are unknown is *held* while
  the user's keys are queried (one query per user at a time, bounded by a timeout); and the keys a
  peer's MAC is checked against (its device key, plus its master key when the MAC names more).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from .._client_http import homeserver_json
from .._single_flight import SingleFlight
from .._types import DeviceId, UserId

__all__ = ["KeySource", "NioDeviceTrust", "NioKeySource", "PeerKeys"]

log = logging.getLogger("bot_toolkit.verification.peer_keys")


class KeySource(Protocol):
    """Device keys and the trust store: nio in production (:class:`NioKeySource`)."""

    def own(self) -> tuple[UserId, DeviceId, str]:
        """Our user id, device id and device ed25519 key."""
        ...

    def device_ed25519(self, user_id: str, device_id: str) -> str | None:
        """A peer device's ed25519 key when its keys are downloaded, else ``None``."""
        ...

    def device_for_curve(self, user_id: str, curve25519: str) -> DeviceId | None:
        """The known device of ``user_id`` with this curve25519 identity key."""
        ...

    async def query(self, user_id: str) -> None:
        """Download ``user_id``'s device keys (and start tracking the user)."""
        ...

    async def master_key(self, user_id: str) -> str | None:
        """The user's master cross-signing public key (unpadded base64), if any."""
        ...

    async def mark_verified(self, user_id: str, device_id: str) -> bool:
        """Persist that the device is verified; False when the device is unknown."""
        ...


class NioKeySource:
    """:class:`KeySource` over a ``nio.AsyncClient`` with encryption.

    Keys of users we share no room with are fetched through the client's
    :class:`~bot_toolkit.key_queries.KeyQueries` (nio's ``keys_query()``; nio then tracks the
    user). Only allowed users get that far.
    The master cross-signing key is read from a raw ``/keys/query`` (nio 0.26 ignores
    ``master_keys``) with the client's access token.
    """

    def __init__(self, client: Any) -> None:
        self._client = client

    def own(self) -> tuple[UserId, DeviceId, str]:
        from ..nio_plugin import our_identity  # noqa: PLC0415 - nio is only needed here

        ident = our_identity(self._client)
        return ident.user_id, ident.device_id, ident.ed25519

    def device_ed25519(self, user_id: str, device_id: str) -> str | None:
        from ..nio_plugin import device_keys  # noqa: PLC0415

        keys = device_keys(self._client, user_id, device_id)
        return None if keys is None else keys.ed25519

    def device_for_curve(self, user_id: str, curve25519: str) -> DeviceId | None:
        olm = self._client.olm
        if olm is None or user_id not in olm.device_store.users:
            return None
        for device in olm.device_store[user_id].values():
            if device.curve25519 == curve25519 and not device.deleted:
                return DeviceId(device.device_id)
        return None

    async def query(self, user_id: str) -> None:
        # Through the client's shared KeyQueries: a global cap on concurrent queries, a
        # timeout, and at most one query per user a minute (requests naming unknown devices
        # must not each cost a /keys/query).
        from ..key_queries import KeyQueries  # noqa: PLC0415

        if self._client.olm is not None:
            await KeyQueries.of(self._client).query(user_id)

    async def master_key(self, user_id: str) -> str | None:
        import aiohttp  # noqa: PLC0415

        try:
            status, body = await homeserver_json(
                self._client,
                "POST",
                "/_matrix/client/v3/keys/query",
                {"device_keys": {user_id: []}},
                request_timeout=15,
            )
        except (aiohttp.ClientError, TimeoutError):
            log.warning("could not fetch the master key of %s", user_id)
            return None
        if status != 200:
            return None
        master = body.get("master_keys", {}).get(user_id) if isinstance(body, dict) else None
        keys = master.get("keys") if isinstance(master, dict) else None
        if not isinstance(keys, dict) or len(keys) != 1:
            return None
        key_id, key = next(iter(keys.items()))
        if not (isinstance(key, str) and key_id == f"ed25519:{key}"):
            return None
        return key

    async def mark_verified(self, user_id: str, device_id: str) -> bool:
        olm = self._client.olm
        if olm is None or user_id not in olm.device_store.users:
            return False
        device = olm.device_store[user_id].get(device_id)
        if device is None:
            return False
        self._client.verify_device(device)
        return True


class NioDeviceTrust:
    """:class:`~bot_toolkit.verification.user_trust.DeviceTrustStore` over nio's device store
    (``verify_device`` / ``unverify_device``; the keys query through :class:`PeerKeys`)."""

    def __init__(self, client: Any, peer_keys: PeerKeys) -> None:
        self._client = client
        self._peer_keys = peer_keys

    async def refresh(self, user_id: str) -> None:
        await self._peer_keys.source.query(user_id)

    def _device(self, user_id: str, device_id: str) -> Any:
        olm = self._client.olm
        if olm is None or user_id not in olm.device_store.users:
            return None
        return olm.device_store[user_id].get(device_id)

    def mark(self, user_id: str, device_id: str) -> bool:
        device = self._device(user_id, device_id)
        if device is None or device.deleted:
            return False
        self._client.verify_device(device)
        return True

    def unmark(self, user_id: str, device_id: str) -> None:
        device = self._device(user_id, device_id)
        if device is not None:
            self._client.unverify_device(device)


class PeerKeys:
    """Key look-ups for the manager: held requests and the keys a MAC must cover."""

    def __init__(self, source: KeySource, *, query_timeout: float) -> None:
        self.source = source
        self.query_timeout = query_timeout
        self._queries: SingleFlight[str, None] = SingleFlight()

    async def ensure(self, user_id: str, device_id: str) -> str | None:
        """The device's ed25519 key, querying the user's keys (bounded) when unknown."""
        ed = self.source.device_ed25519(user_id, device_id)
        if ed is not None:
            return ed
        log.info("holding verification from %s %s while its keys are queried", user_id, device_id)
        shared = self._queries.share(user_id, lambda: self.source.query(user_id))
        try:
            await asyncio.wait_for(shared, self.query_timeout)
        except TimeoutError:
            log.warning("keys of %s did not arrive within %.0fs", user_id, self.query_timeout)
        except Exception:
            log.exception("keys query for %s failed", user_id)
        return self.source.device_ed25519(user_id, device_id)

    async def mac_keys(
        self, txn: str, user_id: str, device_id: str, ed25519: str, mac_key_ids: Iterable[str]
    ) -> dict[str, str]:
        """The keys (id -> public key) to check a peer's MAC against.

        Always the device key; the user's master cross-signing key as ``ed25519:<key>`` too when
        the MAC names any other key and the master key is known. A key id the MAC names that is
        not in the result is skipped by :meth:`~bot_toolkit.verification.sas.SasSession.verify_mac`
        (it is still covered by the MAC of the key id list).
        """
        device_key_id = f"ed25519:{device_id}"
        keys = {device_key_id: ed25519}
        if any(k != device_key_id for k in mac_key_ids):
            master = await self.source.master_key(user_id)
            if master is not None:
                keys[f"ed25519:{master}"] = master
            else:
                log.info("verification %s: MAC lists keys we cannot check (no master key)", txn)
        return keys
