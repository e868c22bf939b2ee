"""Feed every to-device event a ``nio.AsyncClient`` receives into a :class:`Dispatcher`.

``plugin = attach(client, dispatcher)`` hooks one client (nothing is patched globally, so
several clients can live in one process) and ``plugin.detach()`` undoes it. After that:

* **Plaintext events** are decoded with :func:`bot_toolkit.events.decode` from the raw dict
  (``event.source``) that nio parsed, never from nio's own event objects. That includes the
  types nio leaves as ``UnknownToDeviceEvent`` (request, ready, done, withheld, ``m.secret.*``)
  and the ``m.room_key_request`` events nio hides from its own callbacks.
* **Olm-decrypted payloads** of every type (also the ones nio drops: encrypted
  ``m.key.verification.*``, ``m.secret.send``, custom types) are decoded with
  ``decrypted_from`` set to the sender's curve25519 key. nio still handles ``m.room_key``,
  ``m.forwarded_room_key`` and ``m.dummy`` exactly as before.
* **The Olm envelope** (``m.room.encrypted``) is dispatched as
  :class:`~bot_toolkit.events.OlmEncrypted` only when no trusted payload came out of it:
  decryption failed, the ciphertext is not for this device, or the payload failed validation.
  Handlers thus see each wire event once: as its payload, or as a failed envelope.

Payload validation follows the spec ("Validation of incoming decrypted events"; the checks are in
:mod:`bot_toolkit._olm_checks`): ``sender`` equals the to-device sender, ``recipient`` is our
user id, ``recipient_keys.ed25519`` our key, ``keys.ed25519`` the sending device's key when that
device is in nio's device store, and ``sender_device_keys``, when present, agrees with the
envelope and is self-signed. A payload
that fails is discarded (neither nio nor the dispatcher gets it), logged and counted in
``nio_olm_rejected_total``; its envelope is dispatched as a failed one.

Handoff: events of one sync are decoded inside nio's processing and handed to the dispatcher
when nio has finished the sync's to-device section, in wire order, with ``await put``. A full
dispatcher therefore slows the sync loop (the homeserver keeps undelivered to-device messages),
but for at most ``backpressure_timeout`` seconds per sync; what still does not fit is dropped,
counted in ``nio_to_device_dropped_total`` and logged. Nothing raised by this module reaches
nio's sync loop: failures are logged and counted in ``nio_plugin_errors_total``. The same goes
for an exception nio itself raises while handling one to-device event (nio 0.26 lets vodozemac's
``DecodeException`` for a malformed Olm body escape and end ``sync_forever``): it is logged,
counted (``where="nio_to_device"``) and the event is treated as undecryptable.

nio 0.26 hook points (all instance attributes, installed through
:class:`bot_toolkit._nio_adapter.NioHooks`, which checks each against the nio contract and
raises at :func:`attach` when one is missing or changed; restored by :meth:`NioPlugin.detach`;
the upstream nio issue behind each is in :data:`bot_toolkit._nio_adapter.CONTRACT`):

* ``client._handle_to_device(response)``: the batch boundary (handoff with backpressure).
* ``client._handle_decrypt_to_device(event)``: each wire to-device event, plaintext or not.
* ``client.olm._verify_olm_payload(sender, payload)``: payload validation (raises nio's
  ``VerificationError`` so nio discards the payload as it does for its own checks).
* ``client.olm._handle_olm_event(sender, sender_key, payload)``: each validated payload.
* ``client.olm.handle_key_verification(event)`` (only with ``intercept_verification=True``):
  replaced by a no-op, so nio neither creates its own ``Sas`` on a start nor answers key events.
* ``client.keys_query()``: queries the pending users in bounded batches (a user never in two
  requests at once, a slow remote homeserver's users left pending as failures) and waits at
  most :data:`KEY_QUERY_WAIT` seconds
  (a ``KeysQueryError`` when some are still coming, an empty ``KeysQueryResponse`` when all
  arrived: the answers go to nio as they come), so no slow homeserver holds up the sync loop.
  With nothing left to query it returns a ``KeysQueryError`` instead of raising
  ``LocalProtocolError``. nio 0.26's ``sync_forever`` schedules ``keys_query()`` as a task
  when users are pending; if another task (the verification manager fetching a peer's keys, key
  sharing, the bot's own code) gets their keys first, the scheduled query finds the list empty,
  raises, and ``sync_forever`` ends. The guard makes that race harmless. This hook and the one
  on ``client.olm._handle_key_query`` (malformed devices skipped) are in
  :mod:`bot_toolkit._key_query_guard`.

Decode failures: an event that fails to decode is logged (once per distinct error) and counted in
``nio_decode_errors_total``. Consumers that must react to it have two public hooks:

* :meth:`NioPlugin.add_decode_error_listener`: ``listener(raw, error, decrypted_from)`` is called
  synchronously, in wire order, for every to-device event (plaintext or decrypted payload) that
  fails to decode; :meth:`NioPlugin.add_decoded_listener` is its counterpart for decoded events
  and gives ``listener(event, raw)`` the raw event as received (e.g. to keep fields the typed
  event drops). Both are called before the event enters the dispatcher.
* ``dispatch_undecodable=True``: the plugin dispatches an
  :class:`~bot_toolkit.undecodable.UndecodableEvent` in place of each such event, at the position
  and with the ordering key the decoded event would have had (counted as source
  ``undecodable``).

The olm hooks follow ``client.olm`` when nio creates it later (``login``, ``load_store``).
nio's parser drops a to-device event with an empty ``content`` (or an ``m.room.encrypted`` one
with an algorithm other than Olm) and leaves ``None`` in its place; the plugin then takes the
raw event from the HTTP body nio read (``response.transport_response``), or counts it as lost
(reason ``unparsed``) when that is not possible.

This module wires the parts, each in its own private module: :mod:`bot_toolkit._to_device_guard`
(events nio's parser dropped, events kept from nio, nio's empty entries),
:mod:`bot_toolkit._olm_payloads` (payload validation and the Olm envelope),
:mod:`bot_toolkit._to_device_decoder` (decoding and its listeners),
:mod:`bot_toolkit._to_device_handover` (the batch and its hand-over to the dispatcher) and
:mod:`bot_toolkit._key_query_guard`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Collection
from typing import Any, Final

from nio import AsyncClient

from bot_toolkit import log_guard  # noqa: F401 - SQL parameters never reach a log
from bot_toolkit._inbound_link import InboundLink
from bot_toolkit._key_query_guard import KEY_QUERY_WAIT, KeyQueryGuard
from bot_toolkit._nio_adapter import NioHooks, ensure_supported
from bot_toolkit._nio_identity import (
    DeviceKeys,
    EncryptionNotReady,
    OwnIdentity,
    device_keys,
    our_identity,
)
from bot_toolkit._olm_payloads import Envelope, OlmPayloadHooks, envelope_of
from bot_toolkit._to_device_decoder import DecodedListener, DecodeErrorListener, ToDeviceDecoder
from bot_toolkit._to_device_guard import ToDeviceGuard
from bot_toolkit._to_device_handover import Handover
from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.events import ToDeviceEvent
from bot_toolkit.inbound_queue import InboundQueue
from bot_toolkit.metrics import Metrics
from bot_toolkit.undecodable import UndecodableEvent

__all__ = [
    "KEY_QUERY_WAIT",
    "DecodeErrorListener",
    "DecodedListener",
    "DeviceKeys",
    "EncryptionNotReady",
    "NioPlugin",
    "OwnIdentity",
    "attach",
    "device_keys",
    "our_identity",
]

logger = logging.getLogger("bot_toolkit.nio_plugin")

_MARK: Final = "_bot_toolkit_plugin"
"""Attribute on our client wrapper naming its plugin (finds a plugin already attached)."""


def attach(
    client: AsyncClient,
    dispatcher: Dispatcher,
    *,
    intercept_verification: bool = False,
    backpressure_timeout: float = 10.0,
    metrics: Metrics | None = None,
    dispatch_undecodable: bool = False,
    trusted_own_devices: Collection[str] = (),
) -> NioPlugin:
    """Feed every to-device event ``client`` receives into ``dispatcher``; see the module doc.

    Args:
        intercept_verification: switch off nio's built-in SAS reaction for this client (use it
            when bot_toolkit runs verification; nio's ``start_key_verification`` flows stop too).
        backpressure_timeout: the longest one sync waits for room in a full dispatcher.
        metrics: where to count (default: the dispatcher's registry).
        dispatch_undecodable: dispatch an :class:`~bot_toolkit.undecodable.UndecodableEvent`
            for each event that fails to decode (also settable later on the plugin).
        trusted_own_devices: devices of the client's own user whose room-key requests nio may
            serve (forward keys to, when verified); nio never sees any other key request.

    Raises:
        TypeError: ``client`` is not a ``nio.AsyncClient``.
        RuntimeError: a plugin is already attached to ``client``.
        NioUnsupported: the installed matrix-nio is outside the tested range, or a method the
            plugin hooks is missing or changed (:class:`~bot_toolkit._nio_adapter.NioHookError`).
    """
    if not isinstance(client, AsyncClient):
        raise TypeError(f"attach() needs a nio.AsyncClient, got {type(client).__name__}")
    ensure_supported()
    if backpressure_timeout < 0:
        raise ValueError("backpressure_timeout must not be negative")
    current = getattr(vars(client).get("_handle_decrypt_to_device"), _MARK, None)
    if isinstance(current, NioPlugin) and current.attached:
        raise RuntimeError("a bot_toolkit plugin is already attached to this client")
    return NioPlugin(
        client,
        dispatcher,
        intercept_verification=intercept_verification,
        backpressure_timeout=backpressure_timeout,
        metrics=metrics,
        dispatch_undecodable=dispatch_undecodable,
        trusted_own_devices=trusted_own_devices,
    )


class NioPlugin:
    """The hooks of one client; made by :func:`attach`. Call :meth:`detach` to remove them."""

    def __init__(
        self,
        client: AsyncClient,
        dispatcher: Dispatcher,
        *,
        intercept_verification: bool,
        backpressure_timeout: float,
        metrics: Metrics | None,
        dispatch_undecodable: bool = False,
        trusted_own_devices: Collection[str] = (),
    ) -> None:
        self.client = client
        self.dispatcher = dispatcher
        self.intercept_verification = intercept_verification
        self.metrics = metrics or getattr(dispatcher, "metrics", None) or Metrics()
        m = self.metrics
        self._hooks = NioHooks()
        self._inbound: InboundLink | None = None
        self._handover = Handover(
            dispatcher,
            m,
            backpressure_timeout=backpressure_timeout,
            inbound=lambda: self._inbound,
            on_error=self._error,
        )
        self._decoder = ToDeviceDecoder(
            m, dispatch_undecodable=dispatch_undecodable, on_error=self._error
        )
        self._payloads = OlmPayloadHooks(
            m,
            attached=lambda: self._hooks.attached,
            on_error=self._error,
            decode=self._decoder.decode,
            emit=self._handover.emit,
        )
        self._m_errors = m.counter(
            "nio_plugin_errors_total", "Unexpected errors caught inside the nio hooks", ["where"]
        )
        self._guard = ToDeviceGuard(
            client, m, trusted_own_devices=trusted_own_devices, on_error=self._error
        )
        self._m_intercepted = m.counter(
            "nio_verification_intercepted_total",
            "Verification events kept from nio's built-in SAS",
            ["event_type"],
        )
        self._unparsed: deque[object] = deque()
        self._key_queries = KeyQueryGuard(
            client,
            m,
            errors=self._m_errors,
            on_error=self._error,
            attached=lambda: self._hooks.attached,
        )
        try:
            self._hooks.install(client, "_handle_to_device", self._wrap_batch)
            self._hooks.install(client, "_handle_decrypt_to_device", self._wrap_event)
            self._hooks.install(client, "keys_query", self._key_queries.wrap_keys_query)
            self._install_olm_hooks()
        except BaseException:
            self._hooks.undo()
            raise

    @property
    def attached(self) -> bool:
        """Whether the hooks are active."""
        return self._hooks.attached

    @property
    def dispatch_undecodable(self) -> bool:
        """Whether an :class:`UndecodableEvent` is dispatched for each event failing to decode
        (settable)."""
        return self._decoder.dispatch_undecodable

    @dispatch_undecodable.setter
    def dispatch_undecodable(self, value: bool) -> None:
        self._decoder.dispatch_undecodable = value

    @property
    def backpressure_timeout(self) -> float:
        """The longest one sync waits for room in a full dispatcher (see :func:`attach`)."""
        return self._handover.backpressure_timeout

    @property
    def trusted_own_devices(self) -> frozenset[str]:
        """Own devices whose key requests reach nio (see :func:`attach`)."""
        return self._guard.trusted_own_devices

    def detach(self) -> None:
        """Remove the hooks (idempotent); nio behaves as before :func:`attach` again."""
        if not self._hooks.attached:
            return
        self._hooks.undo()
        if self._inbound is not None:
            self._inbound.unlink()

    # ----------------------------------------------------------------- durable inbound

    async def use_inbound_queue(self, queue: InboundQueue) -> int:
        """Commit each sync's to-device batch to ``queue`` before nio saves its sync token (see
        :mod:`bot_toolkit.inbound_queue`). Call once, after login (nio's store must be loaded)
        and before the first sync. Returns how many events wait from the last run: hand them
        over with :meth:`replay_inbound` once the handlers are registered.
        """
        if self._inbound is not None:
            raise RuntimeError("an inbound queue is already in use")
        if self.client.store is None:
            raise RuntimeError("log in (or restore_login) before using the inbound queue")
        waiting = await queue.open()
        self._inbound = InboundLink(self, queue)
        return waiting

    async def replay_inbound(self) -> int:
        """Hand the events the last run stored but did not finish to the dispatcher again, in
        arrival order, each with its ``inbound_id``. Returns how many."""
        if self._inbound is None:
            return 0
        return await self._inbound.replay()

    async def close_inbound(self) -> None:
        """Flush acknowledgements of handled events (call before closing the store)."""
        if self._inbound is not None:
            await self._inbound.close()

    # ----------------------------------------------------------------- decode hooks

    def add_decode_error_listener(self, listener: DecodeErrorListener) -> Callable[[], None]:
        """Call ``listener(raw, error, decrypted_from)`` for each event that fails to decode.

        Called synchronously inside nio's processing, in wire order, before the event's
        :class:`UndecodableEvent` (if dispatched) enters the dispatcher. An exception from the
        listener is logged and counted (``nio_plugin_errors_total{where="listener"}``), nothing
        more. Returns a function that removes the listener.
        """
        return self._decoder.add_error_listener(listener)

    def add_decoded_listener(self, listener: DecodedListener) -> Callable[[], None]:
        """Call ``listener(event, raw)`` for each event decoded, before it is dispatched.

        Same guarantees as :meth:`add_decode_error_listener`. Returns a remover.
        """
        return self._decoder.add_decoded_listener(listener)

    def decode_stored(
        self, raw: dict[str, Any], decrypted_from: str | None
    ) -> ToDeviceEvent | None:
        """Decode an event stored by the inbound queue as a received one is decoded (listeners
        included); ``None`` when nothing is dispatched for it."""
        return self._decoder.decode(raw, decrypted_from)

    # ----------------------------------------------------------------- hooking

    def _hook_olm(self) -> None:
        """Follow ``client.olm`` when nio replaced its Olm machine (inside nio's processing:
        a failure is logged and counted, as nothing may reach nio's sync loop)."""
        try:
            self._install_olm_hooks()
        except Exception:
            self._error("hook_olm")

    def _install_olm_hooks(self) -> None:
        """Wrap the methods of ``client.olm`` (raises :class:`NioHookError` when one is missing
        or changed: at attach time that fails :func:`attach`)."""
        olm = self.client.olm
        if not self._hooks.follow_olm(olm):
            return
        payloads = self._payloads
        self._hooks.install(
            olm, "_verify_olm_payload", lambda orig: payloads.wrap_verify(olm, orig)
        )
        self._hooks.install(olm, "_handle_olm_event", lambda orig: payloads.wrap_payload(olm, orig))
        self._hooks.install(olm, "_handle_key_query", self._key_queries.wrap_handle_key_query)
        if self.intercept_verification:
            self._hooks.install(olm, "handle_key_verification", self._wrap_verification)

    def _wrap_batch(self, original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def handle_to_device(response: Any) -> None:
            if not self._hooks.attached:
                await original(response)
                return
            self._hook_olm()
            unparsed = await self._guard.recover_unparsed(response)
            async with self._handover.batch():
                outer, self._unparsed = self._unparsed, unparsed
                try:
                    await original(response)
                finally:
                    self._unparsed = outer

        return handle_to_device

    def _wrap_event(self, original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def handle_decrypt_to_device(event: Any) -> Any:
            if not self._hooks.attached:
                return original(event)
            self._hook_olm()
            self._handover.next_wire_event()
            raw = getattr(event, "source", None)
            if event is None and self._unparsed:
                raw = self._unparsed.popleft()
            envelope = None
            try:
                envelope = envelope_of(raw)
            except Exception:
                self._error("envelope")
            kept = self._guard.keep_from_nio(raw, envelope)
            payloads = self._payloads
            outer, payloads.envelope = payloads.envelope, envelope
            try:
                if kept:
                    if envelope is not None:
                        envelope.rejected = True
                    return None
                return original(event)
            except Exception as exc:
                # nio 0.26 lets e.g. vodozemac's DecodeException for a malformed Olm body
                # escape, which would end sync_forever: any sender could stop the bot. Any
                # sender can also cause it at will: one line, no traceback (rate-limited).
                self._m_errors.inc("nio_to_device")
                logger.warning(
                    "nio could not handle a to-device event from %s: %s: %s",
                    raw.get("sender") if isinstance(raw, dict) else None,
                    type(exc).__name__,
                    str(exc),
                )
                return None
            finally:
                payloads.envelope = outer
                self._guard.drop_empty_entries(raw, envelope)
                self._after_event(raw, envelope)

        setattr(handle_decrypt_to_device, _MARK, self)
        return handle_decrypt_to_device

    def _wrap_verification(self, original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def handle_key_verification(event: Any) -> None:
            if not self._hooks.attached:
                original(event)
                return
            self._m_intercepted.inc(type(event).__name__)
            logger.debug(
                "kept %s from %s away from nio's built-in SAS",
                type(event).__name__,
                getattr(event, "sender", None),
            )

        return handle_key_verification

    # ----------------------------------------------------------------- per event

    def _after_event(self, raw: object, envelope: Envelope | None) -> None:
        """After nio handled one wire event: dispatch it unless its payload went instead."""
        try:
            if not isinstance(raw, dict):
                self._handover.dropped.inc("unparsed")
                logger.warning("nio could not parse a to-device event and it has no raw form")
                return
            if envelope is not None and envelope.decrypted:
                return
            event = self._decoder.decode(raw, None)
            if event is not None:
                self._handover.emit(event, "plaintext" if envelope is None else "undecrypted", raw)
                if (
                    envelope is not None
                    and not envelope.rejected
                    and not isinstance(event, UndecodableEvent)
                ):
                    logger.info(
                        "could not decrypt an Olm to-device event from %s; dispatching it "
                        "undecrypted",
                        raw.get("sender"),
                    )
        except Exception:
            self._error("after_event")

    def _error(self, where: str) -> None:
        self._m_errors.inc(where)
        with contextlib.suppress(Exception):
            logger.exception("bot_toolkit nio plugin failed in %s; nio carries on", where)
