"""Runs one transaction's transitions: feeds an input to the table and performs the actions.

:class:`Engine` is the only caller of :func:`~bot_toolkit.verification.table.transition`. For each
action of the outcome it sends through the outbox (cancels capped per peer user by the
:class:`~bot_toolkit.verification.policy.ErrorReplyLimiter` when an inbound event caused them),
runs the SAS maths of the transaction's :class:`~bot_toolkit.verification.sas.SasSession`,
writes the trust store, asks the policy's ``confirm`` callback, and puts the lifecycle events into
the dispatcher. A :class:`~bot_toolkit.verification.errors.SasError` raised by an action is fed
back as its input. Transactions that begin are registered and persisted; those that end are
recorded in the metrics and forgotten by the restart table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

from .._tasks import TaskSet
from .._types import DeviceId, TransactionId
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
)
from ..metrics import Metrics
from .errors import SasError
from .lifecycle import (
    SasPrompt,
    SasReady,
    VerificationCancelled,
    VerificationDone,
    VerificationRequested,
)
from .negotiation import METHOD_SAS, SAS_DECIMAL, SAS_EMOJI, SUPPORTED_METHODS
from .peer_keys import KeySource
from .persistence import InflightStore
from .policy import (
    AttemptTracker,
    ConfirmCallback,
    ErrorReplyLimiter,
    VerificationPolicy,
    accepted_notice_targets,
)
from .rooms import RoomSender, room_content
from .sas import SasSession
from .table import (
    TERMINAL_STATES,
    CancelCode,
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
    transition,
)
from .transactions import Ctx, Transactions, Txn
from .user_trust import UserTrust

__all__ = ["MARK_FAILED_REASON", "REASONS", "Engine", "OutboxLike", "code_label"]

log = logging.getLogger("bot_toolkit.verification.engine")

REASONS: Final[dict[str, str]] = {
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

"""The ``reason`` sent with each cancel code."""

MARK_FAILED_REASON: Final = "could not record the device as verified"
"""The reason of the ``m.user`` cancel sent when the trust store refuses to mark the peer's
device verified (e.g. nio no longer knows the device). ``m.user`` rather than
``m.key_mismatch``: the peer's keys did match; the failure is ours, and a key mismatch would
wrongly suggest an attack to the peer's user."""


class OutboxLike(Protocol):
    """What the manager needs of the :class:`~bot_toolkit.outbox.Outbox`."""

    async def send(
        self, event_type: str, messages: Mapping[str, Mapping[str, Mapping[str, Any]]]
    ) -> list[str]: ...


class Engine:
    """Transitions and their actions for the manager; see the module docs."""

    def __init__(  # noqa: PLR0917
        self,
        dispatcher: Dispatcher,
        outbox: OutboxLike,
        keys: KeySource,
        policy: VerificationPolicy,
        metrics: Metrics,
        clock: Callable[[], float],
        txns: Transactions,
        inflight: InflightStore,
        attempts: AttemptTracker,
        *,
        rooms: RoomSender | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.rooms = rooms
        """Sends the events of in-room flows (``None``: to-device only)."""
        self.user_trust: UserTrust | None = None
        """The bot's cross-signing side (our master key in MACs, signing verified users)."""
        self.outbox = outbox
        self.keys = keys
        self.policy = policy
        self.clock = clock
        self._txns = txns
        self._inflight = inflight
        self._attempts = attempts
        self._limiter = ErrorReplyLimiter(
            limit=max(1, policy.max_error_replies), window=policy.error_window, clock=clock
        )
        self._m_total = metrics.counter(
            "verifications_total", "Verifications finished", ["outcome", "code"]
        )
        self.m_cancels = metrics.counter(
            "verification_cancels_sent_total", "m.key.verification.cancel messages sent", ["code"]
        )
        self._m_task_errors = metrics.counter(
            "verification_task_errors_total", "Background verification tasks that failed"
        )
        self._m_dropped = metrics.counter(
            "verification_lifecycle_dropped_total",
            "Lifecycle events a full dispatcher refused",
            ["event"],
        )
        self.tasks = TaskSet(log, "verification", lambda _exc: self._m_task_errors.inc())
        """Running confirmation callbacks and trust refreshes (cancelled by the manager's
        ``close``); a failure is logged with the task's name (it holds the transaction id)
        and counted in ``verification_task_errors_total``."""

    def us(self) -> Party:
        """Our user and device."""
        user, device, _ = self.keys.own()
        return Party(user, device)

    def emit(self, event: object) -> None:
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

    async def send(
        self, event_type: str, user: str, devices: Iterable[str], content: dict[str, Any]
    ) -> None:
        targets = {d: content for d in devices}
        if not targets:
            return
        await self.outbox.send(event_type, {user: targets})

    async def send_cancel(
        self,
        txn: str,
        user: str,
        devices: Sequence[str],
        code: CancelCode,
        *,
        limited: bool,
        reason: str | None = None,
        room_id: str | None = None,
    ) -> bool:
        if room_id is not None:
            # In a room the cancel is one event relating to the flow, whatever the devices.
            devices = list(devices[:1]) or [DeviceId("*")]
        if limited:
            # Capped per user: the device ids (from_device) are the sender's choice.
            devices = [d for d in devices if self._limiter.allow(user)]
            if not devices:
                log.info(
                    "cancel %s for %s not sent: error reply cap reached for %s", code, txn, user
                )
                return False
        reason = REASONS.get(code, "") if reason is None else reason
        content = {"transaction_id": txn, "code": str(code), "reason": reason}
        if room_id is not None:
            await self._room_send(room_id, txn, KeyVerificationCancel.event_type, content)
        else:
            await self.send(KeyVerificationCancel.event_type, user, devices, content)
        self.m_cancels.inc(str(code), amount=len(devices))
        log.info("sent cancel %s for verification %s to %s %s", code, txn, user, list(devices))
        return True

    async def feed(self, t: Txn, inp: Input, ctx: Ctx) -> bool:
        """Run one transition and its actions. False when the table refused a local step.

        Whatever happens to the actions, a transaction that reached a terminal state is ended
        (outcome, lifecycle event, metrics, restart row, timers, attempts). If an action of a
        transition into a live state raises (the outbox is closed, the task is cancelled...),
        the transaction is cancelled (``LOCAL_CANCEL``, best effort) and ended, and the error
        propagates. If the trust store refuses to mark the device verified, the transaction
        is cancelled with ``m.user`` instead of finishing (see :meth:`_perform`).
        """
        before = t.state
        outcome = transition(t.state, inp, t.transport)
        t.state = outcome.next_state
        log.debug("verification %s: %s --%s--> %s", t.txn, before.value, inp.value, t.state.value)
        refused = False
        follow_up: Input | None = None
        mark_failed = False
        try:
            if before is State.NEW and t.state is not State.NEW:
                await self._begin(t)
            if t.state is State.CANCELLED and inp is Input.CANCEL:
                t.cancelled_by_us = False
                t.cancel_code = ctx.cancel_code or str(CancelCode.USER)
                t.cancel_reason = ctx.cancel_reason
            elif t.state is State.CANCELLED and before is not State.CANCELLED:
                t.cancel_code = str(_implied_code(inp))
                t.cancel_reason = REASONS.get(t.cancel_code, "")
            self._txns.touch(t.txn)
            for action in outcome.actions:
                try:
                    result = await self._perform(t, action, ctx)
                except SasError as exc:
                    follow_up = exc.input
                    break
                except _MarkFailedError:
                    # Not verified after all: the transition cannot complete. Back to the state
                    # it left (still live), then cancel from there, below.
                    t.state = before
                    mark_failed = True
                    break
                if result is False:
                    refused = True
        except BaseException:
            if t.state is not State.NEW and t.state not in TERMINAL_STATES:
                await self._abort(t, "an action failed")
            raise
        finally:
            if before not in TERMINAL_STATES and t.state in TERMINAL_STATES:
                await self._end(t)
        if mark_failed:
            t.local_reason = MARK_FAILED_REASON
            await self.feed(t, Input.LOCAL_CANCEL, Ctx())
            return False
        if follow_up is not None and t.state not in TERMINAL_STATES:
            await self.feed(t, follow_up, ctx)
        return not refused

    async def _abort(self, t: Txn, why: str) -> None:
        """Cancel a live transaction whose action raised (best effort); it ends either way."""
        log.warning("verification %s: %s in state %s; cancelling", t.txn, why, t.state.value)
        try:
            # Bounded: the send that failed may be one that hangs (a handler timeout).
            async with asyncio.timeout(_ABORT_SEND_TIMEOUT):
                await self.feed(t, Input.LOCAL_CANCEL, Ctx())
        except Exception:
            log.exception("verification %s: could not send the cancel", t.txn)
        if t.state not in TERMINAL_STATES:  # the table always cancels on LOCAL_CANCEL
            t.state = State.CANCELLED
            t.cancel_code = str(CancelCode.USER)
            t.cancel_reason = REASONS[CancelCode.USER]
            await self._end(t)

    async def _begin(self, t: Txn) -> None:
        self._txns.begin(t)
        # The overall deadline: what a restart must honour (the request lapse is shorter).
        deadline = self.clock() + self.policy.timeout
        if t.room_id is None:
            devices = (t.peer_device,) if t.peer_device is not None else t.recipients
            await self._inflight.add(t.txn, t.peer_user, devices, deadline)
        else:
            await self._inflight.add_room(t.txn, t.room_id, t.peer_user, deadline)
        self.emit(
            VerificationRequested(
                t.txn,
                t.peer_user,
                t.peer_device,
                incoming=not t.initiated_by_us,
                room_id=t.room_id,
            )
        )

    async def _end(self, t: Txn) -> None:
        if t.ended:
            return
        t.ended = True
        self._txns.finish(t.txn)
        self._attempts.end(t.txn)
        result: VerificationDone | VerificationCancelled
        if t.state is State.DONE:
            assert t.peer_device is not None
            verified = t.sas.verified_keys if t.sas is not None else ()
            result = VerificationDone(
                t.txn, t.peer_user, t.peer_device, verified, room_id=t.room_id
            )
            self._m_total.inc("done", "")
            log.info("verification %s with %s %s done", t.txn, t.peer_user, t.peer_device)
        else:
            code = t.cancel_code or str(CancelCode.USER)
            result = VerificationCancelled(
                t.txn,
                t.peer_user,
                t.peer_device,
                code,
                t.cancel_reason,
                t.cancelled_by_us,
                room_id=t.room_id,
            )
            self._m_total.inc("cancelled", code_label(code))
            log.info(
                "verification %s with %s cancelled (%s, by %s)",
                t.txn,
                t.peer_user,
                code,
                "us" if t.cancelled_by_us else "them",
            )
        if t.finished is not None and not t.finished.done():
            t.finished.set_result(result)
        self.emit(result)
        await self._inflight.remove(t.txn)

    async def _perform(self, t: Txn, action: object, ctx: Ctx) -> bool | None:
        txn = t.txn
        if isinstance(action, SendRequest):
            if t.room_id is not None:
                # The request event was sent before the flow existed: its event id is the flow
                # id (VerificationManager.request_user_verification).
                return None
            us = self.us()
            content = {
                "from_device": us.device_id,
                "methods": list(SUPPORTED_METHODS),
                "timestamp": int(self.clock() * 1000),
                "transaction_id": txn,
            }
            await self.send(KeyVerificationRequest.event_type, t.peer_user, t.recipients, content)
        elif isinstance(action, SendReady):
            assert t.peer_device is not None
            self._txns.timers.clear_lapse(txn)
            content = {
                "from_device": self.us().device_id,
                "methods": list(SUPPORTED_METHODS),
                "transaction_id": txn,
            }
            await self._to_peer(t, KeyVerificationReady.event_type, content)
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
            ours = {f"ed25519:{device}": ed}
            master = self.user_trust.signer.master_key if self.user_trust is not None else None
            if master is not None:
                # Our identity too: the peer then trusts our master key, not just this device.
                ours[f"ed25519:{master}"] = master
            content = t.sas.mac_content(ours)
            await self._to_peer(t, KeyVerificationMac.event_type, content)
        elif isinstance(action, MarkVerified):
            assert t.peer_device is not None
            ok = await self.keys.mark_verified(t.peer_user, t.peer_device)
            if not ok:
                log.error(
                    "verification %s: could not mark %s %s verified (unknown device); cancelling",
                    txn,
                    t.peer_user,
                    t.peer_device,
                )
                raise _MarkFailedError
            await self._sign_user(t)
        elif isinstance(action, SendDone):
            await self._to_peer(t, KeyVerificationDone.event_type, {"transaction_id": txn})
        elif isinstance(action, SendCancel):
            t.cancel_code = str(action.code)
            t.cancel_reason = t.local_reason or REASONS.get(action.code, "")
            t.cancelled_by_us = True
            devices: Sequence[str]
            devices = [t.peer_device] if t.peer_device is not None else list(t.recipients)
            await self.send_cancel(
                txn,
                t.peer_user,
                devices,
                action.code,
                limited=ctx.inbound,
                reason=t.cancel_reason,
                room_id=t.room_id,
            )
        elif isinstance(action, ReplyCancel):
            if ctx.sender is None:
                return None
            device = ctx.sender_device or DeviceId("*")
            await self.send_cancel(
                txn, ctx.sender, [device], action.code, limited=ctx.inbound, room_id=ctx.room_id
            )
        elif isinstance(action, NotifyOthers):
            answered = t.peer_device or ctx.sender_device
            if answered is None or answered == "*":
                # We cannot tell which recipient answered (a plaintext cancel names no device):
                # notify nobody rather than risk answering the canceller.
                log.info("verification %s: answering device unknown; no %s sent", txn, action.code)
                return None
            others = accepted_notice_targets(t.recipients, answered)
            if others:
                await self.send_cancel(txn, t.peer_user, others, action.code, limited=False)
        elif isinstance(action, Ignore):
            log.debug("verification %s: ignored (%s)", txn, action.reason)
        elif isinstance(action, RejectLocal):
            log.info("verification %s: local step refused (%s)", txn, action.reason)
            return False
        return None

    async def _sign_user(self, t: Txn) -> None:
        """The MAC verified another user's master key: sign it (``UserTrust.verified``).

        A failure is logged and counted there; the device stays verified and the flow ends
        normally (the peer did nothing wrong).
        """
        if self.user_trust is None or t.sas is None or t.peer_user == self.us().user_id:
            return
        device_key = f"ed25519:{t.peer_device}"
        for key_id in t.sas.verified_keys:
            if key_id != device_key and key_id.startswith("ed25519:"):
                await self.user_trust.verified(t.peer_user, key_id.removeprefix("ed25519:"))

    def _sas(self, t: Txn, *, we_started: bool) -> SasSession:
        if t.sas is None:
            assert t.peer_device is not None
            t.sas = SasSession(
                transaction_id=t.txn,
                us=self.us(),
                them=Party(t.peer_user, t.peer_device),
                we_started=we_started,
                in_room=t.room_id is not None,
            )
        return t.sas

    async def _to_peer(self, t: Txn, event_type: str, content: dict[str, Any]) -> None:
        if t.room_id is not None:
            await self._room_send(t.room_id, t.txn, event_type, content)
            return
        assert t.peer_device is not None
        await self.send(event_type, t.peer_user, [t.peer_device], content)

    async def _room_send(
        self, room_id: str, flow_id: str, event_type: str, content: dict[str, Any]
    ) -> None:
        if self.rooms is None:
            raise RuntimeError("an in-room flow needs a room sender")
        await self.rooms.send(room_id, event_type, room_content(content, flow_id))

    def _show_sas(self, t: Txn) -> None:
        assert t.sas is not None and t.sas.agreement is not None and t.peer_device is not None
        methods = t.sas.agreement.short_authentication_string
        t.emoji = (
            tuple((e.emoji, e.description) for e in t.sas.emoji()) if SAS_EMOJI in methods else ()
        )
        t.decimals = t.sas.decimals() if SAS_DECIMAL in methods else None
        self.emit(
            SasReady(t.txn, t.peer_user, t.peer_device, t.emoji, t.decimals, room_id=t.room_id)
        )
        confirm = self.policy.confirm
        if confirm is None:
            log.info("verification %s: SAS shown, waiting for the operator", t.txn)
            return
        prompt = SasPrompt(t.txn, t.peer_user, t.peer_device, t.emoji, t.decimals)
        self.tasks.spawn(self._ask(confirm, prompt), f"confirm {t.txn}")

    async def _ask(self, confirm: ConfirmCallback, prompt: SasPrompt) -> None:
        try:
            ok = await confirm(prompt)
            inp = Input.LOCAL_CONFIRM if ok else Input.LOCAL_MISMATCH
        except Exception:
            log.exception("verification %s: confirm callback failed", prompt.transaction_id)
            inp = Input.LOCAL_CANCEL
        txn = TransactionId(prompt.transaction_id)
        async with self._txns.lock(txn):
            t = self._txns.get(txn)
            if t is not None and t.state not in TERMINAL_STATES:
                await self.feed(t, inp, Ctx())


_ABORT_SEND_TIMEOUT: Final = 10.0
"""Seconds the best-effort cancel of a transaction whose action raised may take."""


class _MarkFailedError(Exception):
    """The trust store refused ``MarkVerified`` (see :meth:`Engine.feed`)."""


def code_label(code: str) -> str:
    """The metric label of a cancel code: the code when known, else ``other``.

    A peer chooses its cancel code (up to 255 characters): labelling with it as is would let a
    peer create unbounded metric series.
    """
    return code if code in _KNOWN_CODES else "other"


_KNOWN_CODES: Final = frozenset(str(c) for c in CancelCode)


def _implied_code(inp: Input) -> CancelCode:
    """The code recorded when a transition ends CANCELLED without sending (or before it sends)."""
    if inp is Input.TIMEOUT:
        return CancelCode.TIMEOUT
    return CancelCode.USER
