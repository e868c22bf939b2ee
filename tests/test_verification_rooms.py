"""In-room verification with the real managers, engines and SAS maths, over a fake room.

:class:`FakeRoom` stands in for the homeserver's room: every event posted (by a manager through
its :class:`RoomSender`, or by the test as a scripted peer or a third member) gets an event id
and ``origin_server_ts`` and reaches every member's dispatcher as a
:class:`~bot_toolkit.verification.rooms.RoomVerificationEvent`, the sender included (its echo).
The hostile sequences check the exact outcome: the cancel the bot posts, or silence.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bot_toolkit._types import DeviceId, UserId
from bot_toolkit.store import Store
from bot_toolkit.verification import (
    SasReady,
    State,
    VerificationCancelled,
    VerificationDone,
    VerificationPolicy,
)
from bot_toolkit.verification.rooms import REQUEST_MSGTYPE, parse_room_event, room_content
from bot_toolkit.verification.sas import SasSession
from bot_toolkit.verification.table import Party
from tests.fakes import FakeClock
from tests.verification_helpers import (
    Side,
    close_sides,
    eventually,
    make_side,
    settle,
)

ROOM = "!dm:test"
PEER, PEER_DEV, PEER_ED = "@peer:test", "PEERDEV", "ed25519-of-peer"
CAROL = "@carol:test"
PUBLISHED_MASTER = "published-master-of-peer"


@dataclass
class FakeRoom:
    """The room: posts get ids and timestamps and reach every member, in order."""

    clock: FakeClock
    members: list[Side] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def post(
        self, sender: str, event_type: str, content: dict[str, Any], *, ts: float | None = None
    ) -> str:
        event_id = f"$ev{len(self.events)}"
        when = self.clock() if ts is None else ts
        raw = {
            "type": event_type,
            "sender": sender,
            "content": copy.deepcopy(content),
            "event_id": event_id,
            "origin_server_ts": int(when * 1000),
        }
        self.events.append(raw)
        for side in self.members:
            parsed = parse_room_event(ROOM, raw)
            if parsed is not None:
                side.dispatcher.put_nowait(parsed)
        return event_id

    def by(self, sender: str, kind: str | None = None) -> list[dict[str, Any]]:
        """Events ``sender`` posted (of type ``m.key.verification.<kind>``)."""
        out = [e for e in self.events if e["sender"] == sender]
        if kind is not None:
            out = [e for e in out if e["type"] == f"m.key.verification.{kind}"]
        return out

    def cancels_by(self, sender: str) -> list[str]:
        return [e["content"]["code"] for e in self.by(sender, "cancel")]


@dataclass
class FakeRoomSender:
    room: FakeRoom
    user_id: str

    async def send(self, room_id: str, event_type: str, content: Any) -> str:
        assert room_id == ROOM
        return self.room.post(self.user_id, event_type, dict(content))

    async def direct_room(self, user_id: str) -> str:
        return ROOM


async def room_side(
    name: str,
    room: FakeRoom,
    clock: FakeClock,
    policy: VerificationPolicy | None = None,
    store: Store | None = None,
) -> Side:
    """A side (:func:`tests.verification_helpers.make_side`) that sends its in-room events to
    ``room`` and knows the peer's device and published master key."""
    rooms = FakeRoomSender(room, f"@{name}:test")
    side = await make_side(name, clock, policy=policy, store=store, rooms=rooms, start=False)
    side.keys.known[(PEER, PEER_DEV)] = PEER_ED
    side.keys.masters[PEER] = PUBLISHED_MASTER
    await side.manager.start()
    room.members.append(side)
    return side


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def room(clock: FakeClock) -> FakeRoom:
    return FakeRoom(clock)


@pytest.fixture
async def bot(room: FakeRoom, clock: FakeClock) -> AsyncIterator[Side]:
    side = await room_side("bot", room, clock)
    try:
        yield side
    finally:
        await close_sides(side)


def _request(to: str = "@bot:test", device: str = PEER_DEV) -> dict[str, Any]:
    return {
        "msgtype": REQUEST_MSGTYPE,
        "body": "verify?",
        "from_device": device,
        "methods": ["m.sas.v1"],
        "to": to,
    }


def _ready(flow: str, device: str = PEER_DEV) -> dict[str, Any]:
    return room_content({"from_device": device, "methods": ["m.sas.v1"]}, flow)


def _silent(room: FakeRoom, bot: Side, before: int) -> bool:
    """Whether the bot posted nothing after the first ``before`` events of the room."""
    return not [e for e in room.events[before:] if e["sender"] == bot.user_id]


def _peer_sas(bot: Side, flow: str, *, we_started: bool) -> SasSession:
    return SasSession(
        transaction_id=flow,
        us=Party(UserId(PEER), DeviceId(PEER_DEV)),
        them=Party(UserId(bot.user_id), DeviceId(bot.device_id)),
        we_started=we_started,
        in_room=True,
    )


async def _peer_request_and_keys(
    room: FakeRoom, bot: Side, *, bot_confirms: bool = True
) -> tuple[str, SasSession]:
    """The peer requests, the bot readies, the peer starts, keys are exchanged; with
    ``bot_confirms`` wait for the bot's MAC, else for the SAS to wait for the operator."""
    flow = room.post(PEER, "m.room.message", _request())
    await eventually(lambda: bot.manager.state_of(flow) is State.READY)
    peer = _peer_sas(bot, flow, we_started=True)
    room.post(PEER, "m.key.verification.start", peer.start_content())
    await eventually(lambda: len(room.by(bot.user_id, "accept")) == 1)
    peer.receive_accept(room.by(bot.user_id, "accept")[0]["content"])
    room.post(PEER, "m.key.verification.key", room_content(peer.our_key_event_content(), flow))
    if not bot_confirms:
        await eventually(lambda: bot.manager.state_of(flow) is State.KEYS_EXCHANGED)
        return flow, peer
    await eventually(lambda: len(room.by(bot.user_id, "key")) == 1)
    peer.receive_their_key(room.by(bot.user_id, "key")[0]["content"]["key"])
    await eventually(lambda: len(room.by(bot.user_id, "mac")) == 1)
    return flow, peer


# ------------------------------------------------------------------------------ both roles


async def test_two_managers_verify_in_a_room(room: FakeRoom, clock: FakeClock) -> None:
    alice = await room_side("alice", room, clock)
    bob = await room_side("bob", room, clock)
    alice.keys.known[(bob.user_id, bob.device_id)] = bob.keys.ed25519
    bob.keys.known[(alice.user_id, alice.device_id)] = alice.keys.ed25519
    try:
        flow = await alice.manager.request_user_verification(bob.user_id)
        assert room.events[0]["event_id"] == flow and room.events[0]["type"] == "m.room.message"
        assert room.events[0]["content"]["to"] == bob.user_id
        done_a = await alice.manager.wait_finished(flow, 10)
        await eventually(lambda: bool(bob.of(VerificationDone)))
        assert isinstance(done_a, VerificationDone) and done_a.room_id == ROOM
        assert bob.of(VerificationDone)[0].room_id == ROOM
        sas_a, sas_b = alice.of(SasReady)[0], bob.of(SasReady)[0]
        assert sas_a.emoji == sas_b.emoji and sas_a.room_id == sas_b.room_id == ROOM
        # Every later event relates to the request; none carries a transaction id; nothing
        # went to-device.
        later = room.events[1:]
        assert [e["type"].rsplit(".", 1)[1] for e in later] == [
            "ready",
            "start",
            "accept",
            "key",
            "key",
            "mac",
            "mac",
            "done",
            "done",
        ]
        for e in later:
            assert e["content"]["m.relates_to"] == {"rel_type": "m.reference", "event_id": flow}
            assert "transaction_id" not in e["content"]
        assert alice.outbox.sent == [] and bob.outbox.sent == []
        assert (bob.user_id, bob.device_id) in alice.keys.verified
    finally:
        await close_sides(alice, bob)


async def test_in_room_flows_listed_with_their_room(room: FakeRoom, clock: FakeClock) -> None:
    operator = await room_side(
        "bot", room, clock, VerificationPolicy(allowed_users=["@*:test"], confirm=None)
    )
    try:
        flow, _peer = await _peer_request_and_keys(room, operator, bot_confirms=False)
        (info,) = operator.manager.list_in_progress()
        assert (info.id, info.room_id, info.state) == (flow, ROOM, "keys_exchanged")
        assert len(info.emoji) == 7 and info.decimals is not None
        assert await operator.manager.confirm(flow)
        await eventually(lambda: len(room.by(operator.user_id, "mac")) == 1)
    finally:
        await close_sides(operator)


# ------------------------------------------------------------------------------ master keys


async def test_mac_over_the_published_master_key_verifies_it(room: FakeRoom, bot: Side) -> None:
    flow, peer = await _peer_request_and_keys(room, bot)
    mac = peer.mac_content(
        {f"ed25519:{PEER_DEV}": PEER_ED, f"ed25519:{PUBLISHED_MASTER}": PUBLISHED_MASTER}
    )
    room.post(PEER, "m.key.verification.mac", room_content(mac, flow))
    await eventually(lambda: bot.manager.state_of(flow) is State.WAITING_DONE)
    room.post(PEER, "m.key.verification.done", room_content({}, flow))
    done = await bot.manager.wait_finished(flow, 10)
    assert isinstance(done, VerificationDone)
    assert set(done.verified_keys) == {f"ed25519:{PEER_DEV}", f"ed25519:{PUBLISHED_MASTER}"}


async def test_mac_over_an_unpublished_master_key_is_a_key_mismatch(
    room: FakeRoom, bot: Side
) -> None:
    flow, peer = await _peer_request_and_keys(room, bot)
    mac = peer.mac_content(
        {f"ed25519:{PEER_DEV}": PEER_ED, "ed25519:forged-master": "forged-master"}
    )
    room.post(PEER, "m.key.verification.mac", room_content(mac, flow))
    await eventually(lambda: bot.manager.state_of(flow) is State.CANCELLED)
    assert room.cancels_by(bot.user_id) == ["m.key_mismatch"]
    assert (PEER, PEER_DEV) not in bot.keys.verified


# ------------------------------------------------------------------------------ hostile


async def test_key_before_accept_is_unexpected(room: FakeRoom, bot: Side) -> None:
    flow = await bot.manager.request_user_verification(PEER)
    room.post(PEER, "m.key.verification.ready", _ready(flow))
    await eventually(lambda: len(room.by(bot.user_id, "start")) == 1)
    stray = _peer_sas(bot, flow, we_started=False)
    room.post(PEER, "m.key.verification.key", room_content({"key": stray.public_key}, flow))
    await eventually(lambda: bot.manager.state_of(flow) is State.CANCELLED)
    assert room.cancels_by(bot.user_id) == ["m.unexpected_message"]
    cancel = room.by(bot.user_id, "cancel")[0]["content"]
    assert cancel["m.relates_to"]["event_id"] == flow and "transaction_id" not in cancel
    # The peer's cancel after that is never answered.
    before = len(room.events)
    room.post(
        PEER, "m.key.verification.cancel", room_content({"code": "m.user", "reason": "x"}, flow)
    )
    await settle_bot(bot)
    assert _silent(room, bot, before)


async def settle_bot(bot: Side) -> None:
    await settle(bot)


async def test_third_member_never_changes_the_flow(room: FakeRoom, bot: Side) -> None:
    flow = room.post(PEER, "m.room.message", _request())
    await eventually(lambda: bot.manager.state_of(flow) is State.READY)
    before = len(room.events)
    carol = _peer_sas(bot, flow, we_started=True)
    room.post(
        CAROL, "m.key.verification.cancel", room_content({"code": "m.user", "reason": "no"}, flow)
    )
    room.post(CAROL, "m.key.verification.start", carol.start_content())
    room.post(CAROL, "m.key.verification.ready", _ready(flow, "CAROLDEV"))
    room.post(CAROL, "m.key.verification.done", room_content({}, flow))
    await settle_bot(bot)
    assert _silent(room, bot, before)
    assert bot.manager.state_of(flow) is State.READY
    # The real peer goes on as if nothing happened.
    peer = _peer_sas(bot, flow, we_started=True)
    room.post(PEER, "m.key.verification.start", peer.start_content())
    await eventually(lambda: bot.manager.state_of(flow) is State.STARTED_IN)
    assert len(room.by(bot.user_id, "accept")) == 1


async def test_relation_to_an_unknown_event_gets_silence(room: FakeRoom, bot: Side) -> None:
    room.post(PEER, "m.key.verification.ready", _ready("$nothing"))
    room.post(PEER, "m.key.verification.key", room_content({"key": "abc"}, "$nothing"))
    room.post(
        PEER,
        "m.key.verification.start",
        _peer_sas(bot, "$nothing", we_started=True).start_content(),
    )
    room.post(PEER, "m.key.verification.mac", {"mac": {}, "keys": "x"})  # no relation at all
    await settle_bot(bot)
    assert _silent(room, bot, 0)
    assert bot.manager.list_in_progress() == []


async def test_malformed_start_is_an_invalid_message(room: FakeRoom, bot: Side) -> None:
    flow = room.post(PEER, "m.room.message", _request())
    await eventually(lambda: bot.manager.state_of(flow) is State.READY)
    start = _peer_sas(bot, flow, we_started=True).start_content()
    del start["hashes"]
    room.post(PEER, "m.key.verification.start", start)
    await eventually(lambda: bot.manager.state_of(flow) is State.CANCELLED)
    assert room.cancels_by(bot.user_id) == ["m.invalid_message"]


async def test_request_older_than_ten_minutes_is_ignored(
    room: FakeRoom, bot: Side, clock: FakeClock
) -> None:
    flow = room.post(PEER, "m.room.message", _request(), ts=clock() - 601)
    await settle_bot(bot)
    assert bot.manager.state_of(flow) is None and _silent(room, bot, 0)


async def test_request_for_someone_else_is_ignored(room: FakeRoom, bot: Side) -> None:
    flow = room.post(PEER, "m.room.message", _request(to=CAROL))
    room.post(
        PEER, "m.key.verification.start", _peer_sas(bot, flow, we_started=True).start_content()
    )
    await settle_bot(bot)
    assert bot.manager.state_of(flow) is None and _silent(room, bot, 0)


async def test_prompt_lapses_two_minutes_after_receipt(room: FakeRoom, clock: FakeClock) -> None:
    side = await room_side(
        "bot", room, clock, VerificationPolicy(allowed_users=["@*:test"], auto_accept=False)
    )
    try:
        flow = room.post(PEER, "m.room.message", _request(), ts=clock() - 60)
        await eventually(lambda: side.manager.state_of(flow) is State.REQUESTED_IN)
        clock.advance(119)
        await side.manager.check_timeouts()
        assert side.manager.state_of(flow) is State.REQUESTED_IN
        clock.advance(2)
        await side.manager.check_timeouts()
        assert side.manager.state_of(flow) is State.CANCELLED
        assert _silent(room, side, 0)  # dismissed, not cancelled in the room
    finally:
        await close_sides(side)


async def test_another_device_of_ours_answering_dismisses_the_request(
    room: FakeRoom, clock: FakeClock
) -> None:
    side = await room_side(
        "bot", room, clock, VerificationPolicy(allowed_users=["@*:test"], auto_accept=False)
    )
    try:
        flow = room.post(PEER, "m.room.message", _request())
        await eventually(lambda: side.manager.state_of(flow) is State.REQUESTED_IN)
        room.post(side.user_id, "m.key.verification.ready", _ready(flow, "OTHERDEV"))
        before = len(room.events)  # that ready came from our other device, not from the bot
        await eventually(lambda: side.manager.state_of(flow) is State.CANCELLED)
        cancelled = side.of(VerificationCancelled)[0]
        assert (cancelled.code, cancelled.by_us) == ("m.accepted", False)
        await settle_bot(side)
        assert _silent(room, side, before)
    finally:
        await close_sides(side)


async def test_peer_cancel_is_never_answered(room: FakeRoom, bot: Side) -> None:
    flow = room.post(PEER, "m.room.message", _request())
    await eventually(lambda: bot.manager.state_of(flow) is State.READY)
    before = len(room.events)
    room.post(
        PEER, "m.key.verification.cancel", room_content({"code": "m.user", "reason": "bye"}, flow)
    )
    room.post(
        PEER, "m.key.verification.cancel", room_content({"code": "m.user", "reason": "bye"}, flow)
    )
    await eventually(lambda: bot.manager.state_of(flow) is State.CANCELLED)
    await settle_bot(bot)
    assert _silent(room, bot, before)


async def test_event_of_the_flow_from_another_room_is_ignored(room: FakeRoom, bot: Side) -> None:
    flow = room.post(PEER, "m.room.message", _request())
    await eventually(lambda: bot.manager.state_of(flow) is State.READY)
    before = len(room.events)
    raw = {
        "type": "m.key.verification.cancel",
        "sender": PEER,
        "content": room_content({"code": "m.user", "reason": "x"}, flow),
        "event_id": "$elsewhere",
        "origin_server_ts": 1,
    }
    parsed = parse_room_event("!other:test", raw)
    assert parsed is not None
    bot.dispatcher.put_nowait(parsed)
    await settle_bot(bot)
    assert bot.manager.state_of(flow) is State.READY and _silent(room, bot, before)


async def test_flow_left_by_a_restart_is_cancelled_in_its_room(
    room: FakeRoom, clock: FakeClock, tmp_path: Path
) -> None:
    store = await Store.open(tmp_path / "bot.sqlite3")
    try:
        first = await room_side("bot", room, clock, store=store)
        flow = room.post(PEER, "m.room.message", _request())
        await eventually(lambda: first.manager.state_of(flow) is State.READY)
        await close_sides(first)
        room.members.clear()
        before = len(room.events)
        second = await room_side("bot", room, clock, store=store)
        try:
            cancels = room.by(second.user_id, "cancel")
            assert [e["content"]["code"] for e in cancels] == ["m.user"]
            assert cancels[0]["content"]["reason"] == "verifier restarted"
            assert cancels[0]["content"]["m.relates_to"]["event_id"] == flow
            assert room.events.index(cancels[0]) >= before
        finally:
            await close_sides(second)
        # Once is enough: a further restart sends nothing.
        third = await room_side("bot", room, clock, store=store)
        await close_sides(third)
        assert len(room.by(second.user_id, "cancel")) == 1
    finally:
        await store.close()


async def test_request_from_a_user_not_allowed_is_refused_in_the_room(
    room: FakeRoom, clock: FakeClock
) -> None:
    side = await room_side(
        "bot", room, clock, VerificationPolicy(allowed_users=["@someone-else:test"])
    )
    try:
        flow = room.post(PEER, "m.room.message", _request())
        await eventually(lambda: len(room.by(side.user_id, "cancel")) == 1)
        cancel = room.by(side.user_id, "cancel")[0]["content"]
        assert cancel["code"] == "m.user" and cancel["m.relates_to"]["event_id"] == flow
        assert side.manager.state_of(flow) is None
    finally:
        await close_sides(side)


async def test_second_device_answering_our_request_is_ignored(room: FakeRoom, bot: Side) -> None:
    flow = await bot.manager.request_user_verification(PEER)
    room.post(PEER, "m.key.verification.ready", _ready(flow))
    await eventually(lambda: bot.manager.state_of(flow) is State.STARTED_OUT)
    before = len(room.events)
    room.post(PEER, "m.key.verification.ready", _ready(flow, "PEERDEV2"))
    await settle_bot(bot)
    assert _silent(room, bot, before)
    assert bot.manager.state_of(flow) is State.STARTED_OUT
    # A cancel from the user (a plaintext room cancel names no device) ends the flow, unanswered.
    room.post(
        PEER, "m.key.verification.cancel", room_content({"code": "m.user", "reason": "no"}, flow)
    )
    await eventually(lambda: bot.manager.state_of(flow) is State.CANCELLED)
    await settle_bot(bot)
    assert _silent(room, bot, before)
