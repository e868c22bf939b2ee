"""Guards on the test suite itself: no test waits by counting event-loop turns.

A loop of ``await asyncio.sleep(0)`` (``for _ in range(20): await asyncio.sleep(0)``) lets the
other tasks run "about long enough": on a loaded machine a positive check then runs before the
work it checks, and a negative check ("the handler was not called", "nothing was sent") passes
whether or not the work would have happened a turn later. Tests wait on real conditions
instead, with a bounded timeout: an ``asyncio.Event`` the work sets, ``Dispatcher.join()`` /
``Dispatcher.idle`` (see ``settle`` in ``verification_helpers.py``), a task set's ``join``.

A loop that yields on purpose (a handler that interleaves with others, never a wait for work)
says so on its first line: ``# sleep-count-ok: <why>``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

TESTS = Path(__file__).resolve().parent
MARKER = "# sleep-count-ok:"


def _is_zero_sleep(stmt: ast.stmt) -> bool:
    """``await asyncio.sleep(0)`` or ``await sleep(0)`` (``0``, ``0.0``, or ``delay=0``)."""
    if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Await)):
        return False
    call = stmt.value.value
    if not isinstance(call, ast.Call):
        return False
    func = call.func
    named_sleep = (isinstance(func, ast.Attribute) and func.attr == "sleep") or (
        isinstance(func, ast.Name) and func.id == "sleep"
    )
    delays = [*call.args, *(k.value for k in call.keywords if k.arg == "delay")]
    return (
        named_sleep
        and len(delays) == 1
        and isinstance(delays[0], ast.Constant)
        and delays[0].value == 0
        and not isinstance(delays[0].value, bool)
    )


def sleep_count_loops(source: str, filename: str = "<string>") -> list[int]:
    """Lines of ``for`` / ``async for`` / ``while`` loops whose body does nothing but await
    ``sleep(0)``, unless the loop's first line carries the opt-out marker with a reason."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.For | ast.AsyncFor | ast.While):
            continue
        body = [s for s in node.body if not isinstance(s, ast.Pass)]
        if not body or not all(_is_zero_sleep(s) for s in body):
            continue
        _, marker, reason = lines[node.lineno - 1].partition(MARKER)
        if marker and reason.strip():
            continue
        found.append(node.lineno)
    return sorted(found)


def offenders(paths: Iterable[Path], root: Path = TESTS.parent) -> list[str]:
    """``file:line`` (relative to ``root``) of every sleep-count loop in ``paths``."""
    out = []
    for path in sorted(paths):
        for line in sleep_count_loops(path.read_text(encoding="utf-8"), str(path)):
            out.append(f"{path.relative_to(root).as_posix()}:{line}")
    return out


def _test_sources() -> list[Path]:
    return [p for p in TESTS.rglob("*.py") if "node_modules" not in p.parts]


def test_no_test_waits_by_counting_event_loop_turns() -> None:
    sources = _test_sources()
    assert Path(__file__).resolve() in sources  # the scan does see the suite
    found = offenders(sources)
    assert not found, (
        "loops of `await asyncio.sleep(0)` used as a wait; wait on a real condition with a "
        "bounded timeout instead (an Event, Dispatcher.join/idle, a task set's join), or mark "
        f"a deliberate interleaving with `{MARKER} <why>`: " + ", ".join(found)
    )


PLANTED = """
import asyncio
from asyncio import sleep


async def test_counts_turns(d):
    await d.put(1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert d.seen == []


async def test_spins(d):
    while not d.done:
        await sleep(0.0)


async def test_counts_with_a_keyword():
    for _ in range(3):
        await asyncio.sleep(delay=0)
        pass


async def handler(event, rng):
    for _ in range(rng.randrange(6)):  # sleep-count-ok: interleaves handlers, waits for nothing
        await asyncio.sleep(0)
    for _ in range(2):  # sleep-count-ok:
        await asyncio.sleep(0)


async def fine(d):
    for n in range(3):
        await asyncio.sleep(0)
        d.step(n)
    while not d.done:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0)
    for _ in range(2):
        await d.sleep(1)
"""


def test_the_guard_finds_planted_sleep_counts() -> None:
    lines = PLANTED.splitlines()

    def line_of(text: str, nth: int = 0) -> int:
        return [i for i, line in enumerate(lines, 1) if text in line][nth]

    assert sleep_count_loops(PLANTED) == [
        line_of("for _ in range(20):"),
        line_of("while not d.done:"),
        line_of("for _ in range(3):"),
        line_of("# sleep-count-ok:", 1),  # the marker needs a reason
    ]


def test_the_guard_names_file_and_line(tmp_path: Path) -> None:
    planted = tmp_path / "tests" / "test_planted.py"
    planted.parent.mkdir()
    planted.write_text(PLANTED, encoding="utf-8")
    clean = tmp_path / "tests" / "test_clean.py"
    clean.write_text("import asyncio\n\n\nasync def test_x():\n    await asyncio.sleep(0)\n")
    lines = sleep_count_loops(PLANTED)
    assert offenders([clean, planted], root=tmp_path) == [
        f"tests/test_planted.py:{line}" for line in lines
    ]
