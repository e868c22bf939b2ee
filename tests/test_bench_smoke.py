"""Smoke test for benchmarks/decode_dispatch.py: tiny runs, structure only, never wall-clock."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest

from bot_toolkit import ToDeviceEvent, UnknownToDeviceEvent, decode
from tests.bench_loader import load_benchmark

TINY: dict[str, int] = {
    "passes": 1,
    "rounds": 1,
    "flows": 1,
    "stream": 300,
    "burst": 200,
    "concurrency": 4,
}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("decode_dispatch.py", "decode_dispatch_bench")


def test_mix_is_decodable_sync_dicts(bench: ModuleType) -> None:
    mix: list[dict[str, Any]] = bench.build_mix(2)
    assert len(mix) > 10
    types = {raw["type"] for raw in mix}
    assert {"m.key.verification.start", "m.room.encrypted", "m.room_key_request"} <= types
    for raw in mix:
        assert set(raw) == {"type", "sender", "content"}
        event = decode(raw)
        assert isinstance(event, ToDeviceEvent)
        assert not isinstance(event, UnknownToDeviceEvent)


def test_bench_decode_structure(bench: ModuleType) -> None:
    result = bench.bench_decode(passes=1, rounds=1, flows=1)
    assert result["events_in_mix"] == sum(result["mix"].values())
    assert result["nio_events_per_s"] > 0
    assert result["bot_toolkit_events_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["bot_toolkit_events_per_s"] / result["nio_events_per_s"]
    )
    assert "KeyVerificationStart" in result["nio_classes"]


def test_bench_dispatch_structure(bench: ModuleType) -> None:
    # The dispatcher ships with bot_toolkit: the "not available" branch must not hide a
    # broken import here.
    assert bench.dispatcher_available()
    result = bench.bench_dispatch(stream=300, burst=200, concurrency=4, rounds=1)
    assert result["available"] is True
    assert result["stream_events"] == 300
    assert result["burst_events"] == 200
    assert result["events_per_s"] > 0
    lat = result["burst_latency"]
    assert 0 <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]


def test_run_and_table(bench: ModuleType) -> None:
    result = bench.run(**TINY)
    table = bench.format_table(result)
    assert "nio ToDeviceEvent.parse_event" in table
    assert "bot_toolkit.decode" in table
    assert "ratio" in table
    assert "dispatch" in table
    assert result["dispatch"]["available"] is True
    assert "p99" in table


def test_main_json(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    args = [f"--{key}={value}" for key, value in TINY.items()]
    assert bench.main(["--json", *args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"python", "decode", "dispatch"}
    assert result["decode"]["ratio"] > 0
