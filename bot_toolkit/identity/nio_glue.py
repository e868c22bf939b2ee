"""The identity for a ``nio.AsyncClient``: our device as a :class:`DeviceSigner`, and the
standalone :func:`ensure_identity` call (one call on the bot's stack)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot_toolkit._nio_identity import our_identity, sign_with_device
from bot_toolkit.identity.api import IdentityApi, Requester
from bot_toolkit.identity.service import EnsureResult, Identity
from bot_toolkit.identity.store import IdentityStore

if TYPE_CHECKING:
    from nio import AsyncClient

__all__ = ["NioDevice", "ensure_identity", "identity_for", "nio_requester"]


class NioDevice:
    """The nio client's own device as a :class:`~bot_toolkit.identity.service.DeviceSigner`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    @property
    def device_id(self) -> str:
        return str(self._client.device_id)

    @property
    def ed25519(self) -> str:
        return our_identity(self._client).ed25519

    def sign(self, message: bytes) -> str:
        return sign_with_device(self._client, message)


def nio_requester(client: AsyncClient) -> Requester:
    """A :data:`~bot_toolkit.identity.api.Requester` over ``AsyncClient.send`` (nio's HTTP
    session and homeserver; the access token is sent, never logged)."""

    async def request(method: str, path: str, body: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {client.access_token}"}
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        resp = await client.send(method, path, data, headers)
        try:
            text = await resp.text()
        finally:
            resp.release()
        try:
            parsed = json.loads(text) if text else {}
        except ValueError:
            parsed = {}
        return resp.status, parsed

    return request


def identity_for(client: AsyncClient, data_dir: Path | str) -> Identity:
    """An :class:`Identity` for a logged-in nio client, its keys kept in ``data_dir``."""
    return Identity(
        IdentityApi(nio_requester(client), client.user_id),
        IdentityStore(data_dir),
        NioDevice(client),
    )


async def ensure_identity(
    client: AsyncClient,
    data_dir: Path | str,
    *,
    recovery_key: str | None = None,
    passphrase: str | None = None,
    password: str | None = None,
    bootstrap: bool = True,
) -> tuple[Identity, EnsureResult]:
    """Make the client's device cross-signed if that can be done safely (one call).

    Uploads the device keys first when nio has not yet. ``recovery_key`` is the text the
    operator saved (Element's or ours). See :meth:`Identity.ensure` for what happens and what
    it raises; the :class:`EnsureResult` carries a new recovery key to show the operator once.
    """
    if client.should_upload_keys:
        await client.keys_upload()
    identity = identity_for(client, data_dir)
    result = await identity.ensure(
        recovery_key=recovery_key or None,
        passphrase=passphrase,
        password=password,
        bootstrap=bootstrap,
    )
    return identity, result
