"""One request to a logged-in client's homeserver, outside nio (for what nio does not offer or
does differently: a key query handed to nio ourselves, the master key alone, a plaintext event
in an encrypted room).

The request carries the client's access token (never logged) and runs in an aiohttp session of
its own, so it does not depend on nio's session being open. aiohttp is imported when the first
request is made: the modules that use this stay light to import.
"""

from __future__ import annotations

from typing import Any

__all__ = ["homeserver_json"]


async def homeserver_json(
    client: Any, method: str, path: str, body: Any, *, request_timeout: float | None = None
) -> tuple[int, Any]:
    """``method`` ``path`` (``/_matrix/...``) with the JSON ``body`` to ``client``'s homeserver.

    Returns the HTTP status and the answer's JSON (``None`` when the answer is not JSON).
    ``request_timeout``: seconds for the whole request (aiohttp's default when ``None``).

    Raises:
        aiohttp.ClientError, TimeoutError: the request failed on the way.
    """
    import aiohttp  # noqa: PLC0415 - see the module docs

    url = client.homeserver.rstrip("/") + path
    headers = {"Authorization": f"Bearer {client.access_token}"}
    options: dict[str, Any] = {"json": body, "headers": headers}
    if request_timeout is not None:
        options["timeout"] = aiohttp.ClientTimeout(total=request_timeout)
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, **options) as resp,
    ):
        try:
            answer = await resp.json(content_type=None)
        except ValueError:
            answer = None
        return resp.status, answer
