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
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from nio import AsyncClient
from nio.exceptions import VerificationError

from bot_toolkit import log_guard  # noqa: F401 - SQL parameters never reach a log
from bot_toolkit._decode_report import DecodeErrorReporter
from bot_toolkit._inbound_link import InboundLink
from bot_toolkit._json_depth import exceeds_depth
from bot_toolkit._key_query_guard import KEY_QUERY_WAIT, KeyQueryGuard
from bot_toolkit._nio_adapter import NioHooks, drop_empty_entries, ensure_supported
from bot_toolkit._nio_identity import (
    DeviceKeys,
    EncryptionNotReady,
    OwnIdentity,
    device_keys,
    our_identity,
)
from bot_toolkit._olm_checks import curve25519_problem, payload_problem
from bot_toolkit.dispatcher import Dispatcher, DispatcherClosed
from bot_toolkit.events import DecodeError, ToDeviceEvent, decode
from bot_toolkit.inbound_queue import InboundQueue
from bot_toolkit.metrics import Metrics
from bot_toolkit.undecodable import UndecodableEvent, undecodable_from

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

_OLM_ALGORITHM: Final = "m.olm.v1.curve25519-aes-sha2"
_MAX_LOGGED_DECODE_ERRORS: Final = 256
"""Distinct (event type, path, reason) decode errors logged; later new ones are only counted."""

_MARK: Final = "_bot_toolkit_plugin"
"""Attribute on our client wrapper naming its plugin (finds a plugin already attached)."""


DecodeErrorListener = Callable[[Mapping[str, Any], DecodeError, "str | None"], None]
"""``listener(raw, error, decrypted_from)``: a to-device event failed to decode. ``raw`` is the
event as received (for a decrypted payload: ``type``, ``sender`` and a copy of ``content``);
``decrypted_from`` is the Olm sender key of a decrypted payload, else ``None``. Do not modify
``raw``; copy what you keep."""

DecodedListener = Callable[[ToDeviceEvent, Mapping[str, Any]], None]
"""``listener(event, raw)``: ``event`` was decoded from ``raw`` (same conventions as above)."""


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


@dataclass(slots=True)
class _Envelope:
    """What happened to one Olm ``m.room.encrypted`` event while nio handled it."""

    sender_key: str | None
    validated: object = None  # the payload our validation let through
    decrypted: bool = False  # a trusted payload came out (dispatched or counted as malformed)
    rejected: bool = False


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
        self.backpressure_timeout = backpressure_timeout
        self.dispatch_undecodable = dispatch_undecodable
        """Whether an :class:`UndecodableEvent` is dispatched for each event failing to decode."""
        self.trusted_own_devices = frozenset(trusted_own_devices)
        """Own devices whose key requests reach nio (see :func:`attach`)."""
        self._error_listeners: list[DecodeErrorListener] = []
        self._decoded_listeners: list[DecodedListener] = []
        self.metrics = metrics or getattr(dispatcher, "metrics", None) or Metrics()
        m = self.metrics
        self._m_events = m.counter(
            "nio_to_device_total",
            "To-device events the nio plugin handed to the dispatcher",
            ["source"],  # plaintext, decrypted, undecrypted, undecodable
        )
        self._m_dropped = m.counter(
            "nio_to_device_dropped_total",
            "To-device events the nio plugin could not hand over",
            ["reason"],  # queue_full, closed, unparsed, error
        )
        self._m_decode = m.counter(
            "nio_decode_errors_total", "To-device events that failed to decode", ["event_type"]
        )
        self._m_rejected = m.counter(
            "nio_olm_rejected_total", "Decrypted Olm payloads that failed validation", ["reason"]
        )
        self._m_errors = m.counter(
            "nio_plugin_errors_total", "Unexpected errors caught inside the nio hooks", ["where"]
        )
        self._m_kept = m.counter(
            "nio_kept_from_nio_total",
            "To-device events handled without nio (reason: key_request, invalid_sender_key)",
            ["reason"],
        )
        self._m_intercepted = m.counter(
            "nio_verification_intercepted_total",
            "Verification events kept from nio's built-in SAS",
            ["event_type"],
        )
        self._attached = True
        self._hooks = NioHooks()
        self._olm: Any = None
        self._batch: list[ToDeviceEvent] | None = None
        self._unparsed: deque[object] = deque()
        self._envelope: _Envelope | None = None
        self._received: list[tuple[int, Mapping[str, Any] | None, str | None]] = []
        """Per event of the batch being handled: wire position, raw form, Olm sender key."""
        self._wire_index = -1
        self._inbound: InboundLink | None = None
        self._decode_report = DecodeErrorReporter(
            self._m_decode, logger, limit=_MAX_LOGGED_DECODE_ERRORS
        )
        self._key_queries = KeyQueryGuard(
            client,
            m,
            errors=self._m_errors,
            on_error=self._error,
            attached=lambda: self._attached,
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
        return self._attached

    def detach(self) -> None:
        """Remove the hooks (idempotent); nio behaves as before :func:`attach` again."""
        if not self._attached:
            return
        self._attached = False
        self._hooks.undo()
        self._olm = None
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
        return _subscribe(self._error_listeners, listener)

    def add_decoded_listener(self, listener: DecodedListener) -> Callable[[], None]:
        """Call ``listener(event, raw)`` for each event decoded, before it is dispatched.

        Same guarantees as :meth:`add_decode_error_listener`. Returns a remover.
        """
        return _subscribe(self._decoded_listeners, listener)

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
        if olm is None or olm is self._olm:
            return
        self._olm = olm
        self._hooks.install(olm, "_verify_olm_payload", lambda orig: self._wrap_verify(olm, orig))
        self._hooks.install(olm, "_handle_olm_event", lambda orig: self._wrap_payload(olm, orig))
        self._hooks.install(olm, "_handle_key_query", self._key_queries.wrap_handle_key_query)
        if self.intercept_verification:
            self._hooks.install(olm, "handle_key_verification", self._wrap_verification)

    def _wrap_batch(self, original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def handle_to_device(response: Any) -> None:
            if not self._attached:
                await original(response)
                return
            self._hook_olm()
            batch: list[ToDeviceEvent] = []
            unparsed = await self._recover_unparsed(response)
            outer = self._batch, self._unparsed
            self._batch, self._unparsed = batch, unparsed
            self._received, self._wire_index = [], -1
            try:
                await original(response)
            except BaseException:
                self._batch, self._unparsed = outer
                self._hand_over_nowait(batch, 0)
                raise
            self._batch, self._unparsed = outer
            if self._inbound is not None:
                batch = await self._inbound.persist(batch, self._received)
            await self._hand_over(batch)

        return handle_to_device

    def _wrap_event(self, original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def handle_decrypt_to_device(event: Any) -> Any:
            if not self._attached:
                return original(event)
            self._hook_olm()
            self._wire_index += 1
            raw = getattr(event, "source", None)
            if event is None and self._unparsed:
                raw = self._unparsed.popleft()
            envelope = None
            try:
                envelope = _envelope_of(raw)
            except Exception:
                self._error("envelope")
            kept = self._kept_from_nio(raw, envelope)
            outer, self._envelope = self._envelope, envelope
            try:
                if kept is not None:
                    self._m_kept.inc(kept)
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
                self._envelope = outer
                self._drop_empty_entries(raw, envelope)
                self._after_event(raw, envelope)

        setattr(handle_decrypt_to_device, _MARK, self)
        return handle_decrypt_to_device

    def _kept_from_nio(self, raw: object, envelope: _Envelope | None) -> str | None:
        """Why nio must not see this wire event (it is still dispatched), or ``None``.

        * An Olm envelope whose ``sender_key`` is not a Curve25519 key: nio would index its
          session store with it (a new empty entry per key) before failing.
        * A room-key request (or cancellation) from anyone but a trusted own device: nio
          forwards keys to verified devices of our own user, and keeps a cancellation's
          ``(sender, requesting_device_id)`` in a ``defaultdict`` for good. Our key-sharing
          handlers answer these requests from the dispatcher.
        """
        if envelope is not None and curve25519_problem(envelope.sender_key) is not None:
            return "invalid_sender_key"
        if isinstance(raw, dict) and raw.get("type") == "m.room_key_request":
            content = raw.get("content")
            device = content.get("requesting_device_id") if isinstance(content, dict) else None
            if raw.get("sender") != self.client.user_id or device not in self.trusted_own_devices:
                return "key_request"
        return None

    def _drop_empty_entries(self, raw: object, envelope: _Envelope | None) -> None:
        """Remove the empty entries nio's ``defaultdict`` look-ups left for this event's keys.

        nio 0.26 indexes its device store by sender, its Olm session store by sender key and
        its waiting key requests by (sender, device) while handling an event, which inserts an
        empty entry for every new key a peer chooses. Empty entries carry no state, so
        removing them changes nothing but memory.
        """
        olm = self.client.olm
        if olm is None or not isinstance(raw, dict):
            return
        try:
            content = raw.get("content")
            device = content.get("requesting_device_id") if isinstance(content, dict) else None
            sender_key = envelope.sender_key if envelope is not None else None
            drop_empty_entries(olm, raw.get("sender"), sender_key, device)
        except Exception:
            self._error("drop_empty_entries")

    def _wrap_verify(
        self, olm: Any, original: Callable[[str, Any], Any]
    ) -> Callable[[str, Any], Any]:
        def verify_olm_payload(sender: str, payload: Any) -> Any:
            if not self._attached:
                return original(sender, payload)
            envelope = self._envelope
            reason = self._check(olm, sender, envelope.sender_key if envelope else None, payload)
            if reason is not None:
                self._reject(sender, reason)
                raise VerificationError(f"Olm payload rejected: {reason}")
            try:
                result = original(sender, payload)
            except VerificationError:
                self._reject(sender, "nio")
                raise
            if envelope is not None:
                envelope.validated = payload
            return result

        return verify_olm_payload

    def _wrap_payload(
        self, olm: Any, original: Callable[[str, str, Any], Any]
    ) -> Callable[[str, str, Any], Any]:
        def handle_olm_event(sender: str, sender_key: str, payload: Any) -> Any:
            if not self._attached:
                return original(sender, sender_key, payload)
            envelope = self._envelope
            if envelope is None or envelope.validated is not payload:
                # Not seen by our validation (nio changed its call order?): check here.
                reason = self._check(olm, sender, sender_key, payload)
                if reason is not None:
                    self._reject(sender, reason)
                    return None
            if envelope is not None:
                envelope.decrypted = True
            event = None
            raw: dict[str, Any] | None = None
            try:
                # Decoded before nio runs: nio mutates some payloads (forwarded key chains).
                content = payload.get("content")
                raw = {
                    "type": payload.get("type"),
                    "sender": sender,
                    # Too deep to copy: decode() refuses it before anything recurses into it.
                    "content": content if exceeds_depth(content) else copy.deepcopy(content),
                }
                event = self._decode(raw, sender_key)
            except Exception:
                self._error("decode_payload")
            try:
                return original(sender, sender_key, payload)
            finally:
                if event is not None:
                    self._emit(event, "decrypted", raw, sender_key)

        return handle_olm_event

    def _wrap_verification(self, original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def handle_key_verification(event: Any) -> None:
            if not self._attached:
                original(event)
                return
            self._m_intercepted.inc(type(event).__name__)
            logger.debug(
                "kept %s from %s away from nio's built-in SAS",
                type(event).__name__,
                getattr(event, "sender", None),
            )

        return handle_key_verification

    async def _recover_unparsed(self, response: Any) -> deque[object]:
        """The raw events nio's parser replaced by ``None``, from the HTTP body it read.

        nio drops a to-device event with an empty ``content`` (or an ``m.room.encrypted`` one
        with an unknown algorithm) while parsing, leaving ``None`` at its position. The body is
        re-read (aiohttp keeps it) only when that happened.
        """
        try:
            parsed = response.to_device_events
            missing = [i for i, event in enumerate(parsed) if event is None]
            if not missing:
                return deque()
            transport = getattr(response, "transport_response", None)
            if transport is not None:
                body = json.loads(await transport.read())
                raws = body.get("to_device", {}).get("events", [])
                if isinstance(raws, list) and len(raws) == len(parsed):
                    return deque(raws[i] for i in missing)
            logger.warning("cannot find the raw form of %d unparsed to-device events", len(missing))
        except Exception:
            self._error("recover_unparsed")
        return deque()

    # ----------------------------------------------------------------- per event

    def _after_event(self, raw: object, envelope: _Envelope | None) -> None:
        """After nio handled one wire event: dispatch it unless its payload went instead."""
        try:
            if not isinstance(raw, dict):
                self._m_dropped.inc("unparsed")
                logger.warning("nio could not parse a to-device event and it has no raw form")
                return
            if envelope is not None and envelope.decrypted:
                return
            event = self._decode(raw, None)
            if event is not None:
                self._emit(event, "plaintext" if envelope is None else "undecrypted", raw)
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

    def _check(self, olm: Any, sender: str, sender_key: str | None, payload: Any) -> str | None:
        """Why a decrypted payload must be discarded, or ``None``. Never raises."""
        try:
            return payload_problem(olm, sender, sender_key, payload)
        except Exception:
            self._error("validate")
            return "validation error"

    def _reject(self, sender: str, reason: str) -> None:
        self._m_rejected.inc(reason)
        if self._envelope is not None:
            self._envelope.rejected = True
        logger.warning("discarded a decrypted Olm payload from %s: %s", sender, reason)

    def decode_stored(
        self, raw: dict[str, Any], decrypted_from: str | None
    ) -> ToDeviceEvent | None:
        """Decode an event stored by the inbound queue as a received one is decoded (listeners
        included); ``None`` when nothing is dispatched for it."""
        return self._decode(raw, decrypted_from)

    def _decode(self, raw: dict[str, Any], decrypted_from: str | None) -> ToDeviceEvent | None:
        """The typed event (or its :class:`UndecodableEvent`); ``None`` when none is dispatched."""
        try:
            event = decode(raw, decrypted_from=decrypted_from)
        except DecodeError as exc:
            self._decode_failed(raw, exc)
            for error_listener in tuple(self._error_listeners):
                try:
                    error_listener(raw, exc, decrypted_from)
                except Exception:
                    self._error("listener")
            if not self.dispatch_undecodable:
                return None
            return undecodable_from(raw, exc, decrypted_from)
        for listener in tuple(self._decoded_listeners):
            try:
                listener(event, raw)
            except Exception:
                self._error("listener")
        return event

    def _decode_failed(self, raw: dict[str, Any], exc: DecodeError) -> None:
        """Count and (once per distinct error) log a decode failure."""
        self._decode_report.report(exc, raw.get("sender"))

    def _emit(
        self,
        event: ToDeviceEvent,
        source: str,
        raw: Mapping[str, Any] | None = None,
        decrypted_from: str | None = None,
    ) -> None:
        if isinstance(event, UndecodableEvent):
            source = "undecodable"
        self._m_events.inc(source)
        if self._batch is not None:
            self._batch.append(event)
            self._received.append((self._wire_index, raw, decrypted_from))
        else:  # outside a sync's to-device section (nio called its hooks from elsewhere)
            self._hand_over_nowait([event], 0)

    # ----------------------------------------------------------------- handoff

    async def _hand_over(self, batch: list[ToDeviceEvent]) -> None:
        """``await put`` each event, waiting at most ``backpressure_timeout`` in all."""
        if not batch:
            return
        done = 0
        try:
            async with asyncio.timeout(self.backpressure_timeout):
                for event in batch:
                    await self.dispatcher.put(event)
                    done += 1
        except TimeoutError:
            logger.warning(
                "dispatcher still full after %.1fs; %d to-device events of this sync left",
                self.backpressure_timeout,
                len(batch) - done,
            )
        except DispatcherClosed:
            self._drop(len(batch) - done, "closed")
            return
        except Exception:
            self._error("put")
        self._hand_over_nowait(batch, done)

    def _hand_over_nowait(self, batch: list[ToDeviceEvent], start: int) -> None:
        lost: dict[str, int] = {}
        for event in batch[start:]:
            try:
                if self.dispatcher.put_nowait(event):
                    continue
                reason = "queue_full"
            except DispatcherClosed:
                reason = "closed"
            except Exception:
                self._error("put_nowait")
                reason = "error"
            lost[reason] = lost.get(reason, 0) + 1
        for reason, count in lost.items():
            self._drop(count, reason)

    def _drop(self, count: int, reason: str) -> None:
        if count <= 0:
            return
        self._m_dropped.inc(reason, amount=count)
        logger.warning("dropped %d to-device events (%s)", count, reason)

    def _error(self, where: str) -> None:
        self._m_errors.inc(where)
        with contextlib.suppress(Exception):
            logger.exception("bot_toolkit nio plugin failed in %s; nio carries on", where)


def _subscribe(listeners: list[Any], listener: Any) -> Callable[[], None]:
    listeners.append(listener)

    def remove() -> None:
        with contextlib.suppress(ValueError):
            listeners.remove(listener)

    return remove


def _envelope_of(raw: object) -> _Envelope | None:
    """An :class:`_Envelope` when ``raw`` is an Olm ``m.room.encrypted`` event."""
    if not isinstance(raw, dict) or raw.get("type") != "m.room.encrypted":
        return None
    content = raw.get("content")
    if not isinstance(content, dict) or content.get("algorithm") != _OLM_ALGORITHM:
        return None
    sender_key = content.get("sender_key")
    return _Envelope(sender_key if isinstance(sender_key, str) else None)
