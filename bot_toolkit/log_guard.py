"""Log lines a peer cannot forge or flood: escaping, truncation and a per-call-site rate limit.

Log messages carry peer-chosen strings (user and device ids, transaction ids, event types, nio's
own messages about bad events). Three guards keep the log readable under attack:

* **Escaping.** :func:`one_line` escapes every character that any common reader treats as a line
  break or a display control: all C0 and C1 controls (``\\n``, ``\\r``, ``\\v``, ``\\f``,
  ``\\x1c``-``\\x1e``, NEL ``\\x85``...), DEL, U+2028/U+2029, bidi and other format characters
  (``\\u202e``, ``\\u2066``...), and every other character Python deems unprintable (separators
  other than the space, surrogates, unassigned code points). Tab stays. :func:`json_safe` does
  the same inside JSON text with ``\\uXXXX`` escapes (``json.dumps`` leaves U+2028, U+2029 and C1
  raw).
* **Truncation.** :class:`FloodGuard` shortens each string argument of a record to
  :data:`MAX_ARG` characters and a foreign library's (nio's) whole message to
  :data:`MAX_FOREIGN_MESSAGE`, marking what was cut.
* **Rate limit.** :class:`FloodGuard` lets through at most ``burst`` records per call site
  (logger, file, line) in each ``window`` seconds; the next record that passes says how many
  were suppressed. A flood of bad events costs a bounded number of lines.
* **No SQL parameters.** At DEBUG, peewee (nio's store) logs every statement with its
  parameters, among them nio's pickled Olm account and sessions, and aiosqlite (bot_toolkit's
  store) logs every call with its arguments. :class:`SqlParameterFilter`, attached to those two
  loggers when this module is imported (so also for bots that set up logging themselves), keeps
  the statement (peewee) or the operation's name (aiosqlite) and drops every parameter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

__all__ = [
    "MAX_ARG",
    "MAX_FOREIGN_MESSAGE",
    "SQL_LOGGERS",
    "FloodGuard",
    "SqlParameterFilter",
    "guard_sql_loggers",
    "json_safe",
    "one_line",
]

MAX_ARG: Final = 256
"""Longest string argument of a log record, in characters (the rest is cut, marked)."""

MAX_FOREIGN_MESSAGE: Final = 512
"""Longest message of a record from another library (nio formats peer strings in itself)."""

_OWN_PREFIX: Final = "bot_toolkit"


def _escape(ch: str) -> str:
    cp = ord(ch)
    if cp < 0x100:
        return f"\\x{cp:02x}"
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def one_line(text: str) -> str:
    """``text`` with every line break and display control escaped (``\\x0a``, ``\\u2028``...)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == "\t" else _escape(ch) for ch in text)


def _json_escape(ch: str) -> str:
    cp = ord(ch)
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    cp -= 0x10000
    return f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}"


def json_safe(text: str) -> str:
    """JSON text (from ``json.dumps``) with every unprintable character as a ``\\u`` escape.

    Outside strings ``json.dumps`` writes only printable ASCII, so this only rewrites string
    contents, and the result decodes to the same value.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _json_escape(ch) for ch in text)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters]"


class FloodGuard(logging.Filter):
    """Truncates peer-sized strings and rate-limits each call site; attach to handlers.

    ``burst`` records per (logger, file, line) per ``window`` seconds pass (DEBUG records are
    not limited: DEBUG is opted into for diagnosis). ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        burst: int = 20,
        window: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        # call site -> [window start, passed in window, suppressed since the last one passed]
        self._sites: dict[tuple[str, str, int], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        suppressed = 0
        if record.levelno > logging.DEBUG:
            site = (record.name, record.pathname, record.lineno)
            now = self.clock()
            with self._lock:
                state = self._sites.get(site)
                if state is None:
                    state = self._sites[site] = [now, 0.0, 0.0]
                if now - state[0] >= self.window:
                    state[0], state[1] = now, 0.0
                if state[1] >= self.burst:
                    state[2] += 1
                    return False
                state[1] += 1
                suppressed, state[2] = int(state[2]), 0.0
        self._truncate(record)
        if suppressed:
            record.msg = f"{record.msg} [{suppressed} similar lines suppressed]"
        return True

    @staticmethod
    def _truncate(record: logging.LogRecord) -> None:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and len(a) > MAX_ARG for a in args):
            record.args = tuple(_cut(a, MAX_ARG) if isinstance(a, str) else a for a in args)
        if not record.name.startswith(_OWN_PREFIX):
            try:
                message = record.getMessage()
            except Exception:  # a bad format string: the formatter shows what there is
                return
            if len(message) > MAX_FOREIGN_MESSAGE:
                record.msg, record.args = _cut(message, MAX_FOREIGN_MESSAGE), None


SQL_LOGGERS: Final = ("peewee", "aiosqlite")
"""Loggers that print SQL parameters at DEBUG (nio's peewee store, bot_toolkit's aiosqlite)."""


class SqlParameterFilter(logging.Filter):
    """Rewrites SQL debug records so no parameter (a pickled key, a message) reaches a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if isinstance(msg, tuple) and len(msg) == 2 and isinstance(msg[0], str):  # peewee
            params = msg[1]
            count = len(params) if isinstance(params, list | tuple) else 0
            record.msg, record.args = "%s [%d parameters not logged]", (msg[0], count)
        elif record.name.startswith("aiosqlite"):
            words = str(msg).split()
            what = words[0] if words else "call"
            func = record.args[0] if isinstance(record.args, tuple) and record.args else None
            name = getattr(getattr(func, "func", func), "__name__", type(func).__name__)
            record.msg, record.args = "%s %s [arguments not logged]", (what, name)
        return True


def guard_sql_loggers() -> None:
    """Attach :class:`SqlParameterFilter` to :data:`SQL_LOGGERS` (idempotent)."""
    for name in SQL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, SqlParameterFilter) for f in logger.filters):
            logger.addFilter(SqlParameterFilter())


guard_sql_loggers()
