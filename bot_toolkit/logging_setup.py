"""Logging for the standalone bot: text or JSON lines, with secrets redacted from every record.

:class:`Redactor` knows the shapes secrets take in log text (``Authorization: Bearer ...``,
``access_token=...`` query parameters, ``"password": "..."`` in JSON or dict reprs) and, once told,
the literal secret values (:meth:`Redactor.add`, e.g. the access token the homeserver returns at
login). :class:`RedactingFilter` applies it to the message, the extra fields, the traceback and the
stack of each record; the formatters apply it once more to the finished line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import IO, Any, Final, Literal

from bot_toolkit.log_guard import FloodGuard, json_safe, one_line

__all__ = [
    "REDACTED",
    "JsonFormatter",
    "RedactingFilter",
    "Redactor",
    "TextFormatter",
    "active_redactor",
    "setup_logging",
]

REDACTED: Final = "<redacted>"

_SENSITIVE_KEYS: Final = frozenset(
    {
        "access_token",
        "refresh_token",
        "admin_token",
        "token",
        "password",
        "passwd",
        "passphrase",
        "session_key",
        "secret",
        "private_key",
        "pickle_key",
        "recovery_key",
        "authorization",
    }
)
_KEYS = "|".join(sorted(_SENSITIVE_KEYS, key=len, reverse=True))
_VALUE = r"""(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s&'",;)}\]]+)"""
_PATTERNS: Final = (
    # Authorization: Bearer xyz  /  Bearer xyz
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1" + REDACTED),
    # "access_token": "xyz"  /  'password': 'xyz'  (JSON and Python reprs; the quote is kept)
    (
        re.compile(rf"""(?i)(["'](?:{_KEYS})["']\s*:\s*)(["'])(?:(?!\2)[^\\]|\\.)*\2"""),
        r"\1\2" + REDACTED + r"\2",
    ),
    # Synapse (syt_, syr_) and MAS (mat_, mar_, mct_) access and refresh tokens anywhere
    (re.compile(r"\b(?:syt|syr|mat|mar|mct)_[A-Za-z0-9_]{8,}"), REDACTED),
    # access_token=xyz (query strings, key=value logs, keyword reprs)
    (re.compile(rf"(?i)(?<![A-Za-z0-9_])((?:{_KEYS})=){_VALUE}"), r"\1" + REDACTED),
)
_MIN_SECRET = 4  # shorter literals would redact ordinary words


class Redactor:
    """Removes secrets from text; thread-safe."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        """Redact this literal value from now on (values shorter than 4 characters are ignored)."""
        if len(secret) < _MIN_SECRET:
            return
        with self._lock:
            if secret not in self._secrets:
                self._secrets = tuple(sorted((*self._secrets, secret), key=len, reverse=True))

    def redact(self, text: str) -> str:
        """``text`` with every known secret and secret-shaped value replaced by ``<redacted>``."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def redact_value(self, value: Any) -> Any:
        """Redact a structured value: sensitive dict keys lose their value, strings are redacted."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Mapping):
            return {
                k: REDACTED
                if isinstance(k, str) and k.lower() in _SENSITIVE_KEYS
                else self.redact_value(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple | set | frozenset):
            return [self.redact_value(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.redact(repr(value))


_STANDARD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


class RedactingFilter(logging.Filter):
    """Rewrites each record so no secret reaches a handler; attach it to handlers, not loggers."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        r = self.redactor
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what there is
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = r.redact(message)
        record.args = None
        for key, value in _extras(record).items():
            setattr(record, key, r.redact_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = r.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = r.redact(record.stack_info)
        return True


def _timestamp(record: logging.LogRecord) -> str:
    ts = datetime.fromtimestamp(record.created, UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _continuation(text: str) -> str:
    """A traceback or stack under its record: every line escaped and indented by ``"  | "``, so
    an exception message holding a line break cannot start a line that looks like a record."""
    return "\n".join("  | " + one_line(line) for line in text.split("\n"))


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: <message> key=value ...`` with the traceback on following lines.

    Every line break and display control in the message is escaped (``\\x0a``, ``\\u2028``; see
    :func:`~bot_toolkit.log_guard.one_line`), so one record is one line, followed only by its
    own traceback, whose lines start with ``"  | "``.
    """

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<8} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v!r}" for k, v in extras.items())
        line = one_line(line)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + _continuation(record.exc_text)
        if record.stack_info:
            line += "\n" + _continuation(self.formatStack(record.stack_info))
        return self.redactor.redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, the extra fields,
    and ``exc`` / ``stack`` when present. Extra fields never replace the base keys."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            obj[key if key not in obj else f"extra_{key}"] = self.redactor.redact_value(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = record.stack_info
        text = json.dumps(obj, default=repr, ensure_ascii=False)
        return json_safe(self.redactor.redact(text))


_HANDLER_MARK = "_bot_toolkit_handler"
_active = Redactor()


def active_redactor() -> Redactor:
    """The redactor of the handler :func:`setup_logging` installed last (add secrets learnt later,
    such as the access token returned at login, with :meth:`Redactor.add`)."""
    return _active


def setup_logging(
    level: str = "INFO",
    fmt: Literal["text", "json"] = "text",
    *,
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
) -> Redactor:
    """Send every log record to ``stream`` (stderr) as text or JSON lines, secrets redacted,
    peer strings escaped and truncated, each call site rate-limited (see
    :mod:`bot_toolkit.log_guard`).

    Replaces the handler an earlier call installed (so it can be called again once the config is
    known). Returns the :class:`Redactor`; call :meth:`Redactor.add` with secrets learnt later.
    """
    global _active  # noqa: PLW0603 - one logging setup per process
    redactor = Redactor(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(FloodGuard())  # first: a suppressed record costs nothing more
    handler.addFilter(RedactingFilter(redactor))
    handler.setFormatter(JsonFormatter(redactor) if fmt == "json" else TextFormatter(redactor))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    # one line per HTTP request is noise; /metrics counts them
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    _active = redactor
    return redactor
