"""bot_toolkit.testing's fakes behave as documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot_toolkit.outbox import OutboxClosed
from bot_toolkit.testing import FakeClock, FakeOutbox, SentMessage, offline_pair


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(100.0)
    assert clock() == 100.0
    clock.advance(2.5)
    assert clock() == 102.5


async def test_fake_outbox_records_and_delivers() -> None:
    delivered: list[SentMessage] = []
    outbox = FakeOutbox(deliver=delivered.append)
    txns = await outbox.send("m.dummy", {"@a:x": {"D1": {}, "D2": {"k": 1}}}, txn_id="t1")
    assert txns == ["t1"]
    assert (
        outbox.sent
        == delivered
        == [
            SentMessage("m.dummy", "@a:x", "D1", {}, "t1"),
            SentMessage("m.dummy", "@a:x", "D2", {"k": 1}, "t1"),
        ]
    )
    outbox.fail_types.add("m.room_key.withheld")
    with pytest.raises(OutboxClosed):
        await outbox.send("m.room_key.withheld", {"@a:x": {"D1": {}}})
    assert outbox.of_type("m.room_key.withheld") == []
    assert len(outbox.of_type("m.dummy")) == 2


async def test_offline_pair_knows_each_other(tmp_path: Path) -> None:
    alice, bob = offline_pair(tmp_path)
    try:
        a: Any = alice.olm
        b: Any = bob.olm
        seen_by_alice = a.device_store[bob.user_id][bob.device_id]
        assert seen_by_alice.ed25519 == b.account.identity_keys["ed25519"]
        assert seen_by_alice.curve25519 == b.account.identity_keys["curve25519"]
        assert (
            b.device_store[alice.user_id][alice.device_id].ed25519
            == (a.account.identity_keys["ed25519"])
        )
        assert not a.is_device_verified(seen_by_alice)
    finally:
        await alice.close()
        await bob.close()
