"""The stack is wired once: in :class:`bot_toolkit.BotToolkit`.

Read by AST over ``tests/``, ``benchmarks/``, ``examples/`` and ``bot_toolkit/``: no function
outside ``bot_toolkit/toolkit.py`` constructs two or more of the stack's parts (the dispatcher,
the store, the HTTP transport, the outbox, the nio plugin, key sharing, the verification
manager) or connects them with ``watch()``. Code that needs the stack builds a ``BotToolkit``
(and reads its parts); a test that needs one more knob gets it on the facade.

The exception is :data:`UNIT_TESTS`: modules that test *one* part and so build it with the
inputs its constructor takes (an outbox needs a store and a transport, the plugin a
dispatcher). Each entry names that one part and those inputs; a function there that builds a
second part, or anything else, is wiring again and fails the test.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("tests", "benchmarks", "examples", "bot_toolkit")
FACADE = "bot_toolkit/toolkit.py"

CLASSES = {
    "Dispatcher": "dispatcher",
    "Store": "store",
    "HttpTransport": "transport",
    "Outbox": "outbox",
    "NioPlugin": "plugin",
    "KeySharing": "key_sharing",
    "VerificationManager": "verification",
}
"""Constructors of the stack's parts (``Store.open``/``Store.open_in`` count as ``Store``; a
class of the same module derived from one of these counts as it)."""

ATTACH = {"nio_plugin": "plugin", "key_sharing": "key_sharing"}
"""Modules whose ``attach()`` builds a part (matched on the module name, so a module split into
``nio_plugin/...`` or ``_key_sharing_...`` is still seen)."""

PARTS = frozenset({"outbox", "plugin", "key_sharing", "verification"})
"""The parts that run (each one a unit a test may build alone)."""

INPUTS = frozenset({"dispatcher", "store", "transport"})
"""What the running parts take in their constructors."""

WATCH = "watch()"
"""Connecting the verification manager to the plugin by hand: the facade's job."""


@dataclass(frozen=True)
class Unit:
    """One running part a module tests alone, and the inputs it builds it with."""

    part: str
    inputs: frozenset[str] = frozenset()

    def covers(self, kinds: frozenset[str]) -> bool:
        return kinds <= {self.part} | self.inputs


def _unit(part: str, *inputs: str) -> Unit:
    return Unit(part, frozenset(inputs))


UNIT_TESTS: dict[str, tuple[Unit, ...]] = {
    # The outbox alone, over a store and a (fake, counting or HTTP) transport; its
    # OutboxSendFailed events go to a dispatcher.
    "tests/test_outbox.py": (_unit("outbox", "store", "transport", "dispatcher"),),
    "tests/test_outbox_faults.py": (_unit("outbox", "store", "transport"),),
    "tests/outbox_crash_child.py": (_unit("outbox", "store", "transport"),),
    "benchmarks/outbox_fanout.py": (_unit("outbox", "store", "transport"),),
    # The nio plugin alone, feeding a dispatcher (and its durable inbound queue, in a store).
    "tests/test_nio_plugin.py": (_unit("plugin", "dispatcher"),),
    "tests/test_nio_plugin_integration.py": (_unit("plugin", "dispatcher"),),
    "tests/test_nio_bounds.py": (_unit("plugin", "dispatcher"),),
    "tests/test_inbound_queue.py": (_unit("plugin", "dispatcher", "store"),),
    "benchmarks/inbound_queue.py": (_unit("plugin", "dispatcher", "store"),),
    # The nio contract: attach() of the plugin, and of key sharing, fails on a broken nio hook
    # (each in a test of its own).
    "tests/test_nio_contract.py": (
        _unit("plugin", "dispatcher"),
        _unit("key_sharing", "dispatcher", "store"),
    ),
    # Key sharing alone (a fake outbox): its tables in a store, its notices into a dispatcher.
    "tests/test_key_sharing.py": (_unit("key_sharing", "dispatcher", "store"),),
    # The verification manager alone (fake keys, a fake outbox, no nio client): the one unit
    # harness, make_side(), that the manager's and the in-room tests share.
    "tests/verification_helpers.py": (_unit("verification", "dispatcher"),),
}
"""Modules that test one part alone: ``path: (Unit, ...)``. Each function of such a module
that builds parts must fit one of its units: a second running part is wiring again."""


@dataclass(frozen=True)
class Wiring:
    """One function (or module body) that builds two or more parts."""

    path: str
    scope: str
    kinds: frozenset[str]

    def __str__(self) -> str:
        return f"{self.path}::{self.scope} builds {', '.join(sorted(self.kinds))}"


def _attach_modules(tree: ast.Module) -> tuple[dict[str, str], dict[str, str]]:
    """Names bound to the part-building ``attach`` functions and to their modules."""
    functions: dict[str, str] = {}
    modules: dict[str, str] = {}

    def kind_of(module: str) -> str | None:
        parts = module.split(".")
        return next((k for stem, k in ATTACH.items() for p in parts if stem in p), None)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                bound = alias.asname or alias.name
                if alias.name == "attach" and node.module and (k := kind_of(node.module)):
                    functions[bound] = k
                elif k := kind_of(alias.name):
                    modules[bound] = k
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if (k := kind_of(alias.name)) and alias.asname:
                    modules[alias.asname] = k
                elif k:
                    modules[alias.name] = k  # used as the dotted name
    return functions, modules


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def parts_built(source: str) -> dict[str, frozenset[str]]:
    """``{scope: parts}`` for each function (``outer.inner``; ``<module>`` for the body) of
    ``source`` that builds or connects a part; see :data:`CLASSES`, :data:`ATTACH`."""
    tree = ast.parse(source)
    classes = dict(CLASSES)
    for node in ast.walk(tree):  # local subclasses (a dispatcher that records, ...)
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if (name := _dotted(base)) and name.rpartition(".")[2] in CLASSES:
                    classes[node.name] = CLASSES[name.rpartition(".")[2]]
    functions, modules = _attach_modules(tree)

    def kind(call: ast.Call) -> str | None:
        name = _dotted(call.func)
        if name is None:  # a call on a call's result, a subscript, ...
            func = call.func
            return WATCH if isinstance(func, ast.Attribute) and func.attr == "watch" else None
        head, _, last = name.rpartition(".")
        if name in classes:
            return classes[name]
        if head and last in CLASSES:
            return CLASSES[last]  # module.Outbox(...)
        if last in ("open", "open_in") and head.rpartition(".")[2] == "Store":
            return "store"
        if name in functions:
            return functions[name]
        if last == "attach" and head in modules:
            return modules[head]
        if last == "watch":
            return WATCH
        return None

    found: dict[str, set[str]] = {}

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, f"{scope}.{child.name}" if scope != "<module>" else child.name)
                continue
            if isinstance(child, ast.Call) and (k := kind(child)):
                found.setdefault(scope, set()).add(k)
            visit(child, scope)

    visit(tree, "<module>")
    return {scope: frozenset(kinds) for scope, kinds in found.items()}


def _modules(root: Path) -> Iterator[tuple[str, Path]]:
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel != FACADE and "node_modules" not in path.parts:
                yield rel, path


def wiring(root: Path) -> list[Wiring]:
    """Every function under ``root`` (the repo's layout) that builds two or more parts, or
    connects them with ``watch()``; the facade excluded, the unit tests included."""
    out: list[Wiring] = []
    for rel, path in _modules(root):
        for scope, kinds in parts_built(path.read_text(encoding="utf-8")).items():
            if len(kinds) >= 2:
                out.append(Wiring(rel, scope, kinds))
    return out


def allowed(found: Wiring) -> bool:
    """Whether ``found`` is one part built with its inputs in a module of :data:`UNIT_TESTS`."""
    return any(unit.covers(found.kinds) for unit in UNIT_TESTS.get(found.path, ()))


def violations(root: Path) -> list[Wiring]:
    """The wiring under ``root`` that :data:`UNIT_TESTS` does not cover: must be none."""
    return [w for w in wiring(root) if not allowed(w)]


# ------------------------------------------------------------------------------ the tree


def test_the_stack_is_wired_only_by_the_facade() -> None:
    found = violations(ROOT)
    assert found == [], "build the stack through BotToolkit:\n" + "\n".join(map(str, found))


def test_each_unit_test_entry_is_one_part_and_still_needed() -> None:
    found = wiring(ROOT)
    for path, units in UNIT_TESTS.items():
        for unit in units:
            assert unit.part in PARTS and unit.inputs <= INPUTS, path  # never two running parts
            used = [w for w in found if w.path == path and unit.covers(w.kinds)]
            assert used, f"{path} no longer builds {unit.part} with its inputs: drop the entry"


def test_the_facade_itself_builds_every_part() -> None:
    """The scan sees the facade's constructions (so its silence elsewhere means something)."""
    source = (ROOT / FACADE).read_text(encoding="utf-8")
    built = set().union(*parts_built(source).values())
    assert set(CLASSES.values()) <= built, built


# ------------------------------------------------------------------------------ planted wiring

PLANTED = """
from bot_toolkit import nio_plugin as np
from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.verification import VerificationManager

async def running_peer(client, policy):
    dispatcher = Dispatcher()
    plugin = np.attach(client, dispatcher, intercept_verification=True)
    manager = VerificationManager(client, dispatcher, object(), policy)
    manager.watch(plugin)
"""


def _plant(root: Path, path: str, source: str) -> None:
    for top in SCANNED:
        (root / top).mkdir(parents=True, exist_ok=True)
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(source, encoding="utf-8")


def test_planted_wiring_is_found(tmp_path: Path) -> None:
    _plant(tmp_path, "tests/test_planted.py", PLANTED)
    (found,) = violations(tmp_path)
    assert (found.path, found.scope) == ("tests/test_planted.py", "running_peer")
    assert found.kinds == {"dispatcher", "plugin", "verification", WATCH}


@pytest.mark.parametrize(
    "source",
    [
        # attach() imported by name, the module split into a package
        "from bot_toolkit.nio_plugin.core import attach\n"
        "from bot_toolkit.outbox import Outbox\n"
        "def f(c, d, t, s):\n    attach(c, d)\n    Outbox(t, s)\n",
        # key sharing through its module, the store through Store.open_in, nested function
        "import bot_toolkit.key_sharing as ks\nfrom bot_toolkit.store import Store\n"
        "async def f(c, o, d, p):\n    async def inner():\n"
        "        s = await Store.open_in(p)\n"
        "        await ks.attach(c, store=s, outbox=o, dispatcher=d)\n",
        # a local subclass of the dispatcher, the outbox through its module
        "import bot_toolkit.outbox as ob\nfrom bot_toolkit.dispatcher import Dispatcher\n"
        "class Mine(Dispatcher):\n    pass\n"
        "def f(t, s):\n    ob.Outbox(t, s, dispatcher=Mine())\n",
        # at module level
        "from bot_toolkit.store import Store\n"
        "from bot_toolkit.outbox import HttpTransport, Outbox\n"
        "OUTBOX = Outbox(HttpTransport('http://127.0.0.1', 't'), Store('x'))\n",
    ],
)
def test_every_way_of_building_is_seen(tmp_path: Path, source: str) -> None:
    _plant(tmp_path, "benchmarks/planted.py", source)
    assert [w.path for w in violations(tmp_path)] == ["benchmarks/planted.py"]


def test_a_second_part_in_a_unit_test_module_is_wiring(tmp_path: Path) -> None:
    """An allow-listed module only covers its one part with its inputs."""
    source = (
        "from bot_toolkit.outbox import Outbox\nfrom bot_toolkit.store import Store\n"
        "from bot_toolkit.verification import VerificationManager\n"
        "async def test_alone(t, p):\n    Outbox(t, await Store.open(p))\n"
        "async def test_wired(t, p, c, d, pol):\n"
        "    o = Outbox(t, await Store.open(p))\n    VerificationManager(c, d, o, pol)\n"
    )
    _plant(tmp_path, "tests/test_outbox.py", source)
    found = violations(tmp_path)
    assert [(w.path, w.scope) for w in found] == [("tests/test_outbox.py", "test_wired")]


def test_the_facade_and_single_parts_are_not_wiring(tmp_path: Path) -> None:
    _plant(tmp_path, FACADE, PLANTED)
    _plant(
        tmp_path,
        "tests/test_one_part.py",
        "from bot_toolkit.dispatcher import Dispatcher\nfrom bot_toolkit import BotToolkit\n"
        "def test_a():\n    Dispatcher()\n    BotToolkit(object(), 'd')\n"
        "def test_b(m, p):\n    m.watch(p)\n",
    )
    assert violations(tmp_path) == []
