"""Room-key sharing hooks for one ``nio.AsyncClient``: tell devices why they get no key.

``sharing = await attach(client, store=..., outbox=..., dispatcher=..., policy=...)`` hooks one
client (instance attributes only; :meth:`KeySharing.detach` undoes it). Decisions come from
:mod:`bot_toolkit.withheld`; every notice and ``m.dummy`` goes out through the
:class:`~bot_toolkit.outbox.Outbox`. What changes for the client:

Sending (``room_send`` -> ``share_group_session``):

* the room keys themselves go through the outbox, not nio's ``_send``
  (:func:`bot_toolkit._nio_adapter.share_room_key`): each device's key is recorded in the
  :class:`~bot_toolkit.room_key_log.RoomKeyLog` and stored in the outbox before the device counts
  as shared and before the session encrypts anything; if that fails, ``room_send`` raises
  :class:`RoomKeysNotQueued`. A request the homeserver refuses for good gets its devices
  ``m.unavailable`` for that session, and the next message uses a new session. nio's own queued
  to-device messages (``to_device``, ``send_to_device_messages``) go to the outbox too, and an
  error response's ``soft_logout`` clears the access token only for a real ``M_UNKNOWN_TOKEN``;
* devices that still have no Olm session after the one-time-key claim get ``m.no_olm``, as the
  :class:`~bot_toolkit.withheld.NoOlmLedger` allows (one notice per device until an Olm session
  with it has existed, then one more);
* blacklisted devices get ``m.blacklisted`` and, with ``share_with = "verified"``, unverified
  devices get ``m.unverified`` instead of the key; once per device and Megolm session;
  ``share_with = "all"`` shares with unverified devices (nio marks them "ignored");
* a device whose claim returned no key is not claimed again before its backoff (15 s x 2^n, at
  most 15 min) has passed;
* nio marks a Megolm session as shared even when some devices had no Olm session, and never
  offers them the key again. Here, while the session is current, a later ``room_send`` re-shares it
  (same session, no rotation) as soon as such a device has an Olm session or its backoff has
  passed, so the device gets the key once it is reachable.

Sessions: any Olm session with a device told ``m.no_olm`` (one we opened after a successful
claim, one it opened to us with a pre-key message such as an ``m.dummy``, or one simply used)
re-arms the device in the ledger (hook on ``Olm.save_session``, which nio calls whenever a
session is created or used).

Receiving (through the :class:`~bot_toolkit.dispatcher.Dispatcher`; attach
:func:`bot_toolkit.nio_plugin.attach` to the same client so that it is fed):

* ``m.room_key_request`` for one of the bot's own sessions from a device the room-key log says
  was meant to have it (same identity key): answered with ``m.forwarded_room_key`` from the
  index it was given, Olm-encrypted, through the outbox;
* other ``m.room_key_request`` events that nio will not serve are answered with
  ``m.unauthorised`` (not a verified device of our own user) or ``m.unavailable`` (we do not
  hold the session).
  nio 0.26 serves requests from verified devices of our own user for sessions it holds (it
  forwards the key) and silently ignores everything else, so the two never both answer
  (:class:`bot_toolkit._key_request_answers.KeyRequestAnswers`);
* ``m.room_key.withheld`` with ``m.no_olm``: the sender could not reach us, so we open a new Olm
  session with it (claiming one of its one-time keys) and send it an Olm-encrypted ``m.dummy``,
  at most once per peer device per hour (:class:`bot_toolkit._no_olm_answers.NoOlmAnswers`).
  Every received withheld notice also reaches the bot's own handlers as a
  :class:`~bot_toolkit.events.RoomKeyWithheld` event.
* both kinds can come from any Matrix user, so each sender user may cause at most
  :data:`~bot_toolkit.withheld.SENDER_BURST` replies to key requests at once, and as many
  answers to ``m.no_olm`` (device-list query included), then one more every
  :data:`~bot_toolkit.withheld.SENDER_REFILL` seconds; beyond that the bot stays silent and
  counts ``key_sharing_rate_limited_total{what}``.

Crash safety of ``m.no_olm``: the ledger commits the decision with a transaction id before the
outbox is called, and marks it after the outbox has stored the notice. :meth:`KeySharing.recover`
(run by :func:`attach`) sends notices that were decided but never marked, under the recorded
transaction id (the outbox's ``send(..., txn_id=...)``), so whichever instant a crash hits, the
homeserver de-duplicates the resend and the device gets exactly one notice.

nio 0.26 hook points (instance attributes, installed through
:class:`bot_toolkit._nio_adapter.NioHooks`, which raises at :func:`attach` when one is missing or
changed; the upstream nio issue behind each is in its ``CONTRACT``): ``client.share_group_session``,
``client.keys_claim``, ``olm.should_share_group_session``, ``olm.get_missing_sessions``,
``olm.share_group_session_parallel``, ``olm.is_device_blacklisted``, ``olm.save_session``. The olm
hooks follow ``client.olm`` when nio replaces it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from nio import (
    AsyncClient,
    KeysClaimResponse,
    ShareGroupSessionResponse,
)

from bot_toolkit._bounded import BoundedMap
from bot_toolkit._key_request_answers import KeyRequestAnswers
from bot_toolkit._nio_adapter import (
    NioHooks,
    ensure_supported,
    share_room_key,
)
from bot_toolkit._nio_sends import NioSends
from bot_toolkit._no_olm_answers import NoOlmAnswers
from bot_toolkit._tasks import TaskSet
from bot_toolkit._withheld_wire import WITHHELD_EVENT
from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.events import RoomKeyRequest, RoomKeyWithheld, WithheldCode
from bot_toolkit.metrics import Metrics
from bot_toolkit.nio_plugin import our_identity
from bot_toolkit.outbox import OutboxSendFailed
from bot_toolkit.room_key_log import RoomKeyLog, SharedKey
from bot_toolkit.store import Store
from bot_toolkit.withheld import (
    ClaimBackoff,
    Clock,
    CrossSigningView,
    DeviceTrust,
    DummyThrottle,
    NoOlmLedger,
    PeerDevice,
    ShareWith,
    SharingPolicy,
    WithheldDeduper,
    WithheldError,
    WithheldMetrics,
    withheld_content,
)

__all__ = ["KeySharing", "NoticeOutbox", "RoomKeysNotQueued", "attach"]

log = logging.getLogger("bot_toolkit.key_sharing")

_ENCRYPTED_EVENT: Final = "m.room.encrypted"
_MEGOLM: Final = "m.megolm.v1.aes-sha2"
_REQUESTS_REMEMBERED: Final = 10_000


class RoomKeysNotQueued(RuntimeError):
    """The Megolm room keys of a message could not be stored in the outbox (the store failed or
    the outbox is closed). ``room_send`` raises it and sends nothing: a message whose keys are
    not on their way would be undecryptable. The cause is the ``__cause__``."""


class NoticeOutbox(Protocol):
    """What key sharing needs from the :class:`~bot_toolkit.outbox.Outbox`."""

    async def send(
        self,
        event_type: str,
        messages: Mapping[str, Mapping[str, Mapping[str, Any]]],
        *,
        txn_id: str | None = None,
    ) -> list[str]: ...


@dataclass(slots=True)
class _Round:
    """What one ``share_group_session`` call found, filled by the olm hooks."""

    room_id: str
    session_id: str | None = None
    no_olm: list[PeerDevice] = field(default_factory=list)
    refused: list[tuple[PeerDevice, WithheldError]] = field(default_factory=list)
    claim_failed: bool = False


_ROUND: contextvars.ContextVar[_Round | None] = contextvars.ContextVar(
    "bot_toolkit_key_sharing_round", default=None
)


async def attach(
    client: AsyncClient,
    *,
    store: Store,
    outbox: NoticeOutbox,
    dispatcher: Dispatcher,
    policy: SharingPolicy | None = None,
    metrics: Metrics | None = None,
    clock: Clock = time.monotonic,
    wall_clock: Clock = time.time,
) -> KeySharing:
    """Hook ``client``'s room-key sharing (see the module doc) and send pending notices.

    Args:
        store: the bot's store (the ledger and the ``m.dummy`` throttle keep their tables there).
        outbox: every notice and ``m.dummy`` goes through it.
        dispatcher: receives the client's to-device events (via ``nio_plugin.attach``); key
            requests and ``m.no_olm`` notices are handled from there.
        policy: the sharing policy (default :class:`~bot_toolkit.withheld.SharingPolicy`).
        metrics: where ``withheld_sent_total``/``withheld_suppressed_total`` are counted
            (default: the dispatcher's registry).
        clock: monotonic clock for claim backoff; ``wall_clock``: persisted times.

    Raises:
        TypeError: ``client`` is not a ``nio.AsyncClient``.
        RuntimeError: key sharing is already attached to ``client``.
    """
    if not isinstance(client, AsyncClient):
        raise TypeError(f"attach() needs a nio.AsyncClient, got {type(client).__name__}")
    ensure_supported()
    if isinstance(
        getattr(vars(client).get("share_group_session"), "_bot_toolkit_ks", None), KeySharing
    ):
        raise RuntimeError("key sharing is already attached to this client")
    registry = metrics or dispatcher.metrics
    counters = WithheldMetrics(registry)
    ledger = await NoOlmLedger.open(store, counters, clock=wall_clock)
    throttle = await DummyThrottle.open(store, clock=wall_clock)
    room_keys = await RoomKeyLog.open(store)
    sharing = KeySharing(
        client,
        ledger=ledger,
        throttle=throttle,
        room_keys=room_keys,
        outbox=outbox,
        dispatcher=dispatcher,
        policy=policy or SharingPolicy(),
        counters=counters,
        metrics=registry,
        clock=clock,
    )
    await sharing.recover()
    return sharing


class KeySharing:
    """The hooks of one client; made by :func:`attach`."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        ledger: NoOlmLedger,
        throttle: DummyThrottle,
        room_keys: RoomKeyLog,
        outbox: NoticeOutbox,
        dispatcher: Dispatcher,
        policy: SharingPolicy,
        counters: WithheldMetrics,
        metrics: Metrics,
        clock: Clock = time.monotonic,
    ) -> None:
        self.client = client
        self.policy = policy
        self.ledger = ledger
        self.backoff = ClaimBackoff(clock)
        self.deduper = WithheldDeduper(counters)
        self.room_keys = room_keys
        self._outbox = outbox
        self._counters = counters
        self.cross_signing: CrossSigningView | None = None
        """Other users' cross-signing, for ``share_with`` ``cross_signed`` / ``verified``
        (None: no device counts as cross-signed)."""
        self._m_errors = metrics.counter(
            "key_sharing_errors_total",
            "Unexpected errors caught in the key-sharing hooks",
            ["where"],
        )
        self._m_limited = metrics.counter(
            "key_sharing_rate_limited_total",
            "Received events left unanswered because their sender sent too many "
            "(what: key_request, no_olm)",
            ["what"],
        )
        self._attached = True
        self._hooks = NioHooks()
        self._olm: Any = None
        # room -> (Megolm session id, devices that got no key for lack of an Olm session)
        self._unreached: dict[str, tuple[str, set[PeerDevice]]] = {}
        self._reshare: set[str] = set()
        self._withholding = False  # inside share_group_session_parallel
        self._observed: set[str] = set()  # curve25519 keys with a live session, not yet recorded
        # m.no_olm transaction ids being handed to the outbox, or handed over but not recorded
        self._in_flight: set[str] = set()
        self._tasks = TaskSet(
            log, "key sharing background", lambda _exc: self._m_errors.inc("background")
        )
        self._no_olm = NoOlmAnswers(
            client,
            throttle=throttle,
            outbox=outbox,
            metrics=metrics,
            limited=self._m_limited,
            clock=clock,
            spawn=self._spawn,
            on_error=self._error,
            enabled=lambda: self._attached and self.policy.dummy_on_no_olm,
        )
        self._request_answers = KeyRequestAnswers(
            client,
            room_keys=room_keys,
            outbox=outbox,
            counters=counters,
            metrics=metrics,
            limited=self._m_limited,
            clock=clock,
            policy=lambda: self.policy,
            attached=lambda: self._attached,
            trust=self._trust,
            own=self._own,
        )
        self._retry_needed = False  # a notice stayed pending after a failed hand-over
        # outbox txn id -> (room, Megolm session id) of the room keys it carries (this run)
        self._key_requests: BoundedMap[str, tuple[str, str]] = BoundedMap(_REQUESTS_REMEMBERED)
        self._rotate: set[str] = set()  # Megolm session ids to replace before the next message
        self._m_room_keys = metrics.counter(
            "room_keys_queued_total",
            "Megolm room keys stored in the outbox for a device",
            [],
        )
        self._m_room_key_failures = metrics.counter(
            "room_key_failures_total",
            "Room keys not delivered (what: store, refused_withheld)",
            ["what"],
        )
        self._nio_sends = NioSends(client, outbox, metrics, attached=lambda: self._attached)

        try:
            self._hooks.install(client, "share_group_session", self._wrap_share)
            self._hooks.install(client, "keys_claim", self._wrap_keys_claim)
            self._hooks.install(client, "to_device", self._nio_sends.wrap_to_device)
            self._hooks.install(
                client, "send_to_device_messages", self._nio_sends.wrap_send_to_device_messages
            )
            self._hooks.install(client, "receive_response", self._nio_sends.wrap_receive_response)
            self._install_olm_hooks()
        except BaseException:
            self._hooks.undo()
            raise
        dispatcher.register(RoomKeyRequest, self._on_key_request)
        dispatcher.register(RoomKeyWithheld, self._on_withheld, _is_no_olm)
        dispatcher.register(OutboxSendFailed, self._on_send_failed, _is_room_key_failure)

    # ----------------------------------------------------------------- lifecycle

    @property
    def attached(self) -> bool:
        """Whether the hooks are active."""
        return self._attached

    def detach(self) -> None:
        """Remove the hooks (idempotent). Dispatcher handlers stay registered but do nothing."""
        if not self._attached:
            return
        self._attached = False
        self._hooks.undo()
        self._olm = None

    async def close(self) -> None:
        """Detach and wait for background ledger updates to finish."""
        self.detach()
        await self.flush()
        await self.join()

    @property
    def busy(self) -> bool:
        """Whether background work (ledger updates, ``m.dummy`` answers) is still running."""
        return bool(self._tasks)

    async def join(self) -> None:
        """Wait until the background work running now, and any it starts, has finished."""
        await self._tasks.join()

    async def recover(self) -> int:
        """Record Olm sessions that exist with devices the ledger holds as told (a crash can
        lose the in-memory observation), then send ``m.no_olm`` notices that were decided but
        whose hand-over to the outbox was never recorded.

        Returns how many notices were sent again. Run by :func:`attach`; safe to call again.
        """
        olm = self.client.olm
        if olm is not None:
            for entry in await self.ledger.entries():
                curve = entry.device.curve25519
                if not entry.session_since_notice and olm.session_store.get(curve) is not None:
                    await self.ledger.session_established(curve, user_id=entry.device.user_id)
        return await self._resend_pending()

    async def _resend_pending(self) -> int:
        self._retry_needed = False
        resent = 0
        for device, txn_id in await self.ledger.pending():
            if txn_id in self._in_flight:
                continue
            if await self._deliver_no_olm(device, txn_id):
                resent += 1
        if resent:
            log.info("sent %d recorded m.no_olm notices again", resent)
        return resent

    async def flush(self) -> None:
        """Record observed Olm sessions in the ledger now."""
        while self._observed:
            curve = self._observed.pop()
            try:
                await self.ledger.session_established(curve)
            except Exception:
                self._observed.add(curve)
                self._error("session_established")
                return

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    def _error(self, where: str) -> None:
        self._m_errors.inc(where)
        with contextlib.suppress(Exception):
            log.exception("key sharing failed in %s; nio carries on", where)

    # ----------------------------------------------------------------- olm hooks

    def _hook_olm(self) -> None:
        """Follow ``client.olm`` when nio replaced its Olm machine (logged and counted when it
        fails: this runs inside nio's ``share_group_session``)."""
        try:
            self._install_olm_hooks()
        except Exception:
            self._error("hook_olm")

    def _install_olm_hooks(self) -> None:
        olm = self.client.olm
        if olm is None or olm is self._olm:
            return
        self._olm = olm
        hooks = self._hooks
        hooks.install(olm, "should_share_group_session", lambda o: self._wrap_should_share(olm, o))
        hooks.install(olm, "get_missing_sessions", lambda o: self._wrap_missing(olm, o))
        hooks.install(olm, "share_group_session_parallel", lambda o: self._wrap_parallel(olm, o))
        hooks.install(olm, "is_device_blacklisted", lambda o: self._wrap_blacklisted(olm, o))
        hooks.install(olm, "save_session", self._wrap_save_session)

    def _peer(self, device: Any) -> PeerDevice:
        return PeerDevice(device.user_id, device.device_id, device.curve25519)

    def _trust(self, olm: Any, device: Any, *, blacklisted: bool | None = None) -> DeviceTrust:
        """nio's trust state of ``device`` plus its cross-signing (outside nio's device
        selection, where our ``is_device_blacklisted`` hook answers as nio's own; inside it,
        pass ``blacklisted``)."""
        view = self.cross_signing
        cross_signed = owner_verified = False
        if view is not None and self.policy.share_with is not ShareWith.ALL:
            cross_signed = view.cross_signed(device.user_id, device.device_id, device.ed25519)
            owner_verified = cross_signed and view.owner_verified(device.user_id)
        return DeviceTrust(
            verified=bool(olm.is_device_verified(device)),
            blacklisted=(
                bool(olm.is_device_blacklisted(device)) if blacklisted is None else blacklisted
            ),
            unlisted_own=device.user_id == olm.user_id
            and device.device_id not in self.policy.own_devices,
            cross_signed=cross_signed,
            owner_verified=owner_verified,
        )

    def _wrap_should_share(
        self, olm: Any, original: Callable[[str], bool]
    ) -> Callable[[str], bool]:
        def should_share_group_session(room_id: str) -> bool:
            current = olm.outbound_group_sessions.get(room_id)
            if self._attached and current is not None and current.id in self._rotate:
                # Some devices' keys for it were refused (they were told m.unavailable): the
                # next message starts a new session, offered to every device.
                self._rotate.discard(current.id)
                del olm.outbound_group_sessions[room_id]
                log.info("rotating the Megolm session of %s after a refused room key", room_id)
                return True
            if original(room_id):
                return True
            if not self._attached:
                return False
            try:
                if self._reshare_due(olm, room_id):
                    self._reshare.add(room_id)
                    return True
            except Exception:
                self._error("should_share")
            return False

        return should_share_group_session

    def _reshare_due(self, olm: Any, room_id: str) -> bool:
        entry = self._unreached.get(room_id)
        session = olm.outbound_group_sessions.get(room_id)
        if entry is None or session is None or session.expired or entry[0] != session.id:
            return False
        for peer in entry[1]:
            device = olm.device_store[peer.user_id].get(peer.device_id)
            if device is None or device.deleted or device.curve25519 != peer.curve25519:
                continue
            if olm.session_store.get(peer.curve25519) is not None or self.backoff.due(peer):
                return True
        return False

    def _wrap_missing(
        self, olm: Any, original: Callable[[list[str]], dict[str, list[str]]]
    ) -> Callable[[list[str]], dict[str, list[str]]]:
        def get_missing_sessions(users: list[str]) -> dict[str, list[str]]:
            missing = original(users)
            if not self._attached:
                return missing
            try:
                return self._claimable(olm, missing)
            except Exception:
                self._error("get_missing_sessions")
                return missing

        return get_missing_sessions

    def _claimable(self, olm: Any, missing: dict[str, list[str]]) -> dict[str, list[str]]:
        """Leave out devices that will not get the key anyway, and devices in claim backoff."""
        wanted: dict[str, list[str]] = {}
        for user_id, device_ids in missing.items():
            for device_id in device_ids:
                device = olm.device_store[user_id].get(device_id)
                if device is None:
                    continue
                if self.policy.withholds(self._trust(olm, device)):
                    continue
                if not self.backoff.due(self._peer(device)):
                    log.debug("claim for %s %s skipped: backoff", user_id, device_id)
                    continue
                wanted.setdefault(user_id, []).append(device_id)
        return wanted

    def _wrap_blacklisted(self, olm: Any, original: Callable[[Any], bool]) -> Callable[[Any], bool]:
        def is_device_blacklisted(device: Any) -> bool:
            if original(device):
                return True
            # Only while nio picks the devices for a room key: the policy withholds the key from
            # unverified devices, and from own devices the operator did not name, by making nio
            # skip them like blacklisted ones.
            if not (self._attached and self._withholding):
                return False
            if device.user_id == olm.user_id and device.device_id not in self.policy.own_devices:
                return True
            if self.policy.share_with is ShareWith.ALL:
                return False
            return not self._trust(olm, device, blacklisted=False).meets(self.policy.share_with)

        return is_device_blacklisted

    def _wrap_parallel(self, olm: Any, original: Callable[..., Any]) -> Callable[..., Any]:
        def share_group_session_parallel(
            room_id: str, users: list[str], ignore_unverified_devices: bool = False
        ) -> Any:
            if not self._attached:
                yield from original(room_id, users, ignore_unverified_devices)
                return
            if room_id in self._reshare:
                self._reshare.discard(room_id)
                session = olm.outbound_group_sessions.get(room_id)
                if session is not None and session.shared and not session.expired:
                    # Extend the current session to the devices it missed, instead of letting
                    # nio rotate it: they get it from the current message index on.
                    session.shared = False
                    log.info("re-sharing the Megolm session of %s with devices it missed", room_id)
            self._withholding = True
            try:
                # nio builds every batch before the first request is sent: materialise them so
                # that the refused devices are known, then hand them over unchanged.
                batches = list(original(room_id, users, ignore_unverified_devices))
            finally:
                self._withholding = False
            try:
                self._classify(olm, room_id, users)
            except Exception:
                self._error("classify")
            yield from batches

        return share_group_session_parallel

    def _classify(self, olm: Any, room_id: str, users: list[str]) -> None:
        session = olm.outbound_group_sessions.get(room_id)
        if session is None:
            return
        current = _ROUND.get()
        found = current if current is not None and current.room_id == room_id else _Round(room_id)
        found.session_id = session.id
        unreached: set[PeerDevice] = set()
        for user_id in users:
            for device in olm.device_store.active_user_devices(user_id):
                if user_id == olm.user_id and device.device_id == olm.device_id:
                    continue
                if (user_id, device.device_id) in session.users_shared_with:
                    continue
                peer = self._peer(device)
                try:
                    share = self.policy.check_share(self._trust(olm, device))
                except WithheldError as refusal:
                    found.refused.append((peer, refusal))
                    continue
                if not share:
                    continue
                if olm.session_store.get(device.curve25519) is None:
                    unreached.add(peer)
                    found.no_olm.append(peer)
        if unreached:
            self._unreached[room_id] = (session.id, unreached)
        else:
            self._unreached.pop(room_id, None)

    def _wrap_save_session(
        self, original: Callable[[str, Any], None]
    ) -> Callable[[str, Any], None]:
        def save_session(curve_key: str, session: Any) -> None:
            original(curve_key, session)
            try:
                if self._attached and self.ledger.armed(curve_key):
                    first = not self._observed
                    self._observed.add(curve_key)
                    if first:
                        self._spawn(self.flush())
            except Exception:
                self._error("save_session")

        return save_session

    # ----------------------------------------------------------------- client hooks

    def _wrap_share(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def share_group_session(room_id: str, ignore_unverified_devices: bool = False) -> Any:
            if not self._attached:
                return await original(room_id, ignore_unverified_devices=ignore_unverified_devices)
            self._hook_olm()
            if self.policy.share_with is not ShareWith.VERIFIED or self.cross_signing is not None:
                # Our is_device_blacklisted hook filters by the policy; nio must not refuse
                # the devices it lets through (cross-signed ones nio does not call verified).
                ignore_unverified_devices = True
            await self._refresh_cross_signing(room_id)
            await self.flush()
            current = _Round(room_id)
            token = _ROUND.set(current)
            try:
                return await self._share_via_outbox(room_id, ignore_unverified_devices)
            finally:
                _ROUND.reset(token)
                try:
                    await self._after_share(current)
                except Exception:
                    self._error("after_share")

        share_group_session._bot_toolkit_ks = self  # type: ignore[attr-defined]
        return share_group_session

    async def _refresh_cross_signing(self, room_id: str) -> None:
        """Bring the cross-signing view up to date for the room's members' devices."""
        view, olm = self.cross_signing, self.client.olm
        if view is None or olm is None or self.policy.share_with is ShareWith.ALL:
            return
        room = self.client.rooms.get(room_id)
        if room is None:
            return
        devices: dict[str, dict[str, str]] = {}
        for user_id in room.users:
            for device in olm.device_store.active_user_devices(user_id):
                devices.setdefault(user_id, {})[device.device_id] = device.ed25519
        try:
            await view.refresh(devices)
        except Exception:
            self._error("cross_signing_refresh")

    def _wrap_keys_claim(
        self, original: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def keys_claim(user_set: Mapping[str, Any]) -> Any:
            olm = self.client.olm
            if not self._attached or olm is None:
                return await original(user_set)
            claimed: list[Any] = []
            with contextlib.suppress(Exception):
                for user_id, device_ids in user_set.items():
                    for device_id in device_ids:
                        device = olm.device_store[user_id].get(device_id)
                        if device is not None:
                            claimed.append(device)
            response = await original(user_set)
            try:
                self._account_claim(olm, claimed, response)
            except Exception:
                self._error("keys_claim")
            return response

        return keys_claim

    # ----------------------------------------------------------------- room keys via the outbox

    async def _share_via_outbox(
        self, room_id: str, ignore_unverified_devices: bool
    ) -> ShareGroupSessionResponse:
        """nio's ``share_group_session``, with the room keys going through the outbox.

        nio 0.26 sends the keys itself with ``_send``, ignores failed answers and marks the
        session as shared anyway. Here every device's Olm-encrypted key is recorded in the
        room-key log and stored in the outbox (one ``send()``: the outbox packs the messages
        into requests of its ``batch_size``, retries them with the same transaction ids and
        resends them after a crash); only then do the devices count as shared with, and only
        then is the session marked shared, so ``room_send`` encrypts nothing with a session
        whose keys are not durably on their way.

        Raises:
            LocalProtocolError: as nio's (no such room, not encrypted, already sharing).
            RoomKeysNotQueued: the keys could not be stored; nothing counts as shared, and
                ``room_send`` raises instead of sending a message nobody could decrypt.
        """
        olm = self.client.olm

        async def store(session: Any, shared: set[tuple[str, str]], messages: Any) -> None:
            await self._queue_room_keys(olm, room_id, session, shared, messages)

        return await share_room_key(self.client, room_id, ignore_unverified_devices, store)

    async def _queue_room_keys(
        self,
        olm: Any,
        room_id: str,
        session: Any,
        shared: set[tuple[str, str]],
        messages: dict[str, dict[str, Any]],
    ) -> None:
        """Record who gets the key of ``session``, then store the key messages in the outbox."""
        index = int(session.message_index)
        records = []
        for user_id, device_id in shared:
            device = olm.device_store[user_id].get(device_id)
            curve = "" if device is None else str(device.curve25519)
            records.append(SharedKey(room_id, session.id, user_id, device_id, curve, index))
        try:
            await self.room_keys.record(records)
            txn_ids = await self._outbox.send(_ENCRYPTED_EVENT, messages)
        except Exception as exc:
            self._m_room_key_failures.inc("store")
            log.error(
                "could not store the room key of %s for %d devices: %s; the message is not sent",
                room_id,
                len(shared),
                type(exc).__name__,
            )
            raise RoomKeysNotQueued(f"room keys for {room_id} not stored: {exc}") from exc
        for txn_id in txn_ids:
            self._key_requests[txn_id] = (room_id, session.id)
        try:
            await self.room_keys.note_requests(txn_ids, room_id, session.id)
        except Exception:
            # The keys are stored; only a refusal of them after a restart goes unanswered.
            self._error("note_requests")
        self._m_room_keys.inc(amount=len(shared))
        log.info(
            "room key of %s (session %s, index %d) stored for %d devices in %d requests",
            room_id,
            session.id,
            index,
            len(shared),
            len(txn_ids),
        )

    async def _on_send_failed(self, event: OutboxSendFailed) -> None:
        """The homeserver refused a request carrying room keys: tell why, offer a new key.

        Each refused device gets ``m.room_key.withheld`` with ``m.unavailable`` for that
        session: the messages it cannot read now say why. When the session is still the room's
        current one it is discarded, so the next message uses a new session and offers its key
        to every device again, the refused ones included. (Offering the old session again would
        give them its key only from the current message index on: what they missed would stay
        unreadable with no reason shown.)
        """
        olm = self.client.olm
        if olm is None or not self._attached:
            return
        entry = self._key_requests.pop(event.txn_id, None)
        if entry is None:  # sent by an earlier run, or not a room-key request
            entry = await self.room_keys.request_session(event.txn_id)
        if entry is None:
            return
        room_id, session_id = entry
        refused: list[SharedKey] = []
        for user_id, device_id in event.recipients:
            record = await self.room_keys.lookup(session_id, user_id, device_id)
            if record is not None:  # else another message packed into the same request
                refused.append(record)
        if not refused:
            return
        session = olm.outbound_group_sessions.get(room_id)
        rotated = session is not None and session.id == session_id
        if rotated:
            # Not now: the refusal may arrive while the session is still being shared.
            self._rotate.add(session_id)
            while len(self._rotate) > _REQUESTS_REMEMBERED:
                self._rotate.pop()
        log.warning(
            "room key of %s (session %s) refused for %d devices (%d %s); telling them "
            "m.unavailable%s",
            room_id,
            session_id,
            len(refused),
            event.status,
            event.errcode,
            "; the next message uses a new session" if rotated else "",
        )
        await self._withhold_unavailable(refused)

    async def _withhold_unavailable(self, records: list[SharedKey]) -> None:
        _, device_id, curve = self._own()
        messages: dict[str, dict[str, dict[str, Any]]] = {}
        for r in records:
            messages.setdefault(r.user_id, {})[r.device_id] = withheld_content(
                WithheldError(WithheldCode.UNAVAILABLE),
                sender_key=curve,
                from_device=device_id,
                room_id=r.room_id,
                session_id=r.session_id,
            )
        try:
            await self._outbox.send(WITHHELD_EVENT, messages)
        except Exception:
            self._error("withhold_unavailable")
            return
        self._counters.sent.inc(WithheldCode.UNAVAILABLE, amount=len(records))
        self._m_room_key_failures.inc("refused_withheld", amount=len(records))
        log.info("told %d devices m.unavailable for a refused room key", len(records))

    def _account_claim(self, olm: Any, claimed: list[Any], response: Any) -> None:
        if not isinstance(response, KeysClaimResponse):
            current = _ROUND.get()
            if current is not None:
                current.claim_failed = True
            log.warning("one-time key claim failed: %s", response)
            return
        for device in claimed:
            peer = self._peer(device)
            if olm.session_store.get(device.curve25519) is not None:
                self.backoff.succeeded(peer)
            else:
                delay = self.backoff.failed(peer)
                log.info(
                    "no one-time key for %s %s; next claim in %.0fs",
                    device.user_id,
                    device.device_id,
                    delay,
                )

    async def _after_share(self, done: _Round) -> None:
        await self.flush()
        if done.refused and done.session_id is not None:
            await self._send_refusals(done)
        if done.no_olm and self.policy.no_olm_notices:
            if done.claim_failed:
                log.info(
                    "no m.no_olm for %d devices: the key claim itself failed", len(done.no_olm)
                )
            else:
                for peer in done.no_olm:
                    txn_id = await self.ledger.decide(peer)
                    if txn_id is not None:
                        await self._deliver_no_olm(peer, txn_id)
        if self._retry_needed:
            await self._resend_pending()

    # ----------------------------------------------------------------- sending notices

    def _own(self) -> tuple[str, str, str]:
        me = our_identity(self.client)
        return me.user_id, me.device_id, me.curve25519

    async def _send_refusals(self, done: _Round) -> None:
        assert done.session_id is not None
        _, device_id, curve = self._own()
        messages: dict[str, dict[str, dict[str, Any]]] = {}
        sent: list[tuple[PeerDevice, str]] = []
        for peer, refusal in done.refused:
            if not self.deduper.first(peer, done.session_id, refusal.code):
                continue
            content = withheld_content(
                refusal,
                sender_key=curve,
                from_device=device_id,
                room_id=done.room_id,
                session_id=done.session_id,
            )
            messages.setdefault(peer.user_id, {})[peer.device_id] = content
            sent.append((peer, refusal.code))
        if not sent:
            return
        try:
            await self._outbox.send(WITHHELD_EVENT, messages)
        except Exception:
            for peer, code in sent:
                self.deduper.forget(peer, done.session_id, code)
            self._error("send_refusals")
            return
        for _, code in sent:
            self._counters.sent.inc(code)
        log.info("told %d devices why they get no key for %s", len(sent), done.room_id)

    async def _deliver_no_olm(self, peer: PeerDevice, txn_id: str) -> bool:
        """Hand the decided notice ``txn_id`` to the outbox and record that in the ledger.

        False when the outbox did not take it: it stays pending and is tried again after the
        next share (and by :meth:`recover`). When only the ledger's record fails, the notice is
        not handed over again by this process.
        """
        _, device_id, curve = self._own()
        content = withheld_content(
            WithheldError(WithheldCode.NO_OLM), sender_key=curve, from_device=device_id
        )
        messages = {peer.user_id: {peer.device_id: content}}
        self._in_flight.add(txn_id)
        try:
            await self._outbox.send(WITHHELD_EVENT, messages, txn_id=txn_id)
        except Exception:
            self._retry_needed = True
            self._in_flight.discard(txn_id)
            self._error("send_no_olm")
            return False
        self._counters.sent.inc(WithheldCode.NO_OLM)
        log.info("told %s %s m.no_olm", peer.user_id, peer.device_id)
        try:
            await self.ledger.mark_sent(peer, txn_id)
        except Exception:
            self._error("mark_sent")  # stays in _in_flight: never handed over twice here
        else:
            self._in_flight.discard(txn_id)
        return True

    # ----------------------------------------------------------------- dispatcher handlers

    async def _on_key_request(self, event: RoomKeyRequest) -> None:
        """An ``m.room_key_request`` (see :class:`KeyRequestAnswers`)."""
        await self._request_answers.on_key_request(event)

    async def _on_withheld(self, event: RoomKeyWithheld) -> None:
        """A peer could not set up an Olm session with us (see :class:`NoOlmAnswers`)."""
        await self._no_olm.on_withheld(event)


# ---------------------------------------------------------------------------------------------


def _is_no_olm(event: RoomKeyWithheld) -> bool:
    return event.code == WithheldCode.NO_OLM


def _is_room_key_failure(event: OutboxSendFailed) -> bool:
    return event.event_type == _ENCRYPTED_EVENT
