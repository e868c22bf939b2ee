"""Guards on the test suite itself: no test waits by counting event-loop turns or sleeping.

A loop of ``await asyncio.sleep(0)`` (``for _ in range(20): await asyncio.sleep(0)``), or a
test that itself awaits ``asyncio.sleep(0.1)`` before checking, lets the other tasks run "about
long enough": on a loaded machine a positive check then runs before the work it checks, and a
negative check ("the handler was not called", "nothing was sent") passes whether or not the
work would have happened a moment later. Tests wait on real conditions instead, with a bounded
timeout: an ``asyncio.Event`` the work sets, ``Dispatcher.join()`` / ``Dispatcher.idle`` (see
``settle`` in ``verification_helpers.py``), a task set's ``join``. Polling a condition in a
bounded loop is fine, and so is a handler or fake that sleeps as the behaviour under test.

A loop that yields on purpose (a handler that interleaves with others, never a wait for work),
or a test's sleep that is itself what is tested, says so on its line:
``# sleep-count-ok: <why>``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent
MARKER = "# sleep-count-ok:"


def _fixed_sleep(stmt: ast.stmt) -> float | None:
    """The delay of ``await asyncio.sleep(<number>)`` / ``await sleep(<number>)`` (also
    ``delay=<number>``), or ``None`` for any other statement."""
    if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Await)):
        return None
    call = stmt.value.value
    if not isinstance(call, ast.Call):
        return None
    func = call.func
    named_sleep = (isinstance(func, ast.Attribute) and func.attr == "sleep") or (
        isinstance(func, ast.Name) and func.id == "sleep"
    )
    delays = [*call.args, *(k.value for k in call.keywords if k.arg == "delay")]
    if not (named_sleep and len(delays) == 1 and isinstance(delays[0], ast.Constant)):
        return None
    delay = delays[0].value
    if isinstance(delay, bool) or not isinstance(delay, int | float):
        return None
    return float(delay)


def _is_zero_sleep(stmt: ast.stmt) -> bool:
    """``await asyncio.sleep(0)`` or ``await sleep(0)`` (``0``, ``0.0``, or ``delay=0``)."""
    return _fixed_sleep(stmt) == 0.0


def _marked(lines: list[str], lineno: int) -> bool:
    _, marker, reason = lines[lineno - 1].partition(MARKER)
    return bool(marker and reason.strip())


_NOT_OWN = (ast.For, ast.AsyncFor, ast.While, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _own_statements(func: ast.AsyncFunctionDef | ast.FunctionDef) -> Iterator[ast.stmt]:
    """The statements of ``func`` outside any loop and any nested function or class."""
    todo: list[ast.stmt] = list(func.body)
    while todo:
        stmt = todo.pop()
        if isinstance(stmt, _NOT_OWN):
            continue
        yield stmt
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(stmt, field, ()):
                if isinstance(child, ast.ExceptHandler | ast.match_case):
                    todo.extend(child.body)
                else:
                    todo.append(child)


def fixed_sleeps_in_tests(source: str, filename: str = "<string>") -> list[int]:
    """Lines where a ``test_*`` function itself awaits ``sleep(<number>)`` outside a loop: a
    fixed wait for work to finish (a poll inside a loop, or a handler that sleeps, is not)."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not (
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
        ):
            continue
        for stmt in _own_statements(node):
            if _fixed_sleep(stmt) is not None and not _marked(lines, stmt.lineno):
                found.append(stmt.lineno)
    return sorted(found)


def sleep_count_loops(source: str, filename: str = "<string>") -> list[int]:
    """Lines of ``for`` / ``async for`` / ``while`` loops whose body does nothing but await
    ``sleep(0)``, unless the loop's first line carries the opt-out marker with a reason."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.For | ast.AsyncFor | ast.While):
            continue
        body = [s for s in node.body if not isinstance(s, ast.Pass)]
        if body and all(_is_zero_sleep(s) for s in body) and not _marked(lines, node.lineno):
            found.append(node.lineno)
    return sorted(found)


def offenders(paths: Iterable[Path], root: Path = TESTS.parent) -> list[str]:
    """``file:line`` (relative to ``root``) of every sleep-count loop and every fixed sleep of
    a test in ``paths``."""
    out = []
    for path in sorted(paths):
        source = path.read_text(encoding="utf-8")
        lines = sleep_count_loops(source, str(path)) + fixed_sleeps_in_tests(source, str(path))
        out.extend(f"{path.relative_to(root).as_posix()}:{line}" for line in sorted(lines))
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


async def test_sleeps_then_checks(d):
    await d.put(1)
    if d.slow:
        await asyncio.sleep(0.5)
    try:
        await asyncio.sleep(0)  # one turn for the work
    finally:
        assert d.seen == [1]


async def handler(event, rng):
    for _ in range(rng.randrange(6)):  # sleep-count-ok: interleaves handlers, waits for nothing
        await asyncio.sleep(0)
    for _ in range(2):  # sleep-count-ok:
        await asyncio.sleep(0)


async def test_fine(d):
    async def slow_handler(event):
        await asyncio.sleep(30)  # the behaviour under test: a handler that hangs

    for n in range(3):
        await asyncio.sleep(0)
        d.step(n)
    while not d.done:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1)  # sleep-count-ok: the clock must tick once, checked below
    for _ in range(2):
        await d.sleep(1)


async def helper(d):
    await asyncio.sleep(0)
"""


def _line_of(text: str, nth: int = 0) -> int:
    return [i for i, line in enumerate(PLANTED.splitlines(), 1) if text in line][nth]


def test_the_guard_finds_planted_sleep_counts() -> None:
    assert sleep_count_loops(PLANTED) == [
        _line_of("for _ in range(20):"),
        _line_of("while not d.done:"),
        _line_of("for _ in range(3):"),
        _line_of("# sleep-count-ok:", 1),  # the marker needs a reason
    ]


def test_the_guard_finds_planted_fixed_sleeps_in_tests() -> None:
    assert fixed_sleeps_in_tests(PLANTED) == [
        _line_of("await asyncio.sleep(0.5)"),
        _line_of("one turn for the work"),
    ]


def test_the_guard_names_file_and_line(tmp_path: Path) -> None:
    planted = tmp_path / "tests" / "test_planted.py"
    planted.parent.mkdir()
    planted.write_text(PLANTED, encoding="utf-8")
    clean = tmp_path / "tests" / "test_clean.py"
    clean.write_text("import asyncio\n\n\nasync def test_x(e):\n    await e.wait()\n")
    lines = sorted(sleep_count_loops(PLANTED) + fixed_sleeps_in_tests(PLANTED))
    assert len(lines) == 6
    assert offenders([clean, planted], root=tmp_path) == [
        f"tests/test_planted.py:{line}" for line in lines
    ]
