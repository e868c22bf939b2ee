"""The standalone bot: ``bot-toolkit run -c config.toml``.

:func:`run_bot` builds a :class:`Bot` from a :class:`~bot_toolkit.config.BotConfig` and runs it
until SIGTERM or SIGINT. The bot:

* keeps everything in ``storage.data_dir``::

      <data_dir>/session.json          user id, device id, access token (mode 0600)
      <data_dir>/nio/                   nio's crypto store (Olm account, sessions, trust)
      <data_dir>/bot_toolkit.sqlite3    bot_toolkit's store (outbox, no_olm ledger, ...)

  so a restart reuses the device id, its keys and its token (the token is checked with
  ``/account/whoami``; when the homeserver refuses it the bot logs in again with the password,
  asking for the same device id);
* logs in with ``matrix.access_token`` (device id from ``/whoami``) or ``matrix.password``;
* builds its stack with :class:`~bot_toolkit.toolkit.BotToolkit` (dispatcher, nio plugin, store,
  outbox over the bot's HTTP session, key sharing with the ``[keys]`` policy, the
  :class:`~bot_toolkit.verification.VerificationManager` with the ``[verification]`` policy);
* serves ``/healthz``, ``/readyz``, ``/metrics`` and the admin API from the first second (before
  login), so ``/readyz`` can say why the bot is not ready;
* syncs in its own loop: an unreachable homeserver (at start or later) is retried with
  exponential backoff capped at ``matrix.retry_max_delay`` and reported in ``/readyz``;
* optionally posts the SAS (emoji with names, decimals) in a direct room with the peer user
  (``verification.post_sas_in_dm``), and joins rooms it is invited to by allowed users.

Stopping (SIGTERM, SIGINT or :meth:`Bot.stop`): stop syncing, drain the dispatcher, flush the
outbox for at most ``outbox.flush_deadline`` seconds (the rest stays stored for the next start),
close the stores; :func:`run_bot` then returns 0.

Plugins (``[plugins]``, :mod:`bot_toolkit.plugin_host`) are loaded when the :class:`Bot` is made,
register their handlers on the toolkit before it starts, start before the first sync and stop
after the dispatcher has drained; one that fails to load or start raises
:class:`~bot_toolkit.plugin_host.PluginError` (a config error: the CLI exits 2).

Fatal problems (the homeserver refuses the credentials, the data directory is unusable, the HTTP
port cannot be bound) raise :class:`BotError` with a one-line message; the CLI turns it into
exit code 1. Access tokens and passwords are never logged: the token learnt at login is added to
the log redactor at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import signal
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar
from urllib.parse import quote

import aiohttp
from nio import (
    AsyncClient,
    JoinResponse,
    KeysUploadResponse,
    LocalProtocolError,
    LoginResponse,
    SyncResponse,
)

from bot_toolkit._tasks import TaskSet
from bot_toolkit.config import BotConfig
from bot_toolkit.http_api import BotState, HttpServer, VerificationInfo, make_app
from bot_toolkit.identity import Identity, identity_for
from bot_toolkit.identity.startup import IdentityOptions, IdentityStartup
from bot_toolkit.install_secret import (
    STORE_KEY_FILE,
    STORE_PASSPHRASE_ENV,
    store_secret,
)
from bot_toolkit.logging_setup import active_redactor
from bot_toolkit.metrics import Metrics
from bot_toolkit.nio_client import WrongStoreSecret, client_config, restore_client
from bot_toolkit.plugin_host import Plugin, PluginHost, load_plugins
from bot_toolkit.sas_notice import sas_notice
from bot_toolkit.session import Session
from bot_toolkit.store import StoreError
from bot_toolkit.toolkit import BotToolkit, Settings
from bot_toolkit.verification import (
    SasPrompt,
    SasReady,
    VerificationManager,
    VerificationPolicy,
)
from bot_toolkit.withheld import ShareWith, SharingPolicy

__all__ = [
    "NIO_DIR",
    "SESSION_FILE",
    "STORE_FILE",
    "Bot",
    "BotError",
    "Session",
    "run_bot",
    "sas_notice",
]

log = logging.getLogger("bot_toolkit.bot")

SESSION_FILE: Final = "session.json"
NIO_DIR: Final = "nio"
STORE_FILE: Final = "bot_toolkit.sqlite3"

_FIRST_RETRY: Final = 1.0
_DRAIN_TIMEOUT: Final = 10.0
_HANDLER_TIMEOUT: Final = 60.0
_HTTP_TIMEOUT: Final = 30.0
_CLIENT_OPTIONS: Final = {
    "max_timeouts": 0,  # a connection error reaches our own retry loop at once
    "request_timeout": _HTTP_TIMEOUT,
}
_FATAL_ERRCODES: Final = frozenset(
    {"M_FORBIDDEN", "M_USER_DEACTIVATED", "M_INVALID_USERNAME", "M_UNKNOWN_TOKEN"}
)

T = TypeVar("T")


class BotError(RuntimeError):
    """A fatal problem the bot cannot retry its way out of; ``str()`` is one line."""

    one_line: ClassVar[bool] = True
    """The message says it all: the CLI logs and prints it without a traceback."""


class _Transient(Exception):
    """The homeserver cannot be used right now (retry with backoff)."""


# ----------------------------------------------------------------------------- helpers


class _ControllerProxy:
    """The admin API's controller before (empty) and after the manager exists."""

    def __init__(self) -> None:
        self.manager: VerificationManager | None = None

    def list_in_progress(self) -> Sequence[VerificationInfo]:
        return () if self.manager is None else self.manager.list_in_progress()

    async def confirm(self, verification_id: str) -> bool:
        if self.manager is None:
            raise KeyError(verification_id)
        return await self.manager.confirm(verification_id)

    async def cancel(self, verification_id: str) -> bool:
        if self.manager is None:
            raise KeyError(verification_id)
        return await self.manager.cancel(verification_id)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


# ----------------------------------------------------------------------------- the bot


class Bot:
    """One bot run: see the module docs. ``await run()`` until :meth:`stop`.

    ``confirm`` overrides the SAS confirmation callback (the demo uses it to print the SAS);
    ``None`` follows ``verification.confirm``. :attr:`ready` is set after the first successful
    sync; :attr:`client`, :attr:`manager`, ... exist from then on.
    """

    def __init__(
        self,
        config: BotConfig,
        *,
        confirm: Callable[[SasPrompt], Awaitable[bool]] | None = None,
        install_signal_handlers: bool = True,
        plugins: tuple[Plugin[Any], ...] | None = None,
    ) -> None:
        self.config = config
        # [plugins]: loaded (imported, configured, set up) now, so a broken plugin is a config
        # error (PluginError) before anything connects; None: load what the config names.
        self.plugins = PluginHost(
            load_plugins(config.plugins) if plugins is None else plugins, config.plugins
        )
        self.data_dir = Path(config.storage.data_dir)
        self.metrics = Metrics()
        self.state = BotState()
        self.ready = asyncio.Event()
        self._confirm_override = confirm
        self._signals = install_signal_handlers
        self._stopping = asyncio.Event()
        self._controller = _ControllerProxy()
        self.client: AsyncClient | None = None
        self.toolkit: BotToolkit | None = None
        self.http: HttpServer | None = None
        self.identity: IdentityStartup | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks = TaskSet(log, "bot")  # identity startup, user trust
        self._dm_rooms: dict[str, str] = {}
        self._attempt = 0
        m = self.metrics
        self._m_syncs = m.counter("syncs_total", "Successful /sync requests")
        self._m_sync_errors = m.counter(
            "sync_errors_total", "Failed homeserver requests of the sync loop", ["reason"]
        )
        self._m_dm = m.counter(
            "sas_dm_posts_total", "SAS posted in a direct room (result: sent, failed)", ["result"]
        )

    # ------------------------------------------------------------------ running

    @property
    def device_id(self) -> str | None:
        """The bot's device id once logged in."""
        return None if self.client is None else self.client.device_id

    def stop(self) -> None:
        """Ask :meth:`run` to stop (idempotent; safe from a signal handler)."""
        if not self._stopping.is_set():
            log.info("stopping")
        self._stopping.set()

    async def run(self) -> int:
        """Serve HTTP, log in, sync until :meth:`stop`; shut down cleanly. Returns 0.

        Raises :class:`BotError` for fatal problems (after cleaning up).
        """
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if self._signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass  # not the main thread, or no signals here
        main: asyncio.Task[None] | None = None
        try:
            self._prepare_data_dir()
            await self._start_http()
            main = asyncio.create_task(self._main(), name="bot_toolkit.bot.main")
            stopper = asyncio.create_task(self._stopping.wait(), name="bot_toolkit.bot.stop")
            try:
                await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
            if main.done():
                main.result()  # a fatal error; a clean return cannot happen
            else:
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await main
        finally:
            if main is not None and not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await main
            await self._shutdown()
            for sig in installed:
                loop.remove_signal_handler(sig)
        return 0

    def _on_signal(self, signum: int) -> None:
        log.info("received %s", signal.Signals(signum).name)
        self.stop()

    def _prepare_data_dir(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            (self.data_dir / NIO_DIR).mkdir(exist_ok=True, mode=0o700)
            probe = self.data_dir / f".write-test-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise BotError(
                f"storage.data_dir: cannot use {self.data_dir}: {e.strerror or e}"
            ) from None

    async def _start_http(self) -> None:
        cfg = self.config.http
        if not cfg.enabled:
            return
        app = make_app(
            self.state,
            self.metrics,
            controller=self._controller,
            admin_token=cfg.admin_token,
            allowed_hosts=cfg.answered_hosts(),
            sync_stale_after=cfg.sync_stale_after,
            outbox_stuck_after=self.config.outbox.stuck_after,
        )
        server = HttpServer(app, cfg.host, cfg.port)
        try:
            await server.start()
        except OSError as e:
            raise BotError(
                f"http: cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}"
            ) from None
        self.http = server

    async def _main(self) -> None:
        self._session = aiohttp.ClientSession()
        await self._login()
        await self._build()
        await self.plugins.start()
        await self._sync_loop()

    # ------------------------------------------------------------------ retries

    async def _backoff(self, what: str, exc: BaseException | str) -> None:
        """Record the failure for /readyz and sleep (exponential, capped, jittered)."""
        reason = exc if isinstance(exc, str) else _describe(exc)
        self.state.last_error = f"{what}: {reason}"
        self._attempt += 1
        cap = self.config.matrix.retry_max_delay
        delay = min(cap, _FIRST_RETRY * 2 ** min(self._attempt - 1, 30))
        delay = min(cap, delay * random.uniform(0.8, 1.2))
        log.warning("%s failed (%s); retrying in %.1fs", what, reason, delay)
        await asyncio.sleep(delay)

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` until it does not raise :class:`_Transient` (or a network error)."""
        while True:
            try:
                result = await attempt()
            except (_Transient, aiohttp.ClientError, OSError, TimeoutError) as e:
                self._m_sync_errors.inc(what)
                await self._backoff(what, e)
                continue
            self._attempt = 0
            return result

    async def _request(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> tuple[int, Any]:
        """One JSON request to the homeserver: (status, body). Network errors raise."""
        assert self._session is not None
        url = self.config.matrix.homeserver + path
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self._session.request(
            method,
            url,
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT),
            allow_redirects=False,
        ) as resp:
            text = await resp.text()
            try:
                data = json.loads(text) if text else {}
            except ValueError:
                data = {}
            return resp.status, data

    # ------------------------------------------------------------------ login

    def _new_client(self, device_id: str | None) -> AsyncClient:
        m = self.config.matrix
        return AsyncClient(
            m.homeserver,
            m.user_id,
            device_id=device_id,
            store_path=str(self.data_dir / NIO_DIR),
            config=client_config(self._store_secret(), **_CLIENT_OPTIONS),
        )

    async def _whoami(self, token: str) -> tuple[str, str | None] | None:
        """(user id, device id) of a token; None when the homeserver refuses it."""
        status, body = await self._request("GET", "/_matrix/client/v3/account/whoami", token=token)
        if status in (401, 403):
            return None
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("user_id"), str):
            raise _Transient(f"/account/whoami answered {status}")
        device = body.get("device_id")
        return body["user_id"], device if isinstance(device, str) else None

    async def _login(self) -> None:
        m = self.config.matrix
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
            who = await self._retrying("whoami", lambda: self._whoami(token))
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
            self._restore(user_id, device_id, token)
            Session(user_id, device_id, None, m.homeserver).save(session_path)
            return

        if saved is not None and saved.access_token:
            token = saved.access_token
            active_redactor().add(token)
            who = await self._retrying("whoami", lambda: self._whoami(token))
            if who is not None and who[0] == m.user_id and who[1] in (None, saved.device_id):
                self._restore(m.user_id, saved.device_id, token)
                log.info("restored session of %s, device %s", m.user_id, saved.device_id)
                return
            log.info("saved access token no longer works; logging in again")

        if not m.password:
            raise BotError("matrix.password: needed to log in (no usable access token)")
        device_id = m.device_id or (saved.device_id if saved else None)
        await self._password_login(device_id)

    def _store_secret(self) -> str:
        try:
            secret = store_secret(self.data_dir)
        except (OSError, ValueError) as e:
            raise BotError(f"storage.data_dir: cannot read the store key: {_describe(e)}") from None
        active_redactor().add(secret)
        return secret

    def _restore(self, user_id: str, device_id: str, token: str) -> None:
        m = self.config.matrix
        try:  # moves a store still under nio's default pickle key, then loads it
            client = restore_client(
                m.homeserver,
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
        self._adopt(client)

    def _adopt(self, client: AsyncClient) -> None:
        if client.olm is None:
            raise BotError("encryption is not available: is matrix-nio[e2e] installed?")
        self.client = client
        self.state.logged_in = True
        log.info("logged in as %s, device %s", client.user_id, client.device_id)

    async def _password_login(self, device_id: str | None) -> None:
        m = self.config.matrix
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
            if errcode in _FATAL_ERRCODES or (
                isinstance(status, int) and 400 <= status < 500 and status != 429
            ):
                raise BotError(
                    f"login as {m.user_id} refused: {errcode or status} "
                    f"{getattr(resp, 'message', '')}".strip()
                )
            raise _Transient(f"login answered {errcode or status or 'an error'}")

        client = await self._retrying("login", attempt)
        token = client.access_token
        active_redactor().add(token)
        Session(m.user_id, client.device_id, token, m.homeserver).save(self.data_dir / SESSION_FILE)
        self._adopt(client)

    # ------------------------------------------------------------------ wiring

    def _verification_policy(self) -> VerificationPolicy:
        v = self.config.verification
        confirm = self._confirm_override
        if confirm is None and v.confirm == "auto":
            # SAS protects against a man in the middle only if someone compares the strings.
            # "auto" compares nothing, and a DM with the SAS travels through the same
            # homeserver as the key exchange; say so once, loudly.
            log.warning(
                "verification.confirm = auto: the bot confirms every SAS of an allowed user "
                "without comparing it; this does not protect against a malicious homeserver or "
                "anyone who can add devices to those users. Use 'operator' where that matters."
            )

            async def auto(prompt: SasPrompt) -> bool:
                ok = v.allows(prompt.user_id)
                log.info(
                    "verification %s with %s %s: SAS confirmed automatically",
                    prompt.transaction_id,
                    prompt.user_id,
                    prompt.device_id,
                )
                return ok

            confirm = auto
        return VerificationPolicy(
            allowed_users=v.allows,
            confirm=confirm,
            auto_accept=True,
            max_error_replies=max(1, v.max_error_replies),
            timeout=v.timeout,
            own_devices=v.own_devices,
        )

    async def _build(self) -> None:
        client = self.client
        assert client is not None and self._session is not None
        cfg = self.config
        toolkit = BotToolkit(
            client,
            self.data_dir,
            verification=self._verification_policy() if cfg.verification.enabled else None,
            key_sharing=SharingPolicy(
                share_with=ShareWith(cfg.keys.share_with),
                send_withheld=cfg.keys.send_withheld,
                no_olm_notices=cfg.keys.no_olm_notices,
                notify_blacklisted=cfg.keys.notify_blacklisted,
                own_devices=frozenset(cfg.verification.own_devices),
            ),
            metrics=self.metrics,
            settings=Settings(
                drain_timeout=_DRAIN_TIMEOUT,
                outbox_batch_size=cfg.outbox.batch_size,
                outbox_concurrency=cfg.outbox.concurrency,
                outbox_backoff_max=cfg.outbox.backoff_max,
                outbox_max_pending=cfg.outbox.max_pending,
                flush_deadline=cfg.outbox.flush_deadline,
                # the plugins' own limit must be the one that applies to their handlers
                handler_timeout=max(_HANDLER_TIMEOUT, cfg.plugins.handler_timeout),
            ),
            http_session=self._session,
        )
        self.toolkit = toolkit
        if cfg.verification.enabled and cfg.verification.post_sas_in_dm:
            toolkit.on(SasReady)(self._post_sas)
        self.plugins.attach(toolkit)
        try:
            await toolkit.start()
        except (StoreError, sqlite3.Error) as e:
            raise BotError(f"storage.data_dir: cannot use the store: {_describe(e)}") from None
        self.state.outbox_age = toolkit.outbox.oldest_pending_age
        self.state.outbox_is_full = toolkit.outbox.is_full
        if cfg.verification.enabled:
            self._controller.manager = toolkit.verification

    # ------------------------------------------------------------------ syncing

    async def _sync_loop(self) -> None:
        client = self.client
        assert client is not None
        first = True
        while True:
            try:
                if client.should_upload_keys:
                    upload = await client.keys_upload()
                    if not isinstance(upload, KeysUploadResponse):
                        raise _Transient(f"keys upload failed: {upload}")
                timeout_ms = 0 if first else int(self.config.matrix.sync_timeout * 1000)
                resp = await client.sync(timeout=timeout_ms or 1)
                if not isinstance(resp, SyncResponse):
                    errcode = getattr(resp, "status_code", None)
                    if errcode == "M_UNKNOWN_TOKEN":
                        raise BotError(
                            "the homeserver no longer accepts the access token (M_UNKNOWN_TOKEN)"
                        )
                    raise _Transient(f"sync answered {errcode or resp}")
                self._m_syncs.inc()
                if self._attempt:
                    log.info("homeserver reachable again after %d failed attempts", self._attempt)
                self._attempt = 0
                self.state.synced()
                if first:
                    first = False
                    log.info("first sync done; ready")
                    self._start_identity(client)
                    self.ready.set()
                await self._after_sync(client, resp)
            except BotError:
                raise
            except (_Transient, aiohttp.ClientError, OSError, TimeoutError) as e:
                self._m_sync_errors.inc("sync")
                await self._backoff("homeserver", e)
            except Exception as e:
                log.exception("sync loop error")
                self._m_sync_errors.inc("error")
                await self._backoff("sync", e)

    def _start_identity(self, client: AsyncClient) -> None:
        """Check / bootstrap / recover the cross-signing identity in the background (after the
        first sync, so the device keys are uploaded). Never fatal: see ``[identity]``."""
        cfg = self.config.identity
        if not cfg.enabled or self.identity is not None:
            return
        m = self.config.matrix
        options = IdentityOptions(
            recovery_key=cfg.recovery_key.reveal() if cfg.recovery_key else None,
            passphrase=cfg.passphrase.reveal() if cfg.passphrase else None,
            password=m.password.reveal() if m.password else None,
            bootstrap=cfg.bootstrap,
            retry_max_delay=m.retry_max_delay,
        )
        startup = IdentityStartup(
            self.toolkit.identity if self.toolkit else identity_for(client, self.data_dir),
            options,
            self.metrics,
            self.data_dir,
        )
        self.identity = startup
        self.state.identity = startup.detail
        if self.toolkit is not None and cfg.from_own_devices:
            self.toolkit.take_keys_from_own_devices()
        self._tasks.spawn(startup.run(), name="bot_toolkit.bot.identity")
        self._tasks.spawn(
            self._enable_user_trust(startup.identity), name="bot_toolkit.bot.user_trust"
        )

    async def _enable_user_trust(self, identity: Identity) -> None:
        """In-room user verification with our identity: our master key in MACs, verified users'
        master keys signed, their cross-signed devices trusted (see
        :mod:`bot_toolkit.verification.user_trust`)."""
        toolkit = self.toolkit
        if toolkit is None or not self.config.verification.enabled:
            return
        try:
            await toolkit.verification.enable_user_trust(identity, identity.api.query_keys)
        except Exception:
            log.exception("user verification could not be enabled")

    async def _after_sync(self, client: AsyncClient, resp: SyncResponse) -> None:
        """What ``sync_forever`` does between syncs, plus joining invites."""
        if client.outgoing_to_device_messages:
            await client.send_to_device_messages()
        # LocalProtocolError: another task (room_send, the verification manager) took the
        # query or the claim first.
        if client.should_query_keys:
            with contextlib.suppress(LocalProtocolError):
                await client.keys_query()
        if client.should_claim_keys:
            with contextlib.suppress(LocalProtocolError):
                await client.keys_claim(client.get_users_for_key_claiming())
        for room_id, info in resp.rooms.invite.items():
            await self._maybe_join(client, room_id, info)
        changed = resp.device_list.changed
        toolkit = self.toolkit
        if changed and toolkit is not None and self.config.verification.enabled:
            toolkit.verification.device_lists_changed(changed)

    async def _maybe_join(self, client: AsyncClient, room_id: str, info: Any) -> None:
        inviter = None
        for event in getattr(info, "invite_state", []):
            if (
                getattr(event, "state_key", None) == client.user_id
                and getattr(event, "membership", None) == "invite"
            ):
                inviter = getattr(event, "sender", None)
        if not isinstance(inviter, str) or not self.config.verification.allows(inviter):
            log.info("not joining %s: invited by %s, who is not allowed", room_id, inviter)
            return
        resp = await client.join(room_id)
        if isinstance(resp, JoinResponse):
            log.info("joined %s (invited by %s)", room_id, inviter)
        else:
            log.warning("could not join %s: %s", room_id, resp)

    # ------------------------------------------------------------------ SAS in a DM

    async def _post_sas(self, event: SasReady) -> None:
        try:
            toolkit = self.toolkit
            rooms = toolkit.verification.rooms if toolkit is not None else None
            if event.room_id is not None and rooms is not None:
                # An in-room flow: the SAS goes into the flow's own room (encrypted there
                # when the room is).
                room_id = event.room_id
                await rooms.send(room_id, "m.room.message", sas_notice(event))
            else:
                room_id = await self._dm_room(event.user_id)
                await self._send_message(room_id, sas_notice(event))
        except Exception as e:
            self._m_dm.inc("failed")
            log.warning("could not post the SAS to %s: %s", event.user_id, _describe(e))
            return
        self._m_dm.inc("sent")
        log.info("posted the SAS of %s to %s in %s", event.transaction_id, event.user_id, room_id)

    async def _dm_room(self, user_id: str) -> str:
        """An unencrypted room with just us and ``user_id`` (found, or created with an invite).

        Unencrypted on purpose: the peer's device is not verified yet, so a Megolm key would be
        withheld from it. The SAS is not secret (it is meant to be shown).
        """
        client = self.client
        assert client is not None
        known = self._dm_rooms.get(user_id)
        if known is not None:
            return known
        for room in client.rooms.values():
            members = set(room.users) | set(getattr(room, "invited_users", {}))
            if not room.encrypted and members == {client.user_id, user_id}:
                self._dm_rooms[user_id] = room.room_id
                return str(room.room_id)
        body = {"preset": "trusted_private_chat", "is_direct": True, "invite": [user_id]}
        status, data = await self._request(
            "POST", "/_matrix/client/v3/createRoom", body, token=client.access_token
        )
        if status != 200 or not isinstance(data.get("room_id"), str):
            raise RuntimeError(f"createRoom answered {status} {data.get('errcode', '')}")
        room_id: str = data["room_id"]
        self._dm_rooms[user_id] = room_id
        return room_id

    async def _send_message(self, room_id: str, content: dict[str, Any]) -> None:
        client = self.client
        assert client is not None
        path = (
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/send/m.room.message/"
            f"{secrets.token_hex(12)}"
        )
        status, data = await self._request("PUT", path, content, token=client.access_token)
        if status != 200:
            raise RuntimeError(f"send answered {status} {data.get('errcode', '')}")

    # ------------------------------------------------------------------ operator commands

    @contextlib.asynccontextmanager
    async def logged_in(self) -> AsyncIterator[AsyncClient]:
        """Log in as :meth:`run` does (the same device and session), without syncing or
        serving; for one-off operator commands such as ``bot-toolkit identity``."""
        self._prepare_data_dir()
        self._session = aiohttp.ClientSession()
        try:
            await self._login()
            assert self.client is not None
            yield self.client
        finally:
            await self._shutdown()

    # ------------------------------------------------------------------ shutdown

    async def _shutdown(self) -> None:
        """Drain, flush, close; each step bounded and independent of the others."""
        await self._tasks.cancel()
        if self.toolkit is not None:
            if self.plugins.running:
                # The plugins' stop hooks run once their handlers are done (the toolkit's own
                # close then finds the dispatcher closed already).
                with _logged("dispatcher close"):
                    await self.toolkit.dispatcher.close(_DRAIN_TIMEOUT)
            with _logged("plugins stop"):
                await self.plugins.stop()
            await self.toolkit.close()  # every part in order, then the nio client
        elif self.client is not None:
            with _logged("nio close"):
                await self.client.close()
        if self._session is not None:
            with _logged("http session close"):
                await self._session.close()
        if self.http is not None:
            with _logged("http stop"):
                await self.http.stop()
        log.info("stopped")


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    try:
        yield
    except Exception:
        log.exception("shutdown: %s failed", what)


async def run_bot(config: BotConfig, *, plugins: tuple[Plugin[Any], ...] | None = None) -> int:
    """The ``run`` command: run a :class:`Bot` until SIGTERM/SIGINT; 0 on a clean stop.

    ``plugins``: already loaded (:func:`~bot_toolkit.plugin_host.load_plugins`); ``None``:
    load ``config.plugins``. Raises :class:`BotError` (one-line message) for fatal problems and
    :class:`~bot_toolkit.plugin_host.PluginError` when a plugin cannot load or start.
    """
    return await Bot(config, plugins=plugins).run()
