"""Every Python block in the README is valid code that names only what the package exports.

The nio example is run for real by ``tests/test_examples.py``; the other blocks are fragments
(they use ``HOMESERVER`` and the like), so here each is parsed, and every name it takes from
``bot_toolkit`` (``bt.X``, ``from bot_toolkit... import X``) must exist: a renamed or removed
export breaks this test before it breaks a reader's bot.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)


def toolkit_names(tree: ast.AST) -> list[tuple[str, str]]:
    """``(module, name)`` for each name the code takes from a bot_toolkit module."""
    aliases: dict[str, str] = {}  # local name -> module
    found: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bot_toolkit":
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bot_toolkit"):
            assert node.module is not None
            found += [(node.module, alias.name) for alias in node.names]
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            found.append((aliases[node.value.id], node.attr))
    return found


def test_the_readme_has_python_blocks() -> None:
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_block_parses_and_names_real_exports(index: int) -> None:
    block = python_blocks()[index]
    tree = ast.parse(block)  # SyntaxError fails the test with the line
    for module, name in toolkit_names(tree):
        if module.startswith("bot_toolkit._") or any(p.startswith("_") for p in module.split(".")):
            pytest.fail(f"README block {index} uses the private module {module}")
        assert hasattr(importlib.import_module(module), name), f"{module}.{name} (block {index})"


def test_a_missing_export_is_found() -> None:
    tree = ast.parse("import bot_toolkit as bt\nbt.restore_client\nbt.NoSuchThing\n")
    names = toolkit_names(tree)
    assert ("bot_toolkit", "NoSuchThing") in names
    assert not hasattr(importlib.import_module("bot_toolkit"), "NoSuchThing")
