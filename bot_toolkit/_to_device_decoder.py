"""The nio plugin's decoding: every received to-device event to its typed event, listeners told.

:meth:`ToDeviceDecoder.decode` decodes the raw dict (never nio's event objects) with
:func:`bot_toolkit.events.decode`. A failure is counted in ``nio_decode_errors_total`` and logged
once per distinct error (:class:`~bot_toolkit._decode_report.DecodeErrorReporter`), the
:data:`DecodeErrorListener` s are called, and with ``dispatch_undecodable`` an
:class:`~bot_toolkit.undecodable.UndecodableEvent` takes the event's place. A decoded event goes
to the :data:`DecodedListener` s. Listeners run synchronously, before the event is handed on; an
exception from one is logged and counted (``on_error("listener")``), nothing more.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from bot_toolkit._decode_report import DecodeErrorReporter
from bot_toolkit.events import DecodeError, ToDeviceEvent, decode
from bot_toolkit.metrics import Metrics
from bot_toolkit.undecodable import undecodable_from

__all__ = ["DecodeErrorListener", "DecodedListener", "ToDeviceDecoder"]

# The plugin's parts log under one name (users filter on it).
logger = logging.getLogger("bot_toolkit.nio_plugin")

_MAX_LOGGED_DECODE_ERRORS: Final = 256
"""Distinct (event type, path, reason) decode errors logged; later new ones are only counted."""

DecodeErrorListener = Callable[[Mapping[str, Any], DecodeError, "str | None"], None]
"""``listener(raw, error, decrypted_from)``: a to-device event failed to decode. ``raw`` is the
event as received (for a decrypted payload: ``type``, ``sender`` and a copy of ``content``);
``decrypted_from`` is the Olm sender key of a decrypted payload, else ``None``. Do not modify
``raw``; copy what you keep."""

DecodedListener = Callable[[ToDeviceEvent, Mapping[str, Any]], None]
"""``listener(event, raw)``: ``event`` was decoded from ``raw`` (same conventions as above)."""


class ToDeviceDecoder:
    """The decoding of one :class:`~bot_toolkit.nio_plugin.NioPlugin`; ``on_error(where)`` is the
    plugin's log-and-count of an unexpected error."""

    def __init__(
        self, metrics: Metrics, *, dispatch_undecodable: bool, on_error: Callable[[str], None]
    ) -> None:
        self.dispatch_undecodable = dispatch_undecodable
        """Whether an :class:`UndecodableEvent` is dispatched for each event failing to decode."""
        self._error = on_error
        self._error_listeners: list[DecodeErrorListener] = []
        self._decoded_listeners: list[DecodedListener] = []
        m_decode = metrics.counter(
            "nio_decode_errors_total", "To-device events that failed to decode", ["event_type"]
        )
        self._report = DecodeErrorReporter(m_decode, logger, limit=_MAX_LOGGED_DECODE_ERRORS)

    def add_error_listener(self, listener: DecodeErrorListener) -> Callable[[], None]:
        """Call ``listener`` for each event that fails to decode; returns a remover."""
        return _subscribe(self._error_listeners, listener)

    def add_decoded_listener(self, listener: DecodedListener) -> Callable[[], None]:
        """Call ``listener`` for each event decoded; returns a remover."""
        return _subscribe(self._decoded_listeners, listener)

    def decode(self, raw: dict[str, Any], decrypted_from: str | None) -> ToDeviceEvent | None:
        """The typed event (or its :class:`UndecodableEvent`); ``None`` when none is dispatched."""
        try:
            event = decode(raw, decrypted_from=decrypted_from)
        except DecodeError as exc:
            self._report.report(exc, raw.get("sender"))
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


def _subscribe(listeners: list[Any], listener: Any) -> Callable[[], None]:
    listeners.append(listener)

    def remove() -> None:
        with contextlib.suppress(ValueError):
            listeners.remove(listener)

    return remove
