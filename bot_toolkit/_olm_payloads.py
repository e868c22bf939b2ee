"""The nio plugin's hooks on decrypted Olm payloads: validate each, discard failures, pass the rest.

Validation follows the spec ("Validation of incoming decrypted events"; the checks themselves are
in :mod:`bot_toolkit._olm_checks`) and runs inside nio's ``olm._verify_olm_payload``: a payload
that fails raises nio's ``VerificationError``, so nio discards it as it does for its own checks,
and the dispatcher never gets it either; it is logged and counted in ``nio_olm_rejected_total``.
A payload that passes reaches ``olm._handle_olm_event``, where it is decoded *before* nio runs
(nio mutates some payloads, e.g. forwarded key chains) and emitted after nio handled it.

:class:`Envelope` records what happened to the Olm ``m.room.encrypted`` event nio is handling, so
that the plugin dispatches the envelope itself only when no trusted payload came out of it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from nio.exceptions import VerificationError

from bot_toolkit._json_depth import exceeds_depth
from bot_toolkit._olm_checks import payload_problem
from bot_toolkit.events import ToDeviceEvent
from bot_toolkit.metrics import Metrics

__all__ = ["OLM_ALGORITHM", "Envelope", "OlmPayloadHooks", "envelope_of"]

# The plugin's parts log under one name (users filter on it).
logger = logging.getLogger("bot_toolkit.nio_plugin")

OLM_ALGORITHM: Final = "m.olm.v1.curve25519-aes-sha2"

Decode = Callable[[dict[str, Any], "str | None"], "ToDeviceEvent | None"]
"""``decode(raw, decrypted_from)``: the event to dispatch for ``raw``, or ``None``."""
Emit = Callable[[ToDeviceEvent, str, "Mapping[str, Any] | None", "str | None"], None]
"""``emit(event, source, raw, decrypted_from)``: hand ``event`` on to the dispatcher."""


@dataclass(slots=True)
class Envelope:
    """What happened to one Olm ``m.room.encrypted`` event while nio handled it."""

    sender_key: str | None
    validated: object = None  # the payload our validation let through
    decrypted: bool = False  # a trusted payload came out (dispatched or counted as malformed)
    rejected: bool = False


def envelope_of(raw: object) -> Envelope | None:
    """An :class:`Envelope` when ``raw`` is an Olm ``m.room.encrypted`` event."""
    if not isinstance(raw, dict) or raw.get("type") != "m.room.encrypted":
        return None
    content = raw.get("content")
    if not isinstance(content, dict) or content.get("algorithm") != OLM_ALGORITHM:
        return None
    sender_key = content.get("sender_key")
    return Envelope(sender_key if isinstance(sender_key, str) else None)


class OlmPayloadHooks:
    """The payload hooks of one :class:`~bot_toolkit.nio_plugin.NioPlugin`.

    ``attached`` tells whether the plugin's hooks are active; ``on_error(where)`` is the plugin's
    log-and-count of an unexpected error; ``decode`` and ``emit`` turn a trusted payload into an
    event and hand it on. The plugin sets :attr:`envelope` around each wire event nio handles.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        attached: Callable[[], bool],
        on_error: Callable[[str], None],
        decode: Decode,
        emit: Emit,
    ) -> None:
        self._attached = attached
        self._error = on_error
        self._decode = decode
        self._emit = emit
        self._m_rejected = metrics.counter(
            "nio_olm_rejected_total", "Decrypted Olm payloads that failed validation", ["reason"]
        )
        self.envelope: Envelope | None = None
        """The Olm envelope nio is handling now (``None`` for a plaintext event)."""

    def wrap_verify(
        self, olm: Any, original: Callable[[str, Any], Any]
    ) -> Callable[[str, Any], Any]:
        """The replacement for ``olm._verify_olm_payload``: our checks, then nio's."""

        def verify_olm_payload(sender: str, payload: Any) -> Any:
            if not self._attached():
                return original(sender, payload)
            envelope = self.envelope
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

    def wrap_payload(
        self, olm: Any, original: Callable[[str, str, Any], Any]
    ) -> Callable[[str, str, Any], Any]:
        """The replacement for ``olm._handle_olm_event``: decode, let nio handle it, emit."""

        def handle_olm_event(sender: str, sender_key: str, payload: Any) -> Any:
            if not self._attached():
                return original(sender, sender_key, payload)
            envelope = self.envelope
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

    def _check(self, olm: Any, sender: str, sender_key: str | None, payload: Any) -> str | None:
        """Why a decrypted payload must be discarded, or ``None``. Never raises."""
        try:
            return payload_problem(olm, sender, sender_key, payload)
        except Exception:
            self._error("validate")
            return "validation error"

    def _reject(self, sender: str, reason: str) -> None:
        self._m_rejected.inc(reason)
        if self.envelope is not None:
            self.envelope.rejected = True
        logger.warning("discarded a decrypted Olm payload from %s: %s", sender, reason)
