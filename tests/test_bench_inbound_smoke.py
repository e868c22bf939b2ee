"""Smoke test for benchmarks/inbound_queue.py: a tiny run, structure only, never wall-clock."""

from __future__ import annotations

import pytest

from tests.bench_loader import load_benchmark


async def test_inbound_queue_benchmark_runs_and_reports() -> None:
    bench = load_benchmark("inbound_queue.py", "inbound_queue_bench")
    result = await bench.bench(batches=2, events=5, rounds=1)
    assert set(result["events_per_s"]) == {"nio", "plugin", "durable"}
    assert all(rate > 0 for rate in result["events_per_s"].values())
    assert result["durable_vs_nio"] == pytest.approx(
        result["events_per_s"]["durable"] / result["events_per_s"]["nio"]
    )
