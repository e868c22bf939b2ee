"""The verification manager: the I/O around the pure transition table.

:class:`VerificationManager` registers dispatcher handlers for the ``m.key.verification.*``
events (plaintext and Olm-decrypted ones arrive as the same typed events), turns each event, local
decision and timer into one :class:`~bot_toolkit.verification.table.Input`, asks
:func:`~bot_toolkit.verification.table.transition` what to do and performs the actions: messages go
out through the :class:`~bot_toolkit.outbox.Outbox`, SAS maths is a
:class:`~bot_toolkit.verification.sas.SasSession` per transaction, and a verified device is
written to nio's trust store (``client.verify_device``).

The work is split by job; this module wires the parts together and holds the public API:

* :mod:`~bot_toolkit.verification.inbound`: the dispatcher handlers (event -> input);
* :mod:`~bot_toolkit.verification.engine`: input -> table -> actions (sends, lifecycle events);
* :mod:`~bot_toolkit.verification.transactions`: the records, timers and locks per transaction;
* :mod:`~bot_toolkit.verification.peer_keys`: device and master keys, held requests;
* :mod:`~bot_toolkit.verification.persistence`: the restart-cancel table;
* :mod:`~bot_toolkit.verification.rooms`: the in-room transport (user verification in a DM);
* :mod:`~bot_toolkit.verification.user_trust`: verified users (after
  :meth:`VerificationManager.enable_user_trust`).

Both roles are supported: answering a request (ready; then either side starts) and
:meth:`VerificationManager.request_verification` (to-device, one device) or
:meth:`VerificationManager.request_user_verification` (in a room, the way Element verifies
users). A start without a request (the deprecated start-first flow) is handled as the table
says. To-device and in-room flows share the table, the SAS code, the policy and the admin API;
the in-room differences are the table's ``IN_ROOM_DIFFERENCES``.

Rules that live here rather than in the table (the table decides every cancel code):

* requests more than 10 min old or 5 min in the future are ignored;
* a request or start from a device whose keys we have not downloaded is held while the keys are
  queried (at most ``VerificationPolicy.key_query_timeout`` seconds); if they do not arrive the
  request is refused with ``m.user`` and logged;
* a request offering no method we support is not cancelled (the spec: another of the user's
  devices may support it): it stays ``requested_in`` in :meth:`VerificationManager.list_in_progress`
  (logged), is never auto-accepted nor accepted by :meth:`VerificationManager.confirm`, and
  lapses silently unless the operator refuses it with :meth:`VerificationManager.cancel`
  (``m.user``);
* a cancel is never answered; cancels caused by inbound events are capped per peer user
  (:class:`~bot_toolkit.verification.policy.ErrorReplyLimiter`);
* a malformed verification event cannot become a typed event; :meth:`VerificationManager.watch`
  makes the nio plugin dispatch such events as
  :class:`~bot_toolkit.undecodable.UndecodableEvent` (in wire order) so that a known transaction
  is cancelled with ``m.invalid_message``, and hands the manager each start's raw content (the
  SAS commitment covers every field the peer sent, also those the typed event drops).

Restart: the ephemeral SAS keys are never persisted, so a transaction cannot survive a restart.
Each live transaction's (txn, peer user, peer device, deadline) is kept in the store; on
:meth:`VerificationManager.start` every unexpired one gets ``m.key.verification.cancel``
(``m.user``, "verifier restarted") so the peer's UI does not hang; expired ones are dropped.
A transaction cancelled so stays cancelled (its id is kept, also across a further restart):
later events for it are ignored like those of any cancelled transaction, never a new flow.

Clock: one injected wall clock (``time.time`` by default) drives request freshness, timeouts and
the deadlines shown to the admin API and persisted across restarts.

Metrics: ``verifications_total{outcome,code}`` (outcome ``done`` / ``cancelled``; code empty for
done, ``other`` for a code that is not a known ``CancelCode``: peers choose their codes) and
``verification_cancels_sent_total{code}``; ``verification_lifecycle_dropped_total`` counts
lifecycle events a full dispatcher refused, ``verification_task_errors_total`` background
tasks (confirmations, trust refreshes) that failed (logged with the transaction id or users).
:attr:`VerificationManager.idle` / :meth:`VerificationManager.join` tell when none runs.

Logs: each module logs under its own name, ``bot_toolkit.verification.<module>``.

Nothing secret is logged: no SAS bytes, no MACs, no keys' private parts (they never leave
vodozemac anyway). Transaction ids are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from .._types import DeviceId, TransactionId, UserId
from ..dispatcher import Dispatcher
from ..events import (
    KeyVerificationCancel,
    ToDeviceEvent,
)
from ..metrics import Metrics
from .engine import Engine, OutboxLike
from .inbound import Inbound
from .info import VerificationInfo
from .lifecycle import (
    VerificationCancelled,
    VerificationDone,
)
from .negotiation import SUPPORTED_METHODS
from .peer_keys import KeySource, NioDeviceTrust, NioKeySource, PeerKeys
from .persistence import RESTART_REASON, InflightStore, StoreLike
from .policy import (
    TRANSACTION_IDLE_TIMEOUT,
    AttemptTracker,
    VerificationPolicy,
)
from .rooms import NioRooms, RoomSender, request_content, room_content
from .table import (
    TERMINAL_STATES,
    CancelCode,
    Input,
    State,
)
from .transactions import Ctx, Transactions, Txn
from .user_trust import CrossSigner, DeviceTrustStore, KeysQuery, UserTrust

if TYPE_CHECKING:
    from ..nio_plugin import NioPlugin

__all__ = [
    "OutboxLike",
    "VerificationManager",
]

log = logging.getLogger("bot_toolkit.verification.manager")

_CONFIRMABLE: Final = frozenset(
    {
        State.KEYS_EXCHANGED,
        State.MAC_RECEIVED,
        State.LEGACY_KEYS_EXCHANGED,
        State.LEGACY_MAC_RECEIVED,
    }
)


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
        rooms: RoomSender | None = None,
        encrypt_room_events: bool = True,
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
        self._txns = Transactions(clock, verification_timeout=policy.timeout)
        self._inflight = InflightStore(store)
        self._peer_keys = PeerKeys(key_source, query_timeout=policy.key_query_timeout)
        self._attempts = AttemptTracker()
        self._nio_rooms: NioRooms | None = None
        self._sync_callback: Callable[[Any], Awaitable[None]] | None = None
        if rooms is None and client is not None:
            self._nio_rooms = rooms = NioRooms(
                client, dispatcher, self.metrics, encrypt=encrypt_room_events
            )
        self.rooms = rooms
        self._engine = Engine(
            dispatcher,
            outbox,
            key_source,
            policy,
            self.metrics,
            clock,
            self._txns,
            self._inflight,
            self._attempts,
            rooms=rooms,
        )
        self._inbound = Inbound(
            self._engine, key_source, self._peer_keys, policy, self._txns, self._attempts
        )
        self._inbound.register(dispatcher)
        self._timer_task: asyncio.Task[None] | None = None
        self._closed = False
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
        self._inbound.decoded(event, raw)

    def remember_raw_start(self, sender: str, content: Mapping[str, Any]) -> None:
        """Keep a start's raw content (see :meth:`watch`), bounded."""
        self._inbound.remember_raw_start(sender, content)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        """Send restart cancels for transactions left by a previous run; start the timer.

        Returns how many peer devices were sent a restart cancel.
        """
        sent = 0
        left_over = await self._inflight.restart_cancels(self.clock())
        # A transaction of this run (begun before start) is not left over.
        left_over = {txn: m for txn, m in left_over.items() if txn not in self._txns}
        for txn, messages in left_over.items():
            log.info("cancelling verification %s left by a restart", txn)
            await self.outbox.send(KeyVerificationCancel.event_type, messages)
            count = sum(len(devices) for devices in messages.values())
            self._engine.m_cancels.inc(str(CancelCode.USER), amount=count)
            sent += count
        # Only the rows dealt with: a transaction this run began meanwhile keeps its row. The
        # ids cancelled stay cancelled (here and across a further restart): a late start or
        # ready of the peer must not begin a new flow with the same id.
        now = self.clock()
        cancelled = await self._inflight.cancelled(now)
        for txn, messages in left_over.items():
            cancelled[txn] = next(iter(messages))
        await self._inflight.mark_cancelled(
            {txn: cancelled[txn] for txn in left_over}, now + TRANSACTION_IDLE_TIMEOUT
        )
        for txn, user in cancelled.items():
            self._txns.cancelled_earlier(TransactionId(txn), UserId(user), RESTART_REASON)
        sent += await self._cancel_room_flows_left_over()
        if self._nio_rooms is not None:
            self._nio_rooms.attach()
        if self._timer_task is None and self.tick > 0:
            self._timer_task = asyncio.get_running_loop().create_task(
                self._timer_loop(), name="bot_toolkit.verification.timers"
            )
        return sent

    async def _cancel_room_flows_left_over(self) -> int:
        """In-room flows left by the last run: one cancel (``m.user``, "verifier restarted")
        into each flow's room, so the peer's Element does not wait; a flow id is an event id,
        never reused, so nothing else needs remembering. Returns how many were sent."""
        left = await self._inflight.room_restart_cancels(self.clock())
        left = {txn: v for txn, v in left.items() if txn not in self._txns}
        sent = 0
        for txn, (room_id, user) in sorted(left.items()):
            if self.rooms is None:
                break
            content = {"transaction_id": txn, "code": str(CancelCode.USER)}
            content["reason"] = RESTART_REASON
            try:
                await self.rooms.send(
                    room_id, KeyVerificationCancel.event_type, room_content(content, txn)
                )
            except Exception as exc:
                log.warning("verification %s: restart cancel not sent: %s", txn, str(exc)[:200])
                continue
            log.info("cancelled verification %s with %s left by a restart", txn, user)
            self._engine.m_cancels.inc(str(CancelCode.USER))
            sent += 1
        await self._inflight.forget(left)
        return sent

    async def close(self) -> None:
        """Stop the timer and the confirmation tasks. Live transactions stay persisted."""
        self._closed = True
        if self._nio_rooms is not None:
            self._nio_rooms.detach()
        if self._sync_callback is not None:
            cb = self._sync_callback
            self._sync_callback = None
            # nio has no remove_response_callback: drop ours from its list.
            self.client.response_callbacks = [
                c for c in self.client.response_callbacks if getattr(c, "func", None) is not cb
            ]
        for unwatch in self._unwatch:
            unwatch()
        self._unwatch.clear()
        timer, self._timer_task = self._timer_task, None
        if timer is not None:
            timer.cancel()
        await self._engine.tasks.cancel()
        if timer is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await timer

    @property
    def idle(self) -> bool:
        """``True`` while no background work of the manager runs: no confirmation callback
        (``VerificationPolicy.confirm``) is being awaited or acted on, no trust refresh runs.

        Verification events themselves are handled by the dispatcher's handlers: a test that
        wants "nothing more will happen" waits for both (see :meth:`join`). The timeout timer
        is not background work (it always runs).
        """
        return not self._engine.tasks

    async def join(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until :attr:`idle`: the background work running now, and any it starts, has
        finished (a failure is logged and counted, not raised).

        Returns ``True`` once idle (at once if it already is), ``False`` if work still runs
        after ``timeout`` seconds (``None``: no limit; nothing is cancelled). Like
        :meth:`Dispatcher.join <bot_toolkit.dispatcher.Dispatcher.join>`, which covers the
        handlers: the two feed each other (a handled event starts a confirmation, whose answer
        is sent and becomes the peer's event), so settle them together by joining each in turn
        until both are idle at once.
        """
        return await self._engine.tasks.join(timeout)

    async def _timer_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                await self.check_timeouts()
            except Exception:
                log.exception("verification timer check failed")

    async def check_timeouts(self) -> None:
        """Feed ``TIMEOUT`` to every live transaction past its deadline; forget old ids."""
        for txn in self._txns.timed_out():
            async with self._lock(txn):
                t = self._txns.get(txn)
                if t is not None and t.state not in TERMINAL_STATES:
                    log.info("verification %s timed out in state %s", txn, t.state.value)
                    await self._engine.feed(t, Input.TIMEOUT, Ctx())
        self._txns.forget_expired()

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
        if user_id == us_user and device_id not in self.policy.own_devices:
            raise ValueError(f"own device {device_id} is not in the policy's own_devices")
        ed = await self._peer_keys.ensure(user_id, device_id)
        if ed is None:
            raise LookupError(f"no device keys for {user_id} {device_id}")
        txn = TransactionId(_new_transaction_id())
        t = Txn(txn, UserId(user_id), None, True, recipients=(DeviceId(device_id),))
        t.peer_ed25519 = ed
        async with self._lock(txn):
            await self._engine.feed(t, Input.LOCAL_REQUEST, Ctx())
        return txn

    async def enable_user_trust(
        self,
        signer: CrossSigner,
        query: KeysQuery,
        devices: DeviceTrustStore | None = None,
    ) -> UserTrust:
        """Take part in user verification with the bot's cross-signing identity ``signer``.

        From then on our MACs cover our master key, a verified peer's master key is signed and
        uploaded, their cross-signed devices are trusted, and identity changes are noticed (see
        :mod:`~bot_toolkit.verification.user_trust`). ``query`` is a raw ``/keys/query``;
        ``devices`` defaults to nio's trust store for the manager's client. Verified users'
        device lists are re-checked after each sync that lists them as changed (a nio response
        callback for ``sync_forever``; a bot with its own sync loop calls
        :meth:`device_lists_changed`).
        """
        if devices is None:
            if self.client is None:
                raise ValueError("give devices (a DeviceTrustStore) without a nio client")
            devices = NioDeviceTrust(self.client, self._peer_keys)
        trust = UserTrust(signer, query, devices, self.store, self._engine.emit, self.metrics)
        await trust.start()
        self._engine.user_trust = trust
        if self.client is not None and self._sync_callback is None:
            from nio import SyncResponse  # noqa: PLC0415

            async def on_sync(response: Any) -> None:
                changed = getattr(getattr(response, "device_list", None), "changed", None)
                log.debug("device lists changed: %s", changed)
                if changed:
                    self.device_lists_changed(changed)

            self._sync_callback = on_sync
            self.client.add_response_callback(on_sync, SyncResponse)
        return trust

    def device_lists_changed(self, user_ids: Sequence[str]) -> None:
        """Users whose devices changed (a sync's ``device_lists.changed``): re-check the ones
        we verified, in the background."""
        trust = self._engine.user_trust
        if trust is None:
            return
        users = [u for u in user_ids if trust.is_verified(u)]
        if users:
            self._engine.tasks.spawn(
                trust.refresh(users), "user trust refresh " + ",".join(users)[:200]
            )

    @property
    def user_trust(self) -> UserTrust | None:
        """The verified users (after :meth:`enable_user_trust`)."""
        return self._engine.user_trust

    async def request_user_verification(
        self, user_id: str, room_id: str | None = None
    ) -> TransactionId:
        """Ask ``user_id`` to verify in a room (the way Element verifies users); returns the
        flow id (the request's event id) at once.

        ``room_id``: the room to use; by default a DM with the user is reused or created
        (:meth:`~bot_toolkit.verification.rooms.RoomSender.direct_room`). Any device of the user
        may answer. Use :meth:`wait_finished` for the outcome. Raises ``RuntimeError`` without a
        room sender, :class:`~bot_toolkit.verification.rooms.RoomSendError` when the homeserver
        refuses.
        """
        if self.rooms is None:
            raise RuntimeError("in-room verification needs a room sender (a nio client)")
        us_user, us_device, _ = self.keys.own()
        if user_id == us_user:
            raise ValueError("verify our own devices with request_verification (to-device)")
        if room_id is None:
            room_id = await self.rooms.direct_room(user_id)
        content = request_content(us_device, user_id, list(SUPPORTED_METHODS))
        # The request's event id is the flow id: the flow is registered as soon as it is
        # known, with the room handler waiting on the lock for events of unknown flows.
        async with self._inbound.room_request_lock:
            event_id = await self.rooms.send(room_id, "m.room.message", content)
            txn = TransactionId(event_id)
            t = Txn(txn, UserId(user_id), None, True, room_id=room_id)
            async with self._lock(txn):
                await self._engine.feed(t, Input.LOCAL_REQUEST, Ctx())
        log.info("verification %s: requested %s in %s", txn, user_id, room_id)
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
        return self._txns.in_progress()

    async def confirm(self, verification_id: str) -> bool:
        """Operator: the SAS matches (or: accept a pending request). False when not possible
        (also for a request offering no method we support)."""
        txn = TransactionId(verification_id)
        async with self._lock(txn):
            t = self._live(txn)
            if t.state is State.REQUESTED_IN:
                if t.no_common_method:
                    log.info("verification %s: no supported method; cannot accept", txn)
                    return False
                return await self._engine.feed(t, Input.LOCAL_READY, Ctx())
            if t.state in _CONFIRMABLE:
                return await self._engine.feed(t, Input.LOCAL_CONFIRM, Ctx())
            return False

    async def start_sas(self, verification_id: str) -> bool:
        """Send our SAS start in a ready transaction (either side may start)."""
        txn = TransactionId(verification_id)
        async with self._lock(txn):
            return await self._engine.feed(self._live(txn), Input.LOCAL_START, Ctx())

    async def mismatch(self, verification_id: str) -> bool:
        """Operator: the SAS does not match (``m.mismatched_sas``)."""
        txn = TransactionId(verification_id)
        async with self._lock(txn):
            return await self._engine.feed(self._live(txn), Input.LOCAL_MISMATCH, Ctx())

    async def cancel(self, verification_id: str) -> bool:
        """Operator: cancel with ``m.user``. ``KeyError`` for an unknown id."""
        txn = TransactionId(verification_id)
        async with self._lock(txn):
            t = self._txns.get(txn)
            if t is None or t.state is State.NEW:
                raise KeyError(verification_id)
            if t.state in TERMINAL_STATES:
                return False
            return await self._engine.feed(t, Input.LOCAL_CANCEL, Ctx())

    def _live(self, txn: TransactionId) -> Txn:
        return self._txns.live(txn)

    # ------------------------------------------------------------------ helpers

    def _lock(self, txn: str) -> asyncio.Lock:
        return self._txns.lock(txn)


def _new_transaction_id() -> str:
    import secrets  # noqa: PLC0415

    return secrets.token_urlsafe(24)
