"""A bound on the nesting depth of JSON values from peers, checked before anything recurses.

Python's ``copy.deepcopy``, ``json`` and ``repr`` recurse once (or more) per level, so a
to-device event nested some hundreds of levels deep (well under any size limit) would raise
``RecursionError`` in whatever copies it first. :func:`exceeds_depth` walks a value without
recursion; :func:`bot_toolkit.events.decode` refuses content deeper than
:data:`MAX_JSON_DEPTH` with a ``DecodeError`` before any copy is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = ["MAX_JSON_DEPTH", "exceeds_depth"]

MAX_JSON_DEPTH: Final = 64
"""Deepest nesting of objects and arrays accepted in event content (real events use < 10)."""


def exceeds_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests objects/arrays more than ``limit`` levels deep (iterative).

    A scalar has depth 0, ``{}`` and ``[]`` depth 1. Stops at the first level past ``limit``.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        depth += 1
        if depth > limit:
            return True
        stack.extend((child, depth) for child in children)
    return False
