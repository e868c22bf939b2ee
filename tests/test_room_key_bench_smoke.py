"""Smoke test for benchmarks/room_key_fanout.py: a tiny room against the test Synapse, structure
and delivery only, never wall-clock."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.bench_loader import load_benchmark
from tests.synapse import LocalSynapse

pytestmark = pytest.mark.synapse


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("room_key_fanout.py", "room_key_fanout_bench")


async def test_tiny_room_key_fanout(bench: ModuleType, synapse: LocalSynapse) -> None:
    result = await bench.run(synapse.url, users=3, per_user=2, parallel=4)
    assert result.devices == 6
    assert [(s.bot, s.faults) for s in result.sends] == [
        ("nio", False),
        ("bot_toolkit", False),
        ("nio", True),
        ("bot_toolkit", True),
    ]
    clean_nio, clean_bt, _, faulty_bt = result.sends
    for send in (clean_nio, clean_bt, faulty_bt):
        assert (send.devices_with_key, send.duplicates) == (6, 0), send
        assert send.logged_in_after
    assert clean_bt.requests == clean_bt.floor == 1
    assert faulty_bt.requests >= faulty_bt.floor
    assert set(result.ratios) == {"clean", "faults"}
    assert all(r > 0 for r in result.ratios.values())
    assert "devices (3 users)" in bench._table(result)


def test_fault_mix_is_seeded_and_roughly_the_asked_shares(bench: ModuleType) -> None:
    policy, twin = bench.fault_mix(7), bench.fault_mix(7)
    draws = [policy(n) for n in range(2000)]
    again = [twin(n) for n in range(2000)]
    assert draws == again
    kinds = [(f.kind, f.status) for f in draws]
    assert 150 <= kinds.count(("429", 0)) <= 250
    assert 60 <= kinds.count(("reply", 502)) <= 140
