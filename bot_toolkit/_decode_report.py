"""The one decode-error reporter: count every to-device event that fails to decode, log each
distinct failure once.

Used by the dispatcher (``put_raw``) and the nio plugin. The event type is sender-chosen, so the
metric label is :func:`~bot_toolkit.events.event_type_label` (known types, else ``other``) and
the logged type is cut to 100 characters; at most ``limit`` distinct (type, path, reason)
triples are remembered, after which new ones are only counted (one line says so).
"""

from __future__ import annotations

import logging
from typing import Final

from bot_toolkit.events import DecodeError, event_type_label
from bot_toolkit.metrics import Counter

__all__ = ["DecodeErrorReporter"]

_TYPE_CHARS: Final = 100


class DecodeErrorReporter:
    """Counts into ``counter`` (one label: the event type label) and logs to ``logger``."""

    __slots__ = ("_counter", "_limit", "_logger", "_seen")

    def __init__(self, counter: Counter, logger: logging.Logger, *, limit: int = 256) -> None:
        self._counter = counter
        self._logger = logger
        self._limit = limit
        self._seen: set[tuple[str, str, str]] = set()

    def report(self, exc: DecodeError, sender: object = None) -> None:
        """Count ``exc``; log it when this (type, path, reason) was not logged before."""
        event_type = exc.event_type or "<unknown>"
        self._counter.inc(event_type_label(event_type))
        triple = (event_type[:_TYPE_CHARS], exc.path, exc.reason)
        seen = self._seen
        if triple in seen or len(seen) >= self._limit:
            return
        seen.add(triple)
        self._logger.warning(
            "cannot decode a %s to-device event from %s at %s: %s "
            "(later identical errors are only counted)",
            triple[0],
            sender if sender is not None else "<unknown sender>",
            exc.path or "<event>",
            exc.reason,
        )
        if len(seen) == self._limit:
            self._logger.warning("too many distinct decode errors; new ones are only counted now")
