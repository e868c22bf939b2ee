"""Log injection and log floods: every line-breaking code point, traceback continuation lines,
JSON lines, truncation and the per-call-site rate limit (bot_toolkit.log_guard)."""

from __future__ import annotations

import io
import json
import logging
import sys
import unicodedata
from collections.abc import Iterator

import pytest

from bot_toolkit.log_guard import MAX_ARG, FloodGuard, json_safe, one_line
from bot_toolkit.logging_setup import setup_logging
from tests.fakes import FakeClock

FORGED = "2026-01-01T00:00:00.000Z CRITICAL bot_toolkit.bot: forged line"

# Every code point a common reader treats as a line break: str.splitlines() (Python), the
# Unicode line-breaking classes BK/CR/LF/NL (U+000A-000D, U+0085, U+2028, U+2029), the
# ASCII file/group/record separators Python also splits on, and JavaScript's line terminators.
LINE_BREAKS = sorted(
    {chr(c) for c in (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85)}
    | {
        "\u2028",
        "\u2029",
        "\r\n",
    }
)
# Display controls: every C0 and C1 control, DEL, and the format characters (bidi overrides
# and isolates, zero-width characters, the BOM...).
C0_C1 = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c != 0x09]  # tab stays
BIDI = [chr(c) for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))]
CONTROLS = C0_C1 + [chr(c) for c in range(0x10000) if unicodedata.category(chr(c)) == "Cf"]


@pytest.fixture
def logs() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """(text stream, json stream): the CLI's handler in each format, on two loggers."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    text, js = io.StringIO(), io.StringIO()
    try:
        setup_logging("DEBUG", "text", stream=text)
        text_handler = root.handlers[-1]
        setup_logging("DEBUG", "json", stream=js)
        root.addHandler(text_handler)  # both at once (setup_logging replaces its own)
        yield text, js
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _clean(line: str) -> bool:
    return all(ch.isprintable() or ch == "\t" for ch in line)


@pytest.mark.parametrize(
    "breaker", LINE_BREAKS + C0_C1 + BIDI, ids=lambda c: "+".join(f"U+{ord(x):04X}" for x in c)
)
def test_no_code_point_forges_a_line(logs: tuple[io.StringIO, io.StringIO], breaker: str) -> None:
    text, js = logs
    peer = f"dev{breaker}{FORGED}"
    log = logging.getLogger("bot_toolkit.test_injection")
    log.warning("request from %s", peer, extra={"device": peer})
    try:
        raise ValueError(f"bad value{breaker}{FORGED}")
    except ValueError:
        log.exception("handler failed for %s", peer)

    out = text.getvalue()
    lines = out.splitlines()  # splits on every Unicode line boundary
    assert len(out.split("\n")) - 1 == len(lines), "a line break other than \\n got through"
    records = [line for line in lines if not line.startswith("  | ")]
    assert len(records) == 2, lines
    assert all((r.startswith("20") and "WARNING" in r) or "ERROR" in r for r in records)
    assert all(_clean(line) for line in lines), [line for line in lines if not _clean(line)]
    assert not any(line.startswith(FORGED[:24]) for line in lines)
    assert any("Traceback" in line for line in lines)  # the traceback is kept, indented

    raw = js.getvalue()
    assert "\u2028" not in raw and "\u2029" not in raw and "\x85" not in raw
    json_lines = raw.splitlines()
    assert len(json_lines) == 2
    first, second = (json.loads(line) for line in json_lines)
    assert first["message"] == f"request from {peer}" and first["device"] == peer
    assert second["exc"].endswith(f"ValueError: bad value{breaker}{FORGED}")
    assert all(_clean(line) for line in json_lines)


def test_every_control_is_escaped() -> None:
    for ch in CONTROLS + LINE_BREAKS:
        escaped = one_line(f"a{ch}b")
        assert _clean(escaped) and escaped.startswith("a\\") and escaped.endswith("b"), repr(ch)
        assert json.loads(json_safe(json.dumps(f"a{ch}b", ensure_ascii=False))) == f"a{ch}b"
    assert one_line("tab\tstays, émoji 🐶 stay") == "tab\tstays, émoji 🐶 stay"


def _record(
    msg: str, *args: object, name: str = "bot_toolkit.x", line: int = 1
) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, "f.py", line, msg, args, None)


def test_flood_guard_limits_each_call_site_and_says_how_many_were_suppressed() -> None:
    clock = FakeClock(0.0)
    guard = FloodGuard(burst=5, window=60, clock=clock)
    passed = [guard.filter(_record("bad event from %s", "x")) for _ in range(1000)]
    assert passed.count(True) == 5
    assert guard.filter(_record("another site", line=2))  # its own budget
    debug = _record("debug")
    debug.levelno = logging.DEBUG
    assert all(guard.filter(debug) for _ in range(100))  # DEBUG is opted into: not limited
    clock.advance(60)
    nxt = _record("bad event from %s", "x")
    assert guard.filter(nxt)
    assert nxt.getMessage() == "bad event from x [995 similar lines suppressed]"
    again = _record("bad event from %s", "x")
    assert guard.filter(again) and again.getMessage() == "bad event from x"


def test_flood_guard_truncates_peer_strings() -> None:
    guard = FloodGuard()
    txn = "t" * 8192
    record = _record("verification %s: %s", txn, 3)
    assert guard.filter(record)
    message = record.getMessage()
    assert len(message) < MAX_ARG + 100 and "more characters]" in message
    foreign = _record(f"Received unsupported Olm event of type {'y' * 8192}", name="nio.crypto")
    assert guard.filter(foreign)
    assert len(foreign.getMessage()) < 600


def test_handler_drops_flooded_lines(logs: tuple[io.StringIO, io.StringIO]) -> None:
    text, _ = logs
    log = logging.getLogger("bot_toolkit.test_flood")
    for i in range(2000):
        log.warning("bogus event %d from %s", i, "@mallory:example.org")
    lines = text.getvalue().splitlines()
    assert 1 <= len(lines) <= 20, len(lines)
    print(f"2000 identical warnings -> {len(lines)} log lines", file=sys.stderr)


def test_sql_parameters_never_reach_a_log(caplog: pytest.LogCaptureFixture) -> None:
    """peewee (nio's store) and aiosqlite (ours) log parameters at DEBUG: the filter attached
    to their loggers on import keeps only the statement / the operation."""
    import functools  # noqa: PLC0415

    pickle = "c2VjcmV0IG9sbSBhY2NvdW50IHBpY2tsZQ"
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("peewee").debug(('UPDATE "accounts" SET "account" = ?', [pickle, 1]))

        def execute(sql: str, params: list[str]) -> None: ...

        logging.getLogger("aiosqlite").debug(
            "executing %s", functools.partial(execute, "INSERT INTO t VALUES (?)", [pickle])
        )
    assert pickle not in caplog.text
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        'UPDATE "accounts" SET "account" = ? [2 parameters not logged]',
        "executing execute [arguments not logged]",
    ]
