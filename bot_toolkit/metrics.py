"""In-process counters and gauges, rendered in the Prometheus text format.

Every component takes a :class:`Metrics` registry (one per bot) and records into it.
No third-party client library: the exposition format is a few lines of text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

__all__ = ["Counter", "Gauge", "Metrics"]

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    """A monotonically increasing counter with a fixed set of label names."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names: tuple[str, ...] = tuple(labels)
        self._values: dict[LabelValues, float] = {}
        self._lock = threading.Lock()

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        """Add ``amount`` to the series named by ``label_values``."""
        if len(label_values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {label_values}")
        with self._lock:
            self._values[label_values] = self._values.get(label_values, 0.0) + amount

    def get(self, *label_values: str) -> float:
        """The current value of one series (0 when never incremented)."""
        return self._values.get(label_values, 0.0)

    def total(self) -> float:
        """The sum over every series."""
        return sum(self._values.values())

    def series(self) -> dict[LabelValues, float]:
        """A copy of every series and its value."""
        with self._lock:
            return dict(self._values)

    def _samples(self) -> Iterable[tuple[LabelValues, float]]:
        return sorted(self.series().items())


class Gauge(Counter):
    """A value that goes up and down, or is read from a callback at render time."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Iterable[str] = (),
        *,
        read: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(name, help_text, labels)
        self._read = read

    def set(self, *label_values: str, value: float) -> None:
        """Set one series to ``value``."""
        with self._lock:
            self._values[label_values] = value

    def get(self, *label_values: str) -> float:
        if self._read is not None and not label_values:
            return float(self._read())
        return super().get(*label_values)

    def _samples(self) -> Iterable[tuple[LabelValues, float]]:
        if self._read is not None:
            return [((), float(self._read()))]
        return super()._samples()


class Metrics:
    """A registry of named counters and gauges.

    ``counter()`` and ``gauge()`` return the existing metric when the name is already
    registered, so components can share one registry without coordinating.
    """

    def __init__(self, prefix: str = "bot_toolkit_") -> None:
        self.prefix = prefix
        self._metrics: dict[str, Counter] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, help_text: str, labels: Iterable[str] = ()) -> Counter:
        """Get or create a counter."""
        with self._lock:
            existing = self._metrics.get(name)
            if existing is None:
                existing = Counter(self.prefix + name, help_text, labels)
                self._metrics[name] = existing
            return existing

    def gauge(
        self,
        name: str,
        help_text: str,
        labels: Iterable[str] = (),
        *,
        read: Callable[[], float] | None = None,
    ) -> Gauge:
        """Get or create a gauge; ``read`` makes it computed at render time."""
        with self._lock:
            existing = self._metrics.get(name)
            if existing is None:
                existing = Gauge(self.prefix + name, help_text, labels, read=read)
                self._metrics[name] = existing
            elif read is not None and isinstance(existing, Gauge):
                existing._read = read
            if not isinstance(existing, Gauge):
                raise TypeError(f"{name} is registered as a counter")
            return existing

    def get(self, name: str) -> Counter | None:
        """The metric registered under ``name`` (without the prefix), if any."""
        return self._metrics.get(name)

    def render(self) -> str:
        """The whole registry in the Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        for metric in sorted(self._metrics.values(), key=lambda m: m.name):
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            for values, value in metric._samples():
                if values:
                    labels = ",".join(
                        f'{k}="{_escape(v)}"'
                        for k, v in zip(metric.label_names, values, strict=True)
                    )
                    lines.append(f"{metric.name}{{{labels}}} {value:g}")
                else:
                    lines.append(f"{metric.name} {value:g}")
        return "\n".join(lines) + "\n"
