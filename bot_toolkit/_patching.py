"""Replace one attribute of one object (never a class) and put it back later.

bot_toolkit hooks nio through attributes of a single client or Olm machine instance, so several
clients can live in one process and ``detach()`` restores nio exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["HookSet", "InstancePatch"]


class InstancePatch:
    """One instance attribute replaced by ``make(current)``; :meth:`undo` restores it.

    If someone else wrapped the attribute again after us, :meth:`undo` leaves it alone: our
    wrapper then stays in their chain as a pass-through rather than cutting them off.
    """

    __slots__ = ("_had_own", "_name", "_obj", "_previous", "_wrapper")

    def __init__(self, obj: Any, name: str, make: Callable[[Any], Any]) -> None:
        self._obj, self._name = obj, name
        self._had_own = name in vars(obj)
        self._previous = vars(obj).get(name)
        self._wrapper = make(getattr(obj, name))
        setattr(obj, name, self._wrapper)

    def undo(self) -> None:
        """Restore the attribute as it was, if it is still ours."""
        if vars(self._obj).get(self._name) is not self._wrapper:
            return
        if self._had_own:
            setattr(self._obj, self._name, self._previous)
        else:
            delattr(self._obj, self._name)


class HookSet:
    """Instance patches installed together and undone together, last first.

    The one "hook set with undo" of bot_toolkit: the nio adapter's
    :class:`~bot_toolkit._nio_adapter.NioHooks` builds on it.
    """

    __slots__ = ("_patches",)

    def __init__(self) -> None:
        self._patches: list[InstancePatch] = []

    def patch(self, obj: Any, name: str, make: Callable[[Any], Any]) -> None:
        """Replace ``obj.name`` by ``make(current)`` until :meth:`undo`."""
        self._patches.append(InstancePatch(obj, name, make))

    def undo(self) -> None:
        """Restore every attribute, last patched first (idempotent)."""
        while self._patches:
            self._patches.pop().undo()

    def __len__(self) -> int:
        return len(self._patches)
