"""Inbound verification events: each is classified into one table input and fed to the engine.

:class:`Inbound` holds the dispatcher handlers for the ``m.key.verification.*`` events
(plaintext and Olm-decrypted ones arrive as the same typed events) and for
:class:`~bot_toolkit.undecodable.UndecodableEvent`. It decides, from data, what the table cannot:
the sender is not the peer (``WRONG_USER``) or another of its devices (``OTHER_DEVICE``), an
identical repeat (``DUPLICATE``), a failed commitment or MAC, a start race; and it applies the
checks before a transaction exists: request freshness, the allowed users, concurrent attempts
from one device (with a cooldown) and holding a request until the peer's keys are known.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import msgspec

from .._bounded import BoundedMap
from .._types import DeviceId, TransactionId, UserId
from ..events import (
    DecodeError,
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
from ..undecodable import UndecodableEvent
from .engine import Engine
from .errors import SasError, SasStateError
from .negotiation import common_verification_methods, negotiate_start, offer_from_start
from .peer_keys import KeySource, PeerKeys
from .policy import AttemptTracker, VerificationPolicy, request_is_fresh, request_prompt_lapse
from .rooms import REQUEST_MSGTYPE, RoomVerificationEvent
from .table import TERMINAL_STATES, CancelCode, Input, Party, State, classify_start
from .transactions import Ctx, Transactions, Txn, fingerprint

__all__ = ["Inbound"]

log = logging.getLogger("bot_toolkit.verification.inbound")

_MAC_EXPECTED: Final = frozenset(
    {State.KEYS_EXCHANGED, State.MAC_SENT, State.LEGACY_KEYS_EXCHANGED, State.LEGACY_MAC_SENT}
)
_RAW_STARTS_KEPT: Final = 1024


def _sas_checked(step: Input, check: Callable[[], object]) -> Input:
    """``step`` when ``check`` (a :class:`SasSession` call taking the peer's message) passes,
    else the table input of the :class:`SasError` it raised."""
    try:
        check()
    except SasError as exc:
        return exc.input
    return step


class Inbound:
    """The manager's event handlers; see the module docs."""

    def __init__(  # noqa: PLR0917
        self,
        engine: Engine,
        keys: KeySource,
        peer_keys: PeerKeys,
        policy: VerificationPolicy,
        txns: Transactions,
        attempts: AttemptTracker,
    ) -> None:
        self._engine = engine
        self.keys = keys
        self._peer_keys = peer_keys
        self.policy = policy
        self.clock = engine.clock
        self._txns = txns
        self._attempts = attempts
        self.room_request_lock = asyncio.Lock()
        """Held while our own in-room request is sent and its flow registered."""
        self._raw_starts: BoundedMap[tuple[str, str], dict[str, Any]] = BoundedMap(_RAW_STARTS_KEPT)
        self._cooldown: BoundedMap[Party, float] = BoundedMap(_RAW_STARTS_KEPT)

    def register(self, dispatcher: Any) -> None:
        """Register the handlers with the dispatcher."""
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
        d.register(RoomVerificationEvent, self._on_room)

    def decoded(self, event: ToDeviceEvent, raw: Mapping[str, Any]) -> None:
        content = raw.get("content")
        if isinstance(event, KeyVerificationStart) and isinstance(content, Mapping):
            self.remember_raw_start(event.sender, copy.deepcopy(content))

    def _reply_device(self, event: ToDeviceEvent, t: Txn | None) -> DeviceId:
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

    def _sender_is_other_device(self, event: ToDeviceEvent, t: Txn) -> bool:
        """Whether an event from the peer user comes from a device not in the transaction."""
        devices: tuple[DeviceId, ...]
        if t.peer_device is not None:
            devices = (t.peer_device,)
        elif t.state is State.REQUESTED_OUT:
            if t.room_id is not None:
                return False  # in a room any device of the peer user may answer
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

    def _ctx(
        self,
        event: ToDeviceEvent,
        t: Txn | None,
        room: RoomVerificationEvent | None = None,
        **kw: Any,
    ) -> Ctx:
        room_id = None if room is None else room.room_id
        return Ctx(
            UserId(event.sender), self._reply_device(event, t), inbound=True, room_id=room_id, **kw
        )

    async def _new_attempt(
        self,
        event: KeyVerificationRequest | KeyVerificationStart,
        room: RoomVerificationEvent | None = None,
    ) -> bool:
        """Checks for a request/start with an unknown id: policy, concurrent attempts, keys.

        Returns True when the new transaction may be created (keys known).
        """
        txn = TransactionId(event.transaction_id or "")
        peer = Party(UserId(event.sender), DeviceId(event.from_device))
        ctx = self._ctx(event, None, room)
        probe = Txn(txn, peer.user_id, peer.device_id, False, room_id=ctx.room_id)
        if peer == self._engine.us():
            return False
        if not self.policy.allows_device(self._engine.us().user_id, *peer):
            log.info("refusing verification %s from %s %.64s: not allowed", txn, *peer)
            await self._engine.feed(probe, Input.LOCAL_CANCEL, ctx)
            return False
        cooling = self._cooldown.get(peer)
        if cooling is not None and self.clock() < cooling:
            log.info("verification %s: %s %s is flooding; refusing", txn, *peer)
            await self._engine.feed(probe, Input.CONCURRENT_ATTEMPT, ctx)
            return False
        others = self._attempts.begin(peer, txn)
        if others:
            self._cooldown[peer] = self.clock() + self.policy.attempt_cooldown
            log.warning(
                "verification %s: %s %s has other attempts %s: cancelling all",
                txn,
                peer.user_id,
                peer.device_id,
                list(others),
            )
            for other in others:
                async with self._txns.lock(other):
                    o = self._txns.get(other)
                    if o is not None and o.state not in TERMINAL_STATES:
                        await self._engine.feed(o, Input.CONCURRENT_ATTEMPT, ctx)
                    self._attempts.end(other)
            await self._engine.feed(probe, Input.CONCURRENT_ATTEMPT, ctx)
            return False
        ed = await self._peer_keys.ensure(peer.user_id, peer.device_id)
        if txn not in self._attempts.live(peer):
            # Cancelled while held: another attempt from the same device came meanwhile.
            await self._engine.feed(probe, Input.CONCURRENT_ATTEMPT, ctx)
            return False
        if ed is None:
            log.warning(
                "verification %s: keys of %s %s unknown; refusing",
                txn,
                peer.user_id,
                peer.device_id,
            )
            self._attempts.end(txn)
            await self._engine.feed(probe, Input.LOCAL_CANCEL, ctx)
            return False
        return True

    def _classify_common(self, event: ToDeviceEvent, t: Txn) -> Input | None:
        """WRONG_USER / OTHER_DEVICE / DUPLICATE, or None to go on."""
        if event.sender != t.peer_user:
            return Input.WRONG_USER
        if self._sender_is_other_device(event, t):
            return Input.OTHER_DEVICE
        if fingerprint(event) in t.seen:
            return Input.DUPLICATE
        return None

    async def _on_request(
        self, event: KeyVerificationRequest, room: RoomVerificationEvent | None = None
    ) -> None:
        txn = TransactionId(event.transaction_id or "")
        if not request_is_fresh(event.timestamp, self.clock()):
            log.info("ignoring stale or future verification request %s from %s", txn, event.sender)
            return
        if txn not in self._txns:
            if not await self._new_attempt(event, room):
                return
            async with self._txns.lock(txn):
                t = self._txns.get(txn)
                if t is None:
                    await self._create_incoming(event, txn, room)
                    return
                # Created meanwhile (during the key query), maybe by another sender.
                self._drop_attempt(event, t)
                inp = self._classify_common(event, t) or Input.REQUEST
                await self._feed_event(t, inp, event, room)
                return
        async with self._txns.lock(txn):
            t = self._txns.get(txn)
            if t is None:
                log.info("verification %s: forgotten while %s's request waited", txn, event.sender)
                return
            inp = self._classify_common(event, t) or Input.REQUEST
            await self._feed_event(t, inp, event, room)

    def _drop_attempt(self, event: KeyVerificationRequest | KeyVerificationStart, t: Txn) -> None:
        """Release the attempt :meth:`_new_attempt` registered when the transaction already
        existed by then (unless it is the same device's, which the transaction owns)."""
        peer = Party(UserId(event.sender), DeviceId(event.from_device))
        if peer != Party(t.peer_user, t.peer_device or DeviceId("")):
            self._attempts.end_for(peer, t.txn)

    async def _create_incoming(
        self,
        event: KeyVerificationRequest,
        txn: TransactionId,
        room: RoomVerificationEvent | None = None,
    ) -> None:
        peer_device = DeviceId(event.from_device)
        room_id = None if room is None else room.room_id
        t = Txn(txn, UserId(event.sender), peer_device, False, room_id=room_id)
        t.peer_ed25519 = self.keys.device_ed25519(event.sender, peer_device)
        # In a room, timestamp is the request's origin_server_ts (RoomVerificationEvent.typed).
        t.lapse = request_prompt_lapse(event.timestamp, self.clock())
        t.seen.add(fingerprint(event))
        ctx = self._ctx(event, t, room)
        t.no_common_method = not common_verification_methods(event.methods)
        await self._engine.feed(t, Input.REQUEST, ctx)
        if t.no_common_method:
            # Spec: "it should not cancel the request as one of his other devices may support
            # the request"; tell the operator, who may reject it (cancel) or let it lapse.
            log.warning(
                "verification %s from %s %s: no supported method in %s; left to the operator",
                txn,
                event.sender,
                peer_device,
                [m[:64] for m in list(event.methods)[:8]],
            )
            return
        if self.policy.auto_accept:
            await self._engine.feed(t, Input.LOCAL_READY, Ctx())

    async def _feed_event(
        self,
        t: Txn,
        inp: Input,
        event: ToDeviceEvent,
        room: RoomVerificationEvent | None = None,
        **kw: Any,
    ) -> None:
        ctx = self._ctx(event, t, room, **kw)
        if inp not in (Input.WRONG_USER, Input.OTHER_DEVICE, Input.DUPLICATE):
            t.seen.add(fingerprint(event))
        await self._engine.feed(t, inp, ctx)

    async def _unknown(
        self, event: ToDeviceEvent, inp: Input, room: RoomVerificationEvent | None = None
    ) -> None:
        """An event for a transaction we do not know (the table's NEW row)."""
        txn = TransactionId(getattr(event, "transaction_id", None) or "")
        ctx = self._ctx(event, None, room)
        probe = Txn(txn, UserId(event.sender), None, False, room_id=ctx.room_id)
        await self._engine.feed(probe, inp, ctx)

    async def _on_ready(
        self, event: KeyVerificationReady, room: RoomVerificationEvent | None = None
    ) -> None:
        txn = TransactionId(event.transaction_id or "")
        async with self._txns.lock(txn):
            t = self._txns.get(txn)
            if t is None:
                await self._unknown(event, Input.READY, room)
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
                if t.room_id is not None:
                    # Any device of the user may answer an in-room request (and in a plaintext
                    # room nio does not track the user): download the device's keys (bounded).
                    t.peer_ed25519 = await self._peer_keys.ensure(t.peer_user, t.peer_device)
                    if t.peer_ed25519 is None:
                        log.warning(
                            "verification %s: keys of %s %s unknown; cancelling",
                            txn,
                            t.peer_user,
                            t.peer_device,
                        )
                        await self._feed_event(t, inp, event, room)
                        t.local_reason = "the device's keys are unknown"
                        await self._engine.feed(t, Input.LOCAL_CANCEL, Ctx())
                        return
                else:
                    t.peer_ed25519 = self.keys.device_ed25519(t.peer_user, t.peer_device)
            await self._feed_event(t, inp, event, room)
            if (
                inp is Input.READY
                and t.state is State.READY
                and t.initiated_by_us
                and self.policy.start_as_requester
            ):
                await self._engine.feed(t, Input.LOCAL_START, Ctx())

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

    async def _on_start(
        self, event: KeyVerificationStart, room: RoomVerificationEvent | None = None
    ) -> None:
        txn = TransactionId(event.transaction_id or "")
        # In a room the content as received is at hand (with its m.relates_to, which the
        # commitment covers).
        content = self._raw_start(event) if room is None else dict(room.content)
        acceptable = False
        if isinstance(event, KeyVerificationStartSas):
            try:
                acceptable = negotiate_start(offer_from_start(content)) is not None
            except SasError:
                acceptable = False
        if txn not in self._txns:
            if room is not None:
                # No start-first flow in a room: a start for an unknown flow creates nothing.
                async with self._txns.lock(txn):
                    await self._unknown(event, Input.START, room)
                return
            if not acceptable:
                async with self._txns.lock(txn):
                    await self._unknown(event, Input.UNKNOWN_METHOD)
                return
            if not await self._new_attempt(event):
                return
            async with self._txns.lock(txn):
                existing = self._txns.get(txn)
                if existing is None:
                    peer_device = DeviceId(event.from_device)
                    t = Txn(txn, UserId(event.sender), peer_device, False)
                    t.peer_ed25519 = self.keys.device_ed25519(event.sender, peer_device)
                    t.their_start = content
                    t.seen.add(fingerprint(event))
                    await self._engine.feed(t, Input.START, self._ctx(event, t))
                    return
                # Created meanwhile (during the key query), maybe by another sender.
                self._drop_attempt(event, existing)
        async with self._txns.lock(txn):
            found = self._txns.get(txn)
            if found is None:
                log.info("verification %s: forgotten while %s's start waited", txn, event.sender)
                return
            t = found
            inp = self._classify_common(event, t)
            if inp is None:
                if t.peer_device is None:
                    inp = Input.START  # before any ready: out of sequence
                else:
                    inp = classify_start(
                        t.state,
                        us=self._engine.us(),
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
            await self._feed_event(t, inp, event, room)

    async def _on_step(
        self,
        event: KeyVerificationAccept
        | KeyVerificationKey
        | KeyVerificationMac
        | KeyVerificationDone,
        step: Input,
        check: Callable[[Txn], Awaitable[Input]] | None,
        room: RoomVerificationEvent | None,
    ) -> None:
        """A message of a running flow: an unknown transaction is refused; otherwise the sender
        and duplicates are checked, then ``check`` (the step's own checks; ``step`` when there
        are none), and the table is fed what they found."""
        txn = TransactionId(event.transaction_id or "")
        async with self._txns.lock(txn):
            t = self._txns.get(txn)
            if t is None:
                await self._unknown(event, step, room)
                return
            inp = self._classify_common(event, t)
            if inp is None:
                inp = step if check is None else await check(t)
            await self._feed_event(t, inp, event, room)

    async def _on_accept(
        self, event: KeyVerificationAccept, room: RoomVerificationEvent | None = None
    ) -> None:
        async def check(t: Txn) -> Input:
            if t.state is State.STARTED_OUT and (sas := t.sas) is not None:
                return _sas_checked(Input.ACCEPT, lambda: sas.receive_accept(encode_content(event)))
            return Input.ACCEPT

        await self._on_step(event, Input.ACCEPT, check, room)

    async def _on_key(
        self, event: KeyVerificationKey, room: RoomVerificationEvent | None = None
    ) -> None:
        async def check(t: Txn) -> Input:
            expects_key = t.state in (State.STARTED_IN, State.LEGACY_STARTED_IN, State.ACCEPTED)
            if expects_key and (sas := t.sas) is not None:
                return _sas_checked(Input.KEY, lambda: sas.receive_their_key(event.key))
            return Input.KEY

        await self._on_step(event, Input.KEY, check, room)

    async def _on_mac(
        self, event: KeyVerificationMac, room: RoomVerificationEvent | None = None
    ) -> None:
        async def check(t: Txn) -> Input:
            if t.state in _MAC_EXPECTED and t.sas is not None:
                return await self._check_mac(t, event)
            return Input.MAC

        await self._on_step(event, Input.MAC, check, room)

    async def _check_mac(self, t: Txn, event: KeyVerificationMac) -> Input:
        assert t.sas is not None and t.peer_device is not None
        ed = t.peer_ed25519 or self.keys.device_ed25519(t.peer_user, t.peer_device)
        if ed is None:
            return Input.MAC_MISMATCH
        their_keys = await self._peer_keys.mac_keys(
            t.txn, t.peer_user, t.peer_device, ed, event.mac
        )
        if t.room_id is not None and set(event.mac) - set(their_keys):
            # User verification: every key the MAC names must be the device's key or the user's
            # published master key; a MAC over any other key (say, a master key the server does
            # not publish) is a key mismatch, not something to skip.
            log.warning(
                "verification %s: %s's MAC names keys that are not published; mismatch",
                t.txn,
                t.peer_user,
            )
            return Input.MAC_MISMATCH
        try:
            t.sas.verify_mac(event.mac, event.keys, their_keys)
        except SasError as exc:
            return exc.input
        except SasStateError:
            return Input.MALFORMED
        return Input.MAC

    async def _on_done(
        self, event: KeyVerificationDone, room: RoomVerificationEvent | None = None
    ) -> None:
        await self._on_step(event, Input.DONE, None, room)

    async def _on_cancel(
        self, event: KeyVerificationCancel, room: RoomVerificationEvent | None = None
    ) -> None:
        await self._cancel_received(event, event.code, event.reason, room)

    async def _cancel_received(
        self,
        event: ToDeviceEvent,
        code: str,
        reason: str,
        room: RoomVerificationEvent | None = None,
    ) -> None:
        txn = TransactionId(getattr(event, "transaction_id", None) or "")
        async with self._txns.lock(txn):
            t = self._txns.get(txn)
            if t is None:
                return  # never answered (the table's NEW row ignores it too)
            if event.sender != t.peer_user or self._sender_is_other_device(event, t):
                inp = Input.OTHER_DEVICE  # a cancel is never answered, not even a stranger's
            else:
                inp = Input.CANCEL
            log.info("verification %s: %s cancelled with %s", txn, event.sender, code[:64])
            await self._feed_event(
                t, inp, event, room, cancel_code=code[:255], cancel_reason=reason[:255]
            )

    async def _on_room(self, ev: RoomVerificationEvent) -> None:
        """An in-room verification event: routed to the handler of its type with its room.

        Silently dropped: events relating to nothing, requests meant for someone else (``to``),
        our own echoes, and events for a flow of another room (a flow belongs to its room). A
        ready or cancel from another device of our own user answers a request we have not
        answered: we ignore the request from then on, as the spec asks (fed as the peer's
        ``m.accepted`` cancel would be to-device).
        """
        if ev.flow_id is None:
            log.debug("in-room %s with no m.reference relation ignored", ev.event_type[:64])
            return
        us_user, us_device, _ = self.keys.own()
        if ev.sender == us_user:
            await self._own_room_event(ev, us_device)
            return
        if ev.event_type == REQUEST_MSGTYPE and ev.to != us_user:
            log.debug("in-room request %s is for someone else", ev.flow_id[:64])
            return
        known = self._txns.get(ev.flow_id)
        if known is None and ev.event_type != REQUEST_MSGTYPE:
            # Our own request may be on its way out (its event id becomes the flow id).
            async with self.room_request_lock:
                known = self._txns.get(ev.flow_id)
        if known is not None and known.room_id != ev.room_id:
            log.info(
                "verification %s: %s in another room ignored", ev.flow_id[:64], ev.event_type[:64]
            )
            return
        try:
            event = ev.typed()
        except DecodeError as exc:
            await self._room_malformed(ev, exc)
            return
        handler = self._room_handlers().get(type(event).event_type)
        if handler is None:  # pragma: no cover - every verification type has a handler
            return
        await handler(event, ev)

    def _room_handlers(self) -> dict[str, Any]:
        return {
            KeyVerificationRequest.event_type: self._on_request,
            KeyVerificationReady.event_type: self._on_ready,
            KeyVerificationStart.event_type: self._on_start,
            KeyVerificationAccept.event_type: self._on_accept,
            KeyVerificationKey.event_type: self._on_key,
            KeyVerificationMac.event_type: self._on_mac,
            KeyVerificationDone.event_type: self._on_done,
            KeyVerificationCancel.event_type: self._on_cancel,
        }

    async def _own_room_event(self, ev: RoomVerificationEvent, us_device: str) -> None:
        """Our own user's event: our echo, or another of our devices answering a request."""
        assert ev.flow_id is not None
        if ev.event_type == KeyVerificationReady.event_type:
            if ev.content.get("from_device") == us_device:
                return  # our own echo
            code, reason = str(CancelCode.ACCEPTED), "answered by another device of ours"
        elif ev.event_type == KeyVerificationCancel.event_type:
            code, reason = str(CancelCode.USER), "declined by another device of ours"
        else:
            return
        txn = TransactionId(ev.flow_id)
        async with self._txns.lock(txn):
            t = self._txns.get(txn)
            if t is None or t.room_id != ev.room_id or t.state is not State.REQUESTED_IN:
                return
            log.info("verification %s: answered by our device elsewhere; ignoring it", txn)
            ctx = Ctx(UserId(ev.sender), None, inbound=True, room_id=ev.room_id)
            ctx.cancel_code, ctx.cancel_reason = code, reason
            await self._engine.feed(t, Input.CANCEL, ctx)

    async def _room_malformed(self, ev: RoomVerificationEvent, exc: DecodeError) -> None:
        assert ev.flow_id is not None
        txn = TransactionId(ev.flow_id)
        log.info(
            "verification %s: malformed in-room %s from %s (%s)",
            txn,
            ev.event_type[:64],
            ev.sender,
            str(exc)[:200],
        )
        probe = UndecodableEvent(
            sender=ev.sender,
            decrypted_from=ev.sender_key,
            event_type_name=ev.event_type,
            transaction_id=ev.flow_id,
            path=exc.path,
            reason=exc.reason,
        )
        if ev.event_type == KeyVerificationCancel.event_type:
            await self._cancel_received(probe, str(CancelCode.USER), "malformed cancel", ev)
            return
        async with self._txns.lock(txn):
            t = self._txns.get(txn)
            if t is None:
                inp = _NEW_MALFORMED.get(ev.event_type)
                if inp is not None:
                    await self._unknown(probe, inp, ev)
                return
            if ev.sender != t.peer_user:
                inp = Input.WRONG_USER
            elif self._sender_is_other_device(probe, t):
                inp = Input.OTHER_DEVICE
            else:
                inp = Input.MALFORMED
            await self._feed_event(t, inp, probe, ev)

    async def _on_malformed(self, event: UndecodableEvent) -> None:
        name = event.event_type_name
        if not name.startswith(_VERIFICATION_PREFIX):
            return
        txn = TransactionId(event.transaction_id or "")
        if name == KeyVerificationCancel.event_type:
            await self._cancel_received(event, str(CancelCode.USER), "malformed cancel")
            return
        async with self._txns.lock(txn):
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


def _jsonable(value: Any) -> Any:
    return msgspec.json.decode(msgspec.json.encode(value))
