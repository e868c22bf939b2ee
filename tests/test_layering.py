"""The package's layering, read from its import graph, and its front door.

* Library code never imports the standalone bot's modules (``bot`` and its private ``_bot_*``
  parts, ``http_api``, ``config``, ``cli``, ``demo``, and the bot's plugin host), by any kind of
  import: top-level, inside a
  function (lazy), under ``TYPE_CHECKING``, or by name through ``importlib`` / a lazy-export
  table.
* Importing a pure module loads neither nio nor aiohttp (checked in a fresh interpreter).
* ``bot_toolkit`` and ``bot_toolkit.verification`` export what a user needs, and every exported
  name resolves.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import bot_toolkit
import bot_toolkit.verification

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bot_toolkit"

STANDALONE = frozenset(
    {
        "bot_toolkit.bot",
        "bot_toolkit.http_api",
        "bot_toolkit.config",
        "bot_toolkit.cli",
        "bot_toolkit.demo",
        "bot_toolkit.session",
        "bot_toolkit.__main__",
        "bot_toolkit.plugin_host",  # the standalone bot's plugin system (reads [plugins])
        "bot_toolkit.identity.operator",  # `bot-toolkit identity ...`: CLI code (BotConfig, Bot)
    }
)
"""The standalone bot: it may import the library, never the other way round."""

STANDALONE_PREFIXES = ("bot_toolkit.plugins", "bot_toolkit._bot_")
"""Module name prefixes of the standalone bot: its bundled plugins, and the parts split out of
``bot.py`` (``_bot_login``, ``_bot_sync``, ...)."""

ALLOWED = frozenset({("bot_toolkit", "bot_toolkit.plugin_host")})
"""The front door's lazy export of ``Plugin``/``PluginError`` for plugin authors (loaded only
when a plugin module imports it, i.e. inside the standalone bot)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_standalone(module: str) -> bool:
    return module in STANDALONE or module.startswith(STANDALONE_PREFIXES)


def imports_of(path: Path) -> set[str]:
    """Every bot_toolkit module the file ``path`` imports (see :func:`imports_in`)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    return imports_in(path.read_text(encoding="utf-8"), package)


def imports_in(source: str, package: str) -> set[str]:
    """Every bot_toolkit module ``source`` (a module of ``package``) imports, however:
    statements anywhere in the file and module names in string constants
    (``importlib.import_module``, lazy-export tables)."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith("bot_toolkit.")
            and " " not in node.value
        ):
            found.add(node.value)
    return {name for name in found if name == "bot_toolkit" or name.startswith("bot_toolkit.")}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Library modules that import a standalone-bot module (``importer -> imported``)."""
    found = []
    for importer, imported in graph.items():
        if _is_standalone(importer):
            continue
        for name in sorted(imported):
            target = next((s for s in STANDALONE if name == s or name.startswith(s + ".")), None)
            if target is None and name.startswith(STANDALONE_PREFIXES):
                target = name
            if target is not None and (importer, target) not in ALLOWED:
                found.append(f"{importer} -> {name}")
    return found


def test_library_never_imports_the_standalone_bot() -> None:
    graph = import_graph()
    assert "bot_toolkit.toolkit" in graph and "bot_toolkit.verification.manager" in graph
    assert violations(graph) == []


def test_the_checker_sees_every_kind_of_import() -> None:
    """The graph reader finds top-level, lazy, TYPE_CHECKING and by-name imports."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "import importlib\n"
        "import bot_toolkit.demo\n"
        "if TYPE_CHECKING:\n"
        "    from bot_toolkit.config import BotConfig\n"
        "def later():\n"
        "    from bot_toolkit import http_api\n"
        "    from .bot import Bot\n"
        "    from bot_toolkit._bot_login import BotLogin\n"
        "    return importlib.import_module('bot_toolkit.cli')\n"
    )
    probe = "bot_toolkit.probe"
    assert violations({probe: imports_in(source, "bot_toolkit")}) == [
        f"{probe} -> bot_toolkit._bot_login",
        f"{probe} -> bot_toolkit._bot_login.BotLogin",
        f"{probe} -> bot_toolkit.bot",
        f"{probe} -> bot_toolkit.bot.Bot",
        f"{probe} -> bot_toolkit.cli",
        f"{probe} -> bot_toolkit.config",
        f"{probe} -> bot_toolkit.config.BotConfig",
        f"{probe} -> bot_toolkit.demo",
        f"{probe} -> bot_toolkit.http_api",
    ]
    # The same imports from a standalone module are fine.
    assert violations({"bot_toolkit.cli": imports_in(source, "bot_toolkit")}) == []
    assert violations({"bot_toolkit._bot_sync": imports_in(source, "bot_toolkit")}) == []


def test_the_bots_split_out_parts_are_standalone() -> None:
    """Every ``_bot_*`` module exists in the graph and counts as the standalone bot's."""
    parts = sorted(m for m in import_graph() if m.startswith("bot_toolkit._bot_"))
    assert parts == [
        "bot_toolkit._bot_homeserver",
        "bot_toolkit._bot_login",
        "bot_toolkit._bot_sas_dm",
        "bot_toolkit._bot_sync",
    ]
    assert all(_is_standalone(m) for m in parts)


PURE = [
    "bot_toolkit",
    "bot_toolkit.events",
    "bot_toolkit.verification",
    "bot_toolkit.verification.table",
    "bot_toolkit.verification.policy",
    "bot_toolkit.verification.lifecycle",
]


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_load_neither_nio_nor_aiohttp(module: str) -> None:
    code = (
        f"import sys, json; import {module}; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'nio', 'aiohttp', 'aiosqlite', 'vodozemac'})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(out.stdout) == [], out.stdout


def test_the_front_door_exports_resolve() -> None:
    for name in bot_toolkit.__all__:
        assert getattr(bot_toolkit, name) is not None, name
    for name in (
        "BotToolkit",
        "Dispatcher",
        "VerificationPolicy",
        "SharingPolicy",
        "VerificationDone",
        "RoomKeyWithheld",
        "ToolkitError",
    ):
        assert name in bot_toolkit.__all__, name
    with pytest.raises(AttributeError):
        _ = bot_toolkit.no_such_name  # type: ignore[attr-defined]


def test_verification_exports_only_what_a_user_calls() -> None:
    assert sorted(bot_toolkit.verification.__all__) == [
        "CancelCode",
        "KeySource",
        "OutboxLike",
        "SasPrompt",
        "SasReady",
        "State",
        "UserIdentityChanged",
        "UserVerified",
        "VerificationCancelled",
        "VerificationDone",
        "VerificationInfo",
        "VerificationManager",
        "VerificationPolicy",
        "VerificationRequested",
    ]
    for name in bot_toolkit.verification.__all__:
        assert getattr(bot_toolkit.verification, name) is not None, name
    with pytest.raises(AttributeError):
        _ = bot_toolkit.verification.transition  # type: ignore[attr-defined]


def test_the_readme_lists_the_public_api() -> None:
    import bot_toolkit.testing  # noqa: PLC0415 - loads nio; only this test needs it

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## The public API")
    section = text[start : text.index("\n## ", start + 1)]
    listed = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", section))
    for module in (bot_toolkit, bot_toolkit.verification, bot_toolkit.testing):
        missing = [n for n in module.__all__ if n != "__version__" and n not in listed]
        assert missing == [], f"{module.__name__}: not in the README's public API: {missing}"
