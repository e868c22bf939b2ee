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

This module is the process lifecycle and the wiring; its parts (standalone-bot modules, never
imported by the library) are :mod:`bot_toolkit._bot_login` (login and ``session.json``),
:mod:`bot_toolkit._bot_homeserver` (fatal vs transient failures, backoff, raw requests),
:mod:`bot_toolkit._bot_sync` (the sync loop, joining invites) and
:mod:`bot_toolkit._bot_sas_dm` (the SAS posted for the peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
from nio import AsyncClient

from bot_toolkit._bot_homeserver import Backoff, BotError, Homeserver, describe
from bot_toolkit._bot_login import NIO_DIR, SESSION_FILE, BotLogin
from bot_toolkit._bot_sas_dm import SasDm
from bot_toolkit._bot_sync import SyncLoop
from bot_toolkit._tasks import TaskSet
from bot_toolkit.config import BotConfig
from bot_toolkit.http_api import BotState, HttpServer, VerificationInfo, make_app
from bot_toolkit.identity import Identity, identity_for
from bot_toolkit.identity.startup import IdentityOptions, IdentityStartup
from bot_toolkit.metrics import Metrics
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

STORE_FILE: Final = "bot_toolkit.sqlite3"

_DRAIN_TIMEOUT: Final = 10.0
_HANDLER_TIMEOUT: Final = 60.0


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
        self._homeserver: Homeserver | None = None
        self._tasks = TaskSet(log, "bot")  # identity startup, user trust
        m = self.metrics
        self._m_syncs = m.counter("syncs_total", "Successful /sync requests")
        self._m_sync_errors = m.counter(
            "sync_errors_total", "Failed homeserver requests of the sync loop", ["reason"]
        )
        self._m_dm = m.counter(
            "sas_dm_posts_total", "SAS posted in a direct room (result: sent, failed)", ["result"]
        )
        self._backoff = Backoff(self.state, config.matrix.retry_max_delay, self._m_sync_errors)

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
        self._open_session()
        await self._login()
        await self._build()
        await self.plugins.start()
        await self._sync()

    def _open_session(self) -> None:
        self._session = aiohttp.ClientSession()
        self._homeserver = Homeserver(self._session, self.config.matrix.homeserver)

    async def _login(self) -> None:
        assert self._homeserver is not None
        login = BotLogin(
            self.config.matrix, self.data_dir, self._homeserver, self._backoff, self.state
        )
        self.client = await login.login()

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
        assert client is not None and self._session is not None and self._homeserver is not None
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
            toolkit.on(SasReady)(
                SasDm(client, self._homeserver, lambda: toolkit.verification.rooms, self._m_dm)
            )
        self.plugins.attach(toolkit)
        try:
            await toolkit.start()
        except (StoreError, sqlite3.Error) as e:
            raise BotError(f"storage.data_dir: cannot use the store: {describe(e)}") from None
        self.state.outbox_age = toolkit.outbox.oldest_pending_age
        self.state.outbox_is_full = toolkit.outbox.is_full
        if cfg.verification.enabled:
            self._controller.manager = toolkit.verification

    # ------------------------------------------------------------------ syncing

    async def _sync(self) -> None:
        client = self.client
        assert client is not None
        toolkit = self.toolkit
        verification = self.config.verification
        await SyncLoop(
            client,
            sync_timeout=self.config.matrix.sync_timeout,
            backoff=self._backoff,
            state=self.state,
            syncs=self._m_syncs,
            errors=self._m_sync_errors,
            allows=verification.allows,
            first_sync=lambda: self._first_sync(client),
            device_lists_changed=(
                toolkit.verification.device_lists_changed
                if toolkit is not None and verification.enabled
                else None
            ),
        ).run()

    def _first_sync(self, client: AsyncClient) -> None:
        self._start_identity(client)
        self.ready.set()

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

    # ------------------------------------------------------------------ operator commands

    @contextlib.asynccontextmanager
    async def logged_in(self) -> AsyncIterator[AsyncClient]:
        """Log in as :meth:`run` does (the same device and session), without syncing or
        serving; for one-off operator commands such as ``bot-toolkit identity``."""
        self._prepare_data_dir()
        self._open_session()
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
