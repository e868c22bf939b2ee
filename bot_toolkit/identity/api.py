"""The homeserver endpoints the identity work uses, as typed calls over one request function.

The request function (``Requester``) does one HTTP request with the bot's access token and
returns ``(status, json body)``; network errors raise. Here every answer becomes data or a typed
error: :class:`TransientError` (5xx, 429, network: try again later), :class:`AuthRequired` (a
401 with user-interactive-auth flows), :class:`HomeserverError` (anything else).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

__all__ = [
    "AuthRequired",
    "HomeserverError",
    "IdentityApi",
    "Requester",
    "TransientError",
]

Requester = Callable[[str, str, Any], Awaitable[tuple[int, Any]]]
"""``(method, path, json body or None) -> (status, parsed JSON body)``."""

_CS = "/_matrix/client/v3"


class HomeserverError(RuntimeError):
    """The homeserver refused a request; ``str()`` is one line (status and errcode)."""

    def __init__(self, what: str, status: int, body: Any) -> None:
        self.status = status
        self.errcode = body.get("errcode") if isinstance(body, Mapping) else None
        error = body.get("error") if isinstance(body, Mapping) else None
        detail = f" {str(error)[:200]}" if isinstance(error, str) else ""
        super().__init__(f"{what}: HTTP {status} {self.errcode or ''}{detail}".rstrip())


class TransientError(HomeserverError):
    """5xx, 429 or a network error: the same request may succeed later."""


class AuthRequired(HomeserverError):
    """HTTP 401 with user-interactive auth flows (``session``, ``flows``)."""

    def __init__(self, what: str, body: Mapping[str, Any]) -> None:
        super().__init__(what, 401, body)
        session = body.get("session")
        self.session: str | None = session if isinstance(session, str) else None
        flows = body.get("flows")
        self.stages: set[str] = set()
        if isinstance(flows, list):
            for flow in flows:
                stages = flow.get("stages") if isinstance(flow, Mapping) else None
                if isinstance(stages, list):
                    self.stages.update(s for s in stages if isinstance(s, str))


class IdentityApi:
    """Cross-signing, signature upload, key query and account data calls for one user."""

    def __init__(self, request: Requester, user_id: str) -> None:
        self._request = request
        self.user_id = user_id

    async def _call(self, what: str, method: str, path: str, body: Any = None) -> Any:
        try:
            status, data = await self._request(method, path, body)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise TransientError(what, 0, {"error": type(e).__name__}) from None
        if 200 <= status < 300:
            return data if isinstance(data, Mapping) else {}
        if status == 429 or status >= 500 or status == 0:
            raise TransientError(what, status, data)
        if status == 401 and isinstance(data, Mapping) and "flows" in data:
            raise AuthRequired(what, data)
        raise HomeserverError(what, status, data)

    async def query_keys(self, user_ids: list[str]) -> Mapping[str, Any]:
        """``POST /keys/query`` for all devices of ``user_ids``."""
        body: dict[str, Any] = {"device_keys": {u: [] for u in user_ids}}
        result: Mapping[str, Any] = await self._call(
            "keys/query", "POST", f"{_CS}/keys/query", body
        )
        return result

    async def upload_cross_signing_keys(
        self, body: Mapping[str, Any], auth: Mapping[str, Any] | None = None
    ) -> None:
        """``POST /keys/device_signing/upload`` (raises :class:`AuthRequired` for UIA)."""
        payload = dict(body)
        if auth is not None:
            payload["auth"] = dict(auth)
        await self._call(
            "keys/device_signing/upload", "POST", f"{_CS}/keys/device_signing/upload", payload
        )

    async def upload_signatures(self, signed: Mapping[str, Mapping[str, Any]]) -> None:
        """``POST /keys/signatures/upload``; a per-key failure raises :class:`HomeserverError`."""
        data = await self._call(
            "keys/signatures/upload", "POST", f"{_CS}/keys/signatures/upload", signed
        )
        failures = data.get("failures")
        if isinstance(failures, Mapping) and failures:
            raise HomeserverError("keys/signatures/upload", 200, {"errcode": str(failures)[:200]})

    def _account_data_path(self, event_type: str) -> str:
        return (
            f"{_CS}/user/{quote(self.user_id, safe='')}/account_data/{quote(event_type, safe='')}"
        )

    async def get_account_data(self, event_type: str) -> Mapping[str, Any] | None:
        """The user's account data of ``event_type``; ``None`` when there is none."""
        try:
            result: Mapping[str, Any] = await self._call(
                f"account_data {event_type[:80]}", "GET", self._account_data_path(event_type)
            )
        except HomeserverError as e:
            if e.status == 404 and not isinstance(e, TransientError):
                return None
            raise
        return result

    async def put_account_data(self, event_type: str, content: Mapping[str, Any]) -> None:
        """Set the user's account data of ``event_type``."""
        await self._call(
            f"account_data {event_type[:80]}",
            "PUT",
            self._account_data_path(event_type),
            dict(content),
        )
