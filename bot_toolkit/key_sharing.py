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

The parts, each in its own module, wired together here (:class:`KeySharing` runs every
``share_group_session`` through them and owns attach, detach, close and background work):

* :mod:`bot_toolkit._key_recipients`: which devices get the key (the policy inside nio's device
  selection, claim backoff, re-sharing and rotation); what a share found, as a ``ShareRound``;
* :mod:`bot_toolkit._room_key_delivery`: the keys through the outbox (:class:`RoomKeysNotQueued`),
  ``m.unavailable`` and a new session for keys the homeserver refused;
* :mod:`bot_toolkit._share_notices`: the withheld notices after a share (refusals, ``m.no_olm``
  through the ledger, crash recovery);
* :mod:`bot_toolkit._key_request_answers`, :mod:`bot_toolkit._no_olm_answers`: the receiving
  side; :mod:`bot_toolkit._nio_sends`: nio's own to-device sends through the outbox.

nio 0.26 hook points (instance attributes, installed through
:class:`bot_toolkit._nio_adapter.NioHooks`, which raises at :func:`attach` when one is missing or
changed; the upstream nio issue behind each is in its ``CONTRACT``): ``client.share_group_session``,
``client.keys_claim``, ``olm.should_share_group_session``, ``olm.get_missing_sessions``,
``olm.share_group_session_parallel``, ``olm.is_device_blacklisted``, ``olm.save_session``. The olm
hooks follow ``client.olm`` when nio replaces it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from nio import AsyncClient

from bot_toolkit._key_recipients import KeyRecipients, ShareRound
from bot_toolkit._key_request_answers import KeyRequestAnswers
from bot_toolkit._nio_adapter import NioHooks, ensure_supported
from bot_toolkit._nio_sends import NioSends
from bot_toolkit._no_olm_answers import NoOlmAnswers
from bot_toolkit._room_key_delivery import RoomKeyDelivery, RoomKeysNotQueued, is_room_key_failure
from bot_toolkit._share_notices import ShareNotices
from bot_toolkit._sharing_context import NoticeOutbox, SharingContext
from bot_toolkit._tasks import TaskSet
from bot_toolkit._withheld_wire import WITHHELD_EVENT  # noqa: F401 - still resolves here
from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.events import RoomKeyRequest, RoomKeyWithheld, WithheldCode
from bot_toolkit.metrics import Metrics
from bot_toolkit.nio_plugin import our_identity
from bot_toolkit.outbox import OutboxSendFailed
from bot_toolkit.room_key_log import RoomKeyLog
from bot_toolkit.store import Store
from bot_toolkit.withheld import (
    ClaimBackoff,
    Clock,
    CrossSigningView,
    DummyThrottle,
    NoOlmLedger,
    PeerDevice,
    ShareWith,
    SharingPolicy,
    WithheldMetrics,
)

__all__ = ["KeySharing", "NoticeOutbox", "RoomKeysNotQueued", "attach"]

log = logging.getLogger("bot_toolkit.key_sharing")


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
    """The hooks of one client; made by :func:`attach`.

    It builds the parts (see the module doc), installs their hooks on the client and its Olm
    machine, registers their dispatcher handlers, runs each ``share_group_session`` through
    them, and owns their lifecycle and background tasks.
    """

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
        self.room_keys = room_keys
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
        self._hooks = NioHooks()
        self._tasks = TaskSet(
            log, "key sharing background", lambda _exc: self._m_errors.inc("background")
        )
        ctx = SharingContext(
            client=client,
            outbox=outbox,
            metrics=metrics,
            counters=counters,
            limited=self._m_limited,
            clock=clock,
            policy=lambda: self.policy,
            attached=lambda: self._hooks.attached,
            own=self._own,
            spawn=self._spawn,
            on_error=self._error,
        )
        self._recipients = KeyRecipients(
            ctx, backoff=self.backoff, cross_signing=lambda: self.cross_signing
        )
        self._notices = ShareNotices(ctx, ledger=ledger)
        self.deduper = self._notices.deduper
        self._no_olm = NoOlmAnswers(ctx, throttle=throttle)
        self._request_answers = KeyRequestAnswers(
            ctx, room_keys=room_keys, trust=self._recipients.trust
        )
        self._delivery = RoomKeyDelivery(
            ctx, room_keys=room_keys, rotate_later=self._recipients.rotate_later
        )
        self._nio_sends = NioSends(ctx)

        try:
            self._hooks.install(client, "share_group_session", self._wrap_share)
            self._hooks.install(client, "keys_claim", self._recipients.wrap_keys_claim)
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
        dispatcher.register(OutboxSendFailed, self._delivery.on_send_failed, is_room_key_failure)

    # ----------------------------------------------------------------- lifecycle

    @property
    def attached(self) -> bool:
        """Whether the hooks are active."""
        return self._hooks.attached

    def detach(self) -> None:
        """Remove the hooks (idempotent). Dispatcher handlers stay registered but do nothing."""
        self._hooks.undo()

    async def close(self) -> None:
        """Detach and wait for background ledger updates to finish."""
        self.detach()
        await self.flush()
        await self.join()

    @property
    def idle(self) -> bool:
        """``True`` while no background work (ledger updates, ``m.dummy`` answers) runs (what
        :meth:`join` awaits)."""
        return not self._tasks

    async def join(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until :attr:`idle`: the background work running now, and any it starts, has
        finished (a failure is logged and counted, not raised).

        Returns ``True`` once idle (at once if it already is), ``False`` if work still runs
        after ``timeout`` seconds (``None``: no limit; nothing is cancelled).
        """
        return await self._tasks.join(timeout)

    async def recover(self) -> int:
        """Record Olm sessions that exist with devices the ledger holds as told (a crash can
        lose the in-memory observation), then send ``m.no_olm`` notices that were decided but
        whose hand-over to the outbox was never recorded.

        Returns how many notices were sent again. Run by :func:`attach`; safe to call again.
        """
        return await self._notices.recover()

    async def flush(self) -> None:
        """Record observed Olm sessions in the ledger now."""
        await self._notices.flush()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    def _error(self, where: str) -> None:
        self._m_errors.inc(where)
        with contextlib.suppress(Exception):
            log.exception("key sharing failed in %s; nio carries on", where)

    def _own(self) -> tuple[str, str, str]:
        me = our_identity(self.client)
        return me.user_id, me.device_id, me.curve25519

    # ----------------------------------------------------------------- hooks

    def _hook_olm(self) -> None:
        """Follow ``client.olm`` when nio replaced its Olm machine (logged and counted when it
        fails: this runs inside nio's ``share_group_session``)."""
        try:
            self._install_olm_hooks()
        except Exception:
            self._error("hook_olm")

    def _install_olm_hooks(self) -> None:
        olm = self.client.olm
        if not self._hooks.follow_olm(olm):
            return
        hooks, recipients = self._hooks, self._recipients
        hooks.install(
            olm, "should_share_group_session", lambda o: recipients.wrap_should_share(olm, o)
        )
        hooks.install(olm, "get_missing_sessions", lambda o: recipients.wrap_missing(olm, o))
        hooks.install(
            olm, "share_group_session_parallel", lambda o: recipients.wrap_parallel(olm, o)
        )
        hooks.install(olm, "is_device_blacklisted", lambda o: recipients.wrap_blacklisted(olm, o))
        hooks.install(olm, "save_session", self._notices.wrap_save_session)

    def _wrap_share(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def share_group_session(room_id: str, ignore_unverified_devices: bool = False) -> Any:
            if not self._hooks.attached:
                return await original(room_id, ignore_unverified_devices=ignore_unverified_devices)
            self._hook_olm()
            if self.policy.share_with is not ShareWith.VERIFIED or self.cross_signing is not None:
                # Our is_device_blacklisted hook filters by the policy; nio must not refuse
                # the devices it lets through (cross-signed ones nio does not call verified).
                ignore_unverified_devices = True
            await self._recipients.refresh_cross_signing(room_id)
            await self.flush()
            current = ShareRound(room_id)
            try:
                with current.running():
                    return await self._delivery.share(room_id, ignore_unverified_devices)
            finally:
                try:
                    await self._after_share(current)
                except Exception:
                    self._error("after_share")

        share_group_session._bot_toolkit_ks = self  # type: ignore[attr-defined]
        return share_group_session

    async def _after_share(self, done: ShareRound) -> None:
        """Tell the devices ``done`` left without the key why, as the policy asks."""
        await self.flush()
        if done.refused and done.session_id is not None:
            await self._notices.send_refusals(done)
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
        if self._notices.retry_needed:
            await self._notices.resend_pending()

    async def _deliver_no_olm(self, peer: PeerDevice, txn_id: str) -> bool:
        """Hand one decided ``m.no_olm`` to the outbox (:meth:`ShareNotices.deliver_no_olm`)."""
        return await self._notices.deliver_no_olm(peer, txn_id)

    # ----------------------------------------------------------------- dispatcher handlers

    async def _on_key_request(self, event: RoomKeyRequest) -> None:
        """An ``m.room_key_request`` (see :class:`KeyRequestAnswers`)."""
        await self._request_answers.on_key_request(event)

    async def _on_withheld(self, event: RoomKeyWithheld) -> None:
        """A peer could not set up an Olm session with us (see :class:`NoOlmAnswers`)."""
        await self._no_olm.on_withheld(event)


def _is_no_olm(event: RoomKeyWithheld) -> bool:
    return event.code == WithheldCode.NO_OLM
