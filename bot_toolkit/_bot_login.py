"""Logging the standalone bot in and keeping its session file (``<data_dir>/session.json``).

:meth:`BotLogin.login` gives a logged-in nio client with its crypto store loaded, in this order:

1. ``matrix.access_token``: checked with ``/account/whoami`` (user and device id);
2. the token saved in the session file, when ``/whoami`` still accepts it for the same device;
3. ``matrix.password``, asking for ``matrix.device_id`` or the saved device id (so a restart
   keeps the device, its keys and its trust).

An unreachable homeserver is retried with the bot's :class:`~bot_toolkit._bot_homeserver.Backoff`;
a refusal raises :class:`~bot_toolkit._bot_homeserver.BotError` with a one-line message. Every
token and password is added to the log redactor before it is used.

Part of the standalone bot (:mod:`bot_toolkit.bot`); library code never imports it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Final

from nio import AsyncClient, LoginResponse

from bot_toolkit._bot_homeserver import (
    HTTP_TIMEOUT,
    Backoff,
    BotError,
    Homeserver,
    Transient,
    describe,
)
from bot_toolkit.config import MatrixConfig
from bot_toolkit.http_api import BotState
from bot_toolkit.install_secret import STORE_KEY_FILE, STORE_PASSPHRASE_ENV, store_secret
from bot_toolkit.logging_setup import active_redactor
from bot_toolkit.nio_client import WrongStoreSecret, client_config, restore_client
from bot_toolkit.session import Session

__all__ = ["NIO_DIR", "SESSION_FILE", "BotLogin", "is_fatal_login_error"]

# The bot's log lines keep one logger name, whichever of its modules writes them.
log = logging.getLogger("bot_toolkit.bot")

SESSION_FILE: Final = "session.json"
NIO_DIR: Final = "nio"

_CLIENT_OPTIONS: Final = {
    "max_timeouts": 0,  # a connection error reaches our own retry loop at once
    "request_timeout": HTTP_TIMEOUT,
}
_FATAL_ERRCODES: Final = frozenset(
    {"M_FORBIDDEN", "M_USER_DEACTIVATED", "M_INVALID_USERNAME", "M_UNKNOWN_TOKEN"}
)


def is_fatal_login_error(errcode: object, status: object) -> bool:
    """Whether a failed ``/login`` is a refusal (do not retry) rather than "not now".

    Fatal: an errcode that says the credentials or the account are wrong, or any other 4xx but
    429 (rate limited). Everything else (5xx, 429, no answer) is retried.
    """
    return errcode in _FATAL_ERRCODES or (
        isinstance(status, int) and 400 <= status < 500 and status != 429
    )


class BotLogin:
    """Logs the bot in as ``matrix`` says and keeps ``<data_dir>/session.json`` up to date."""

    def __init__(
        self,
        matrix: MatrixConfig,
        data_dir: Path,
        homeserver: Homeserver,
        backoff: Backoff,
        state: BotState,
    ) -> None:
        self.matrix = matrix
        self.data_dir = data_dir
        self.homeserver = homeserver
        self.backoff = backoff
        self.state = state

    async def login(self) -> AsyncClient:
        """A logged-in client with its store loaded; :attr:`state` says ``logged_in``.

        Raises :class:`BotError` when the homeserver refuses the credentials or the store
        cannot be opened; retries while the homeserver is unreachable.
        """
        m = self.matrix
        session_path = self.data_dir / SESSION_FILE
        saved = Session.load(session_path)
        if saved is not None and saved.user_id != m.user_id:
            log.warning("session file is for %s, not %s: ignoring it", saved.user_id, m.user_id)
            saved = None
        if saved is not None and m.device_id is not None and saved.device_id != m.device_id:
            log.warning(
                "session file has device %s but matrix.device_id is %s: using %s",
                saved.device_id,
                m.device_id,
                m.device_id,
            )
            saved = Session(m.user_id, m.device_id)

        if m.access_token:
            token = m.access_token.reveal()
            active_redactor().add(token)
            who = await self.backoff.retrying("whoami", lambda: self._whoami(token))
            if who is None:
                raise BotError("matrix.access_token: the homeserver refused it (M_UNKNOWN_TOKEN)")
            user_id, device_id = who
            if user_id != m.user_id:
                raise BotError(
                    f"matrix.access_token: it belongs to {user_id}, not matrix.user_id {m.user_id}"
                )
            device_id = device_id or m.device_id or (saved.device_id if saved else None)
            if device_id is None:
                raise BotError(
                    "matrix.device_id: the homeserver did not say which device the access token "
                    "belongs to; set matrix.device_id"
                )
            client = self._restore(user_id, device_id, token)
            return await self._saved(client, Session(user_id, device_id, None, m.homeserver))

        if saved is not None and saved.access_token:
            token = saved.access_token
            active_redactor().add(token)
            who = await self.backoff.retrying("whoami", lambda: self._whoami(token))
            if who is not None and who[0] == m.user_id and who[1] in (None, saved.device_id):
                client = self._restore(m.user_id, saved.device_id, token)
                log.info("restored session of %s, device %s", m.user_id, saved.device_id)
                return client
            log.info("saved access token no longer works; logging in again")

        if not m.password:
            raise BotError("matrix.password: needed to log in (no usable access token)")
        device_id = m.device_id or (saved.device_id if saved else None)
        return await self._password_login(device_id)

    async def _saved(self, client: AsyncClient, session: Session) -> AsyncClient:
        """``client``, once ``session`` is in the session file; closed when that write fails."""
        try:
            await asyncio.to_thread(session.save, self.data_dir / SESSION_FILE)
        except BaseException:
            await client.close()
            raise
        return client

    async def _whoami(self, token: str) -> tuple[str, str | None] | None:
        """(user id, device id) of a token; None when the homeserver refuses it."""
        status, body = await self.homeserver.request(
            "GET", "/_matrix/client/v3/account/whoami", token=token
        )
        if status in (401, 403):
            return None
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("user_id"), str):
            raise Transient(f"/account/whoami answered {status}")
        device = body.get("device_id")
        return body["user_id"], device if isinstance(device, str) else None

    def _store_secret(self) -> str:
        try:
            secret = store_secret(self.data_dir)
        except (OSError, ValueError) as e:
            raise BotError(f"storage.data_dir: cannot read the store key: {describe(e)}") from None
        active_redactor().add(secret)
        return secret

    def _new_client(self, device_id: str | None) -> AsyncClient:
        m = self.matrix
        return AsyncClient(
            m.homeserver,
            m.user_id,
            device_id=device_id,
            store_path=str(self.data_dir / NIO_DIR),
            config=client_config(self._store_secret(), **_CLIENT_OPTIONS),
        )

    def _restore(self, user_id: str, device_id: str, token: str) -> AsyncClient:
        try:  # moves a store still under nio's default pickle key, then loads it
            client = restore_client(
                self.matrix.homeserver,
                user_id,
                device_id,
                token,
                self.data_dir,
                store_dir=self.data_dir / NIO_DIR,
                pickle_key=self._store_secret(),
                **_CLIENT_OPTIONS,
            )
        except WrongStoreSecret as e:
            raise BotError(f"{STORE_PASSPHRASE_ENV} / {STORE_KEY_FILE}: {e}") from None
        return self._adopt(client)

    def _adopt(self, client: AsyncClient) -> AsyncClient:
        if client.olm is None:
            raise BotError("encryption is not available: is matrix-nio[e2e] installed?")
        self.state.logged_in = True
        log.info("logged in as %s, device %s", client.user_id, client.device_id)
        return client

    async def _password_login(self, device_id: str | None) -> AsyncClient:
        m = self.matrix
        assert m.password is not None
        password = m.password.reveal()
        active_redactor().add(password)

        async def attempt() -> AsyncClient:
            client = self._new_client(device_id)
            try:
                resp = await client.login(password, device_name=m.device_name)
            except BaseException:
                await client.close()
                raise
            if isinstance(resp, LoginResponse):
                return client
            await client.close()
            errcode = getattr(resp, "status_code", None)
            status = getattr(getattr(resp, "transport_response", None), "status", None)
            if is_fatal_login_error(errcode, status):
                raise BotError(
                    f"login as {m.user_id} refused: {errcode or status} "
                    f"{getattr(resp, 'message', '')}".strip()
                )
            raise Transient(f"login answered {errcode or status or 'an error'}")

        client = await self.backoff.retrying("login", attempt)
        token = client.access_token
        active_redactor().add(token)
        await self._saved(client, Session(m.user_id, client.device_id, token, m.homeserver))
        return self._adopt(client)
