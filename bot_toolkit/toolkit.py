"""The facade: one object wires bot_toolkit onto a nio ``AsyncClient``.

``BotToolkit(client, data_dir, verification=..., key_sharing=...)`` builds every part in the one
correct order and closes them in the reverse one::

    bot = BotToolkit(client, "store", verification=VerificationPolicy(allowed_users=[...]))

    @bot.on(VerificationDone)
    async def verified(event: VerificationDone) -> None: ...

    async with bot:          # start(): parts built and started in order
        await bot.run()      # sync until SIGINT/SIGTERM or bot.stop()
                             # close(): parts stopped in reverse order, then the client

What :meth:`BotToolkit.start` does, in order (and :meth:`BotToolkit.close` undoes, backwards):

1. checks the client (a logged-in ``nio.AsyncClient`` with encryption) and the data directory;
2. attaches the nio plugin to the client (every to-device event reaches the dispatcher; with a
   verification policy nio's own SAS reaction is switched off, so the two never both answer);
3. opens the store ``<data_dir>/bot_toolkit.sqlite3`` (outbox queue, ``m.no_olm`` ledger,
   verification restart table) and puts the durable inbound queue in it (each sync's to-device
   batch is committed before nio saves its sync token; see :mod:`bot_toolkit.inbound_queue`);
4. starts the outbox, sending over HTTP with the client's own homeserver and access token (or
   over the ``transport`` given; it runs before key sharing and verification: both may send
   while they start);
5. attaches key sharing (unless ``key_sharing=None``), which resends notices a crash left;
6. creates the verification manager (with a policy), connected to the plugin (malformed
   verification events cancel with ``m.invalid_message``; the SAS commitment covers the raw
   start), and starts it (restart cancels for transactions a previous run left open);
7. starts the dispatcher (handlers registered with :meth:`BotToolkit.on` run from now on) and
   hands it the to-device events a previous run stored but did not finish (``inbound_id`` tells
   a replay);
8. uploads the device keys if nio says they are not on the server yet (Element can only verify
   a device whose keys it can see).

Closing: the dispatcher first (nothing new comes in, running handlers finish for at most
``Settings.drain_timeout`` s), then verification, key sharing, the outbox (flushed for at most
``Settings.flush_deadline`` s; what is left stays stored for the next start), the plugin, the
store, the HTTP transport (one the toolkit made) and finally the client. A step that fails is
logged and the others still run. Every part counts into one
:class:`~bot_toolkit.metrics.Metrics` registry (:attr:`BotToolkit.metrics`).

Testing a bot: ``await bot.join(timeout)`` returns once every part has nothing left to run
(:attr:`BotToolkit.idle`), so a check after it ("nothing was sent") is final.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
from nio import AsyncClient, KeysUploadResponse

from bot_toolkit import key_sharing as _key_sharing
from bot_toolkit import nio_plugin as _nio_plugin
from bot_toolkit._nio_adapter import NioHooks, send_sender_device_keys
from bot_toolkit._nio_identity import device_by_curve25519, device_keys, device_verified
from bot_toolkit._nio_store import NIO_DEFAULT_PICKLE_KEY
from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.events import SecretSend
from bot_toolkit.identity.api import IdentityApi
from bot_toolkit.identity.nio_glue import identity_for, nio_requester
from bot_toolkit.identity.secret_sharing import SecretRequests
from bot_toolkit.identity.service import Identity
from bot_toolkit.identity.trust import CrossSigningTrust, SenderTrustResolver
from bot_toolkit.inbound_queue import InboundQueue
from bot_toolkit.install_secret import store_secret
from bot_toolkit.metrics import Metrics
from bot_toolkit.outbox import HttpTransport, Outbox, Transport
from bot_toolkit.store import Store
from bot_toolkit.verification.lifecycle import VerificationDone
from bot_toolkit.verification.manager import VerificationManager
from bot_toolkit.verification.policy import VerificationPolicy
from bot_toolkit.verification.user_trust import UserIdentityChanged, UserVerified
from bot_toolkit.withheld import ShareWith, SharingPolicy

__all__ = ["BotToolkit", "Settings", "ToolkitError"]

log = logging.getLogger("bot_toolkit.toolkit")

E = TypeVar("E")
P = TypeVar("P")
HandlerT = TypeVar("HandlerT", bound=Callable[..., Awaitable[None]])

_DEFAULT_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


class ToolkitError(RuntimeError):
    """The toolkit cannot be used as asked (client not logged in, part not built, ...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Tuning of the parts; the defaults suit most bots.

    ``concurrency``/``queue_size``/``handler_timeout``: the dispatcher's (see
    :class:`~bot_toolkit.dispatcher.Dispatcher`). ``drain_timeout``: seconds
    :meth:`BotToolkit.close` lets queued events finish.
    ``outbox_batch_size``/``outbox_concurrency``/``outbox_backoff_max``/``outbox_max_pending``:
    the outbox's (see :class:`~bot_toolkit.outbox.Outbox`). ``flush_deadline``: seconds
    :meth:`BotToolkit.close` lets the outbox send what is queued. ``sync_timeout``: the long-poll
    of :meth:`BotToolkit.run`, in seconds.
    """

    concurrency: int = 64
    queue_size: int = 10_000
    handler_timeout: float | None = 60.0
    drain_timeout: float = 10.0
    outbox_batch_size: int = 250
    outbox_concurrency: int = 20
    outbox_backoff_max: float = 60.0
    outbox_max_pending: int = 100_000
    flush_deadline: float = 10.0
    sync_timeout: float = 30.0


class BotToolkit:
    """bot_toolkit on one nio client: see the module docs.

    Args:
        client: a ``nio.AsyncClient`` with encryption, logged in (``login`` or
            ``restore_login``) before :meth:`start`.
        data_dir: where bot_toolkit keeps its store (created, mode 0700, when missing; it may be
            nio's own store directory).
        verification: the SAS verification policy; ``None`` leaves verification to nio.
        key_sharing: the room-key sharing policy; ``None`` leaves room-key sharing to nio.
        metrics: the registry every part counts into (a new one when ``None``).
        settings: tuning of the parts.
        http_session: an aiohttp session for the outbox's HTTP transport (one of its own when
            ``None``).
        transport: what the outbox sends each to-device request with, in place of HTTP to the
            client's homeserver (a :class:`~bot_toolkit.outbox.Transport`: e.g. one that goes
            through a proxy of your own, or a test's that encrypts or counts). The caller
            owns it: :meth:`close` does not close it. Not together with ``http_session``.
        close_client: whether :meth:`close` closes ``client`` too.
        clock: the monotonic clock of key sharing's claim backoff (injectable for tests).
    """

    def __init__(
        self,
        client: AsyncClient,
        data_dir: str | os.PathLike[str],
        *,
        verification: VerificationPolicy | None = None,
        key_sharing: SharingPolicy | None = SharingPolicy(),  # noqa: B008 - frozen
        metrics: Metrics | None = None,
        settings: Settings = Settings(),
        http_session: aiohttp.ClientSession | None = None,
        transport: Transport | None = None,
        close_client: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(client, AsyncClient):
            raise TypeError(f"BotToolkit needs a nio.AsyncClient, got {type(client).__name__}")
        if transport is not None and http_session is not None:
            raise ValueError("give the outbox a transport or an http_session, not both")
        self._client = client
        self._data_dir = Path(data_dir)
        self._verification_policy = verification
        self._sharing_policy = key_sharing
        self._metrics = metrics if metrics is not None else Metrics()
        self._settings = settings
        self._http_session = http_session
        self._transport = transport
        self._close_client = close_client
        self._clock = clock
        self._dispatcher = Dispatcher(
            self._metrics,
            concurrency=settings.concurrency,
            queue_size=settings.queue_size,
            handler_timeout=settings.handler_timeout,
        )
        self._plugin: _nio_plugin.NioPlugin | None = None
        self._store: Store | None = None
        self._outbox: Outbox | None = None
        self._sharing: _key_sharing.KeySharing | None = None
        self._identity: Identity | None = None
        self._secret_requests: SecretRequests | None = None
        self._cross_signing: CrossSigningTrust | None = None
        self._manager: VerificationManager | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._state = "new"  # new -> starting -> running -> closed
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ handlers

    def on(
        self, event_cls: type[E], *filters: Callable[[E], bool]
    ) -> Callable[[HandlerT], HandlerT]:
        """Decorator: call ``async def handler(event)`` for each event of ``event_cls``.

        ``event_cls`` is any to-device event type (:mod:`bot_toolkit.events`), a lifecycle event
        (:class:`~bot_toolkit.verification.VerificationDone`, ...) or
        :class:`~bot_toolkit.outbox.OutboxSendFailed`; ``filters`` are sync predicates that must
        all hold. Same as :meth:`Dispatcher.on <bot_toolkit.dispatcher.Dispatcher.on>`.
        """
        return self._dispatcher.on(event_cls, *filters)

    # ------------------------------------------------------------------ parts (read-only)

    @property
    def client(self) -> AsyncClient:
        """The nio client."""
        return self._client

    @property
    def data_dir(self) -> Path:
        """The data directory."""
        return self._data_dir

    @property
    def metrics(self) -> Metrics:
        """The registry every part counts into."""
        return self._metrics

    @property
    def settings(self) -> Settings:
        """The tuning given at construction."""
        return self._settings

    @property
    def dispatcher(self) -> Dispatcher:
        """The dispatcher (exists from construction; started by :meth:`start`)."""
        return self._dispatcher

    @property
    def started(self) -> bool:
        """Whether :meth:`start` completed and :meth:`close` has not run."""
        return self._state == "running"

    @property
    def plugin(self) -> _nio_plugin.NioPlugin:
        """The nio plugin (after :meth:`start`)."""
        return self._part(self._plugin, "plugin")

    @property
    def store(self) -> Store:
        """The store (after :meth:`start`)."""
        return self._part(self._store, "store")

    @property
    def outbox(self) -> Outbox:
        """The outbox (after :meth:`start`)."""
        return self._part(self._outbox, "outbox")

    @property
    def key_sharing(self) -> _key_sharing.KeySharing:
        """Key sharing (after :meth:`start`; :class:`ToolkitError` when switched off)."""
        if self._sharing_policy is None:
            raise ToolkitError("key sharing is off (key_sharing=None)")
        return self._part(self._sharing, "key sharing")

    @property
    def verification(self) -> VerificationManager:
        """The verification manager (after :meth:`start`; :class:`ToolkitError` when off)."""
        if self._verification_policy is None:
            raise ToolkitError("verification is off: pass verification=VerificationPolicy(...)")
        return self._part(self._manager, "verification manager")

    @property
    def identity(self) -> Identity:
        """The bot user's cross-signing identity (keys kept in the data directory)::

            result = await toolkit.identity.ensure(recovery_key=..., password=...)

        bootstraps an identity for an account without one, recovers an existing one with the
        recovery key, and signs this device; see :mod:`bot_toolkit.identity`. Made on first use.
        """
        if self._identity is None:
            self._identity = identity_for(self._client, self._data_dir)
        return self._identity

    @property
    def cross_signing(self) -> CrossSigningTrust:
        """Other users' cross-signing as the homeserver publishes it (checked): key sharing's
        ``cross_signed`` / ``verified`` policies and :attr:`sender_trust` read it."""
        if self._cross_signing is None:
            client = self._client
            self._cross_signing = CrossSigningTrust(
                IdentityApi(nio_requester(client), client.user_id)
            )
        return self._cross_signing

    @property
    def sender_trust(self) -> SenderTrustResolver:
        """The trust of a message's sending device (verified / cross-signed / not
        cross-signed / unknown): give it to :class:`~bot_toolkit.room_messages.RoomMessageFeed`
        (``trust=``) so handlers can ignore messages from insecure devices."""
        client = self._client
        return SenderTrustResolver(
            self.cross_signing, lambda user, curve: device_by_curve25519(client, user, curve)
        )

    def take_keys_from_own_devices(self) -> SecretRequests:
        """Self-verification: when one of the bot user's own sessions verifies this device
        (SAS), ask it for the private cross-signing keys (``m.secret.request``) and take its
        ``m.secret.send`` answers (Olm-encrypted, from that verified device, checked against
        the published keys). After :meth:`start`; once."""
        if self._secret_requests is None:
            client = self._client
            dispatcher, outbox = self.dispatcher, self.outbox
            requests = SecretRequests(
                self.identity,
                outbox.send,
                device_verified=lambda d: device_verified(client, client.user_id, d),
                device_curve25519=lambda d: getattr(
                    device_keys(client, client.user_id, d), "curve25519", None
                ),
                metrics=self._metrics,
            )
            dispatcher.register(SecretSend, requests.on_secret_send)
            dispatcher.register(VerificationDone, requests.on_verification_done)
            self._secret_requests = requests
        return self._secret_requests

    @property
    def idle(self) -> bool:
        """``True`` while nothing is left to do at this moment: no event queued or being
        handled (the dispatcher), no verification or key-sharing background work, nothing
        waiting in the outbox. Always ``True`` once :meth:`close` has run.

        Incoming events (a sync) can make it ``False`` again: a check after :meth:`join` is
        final for what arrived before it.
        """
        if self._state == "closed":
            return True
        return (
            self._dispatcher.idle
            and (self._manager is None or self._manager.idle)
            and (self._sharing is None or self._sharing.idle)
            and (self._outbox is None or self._outbox.idle)
        )

    async def join(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until :attr:`idle`: each part in turn (a handled event may start a verification
        task, whose answer goes to the outbox...) until all are idle at one moment.

        Returns ``True`` once idle, ``False`` if still busy after ``timeout`` seconds (``None``:
        no limit; nothing is cancelled). For tests: after ``await bot.join(10)`` everything the
        bot will send about the events it has taken is sent, so "nothing was sent" is final.
        """
        try:
            async with asyncio.timeout(timeout):
                while not self.idle:
                    await self._dispatcher.join()
                    if self._manager is not None:
                        await self._manager.join()
                    if self._sharing is not None:
                        await self._sharing.join()
                    if self._outbox is not None:
                        await self._outbox.flush(None)
        except TimeoutError:
            return False
        return True

    def _part(self, part: P | None, name: str) -> P:
        if part is None:
            raise ToolkitError(f"the {name} exists once start() has run")
        return part

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Build and start every part in order (see the module docs); once.

        Raises:
            ToolkitError: the client is not logged in or has no encryption, or start/close
                already ran.
            OSError: the data directory cannot be created.
        """
        if self._state != "new":
            raise ToolkitError(f"start() runs once (the toolkit is {self._state})")
        self._state = "starting"
        client = self._client
        if not (client.user_id and client.device_id and client.access_token):
            self._state = "new"
            raise ToolkitError("log the client in (login or restore_login) before start()")
        if client.olm is None:
            self._state = "new"
            raise ToolkitError(
                "the client has no encryption: give it AsyncClientConfig(encryption_enabled="
                "True) and a store path, and install matrix-nio[e2e]"
            )
        if client.config.pickle_key == NIO_DEFAULT_PICKLE_KEY:
            log.warning(
                "nio's store uses nio's public default pickle key: a copy of it is a copy of the "
                "bot's identity keys. Give the client AsyncClientConfig(pickle_key="
                "bot_toolkit.store_secret(data_dir)) (an existing store must be moved with it)"
            )
        stack = contextlib.AsyncExitStack()
        self._stack = stack
        try:
            await self._build(stack, client)
        except BaseException:
            self._state = "closed"
            self._stack = None
            await self._unwind(stack)
            raise
        self._state = "running"
        log.info("started for %s, device %s", client.user_id, client.device_id)

    async def _build(self, stack: contextlib.AsyncExitStack, client: AsyncClient) -> None:
        # The exit stack closes in reverse order of the pushes below.
        if self._close_client:
            stack.push_async_callback(self._step, "nio client close", client.close)
        await asyncio.to_thread(self._data_dir.mkdir, parents=True, exist_ok=True, mode=0o700)
        plugin = _nio_plugin.attach(
            client,
            self._dispatcher,
            intercept_verification=self._verification_policy is not None,
            metrics=self._metrics,
            trusted_own_devices=(
                self._sharing_policy.own_devices if self._sharing_policy is not None else ()
            ),
        )
        self._plugin = plugin
        stack.push_async_callback(self._step, "plugin detach", _sync(plugin.detach))
        # MSC4147: our device keys (cross-signatures included) in every Olm payload we send.
        hooks = NioHooks()
        send_sender_device_keys(
            hooks,
            client.olm,
            lambda: self._identity.device_keys_json if self._identity is not None else None,
        )
        stack.push_async_callback(self._step, "sender_device_keys hook", _sync(hooks.undo))
        store = await Store.open_in(self._data_dir)
        self._store = store
        stack.push_async_callback(self._step, "store close", store.close)
        secret = await asyncio.to_thread(store_secret, self._data_dir)
        waiting = await plugin.use_inbound_queue(InboundQueue(store, secret, self._metrics))
        stack.push_async_callback(self._step, "inbound queue close", plugin.close_inbound)
        transport = self._transport
        if transport is None:
            http = HttpTransport(client.homeserver, client.access_token, self._http_session)
            stack.push_async_callback(self._step, "transport close", http.close)
            transport = http
        s = self._settings
        outbox = Outbox(
            transport,
            store,
            self._metrics,
            batch_size=s.outbox_batch_size,
            concurrency=s.outbox_concurrency,
            backoff_max=s.outbox_backoff_max,
            max_pending=s.outbox_max_pending,
            dispatcher=self._dispatcher,
        )
        self._outbox = outbox
        await outbox.start()
        stack.push_async_callback(self._step, "outbox close", self._close_outbox)
        if self._sharing_policy is not None:
            sharing = await _key_sharing.attach(
                client,
                store=store,
                outbox=outbox,
                dispatcher=self._dispatcher,
                policy=self._sharing_policy,
                metrics=self._metrics,
                clock=self._clock,
            )
            # Other users' cross-signing, for share_with = cross_signed / verified.
            cross_signing = self.cross_signing  # the one sender_trust reads too
            sharing.cross_signing = cross_signing

            async def user_changed(event: UserVerified | UserIdentityChanged) -> None:
                # We just signed (or lost) this user's master key: ask again, so keys go to
                # (or stop going to) their cross-signed devices at once.
                cross_signing.invalidate([event.user_id])

            self._dispatcher.register(UserVerified, user_changed)
            self._dispatcher.register(UserIdentityChanged, user_changed)
            self._sharing = sharing
            stack.push_async_callback(self._step, "key sharing close", sharing.close)
        if self._verification_policy is not None:
            sharing_policy = self._sharing_policy
            manager = VerificationManager(
                client,
                self._dispatcher,
                outbox,
                self._verification_policy,
                self._metrics,
                store=store,
                # Under share_with = "verified" the peer's devices get no room key before the
                # flow ends: in-room verification events then go out in plaintext, as the spec
                # allows. ("cross_signed" shares with the peer's devices its owner signed.)
                encrypt_room_events=(
                    sharing_policy is None or sharing_policy.share_with is not ShareWith.VERIFIED
                ),
            )
            manager.watch(plugin)
            self._manager = manager
            stack.push_async_callback(self._step, "verification close", manager.close)
            await manager.start()
        await self._dispatcher.start()
        if waiting:
            await plugin.replay_inbound()  # before the first sync: nothing a crash left is lost
        stack.push_async_callback(self._step, "dispatcher close", self._close_dispatcher)
        if client.should_upload_keys:
            upload = await client.keys_upload()
            if not isinstance(upload, KeysUploadResponse):
                raise ToolkitError(f"uploading the device keys failed: {upload}")

    async def close(self) -> None:
        """Stop every part in reverse order (see the module docs). Idempotent; never raises
        for a part that fails to stop (that is logged)."""
        if self._state == "new":
            self._state = "closed"
            if self._close_client:
                await self._step("nio client close", self._client.close)
            return
        stack, self._stack = self._stack, None
        self._state = "closed"
        self._stopping.set()
        if stack is not None:
            await self._unwind(stack)
            log.info("stopped")

    async def __aenter__(self) -> BotToolkit:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    async def _unwind(stack: contextlib.AsyncExitStack) -> None:
        with contextlib.suppress(Exception):  # each step already logged its own failure
            await stack.aclose()

    @staticmethod
    async def _step(what: str, close: Callable[[], Awaitable[Any]]) -> None:
        try:
            await close()
        except Exception:
            log.exception("shutdown: %s failed", what)

    async def _close_dispatcher(self) -> None:
        summary = await self._dispatcher.close(self._settings.drain_timeout)
        log.info("dispatcher drained: %s", summary)

    async def _close_outbox(self) -> None:
        assert self._outbox is not None
        left = await self._outbox.close(self._settings.flush_deadline)
        if left:
            log.warning("shutdown: %d outbox requests stay stored for the next run", left)
        else:
            log.info("shutdown: outbox flushed (queue depth 0)")

    # ------------------------------------------------------------------ running

    def stop(self) -> None:
        """Ask :meth:`run` to return (idempotent; safe from a signal handler)."""
        self._stopping.set()

    async def run(self, *, signals: Iterable[signal.Signals] = _DEFAULT_SIGNALS) -> None:
        """Start (unless started), sync until :meth:`stop` or one of ``signals``, then close.

        Syncs with nio's ``sync_forever`` (long-poll ``Settings.sync_timeout``). Signal handlers
        are installed only when possible (the main thread of a Unix event loop) and removed
        again. An error that ends the sync loop is raised after everything is closed.
        """
        if self._state == "new":
            await self.start()
        elif self._state != "running":
            raise ToolkitError(f"run() needs a toolkit that can start (it is {self._state})")
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for sig in signals:
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or no signals on this platform
            installed.append(sig)
        timeout_ms = int(self._settings.sync_timeout * 1000)
        sync = asyncio.create_task(
            self._client.sync_forever(timeout=timeout_ms), name="bot_toolkit.sync"
        )
        stopper = asyncio.create_task(self._stopping.wait(), name="bot_toolkit.stop")
        try:
            await asyncio.wait({sync, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if sync.done():
                sync.result()  # sync_forever only returns by raising
        finally:
            for task in (sync, stopper):
                task.cancel()
            for task in (sync, stopper):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task  # an error of the sync loop was raised above
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.close()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s; stopping", sig.name)
        self.stop()


def _sync(func: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        func()

    return call
