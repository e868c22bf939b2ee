"""The verification manager: the I/O around the pure transition table.

:class:`VerificationManager` registers dispatcher handlers for the ``m.key.verification.*``
events (plaintext and Olm-decrypted ones arrive as the same typed events), turns each event, local
decision and timer into one :class:`~bot_toolkit.verification.table.Input`, asks
:func:`~bot_toolkit.verification.table.transition` what to do and performs the actions: messages go
out through the :class:`~bot_toolkit.outbox.Outbox`, SAS maths is a
:class:`~bot_toolkit.verification.sas.SasSession` per transaction, and a verified device is
written to nio's trust store (``client.verify_device``).

Both roles are supported: answering a request (ready; then either side starts) and
:meth:`VerificationManager.request_verification`. A start without a request (the deprecated
start-first flow) is handled as the table says.

Rules that live here rather than in the table (the table decides every cancel code):

* requests more than 10 min old or 5 min in the future are ignored;
* a request or start from a device whose keys we have not downloaded is held while the keys are
  queried (at most ``VerificationPolicy.key_query_timeout`` seconds); if they do not arrive the
  request is refused with ``m.user`` and logged;
* a cancel is never answered; cancels caused by inbound events are capped per peer device
  (:class:`~bot_toolkit.verification.table.ErrorReplyLimiter`);
* a malformed verification event cannot become a typed event; :meth:`VerificationManager.watch`
  makes the nio plugin dispatch such events as
  :class:`~bot_toolkit.undecodable.UndecodableEvent` (in wire order) so that a known transaction
  is cancelled with ``m.invalid_message``, and hands the manager each start's raw content (the
  SAS commitment covers every field the peer sent, also those the typed event drops).

Restart: the ephemeral SAS keys are never persisted, so a transaction cannot survive a restart.
Each live transaction's (txn, peer user, peer device, deadline) is kept in the store; on
:meth:`VerificationManager.start` every unexpired one gets ``m.key.verification.cancel``
(``m.user``, "verifier restarted") so the peer's UI does not hang; expired ones are dropped.

Clock: one injected wall clock (``time.time`` by default) drives request freshness, timeouts and
the deadlines shown to the admin API and persisted across restarts.

Metrics: ``verifications_total{outcome,code}`` (outcome ``done`` / ``cancelled``; code empty for
done) and ``verification_cancels_sent_total{code}``; ``verification_lifecycle_dropped_total``
counts lifecycle events a full dispatcher refused.

Nothing secret is logged: no SAS bytes, no MACs, no keys' private parts (they never leave
vodozemac anyway). Transaction ids are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fnmatch
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

import msgspec

from .._types import DeviceId, TransactionId, UserId
from ..dispatcher import Dispatcher, DispatcherClosed
from ..events import (
    KeyVerificationAccept,
    KeyVerificationCancel,
    KeyVerificationDone,
    KeyVerificationKey,
    KeyVerificationMac,
    KeyVerificationReady,
    KeyVerificationRequest,
    KeyVerificationStart,
    KeyVerificationStartSas,
    ToDeviceEvent,
    encode_content,
)
from ..http_api import VerificationInfo
from ..metrics import Metrics
from ..undecodable import UndecodableEvent
from .lifecycle import (
    SasPrompt,
    SasReady,
    VerificationCancelled,
    VerificationDone,
    VerificationRequested,
)
from .sas import (
    METHOD_SAS,
    SAS_DECIMAL,
    SAS_EMOJI,
    SUPPORTED_METHODS,
    SasError,
    SasSession,
    SasStateError,
    common_verification_methods,
    negotiate_start,
    offer_from_start,
)
from .table import (
    TERMINAL_STATES,
    VERIFICATION_TIMEOUT,
    AttemptTracker,
    CancelCode,
    ErrorReplyLimiter,
    Ignore,
    Input,
    MarkVerified,
    NotifyOthers,
    Party,
    RejectLocal,
    ReplyCancel,
    SendAccept,
    SendCancel,
    SendDone,
    SendKey,
    SendMac,
    SendReady,
    SendRequest,
    SendStart,
    ShowSas,
    State,
    TransactionTimers,
    accepted_notice_targets,
    classify_start,
    request_is_fresh,
    request_prompt_lapse,
    transition,
)

if TYPE_CHECKING:
    from ..nio_plugin import NioPlugin

__all__ = [
    "RESTART_REASON",
    "KeySource",
    "MalformedVerificationEvent",
    "NioKeySource",
    "OutboxLike",
    "VerificationManager",
    "VerificationPolicy",
    "watch_malformed",
]

log = logging.getLogger("bot_toolkit.verification.manager")

RESTART_REASON: Final = "verifier restarted"
"""The reason of the ``m.user`` cancel sent on start-up for transactions left by a restart."""

_COMPONENT: Final = "verification"
_MIGRATIONS: Final[dict[int, list[str]]] = {
    1: [
        """
        CREATE TABLE verification_inflight (
            txn TEXT NOT NULL,
            user_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            deadline REAL NOT NULL,
            PRIMARY KEY (txn, user_id, device_id)
        )
        """
    ]
}

_REASONS: Final[dict[str, str]] = {
    CancelCode.USER: "cancelled by the user",
    CancelCode.TIMEOUT: "the verification timed out",
    CancelCode.UNKNOWN_TRANSACTION: "unknown transaction",
    CancelCode.UNKNOWN_METHOD: "unknown or unsupported method",
    CancelCode.UNEXPECTED_MESSAGE: "unexpected message",
    CancelCode.KEY_MISMATCH: "key mismatch",
    CancelCode.USER_MISMATCH: "user mismatch",
    CancelCode.INVALID_MESSAGE: "invalid message",
    CancelCode.ACCEPTED: "the request was accepted on another device",
    CancelCode.MISMATCHED_COMMITMENT: "mismatched commitment",
    CancelCode.MISMATCHED_SAS: "mismatched short authentication string",
}

_SAS_SHOWN: Final = frozenset(
    {
        State.KEYS_EXCHANGED,
        State.MAC_RECEIVED,
        State.MAC_SENT,
        State.LEGACY_KEYS_EXCHANGED,
        State.LEGACY_MAC_RECEIVED,
        State.LEGACY_MAC_SENT,
    }
)
_MAC_EXPECTED: Final = frozenset(
    {State.KEYS_EXCHANGED, State.MAC_SENT, State.LEGACY_KEYS_EXCHANGED, State.LEGACY_MAC_SENT}
)
_CONFIRMABLE: Final = frozenset(
    {
        State.KEYS_EXCHANGED,
        State.MAC_RECEIVED,
        State.LEGACY_KEYS_EXCHANGED,
        State.LEGACY_MAC_RECEIVED,
    }
)
_LOCK_STRIPES: Final = 64
_RAW_STARTS_KEPT: Final = 1024


class MalformedVerificationEvent(UndecodableEvent, frozen=True, kw_only=True):
    """Deprecated: a ``m.key.verification.*`` event that failed to decode.

    The nio plugin now dispatches :class:`~bot_toolkit.undecodable.UndecodableEvent` (see
    :meth:`VerificationManager.watch`); the manager handles this subclass the same way.
    """

    event_type: ClassVar[str] = "bot_toolkit.malformed_verification"


class OutboxLike(Protocol):
    """What the manager needs of the :class:`~bot_toolkit.outbox.Outbox`."""

    async def send(
        self, event_type: str, messages: Mapping[str, Mapping[str, Mapping[str, Any]]]
    ) -> list[str]: ...


class StoreLike(Protocol):
    """What the manager needs of the :class:`~bot_toolkit.store.Store`."""

    async def migrate(self, component: str, migrations: Mapping[int, Iterable[str]]) -> int: ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]: ...


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

    Keys of users we share no room with are fetched by adding the user to nio's
    ``users_for_key_query`` and calling ``client.keys_query()``; nio then tracks the user.
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
        from nio import LocalProtocolError  # noqa: PLC0415

        olm = self._client.olm
        if olm is None:
            return
        olm.users_for_key_query.add(user_id)
        try:
            response = await self._client.keys_query()
        except LocalProtocolError:  # the sync loop's own query took the user already
            return
        if type(response).__name__ != "KeysQueryResponse":
            log.warning("keys query for %s failed: %s", user_id, type(response).__name__)

    async def master_key(self, user_id: str) -> str | None:
        import aiohttp  # noqa: PLC0415

        url = self._client.homeserver.rstrip("/") + "/_matrix/client/v3/keys/query"
        headers = {"Authorization": f"Bearer {self._client.access_token}"}
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    url,
                    json={"device_keys": {user_id: []}},
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=15),
                ) as resp,
            ):
                if resp.status != 200:
                    return None
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            log.warning("could not fetch the master key of %s", user_id)
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


ConfirmCallback = Callable[[SasPrompt], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class VerificationPolicy:
    """Who may verify the bot, and how a SAS is confirmed.

    ``allowed_users``: a predicate on the user id, or user ids / glob patterns
    (``@*:example.org``); others are refused with ``m.user``. ``confirm``: called with the SAS
    (emoji with descriptions, decimals); True = the SAS matches, False = it does not
    (``m.mismatched_sas``). ``None`` is operator mode: the SAS waits for :meth:`confirm` /
    :meth:`cancel` (the admin API). ``auto_accept``: answer allowed requests with ready at once
    (else the operator's ``confirm(id)`` does it). ``start_as_requester``: after our own request
    was answered, send the start ourselves.
    """

    allowed_users: Callable[[str], bool] | Sequence[str] = ()
    confirm: ConfirmCallback | None = None
    auto_accept: bool = True
    start_as_requester: bool = True
    key_query_timeout: float = 15.0
    max_error_replies: int = 5
    error_window: float = 60.0
    attempt_cooldown: float = 5.0
    """Seconds after a device's concurrent attempts were cancelled during which its new
    attempts are refused too (so a burst of requests ends with all of them cancelled)."""

    def allows(self, user_id: str) -> bool:
        """Whether ``user_id`` may verify the bot."""
        rule = self.allowed_users
        if callable(rule):
            return bool(rule(user_id))
        return any(fnmatch.fnmatchcase(user_id, pattern) for pattern in rule)


@dataclass(eq=False)
class _Txn:
    txn: TransactionId
    peer_user: UserId
    peer_device: DeviceId | None
    initiated_by_us: bool
    recipients: tuple[DeviceId, ...] = ()
    state: State = State.NEW
    sas: SasSession | None = None
    their_start: dict[str, Any] | None = None
    our_start_method: str | None = None
    peer_ed25519: str | None = None
    seen: set[bytes] = field(default_factory=set)
    emoji: tuple[tuple[str, str], ...] = ()
    decimals: tuple[int, int, int] | None = None
    cancel_code: str | None = None
    cancel_reason: str = ""
    cancelled_by_us: bool = True
    lapse: float | None = None
    finished: asyncio.Future[VerificationDone | VerificationCancelled] | None = None


@dataclass(slots=True)
class _Ctx:
    """The triggering event of a transition (``None`` fields for local inputs)."""

    sender: UserId | None = None
    sender_device: DeviceId | None = None
    inbound: bool = False
    cancel_code: str | None = None
    cancel_reason: str = ""


def _fingerprint(event: ToDeviceEvent) -> bytes:
    """Identity of an event for duplicate detection: type, sender, content."""
    name = getattr(event, "event_type_name", None) or type(event).event_type
    content = encode_content(event)
    return msgspec.json.encode([name, event.sender, sorted(content.items())])


class VerificationManager:
    """Runs to-device SAS verification for one bot device; see the module docs.

    Implements the admin API's ``VerificationController`` (:meth:`list_in_progress`,
    :meth:`confirm`, :meth:`cancel`). Call :meth:`start` once the outbox runs and
    :meth:`close` on shutdown.
    """

    def __init__(  # noqa: PLR0917 - the documented positional order
        self,
        client: Any,
        dispatcher: Dispatcher,
        outbox: OutboxLike,
        policy: VerificationPolicy,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        *,
        store: StoreLike | None = None,
        key_source: KeySource | None = None,
        tick: float = 1.0,
    ) -> None:
        if key_source is None:
            if client is None:
                raise ValueError("give a nio client or a key_source")
            key_source = NioKeySource(client)
        self.client = client
        self.dispatcher = dispatcher
        self.outbox = outbox
        self.policy = policy
        self.metrics = metrics if metrics is not None else dispatcher.metrics
        self.clock = clock
        self.store = store
        self.keys = key_source
        self.tick = tick
        self._txns: dict[TransactionId, _Txn] = {}
        self._timers = TransactionTimers(clock)
        self._limiter = ErrorReplyLimiter(
            limit=max(1, policy.max_error_replies), window=policy.error_window, clock=clock
        )
        self._attempts = AttemptTracker()
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]
        self._queries: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._raw_starts: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._cooldown: OrderedDict[Party, float] = OrderedDict()
        self._timer_task: asyncio.Task[None] | None = None
        self._closed = False
        m = self.metrics
        self._m_total = m.counter(
            "verifications_total", "Verifications finished", ["outcome", "code"]
        )
        self._m_cancels = m.counter(
            "verification_cancels_sent_total", "m.key.verification.cancel messages sent", ["code"]
        )
        self._m_dropped = m.counter(
            "verification_lifecycle_dropped_total",
            "Lifecycle events a full dispatcher refused",
            ["event"],
        )
        d = dispatcher
        d.register(KeyVerificationRequest, self._on_request)
        d.register(KeyVerificationReady, self._on_ready)
        d.register(KeyVerificationStart, self._on_start)
        d.register(KeyVerificationAccept, self._on_accept)
        d.register(KeyVerificationKey, self._on_key)
        d.register(KeyVerificationMac, self._on_mac)
        d.register(KeyVerificationDone, self._on_done)
        d.register(KeyVerificationCancel, self._on_cancel)
        d.register(UndecodableEvent, self._on_malformed)
        self._unwatch: list[Callable[[], None]] = []

    def watch(self, plugin: NioPlugin) -> None:
        """Take malformed verification events and raw start contents from the nio plugin.

        Turns on the plugin's ``dispatch_undecodable`` (a malformed ``m.key.verification.*``
        event of a known transaction cancels it with ``m.invalid_message``) and subscribes to
        decoded starts to keep their raw content. Undone by :meth:`close`.
        """
        plugin.dispatch_undecodable = True
        self._unwatch.append(plugin.add_decoded_listener(self._decoded))

    def _decoded(self, event: ToDeviceEvent, raw: Mapping[str, Any]) -> None:
        content = raw.get("content")
        if isinstance(event, KeyVerificationStart) and isinstance(content, Mapping):
            self.remember_raw_start(event.sender, copy.deepcopy(content))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        """Send restart cancels for transactions left by a previous run; start the timer.

        Returns how many peer devices were sent a restart cancel.
        """
        sent = 0
        if self.store is not None:
            await self.store.migrate(_COMPONENT, _MIGRATIONS)
            rows = await self.store.fetchall(
                "SELECT txn, user_id, device_id, deadline FROM verification_inflight"
            )
            now = self.clock()
            by_txn: dict[str, dict[str, dict[str, Any]]] = {}
            for txn, user_id, device_id, deadline in rows:
                if float(deadline) <= now:
                    log.info("dropping expired verification %s left by a restart", txn)
                    continue
                by_txn.setdefault(str(txn), {}).setdefault(str(user_id), {})[str(device_id)] = {
                    "transaction_id": str(txn),
                    "code": str(CancelCode.USER),
                    "reason": RESTART_REASON,
                }
            for txn, messages in by_txn.items():
                log.info("cancelling verification %s left by a restart", txn)
                await self.outbox.send(KeyVerificationCancel.event_type, messages)
                count = sum(len(devices) for devices in messages.values())
                self._m_cancels.inc(str(CancelCode.USER), amount=count)
                sent += count
            async with self.store.transaction() as conn:
                await conn.execute("DELETE FROM verification_inflight")
        if self._timer_task is None and self.tick > 0:
            self._timer_task = asyncio.get_running_loop().create_task(
                self._timer_loop(), name="bot_toolkit.verification.timers"
            )
        return sent

    async def close(self) -> None:
        """Stop the timer and the confirmation tasks. Live transactions stay persisted."""
        self._closed = True
        for unwatch in self._unwatch:
            unwatch()
        self._unwatch.clear()
        tasks = list(self._tasks)
        if self._timer_task is not None:
            tasks.append(self._timer_task)
            self._timer_task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _timer_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                await self.check_timeouts()
            except Exception:
                log.exception("verification timer check failed")

    async def check_timeouts(self) -> None:
        """Feed ``TIMEOUT`` to every live transaction past its deadline; forget old ids."""
        for txn in self._timers.timed_out():
            async with self._lock(txn):
                t = self._txns.get(txn)
                if t is not None and t.state not in TERMINAL_STATES:
                    log.info("verification %s timed out in state %s", txn, t.state.value)
                    await self._feed(t, Input.TIMEOUT, _Ctx())
        for txn in self._timers.expired():
            self._txns.pop(txn, None)

    # ------------------------------------------------------------------ public API

    async def request_verification(self, user_id: str, device_id: str) -> TransactionId:
        """Ask ``device_id`` of ``user_id`` to verify; returns the transaction id at once.

        The device's keys are downloaded first when unknown (``LookupError`` if that fails).
        Use :meth:`wait_finished` for the outcome.
        """
        if device_id == "*":
            raise ValueError("request verification of one explicit device id")
        us_user, us_device, _ = self.keys.own()
        if (user_id, device_id) == (us_user, us_device):
            raise ValueError("cannot verify our own device")
        ed = await self._ensure_keys(user_id, device_id)
        if ed is None:
            raise LookupError(f"no device keys for {user_id} {device_id}")
        txn = TransactionId(_new_transaction_id())
        t = _Txn(txn, UserId(user_id), None, True, recipients=(DeviceId(device_id),))
        t.peer_ed25519 = ed
        async with self._lock(txn):
            await self._feed(t, Input.LOCAL_REQUEST, _Ctx())
        return txn

    async def wait_finished(
        self,
        txn: str,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> VerificationDone | VerificationCancelled:
        """Wait for a transaction's outcome (``KeyError`` when unknown)."""
        t = self._txns[TransactionId(txn)]
        assert t.finished is not None
        return await asyncio.wait_for(asyncio.shield(t.finished), timeout)

    def state_of(self, txn: str) -> State | None:
        """The state of a transaction this manager knows (finished ones for a while)."""
        t = self._txns.get(TransactionId(txn))
        return None if t is None else t.state

    def list_in_progress(self) -> Sequence[VerificationInfo]:
        """Every live transaction: id, peer, state, SAS once known, deadline (Unix time)."""
        out = []
        for t in sorted(self._txns.values(), key=lambda x: x.txn):
            if t.state in TERMINAL_STATES or t.state is State.NEW:
                continue
            out.append(
                VerificationInfo(
                    id=t.txn,
                    user_id=t.peer_user,
                    device_id=t.peer_device or ",".join(t.recipients),
                    state=t.state.value,
                    emoji=t.emoji,
                    decimals=t.decimals,
                    deadline=self._timers.deadline(t.txn),
                )
            )
        return out

    async def confirm(self, verification_id: str) -> bool:
        """Operator: the SAS matches (or: accept a pending request). False when not possible."""
        txn = TransactionId(verification_id)
        async with self._lock(txn):
            t = self._live(txn)
            if t.state is State.REQUESTED_IN:
                return await self._feed(t, Input.LOCAL_READY, _Ctx())
            if t.state in _CONFIRMABLE:
                return await self._feed(t, Input.LOCAL_CONFIRM, _Ctx())
            return False

    async def start_sas(self, verification_id: str) -> bool:
        """Send our SAS start in a ready transaction (either side may start)."""
        txn = TransactionId(verification_id)
        async with self._lock(txn):
            return await self._feed(self._live(txn), Input.LOCAL_START, _Ctx())

    async def mismatch(self, verification_id: str) -> bool:
        """Operator: the SAS does not match (``m.mismatched_sas``)."""
        txn = TransactionId(verification_id)
        async with self._lock(txn):
            return await self._feed(self._live(txn), Input.LOCAL_MISMATCH, _Ctx())

    async def cancel(self, verification_id: str) -> bool:
        """Operator: cancel with ``m.user``. ``KeyError`` for an unknown id."""
        txn = TransactionId(verification_id)
        async with self._lock(txn):
            t = self._txns.get(txn)
            if t is None or t.state is State.NEW:
                raise KeyError(verification_id)
            if t.state in TERMINAL_STATES:
                return False
            return await self._feed(t, Input.LOCAL_CANCEL, _Ctx())

    def _live(self, txn: TransactionId) -> _Txn:
        t = self._txns.get(txn)
        if t is None or t.state is State.NEW or t.state in TERMINAL_STATES:
            raise KeyError(txn)
        return t

    # ------------------------------------------------------------------ helpers

    def _lock(self, txn: str) -> asyncio.Lock:
        return self._locks[hash(txn) % _LOCK_STRIPES]

    def _us(self) -> Party:
        user, device, _ = self.keys.own()
        return Party(user, device)

    async def _ensure_keys(self, user_id: str, device_id: str) -> str | None:
        """The device's ed25519 key, querying the user's keys (bounded) when unknown."""
        ed = self.keys.device_ed25519(user_id, device_id)
        if ed is not None:
            return ed
        log.info("holding verification from %s %s while its keys are queried", user_id, device_id)
        fut = self._queries.get(user_id)
        if fut is None:
            fut = asyncio.ensure_future(self.keys.query(user_id))
            self._queries[user_id] = fut

            def forget(_f: asyncio.Future[None], user: str = user_id) -> None:
                self._queries.pop(user, None)

            fut.add_done_callback(forget)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.policy.key_query_timeout)
        except TimeoutError:
            log.warning(
                "keys of %s did not arrive within %.0fs", user_id, self.policy.key_query_timeout
            )
        except Exception:
            log.exception("keys query for %s failed", user_id)
        return self.keys.device_ed25519(user_id, device_id)

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _emit(self, event: object) -> None:
        try:
            ok = self.dispatcher.put_nowait(event)
        except DispatcherClosed:
            ok = False
        if not ok:
            self._m_dropped.inc(type(event).__name__)
            log.warning(
                "dropped lifecycle event %s of %s",
                type(event).__name__,
                getattr(event, "transaction_id", None),
            )

    def _reply_device(self, event: ToDeviceEvent, t: _Txn | None) -> DeviceId:
        from_device = getattr(event, "from_device", None)
        if isinstance(from_device, str) and from_device:
            return DeviceId(from_device)
        if event.decrypted_from is not None:
            found = self.keys.device_for_curve(event.sender, event.decrypted_from)
            if found is not None:
                return found
        if t is not None and event.sender == t.peer_user and t.peer_device is not None:
            return t.peer_device
        return DeviceId("*")

    def _sender_is_other_device(self, event: ToDeviceEvent, t: _Txn) -> bool:
        """Whether an event from the peer user comes from a device not in the transaction."""
        devices: tuple[DeviceId, ...]
        if t.peer_device is not None:
            devices = (t.peer_device,)
        elif t.state is State.REQUESTED_OUT:
            devices = t.recipients
        else:
            return False
        from_device = getattr(event, "from_device", None)
        if isinstance(from_device, str):
            return from_device not in devices
        if event.decrypted_from is not None:
            found = self.keys.device_for_curve(event.sender, event.decrypted_from)
            return found is not None and found not in devices
        return False

    async def _send(
        self, event_type: str, user: str, devices: Iterable[str], content: dict[str, Any]
    ) -> None:
        targets = {d: content for d in devices}
        if not targets:
            return
        await self.outbox.send(event_type, {user: targets})

    async def _send_cancel(
        self, txn: str, user: str, devices: Sequence[str], code: CancelCode, *, limited: bool
    ) -> bool:
        if limited:
            devices = [d for d in devices if self._limiter.allow(Party(UserId(user), DeviceId(d)))]
            if not devices:
                log.info(
                    "cancel %s for %s not sent: error reply cap reached for %s", code, txn, user
                )
                return False
        content = {"transaction_id": txn, "code": str(code), "reason": _REASONS.get(code, "")}
        await self._send(KeyVerificationCancel.event_type, user, devices, content)
        self._m_cancels.inc(str(code), amount=len(devices))
        log.info("sent cancel %s for verification %s to %s %s", code, txn, user, list(devices))
        return True

    # ------------------------------------------------------------------ the engine

    async def _feed(self, t: _Txn, inp: Input, ctx: _Ctx) -> bool:
        """Run one transition and its actions. False when the table refused a local step."""
        before = t.state
        outcome = transition(t.state, inp)
        t.state = outcome.next_state
        log.debug("verification %s: %s --%s--> %s", t.txn, before.value, inp.value, t.state.value)
        if before is State.NEW and t.state is not State.NEW:
            await self._begin(t)
        if t.state is State.CANCELLED and inp is Input.CANCEL:
            t.cancelled_by_us = False
            t.cancel_code = ctx.cancel_code or str(CancelCode.USER)
            t.cancel_reason = ctx.cancel_reason
        elif t.state is State.CANCELLED and before is not State.CANCELLED:
            t.cancel_code = str(_implied_code(inp))
            t.cancel_reason = _REASONS.get(t.cancel_code, "")
        if t.txn in self._timers:
            self._timers.touch(t.txn)
        refused = False
        follow_up: Input | None = None
        for action in outcome.actions:
            try:
                result = await self._perform(t, action, ctx)
            except SasError as exc:
                follow_up = exc.input
                break
            if result is False:
                refused = True
        if before not in TERMINAL_STATES and t.state in TERMINAL_STATES:
            await self._end(t)
        if follow_up is not None and t.state not in TERMINAL_STATES:
            await self._feed(t, follow_up, ctx)
        return not refused

    async def _begin(self, t: _Txn) -> None:
        self._txns[t.txn] = t
        t.finished = asyncio.get_running_loop().create_future()
        self._timers.begin(t.txn, lapse_in=t.lapse)
        # The overall deadline: what a restart must honour (the request lapse is shorter).
        deadline = self.clock() + VERIFICATION_TIMEOUT
        devices = (t.peer_device,) if t.peer_device is not None else t.recipients
        await self._persist(t.txn, t.peer_user, devices, deadline)
        self._emit(
            VerificationRequested(t.txn, t.peer_user, t.peer_device, incoming=not t.initiated_by_us)
        )

    async def _persist(self, txn: str, user: str, devices: Sequence[str], deadline: float) -> None:
        if self.store is None:
            return
        try:
            async with self.store.transaction() as conn:
                for device in devices:
                    await conn.execute(
                        "INSERT OR REPLACE INTO verification_inflight "
                        "(txn, user_id, device_id, deadline) VALUES (?, ?, ?, ?)",
                        (txn, user, device, deadline),
                    )
        except Exception:
            log.exception("could not persist verification %s", txn)

    async def _unpersist(self, txn: str) -> None:
        if self.store is None:
            return
        try:
            async with self.store.transaction() as conn:
                await conn.execute("DELETE FROM verification_inflight WHERE txn = ?", (txn,))
        except Exception:
            log.exception("could not forget verification %s", txn)

    async def _end(self, t: _Txn) -> None:
        self._timers.finish(t.txn)
        self._attempts.end(t.txn)
        result: VerificationDone | VerificationCancelled
        if t.state is State.DONE:
            assert t.peer_device is not None
            verified = t.sas.verified_keys if t.sas is not None else ()
            result = VerificationDone(t.txn, t.peer_user, t.peer_device, verified)
            self._m_total.inc("done", "")
            log.info("verification %s with %s %s done", t.txn, t.peer_user, t.peer_device)
        else:
            code = t.cancel_code or str(CancelCode.USER)
            result = VerificationCancelled(
                t.txn, t.peer_user, t.peer_device, code, t.cancel_reason, t.cancelled_by_us
            )
            self._m_total.inc("cancelled", code)
            log.info(
                "verification %s with %s cancelled (%s, by %s)",
                t.txn,
                t.peer_user,
                code,
                "us" if t.cancelled_by_us else "them",
            )
        if t.finished is not None and not t.finished.done():
            t.finished.set_result(result)
        self._emit(result)
        await self._unpersist(t.txn)

    async def _perform(self, t: _Txn, action: object, ctx: _Ctx) -> bool | None:
        txn = t.txn
        if isinstance(action, SendRequest):
            us = self._us()
            content = {
                "from_device": us.device_id,
                "methods": list(SUPPORTED_METHODS),
                "timestamp": int(self.clock() * 1000),
                "transaction_id": txn,
            }
            await self._send(KeyVerificationRequest.event_type, t.peer_user, t.recipients, content)
        elif isinstance(action, SendReady):
            assert t.peer_device is not None
            self._timers.clear_lapse(txn)
            content = {
                "from_device": self._us().device_id,
                "methods": list(SUPPORTED_METHODS),
                "transaction_id": txn,
            }
            await self._send(KeyVerificationReady.event_type, t.peer_user, [t.peer_device], content)
        elif isinstance(action, SendStart):
            sas = self._sas(t, we_started=True)
            t.our_start_method = METHOD_SAS
            await self._to_peer(t, KeyVerificationStart.event_type, sas.start_content())
        elif isinstance(action, SendAccept):
            sas = self._sas(t, we_started=False)
            assert t.their_start is not None
            content = sas.accept(t.their_start)  # SasError: fed by _feed
            await self._to_peer(t, KeyVerificationAccept.event_type, content)
        elif isinstance(action, SendKey):
            assert t.sas is not None
            await self._to_peer(t, KeyVerificationKey.event_type, t.sas.our_key_event_content())
        elif isinstance(action, ShowSas):
            self._show_sas(t)
        elif isinstance(action, SendMac):
            assert t.sas is not None
            _user, device, ed = self.keys.own()
            content = t.sas.mac_content({f"ed25519:{device}": ed})
            await self._to_peer(t, KeyVerificationMac.event_type, content)
        elif isinstance(action, MarkVerified):
            assert t.peer_device is not None
            ok = await self.keys.mark_verified(t.peer_user, t.peer_device)
            if not ok:
                log.error(
                    "could not mark %s %s verified: unknown device", t.peer_user, t.peer_device
                )
        elif isinstance(action, SendDone):
            await self._to_peer(t, KeyVerificationDone.event_type, {"transaction_id": txn})
        elif isinstance(action, SendCancel):
            t.cancel_code = str(action.code)
            t.cancel_reason = _REASONS.get(action.code, "")
            t.cancelled_by_us = True
            devices: Sequence[str]
            devices = [t.peer_device] if t.peer_device is not None else list(t.recipients)
            await self._send_cancel(txn, t.peer_user, devices, action.code, limited=ctx.inbound)
        elif isinstance(action, ReplyCancel):
            if ctx.sender is None:
                return None
            device = ctx.sender_device or DeviceId("*")
            await self._send_cancel(txn, ctx.sender, [device], action.code, limited=ctx.inbound)
        elif isinstance(action, NotifyOthers):
            answered = t.peer_device or ctx.sender_device
            if answered is None or answered == "*":
                # We cannot tell which recipient answered (a plaintext cancel names no device):
                # notify nobody rather than risk answering the canceller.
                log.info("verification %s: answering device unknown; no %s sent", txn, action.code)
                return None
            others = accepted_notice_targets(t.recipients, answered)
            if others:
                await self._send_cancel(txn, t.peer_user, others, action.code, limited=False)
        elif isinstance(action, Ignore):
            log.debug("verification %s: ignored (%s)", txn, action.reason)
        elif isinstance(action, RejectLocal):
            log.info("verification %s: local step refused (%s)", txn, action.reason)
            return False
        return None

    def _sas(self, t: _Txn, *, we_started: bool) -> SasSession:
        if t.sas is None:
            assert t.peer_device is not None
            t.sas = SasSession(
                transaction_id=t.txn,
                us=self._us(),
                them=Party(t.peer_user, t.peer_device),
                we_started=we_started,
            )
        return t.sas

    async def _to_peer(self, t: _Txn, event_type: str, content: dict[str, Any]) -> None:
        assert t.peer_device is not None
        await self._send(event_type, t.peer_user, [t.peer_device], content)

    def _show_sas(self, t: _Txn) -> None:
        assert t.sas is not None and t.sas.agreement is not None and t.peer_device is not None
        methods = t.sas.agreement.short_authentication_string
        t.emoji = (
            tuple((e.emoji, e.description) for e in t.sas.emoji()) if SAS_EMOJI in methods else ()
        )
        t.decimals = t.sas.decimals() if SAS_DECIMAL in methods else None
        self._emit(SasReady(t.txn, t.peer_user, t.peer_device, t.emoji, t.decimals))
        confirm = self.policy.confirm
        if confirm is None:
            log.info("verification %s: SAS shown, waiting for the operator", t.txn)
            return
        prompt = SasPrompt(t.txn, t.peer_user, t.peer_device, t.emoji, t.decimals)
        self._spawn(self._ask(confirm, prompt), f"confirm {t.txn}")

    async def _ask(self, confirm: ConfirmCallback, prompt: SasPrompt) -> None:
        try:
            ok = await confirm(prompt)
            inp = Input.LOCAL_CONFIRM if ok else Input.LOCAL_MISMATCH
        except Exception:
            log.exception("verification %s: confirm callback failed", prompt.transaction_id)
            inp = Input.LOCAL_CANCEL
        txn = TransactionId(prompt.transaction_id)
        async with self._lock(txn):
            t = self._txns.get(txn)
            if t is not None and t.state not in TERMINAL_STATES:
                await self._feed(t, inp, _Ctx())

    # ------------------------------------------------------------------ inbound events

    def _ctx(self, event: ToDeviceEvent, t: _Txn | None, **kw: Any) -> _Ctx:
        return _Ctx(UserId(event.sender), self._reply_device(event, t), inbound=True, **kw)

    async def _new_attempt(self, event: KeyVerificationRequest | KeyVerificationStart) -> bool:
        """Checks for a request/start with an unknown id: policy, concurrent attempts, keys.

        Returns True when the new transaction may be created (keys known).
        """
        txn = TransactionId(event.transaction_id or "")
        peer = Party(UserId(event.sender), DeviceId(event.from_device))
        ctx = self._ctx(event, None)
        probe = _Txn(txn, peer.user_id, peer.device_id, False)
        if peer == self._us():
            return False
        if not self.policy.allows(event.sender):
            log.info("refusing verification %s from %s: not allowed", txn, event.sender)
            await self._feed(probe, Input.LOCAL_CANCEL, ctx)
            return False
        cooling = self._cooldown.get(peer)
        if cooling is not None and self.clock() < cooling:
            log.info("verification %s: %s %s is flooding; refusing", txn, *peer)
            await self._feed(probe, Input.CONCURRENT_ATTEMPT, ctx)
            return False
        others = self._attempts.begin(peer, txn)
        if others:
            self._cooldown[peer] = self.clock() + self.policy.attempt_cooldown
            while len(self._cooldown) > _RAW_STARTS_KEPT:
                self._cooldown.popitem(last=False)
            log.warning(
                "verification %s: %s %s has other attempts %s: cancelling all",
                txn,
                peer.user_id,
                peer.device_id,
                list(others),
            )
            for other in others:
                async with self._lock(other):
                    o = self._txns.get(other)
                    if o is not None and o.state not in TERMINAL_STATES:
                        await self._feed(o, Input.CONCURRENT_ATTEMPT, ctx)
                    self._attempts.end(other)
            await self._feed(probe, Input.CONCURRENT_ATTEMPT, ctx)
            return False
        ed = await self._ensure_keys(peer.user_id, peer.device_id)
        if txn not in self._attempts.live(peer):
            # Cancelled while held: another attempt from the same device came meanwhile.
            await self._feed(probe, Input.CONCURRENT_ATTEMPT, ctx)
            return False
        if ed is None:
            log.warning(
                "verification %s: keys of %s %s unknown; refusing",
                txn,
                peer.user_id,
                peer.device_id,
            )
            self._attempts.end(txn)
            await self._feed(probe, Input.LOCAL_CANCEL, ctx)
            return False
        return True

    def _classify_common(self, event: ToDeviceEvent, t: _Txn) -> Input | None:
        """WRONG_USER / OTHER_DEVICE / DUPLICATE, or None to go on."""
        if event.sender != t.peer_user:
            return Input.WRONG_USER
        if self._sender_is_other_device(event, t):
            return Input.OTHER_DEVICE
        if _fingerprint(event) in t.seen:
            return Input.DUPLICATE
        return None

    async def _on_request(self, event: KeyVerificationRequest) -> None:
        txn = TransactionId(event.transaction_id or "")
        if not request_is_fresh(event.timestamp, self.clock()):
            log.info("ignoring stale or future verification request %s from %s", txn, event.sender)
            return
        if txn not in self._txns:
            if not await self._new_attempt(event):
                return
            async with self._lock(txn):
                if txn not in self._txns:
                    await self._create_incoming(event, txn)
                    return
        async with self._lock(txn):
            t = self._txns[txn]
            inp = self._classify_common(event, t) or Input.REQUEST
            await self._feed_event(t, inp, event)

    async def _create_incoming(self, event: KeyVerificationRequest, txn: TransactionId) -> None:
        peer_device = DeviceId(event.from_device)
        t = _Txn(txn, UserId(event.sender), peer_device, False)
        t.peer_ed25519 = self.keys.device_ed25519(event.sender, peer_device)
        t.lapse = request_prompt_lapse(event.timestamp, self.clock())
        t.seen.add(_fingerprint(event))
        ctx = self._ctx(event, t)
        await self._feed(t, Input.REQUEST, ctx)
        if not common_verification_methods(event.methods):
            log.info("verification %s: no common method in %s", txn, list(event.methods))
            await self._feed(t, Input.LOCAL_CANCEL, ctx)
            return
        if self.policy.auto_accept:
            await self._feed(t, Input.LOCAL_READY, _Ctx())

    async def _feed_event(self, t: _Txn, inp: Input, event: ToDeviceEvent, **kw: Any) -> None:
        ctx = self._ctx(event, t, **kw)
        if inp not in (Input.WRONG_USER, Input.OTHER_DEVICE, Input.DUPLICATE):
            t.seen.add(_fingerprint(event))
        await self._feed(t, inp, ctx)

    async def _unknown(self, event: ToDeviceEvent, inp: Input) -> None:
        """An event for a transaction we do not know (the table's NEW row)."""
        txn = TransactionId(getattr(event, "transaction_id", None) or "")
        probe = _Txn(txn, UserId(event.sender), None, False)
        await self._feed(probe, inp, self._ctx(event, None))

    async def _on_ready(self, event: KeyVerificationReady) -> None:
        txn = TransactionId(event.transaction_id or "")
        async with self._lock(txn):
            t = self._txns.get(txn)
            if t is None:
                await self._unknown(event, Input.READY)
                return
            inp = self._classify_common(event, t)
            if inp is None:
                if t.state is State.REQUESTED_OUT and not common_verification_methods(
                    event.methods
                ):
                    inp = Input.UNKNOWN_METHOD
                else:
                    inp = Input.READY
            if inp is Input.READY and t.state is State.REQUESTED_OUT:
                t.peer_device = DeviceId(event.from_device)
                t.peer_ed25519 = self.keys.device_ed25519(t.peer_user, t.peer_device)
            await self._feed_event(t, inp, event)
            if (
                inp is Input.READY
                and t.state is State.READY
                and t.initiated_by_us
                and self.policy.start_as_requester
            ):
                await self._feed(t, Input.LOCAL_START, _Ctx())

    def _raw_start(self, event: KeyVerificationStart) -> dict[str, Any]:
        """The start's content as received (the commitment covers every field)."""
        decoded = encode_content(event)
        raw = self._raw_starts.pop((event.sender, event.transaction_id or ""), None)
        if raw is not None and all(raw.get(k) == v for k, v in _jsonable(decoded).items()):
            return raw
        return decoded

    def remember_raw_start(self, sender: str, content: Mapping[str, Any]) -> None:
        """Keep a start's raw content (see :meth:`watch`), bounded."""
        txn = content.get("transaction_id")
        if not isinstance(txn, str):
            return
        self._raw_starts[(sender, txn)] = dict(content)
        while len(self._raw_starts) > _RAW_STARTS_KEPT:
            self._raw_starts.popitem(last=False)

    async def _on_start(self, event: KeyVerificationStart) -> None:
        txn = TransactionId(event.transaction_id or "")
        content = self._raw_start(event)
        acceptable = False
        if isinstance(event, KeyVerificationStartSas):
            try:
                acceptable = negotiate_start(offer_from_start(content)) is not None
            except SasError:
                acceptable = False
        if txn not in self._txns:
            if not acceptable:
                async with self._lock(txn):
                    await self._unknown(event, Input.UNKNOWN_METHOD)
                return
            if not await self._new_attempt(event):
                return
            async with self._lock(txn):
                if txn not in self._txns:
                    peer_device = DeviceId(event.from_device)
                    t = _Txn(txn, UserId(event.sender), peer_device, False)
                    t.peer_ed25519 = self.keys.device_ed25519(event.sender, peer_device)
                    t.their_start = content
                    t.seen.add(_fingerprint(event))
                    await self._feed(t, Input.START, self._ctx(event, t))
                    return
        async with self._lock(txn):
            t = self._txns[txn]
            inp = self._classify_common(event, t)
            if inp is None:
                if t.peer_device is None:
                    inp = Input.START  # before any ready: out of sequence
                else:
                    inp = classify_start(
                        t.state,
                        us=self._us(),
                        them=Party(t.peer_user, t.peer_device),
                        their_method=event.method,
                        our_method=t.our_start_method,
                        acceptable=acceptable,
                    )
            if inp in (Input.START, Input.START_THEY_WIN) and t.state in (
                State.READY,
                State.STARTED_OUT,
            ):
                t.their_start = content
                if inp is Input.START_THEY_WIN and t.sas is not None:
                    t.sas.lose_start_race()
                    t.our_start_method = None
            await self._feed_event(t, inp, event)

    async def _on_accept(self, event: KeyVerificationAccept) -> None:
        txn = TransactionId(event.transaction_id or "")
        async with self._lock(txn):
            t = self._txns.get(txn)
            if t is None:
                await self._unknown(event, Input.ACCEPT)
                return
            inp = self._classify_common(event, t)
            if inp is None:
                inp = Input.ACCEPT
                if t.state is State.STARTED_OUT and t.sas is not None:
                    try:
                        t.sas.receive_accept(encode_content(event))
                    except SasError as exc:
                        inp = exc.input
            await self._feed_event(t, inp, event)

    async def _on_key(self, event: KeyVerificationKey) -> None:
        txn = TransactionId(event.transaction_id or "")
        async with self._lock(txn):
            t = self._txns.get(txn)
            if t is None:
                await self._unknown(event, Input.KEY)
                return
            inp = self._classify_common(event, t)
            if inp is None:
                inp = Input.KEY
                expects_key = t.state in (
                    State.STARTED_IN,
                    State.LEGACY_STARTED_IN,
                    State.ACCEPTED,
                )
                if expects_key and t.sas is not None:
                    try:
                        t.sas.receive_their_key(event.key)
                    except SasError as exc:
                        inp = exc.input
            await self._feed_event(t, inp, event)

    async def _on_mac(self, event: KeyVerificationMac) -> None:
        txn = TransactionId(event.transaction_id or "")
        async with self._lock(txn):
            t = self._txns.get(txn)
            if t is None:
                await self._unknown(event, Input.MAC)
                return
            inp = self._classify_common(event, t)
            if inp is None:
                inp = Input.MAC
                if t.state in _MAC_EXPECTED and t.sas is not None:
                    inp = await self._check_mac(t, event)
            await self._feed_event(t, inp, event)

    async def _check_mac(self, t: _Txn, event: KeyVerificationMac) -> Input:
        assert t.sas is not None and t.peer_device is not None
        ed = t.peer_ed25519 or self.keys.device_ed25519(t.peer_user, t.peer_device)
        if ed is None:
            return Input.MAC_MISMATCH
        their_keys = {f"ed25519:{t.peer_device}": ed}
        if any(k != f"ed25519:{t.peer_device}" for k in event.mac):
            master = await self.keys.master_key(t.peer_user)
            if master is not None:
                their_keys[f"ed25519:{master}"] = master
            else:
                log.info("verification %s: MAC lists keys we cannot check (no master key)", t.txn)
        try:
            t.sas.verify_mac(event.mac, event.keys, their_keys)
        except SasError as exc:
            return exc.input
        except SasStateError:
            return Input.MALFORMED
        return Input.MAC

    async def _on_done(self, event: KeyVerificationDone) -> None:
        txn = TransactionId(event.transaction_id or "")
        async with self._lock(txn):
            t = self._txns.get(txn)
            if t is None:
                await self._unknown(event, Input.DONE)
                return
            inp = self._classify_common(event, t) or Input.DONE
            await self._feed_event(t, inp, event)

    async def _on_cancel(self, event: KeyVerificationCancel) -> None:
        await self._cancel_received(event, event.code, event.reason)

    async def _cancel_received(self, event: ToDeviceEvent, code: str, reason: str) -> None:
        txn = TransactionId(getattr(event, "transaction_id", None) or "")
        async with self._lock(txn):
            t = self._txns.get(txn)
            if t is None:
                return  # never answered (the table's NEW row ignores it too)
            if event.sender != t.peer_user or self._sender_is_other_device(event, t):
                inp = Input.OTHER_DEVICE  # a cancel is never answered, not even a stranger's
            else:
                inp = Input.CANCEL
            log.info("verification %s: %s cancelled with %s", txn, event.sender, code[:64])
            await self._feed_event(
                t, inp, event, cancel_code=code[:255], cancel_reason=reason[:255]
            )

    async def _on_malformed(self, event: UndecodableEvent) -> None:
        name = event.event_type_name
        if not name.startswith(_VERIFICATION_PREFIX):
            return
        txn = TransactionId(event.transaction_id or "")
        if name == KeyVerificationCancel.event_type:
            await self._cancel_received(event, str(CancelCode.USER), "malformed cancel")
            return
        async with self._lock(txn):
            t = self._txns.get(txn)
            if t is None:
                inp = _NEW_MALFORMED.get(name)
                if inp is not None and event.transaction_id is not None:
                    await self._unknown(event, inp)
                return
            if event.sender != t.peer_user:
                inp = Input.WRONG_USER
            elif self._sender_is_other_device(event, t):
                inp = Input.OTHER_DEVICE
            else:
                inp = Input.MALFORMED
            log.info("verification %s: malformed %s from %s", txn, name, event.sender)
            await self._feed_event(t, inp, event)


_VERIFICATION_PREFIX: Final = "m.key.verification."

_NEW_MALFORMED: Final[dict[str, Input]] = {
    "m.key.verification.request": Input.MALFORMED,
    "m.key.verification.start": Input.MALFORMED,
    "m.key.verification.ready": Input.READY,
    "m.key.verification.accept": Input.ACCEPT,
    "m.key.verification.key": Input.KEY,
    "m.key.verification.mac": Input.MAC,
    "m.key.verification.done": Input.DONE,
}
"""A malformed event with an unknown transaction id: the table's NEW row input ("a malformed
request or start" is MALFORMED; other types are fed as their kind)."""


def _implied_code(inp: Input) -> CancelCode:
    """The code recorded when a transition ends CANCELLED without sending (or before it sends)."""
    if inp is Input.TIMEOUT:
        return CancelCode.TIMEOUT
    return CancelCode.USER


def _jsonable(value: Any) -> Any:
    return msgspec.json.decode(msgspec.json.encode(value))


def _new_transaction_id() -> str:
    import secrets  # noqa: PLC0415

    return secrets.token_urlsafe(24)


def watch_malformed(plugin: NioPlugin, manager: VerificationManager) -> None:
    """Deprecated: use :meth:`VerificationManager.watch` (``manager.watch(plugin)``)."""
    warnings.warn(
        "watch_malformed(plugin, manager) is deprecated; use manager.watch(plugin)",
        DeprecationWarning,
        stacklevel=2,
    )
    manager.watch(plugin)
