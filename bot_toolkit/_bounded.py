"""The one bounded map: at most ``maxlen`` entries, the least recently written (or touched)
evicted first. Every per-peer table fed by what remote users send (rate limits, backoffs,
de-duplication, raw contents) is one of these, so no peer can make it grow without bound."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import TypeVar

__all__ = ["BoundedMap"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedMap(MutableMapping[K, V]):
    """A mapping of at most ``maxlen`` entries; see the module docs.

    Writing a key (new or not) makes it the most recent; :meth:`touch` does so without writing.
    Reading does not change the order.
    """

    __slots__ = ("_data", "maxlen")

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self.maxlen = maxlen
        self._data: OrderedDict[K, V] = OrderedDict()

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __setitem__(self, key: K, value: V) -> None:
        data = self._data
        data[key] = value
        data.move_to_end(key)
        while len(data) > self.maxlen:
            data.popitem(last=False)

    def __delitem__(self, key: K) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def touch(self, key: K) -> None:
        """Make ``key`` the most recent entry (``KeyError`` when absent)."""
        self._data.move_to_end(key)

    def __repr__(self) -> str:
        return f"BoundedMap(maxlen={self.maxlen}, entries={len(self._data)})"
