"""Megolm room keys through the outbox, against the real Synapse with a real nio peer.

The bot is the whole bot_toolkit stack (:class:`tests.bot_process.BotProcess`, ``share_with =
"all"``) talking to Synapse through :class:`tests.fault_proxy.FaultProxy`, which fails only the
first ``PUT /sendToDevice/m.room.encrypted/...``: the request carrying the room key. The peer is a
real encrypted nio client syncing Synapse directly. In every row of issue 10's table the peer
must get the key exactly once, decrypt every message, and the bot must stay logged in.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import vodozemac
from nio import (
    AsyncClient,
    ErrorResponse,
    ForwardedRoomKeyEvent,
    MegolmEvent,
    RoomKeyEvent,
    RoomMessageText,
    RoomSendResponse,
    ShareGroupSessionError,
    SyncResponse,
    ToDeviceError,
    ToDeviceMessage,
    ToDeviceResponse,
    WhoamiResponse,
)

from bot_toolkit import key_sharing
from tests.bot_process import BotProcess, room_with
from tests.fault_proxy import Fault, FaultProxy
from tests.nio_helpers import (
    close_clients,
    know_each_other,
    make_client,
    share_encrypted_room,
    wait_until,
)
from tests.raw_device import RawDevice
from tests.synapse import LocalSynapse
from tests.test_key_sharing import BOT_DEVICE, FakeOutbox, Offline, offline
from tests.test_outbox_faults import ROOT, Child, _read_line, _stop

__all__ = ["offline"]  # the fixture, imported from test_key_sharing

ROOM_KEY_PUT = "/sendToDevice/m.room.encrypted/"

FIRST_ROOM_KEY_REQUEST_GETS = {
    "200": Fault.passthrough(),
    "json_429": Fault.rate_limited(500),
    "html_429": Fault.reply(429, "html"),
    "html_502": Fault.reply(502, "html"),
    "empty_502": Fault.reply(502, "empty"),
    "json_502": Fault.reply(502, "json"),
    "json_500": Fault.server_error(),
    "dropped_after_forwarding": Fault.drop_after(),
}


@dataclass
class PeerView:
    """What a nio peer saw of one room: room keys (by session id) and the room's events."""

    client: AsyncClient
    room_id: str
    keys: dict[str, int] = field(default_factory=dict)  # session id -> times received
    forwarded: dict[str, int] = field(default_factory=dict)
    withheld: list[dict[str, Any]] = field(default_factory=list)  # contents received
    events: dict[str, Any] = field(default_factory=dict)  # event id -> event

    async def sync(self, poll_ms: int = 200) -> None:
        resp = await self.client.sync(timeout=poll_ms)
        assert isinstance(resp, SyncResponse), resp
        for event in resp.to_device_events:
            if isinstance(event, RoomKeyEvent):
                self.keys[event.session_id] = self.keys.get(event.session_id, 0) + 1
            elif isinstance(event, ForwardedRoomKeyEvent):
                self.forwarded[event.session_id] = self.forwarded.get(event.session_id, 0) + 1
            elif getattr(event, "source", {}).get("type") == "m.room_key.withheld":
                self.withheld.append(event.source["content"])
        room = resp.rooms.join.get(self.room_id)
        for event in room.timeline.events if room is not None else ():
            if isinstance(event, (MegolmEvent, RoomMessageText)):
                self.events[event.event_id] = event

    def decrypted(self) -> dict[str, str]:
        """Body of each message the peer can read now (late keys included)."""
        out: dict[str, str] = {}
        for event_id, event in self.events.items():
            readable = event
            if isinstance(event, MegolmEvent):
                try:
                    readable = self.client.decrypt_event(event)
                except Exception:
                    continue
                self.events[event_id] = readable
            if isinstance(readable, RoomMessageText):
                out[event_id] = readable.body
        return out

    async def sync_until_seen(self, event_id: str, within: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while event_id not in self.events:
            if asyncio.get_running_loop().time() >= deadline:
                raise AssertionError(f"peer never saw {event_id}")
            await self.sync()

    async def sync_until_readable(self, event_ids: list[str], within: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while not set(event_ids) <= set(self.decrypted()):
            if asyncio.get_running_loop().time() >= deadline:
                raise AssertionError(
                    f"peer cannot read {set(event_ids) - set(self.decrypted())}; "
                    f"keys {self.keys}, events {list(self.events)}"
                )
            await self.sync()


@pytest.fixture
async def proxy(synapse: LocalSynapse) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(synapse.url, match=ROOM_KEY_PUT) as p:
        yield p


async def _bot_and_peer(
    synapse: LocalSynapse, tmp_path: Path, proxy: FaultProxy
) -> tuple[BotProcess, AsyncClient, PeerView]:
    user = synapse.register()
    bot = await BotProcess(synapse, user, tmp_path / "bot", homeserver=proxy.url).start()
    peer = await make_client(synapse, tmp_path)
    room_id = await share_encrypted_room(bot.client, peer)
    await know_each_other(bot.client, peer)
    view = PeerView(peer, room_id)
    await view.sync(poll_ms=0)
    return bot, peer, view


async def _say(bot: BotProcess, room_id: str, text: str) -> tuple[str, str]:
    """Send a message; returns its event id and Megolm session id."""
    res = await bot.client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": text})
    assert hasattr(res, "event_id"), res
    assert await bot.outbox.flush(20.0)
    session = bot.client.olm.outbound_group_sessions[room_id]
    return res.event_id, session.id


@pytest.mark.synapse
@pytest.mark.parametrize(
    "fault", FIRST_ROOM_KEY_REQUEST_GETS.values(), ids=FIRST_ROOM_KEY_REQUEST_GETS.keys()
)
async def test_first_room_key_request_fails(
    synapse: LocalSynapse, tmp_path: Path, proxy: FaultProxy, fault: Fault
) -> None:
    proxy.plan.append(fault)
    bot, peer, view = await _bot_and_peer(synapse, tmp_path, proxy)
    token = bot.client.access_token
    try:
        first, session_id = await _say(bot, view.room_id, "first")
        second, same_session = await _say(bot, view.room_id, "second")
        assert same_session == session_id
        await view.sync_until_readable([first, second])
        await view.sync(poll_ms=0)  # a late duplicate would be in the inbox by now
        assert view.decrypted() == {first: "first", second: "second"}
        assert view.keys == {session_id: 1}
        assert proxy.hits[0].fault == fault
        if fault.kind != "pass":
            assert len(proxy.hits) >= 2  # retried
            assert proxy.hits[1].txn_id == proxy.hits[0].txn_id  # with the same txn id
        # still logged in, with the same token
        assert bot.client.access_token == token
        assert isinstance(await bot.client.whoami(), WhoamiResponse)
        rendered = bot.metrics.render()
        assert "bot_toolkit_room_keys_queued_total 1\n" in rendered
    finally:
        await bot.stop()
        await close_clients(peer)


@pytest.mark.synapse
async def test_key_request_for_a_session_meant_for_the_device_is_answered_with_the_key(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    bot = await BotProcess(synapse, synapse.register(), tmp_path / "bot").start()
    peer = await RawDevice.registered(synapse, one_time_keys=2)
    stranger = await RawDevice.registered(synapse)
    try:
        room_id = await room_with(bot, peer)
        res = await bot.client.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": "hello"}
        )
        assert isinstance(res, RoomSendResponse), res
        assert await bot.outbox.flush(10.0)
        session_id = bot.client.olm.outbound_group_sessions[room_id].id
        bot_curve = bot.client.olm.account.identity_keys["curve25519"]
        await peer.drain()
        assert [p["type"] for p in _payloads(peer)] == ["m.room_key"]

        # The peer lost the key and asks the bot for it; so does a stranger.
        request = {
            "action": "request",
            "body": {
                "algorithm": "m.megolm.v1.aes-sha2",
                "room_id": room_id,
                "sender_key": bot_curve,
                "session_id": session_id,
            },
        }
        for device, request_id in ((peer, "req-peer"), (stranger, "req-stranger")):
            content = {**request, "request_id": request_id}
            content["requesting_device_id"] = device.device_id
            await device.send_to_device(
                "m.room_key_request", {bot.user.user_id: {bot.user.device_id: content}}
            )
        await bot.refresh(poll_ms=200)
        assert await bot.outbox.flush(10.0)

        await peer.drain()
        forwarded = [p for p in _payloads(peer) if p["type"] == "m.forwarded_room_key"]
        assert len(forwarded) == 1
        key = forwarded[0]["content"]
        assert (key["room_id"], key["session_id"], key["sender_key"]) == (
            room_id,
            session_id,
            bot_curve,
        )
        assert peer.withheld() == []  # no m.unauthorised: the bot meant it to have the key
        inbound = vodozemac.InboundGroupSession.import_session(
            vodozemac.ExportedSessionKey(key["session_key"])
        )
        assert inbound.first_known_index == 0
        event = await peer.request(
            "GET", f"/_matrix/client/v3/rooms/{room_id}/event/{res.event_id}"
        )
        plaintext = inbound.decrypt(
            vodozemac.MegolmMessage.from_base64(event["content"]["ciphertext"])
        ).plaintext
        assert json.loads(plaintext)["content"]["body"] == "hello"

        await stranger.drain()
        refusals = stranger.withheld()
        assert [r["content"]["code"] for r in refusals] == ["m.unauthorised"]
        assert _payloads(stranger) == []
        served = bot.metrics.get("room_key_requests_served_total")
        assert served is not None and served.get("sent") == 1
    finally:
        await bot.stop()
        await peer.close()
        await stranger.close()


def _payloads(device: RawDevice) -> list[dict[str, Any]]:
    return [
        p
        for e in device.to_device_events
        if e["type"] == "m.room.encrypted" and (p := device.decrypt_olm(e)) is not None
    ]


@pytest.mark.synapse
async def test_a_refused_room_key_is_withheld_with_a_reason_and_the_next_message_rotates(
    synapse: LocalSynapse, tmp_path: Path, proxy: FaultProxy
) -> None:
    proxy.plan.append(Fault.reply(400, "json"))  # a permanent refusal: never retried
    bot, peer, view = await _bot_and_peer(synapse, tmp_path, proxy)
    try:
        first, old_session = await _say(bot, view.room_id, "first")
        await bot.dispatcher_idle()  # OutboxSendFailed reached key sharing
        assert await bot.outbox.flush(10.0)
        second, new_session = await _say(bot, view.room_id, "second")
        assert new_session != old_session
        await view.sync_until_readable([second])
        await view.sync(poll_ms=0)
        assert first in view.events
        assert view.decrypted() == {second: "second"}  # "first" is not readable ...
        assert view.keys == {new_session: 1}
        [notice] = view.withheld  # ... and the peer was told why
        assert (notice["code"], notice["session_id"], notice["room_id"]) == (
            "m.unavailable",
            old_session,
            view.room_id,
        )
        failures = bot.metrics.get("room_key_failures_total")
        assert failures is not None and failures.get("refused_withheld") == 1
    finally:
        await bot.stop()
        await close_clients(peer)


# ------------------------------------------------------------------ SIGKILL and restart

CHILD = Path(__file__).with_name("room_key_crash_child.py")

HELD_ROOM_KEYS = {
    "never_reached_synapse": Fault.stall(120),
    "processed_answer_lost": Fault.hold_response(120),
}


@pytest.mark.synapse
@pytest.mark.parametrize("held", HELD_ROOM_KEYS.values(), ids=HELD_ROOM_KEYS.keys())
async def test_sigkill_between_session_creation_and_key_delivery(
    synapse: LocalSynapse, tmp_path: Path, proxy: FaultProxy, held: Fault
) -> None:
    user = synapse.register()
    data_dir = tmp_path / "bot"
    bot = await BotProcess(synapse, user, data_dir, homeserver=proxy.url).start()
    peer = await make_client(synapse, tmp_path)
    try:
        try:
            room_id = await share_encrypted_room(bot.client, peer)
            await know_each_other(bot.client, peer)
        finally:
            await bot.stop()
        view = PeerView(peer, room_id)
        await view.sync(poll_ms=0)

        # The bot's process sends a message while every room-key request is held, then dies.
        proxy.policy = lambda n: held
        args = [str(CHILD), "--homeserver", proxy.url, "--data-dir", str(data_dir)]
        args += ["--user", user.user_id, "--device", user.device_id, "--room", room_id]
        args += ["--text", "before the crash"]
        env = {**os.environ, "BOT_TOOLKIT_TEST_TOKEN": user.access_token}
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        logs = tmp_path / "child"
        logs.mkdir()
        stdout, stderr = logs / "stdout", logs / "stderr"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *args, stdout=out, stderr=err, env=env
            )
        child = Child(proc, stdout, stderr)
        try:
            before, session_id = (await _read_line(child, "SENT ")).split()
            await wait_until(lambda: len(proxy.hits) >= 1, within=30, what="room key request")
            await view.sync_until_seen(before)
            if held.kind == "stall":  # the key is only in the bot's outbox
                assert before not in view.decrypted()
            child.proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(child.proc.wait(), 30) == -signal.SIGKILL
        finally:
            await _stop(child)
        if held.kind == "stall":
            assert view.keys == {}

        # Restart: the outbox sends the stored keys with their original transaction ids; nio
        # kept the outbound session only in memory, so the next message uses a new one.
        proxy.policy = None
        proxy.release()
        bot = await BotProcess(synapse, user, data_dir, homeserver=proxy.url).start()
        try:
            assert await bot.outbox.flush(20.0)
            after, new_session = await _say(bot, room_id, "after the restart")
            assert new_session != session_id
            await view.sync_until_readable([before, after])
            await view.sync(poll_ms=0)
            assert view.decrypted() == {before: "before the crash", after: "after the restart"}
            assert view.keys == {session_id: 1, new_session: 1}
            held_txn = proxy.hits[0].txn_id
            assert held_txn in proxy.txn_ids("pass")  # resent under the same id
        finally:
            await bot.stop()
    finally:
        await close_clients(peer)


# ------------------------------------------------------------------ offline: nio's queue, tokens


class _BrokenOutbox(FakeOutbox):
    async def send(self, *args: Any, **kwargs: Any) -> list[str]:
        raise RuntimeError("disk full")


async def test_nio_queued_to_device_messages_go_through_the_outbox(offline: Offline) -> None:
    outbox = FakeOutbox()
    sharing = await key_sharing.attach(
        offline.client, store=offline.store, outbox=outbox, dispatcher=offline.dispatcher
    )
    try:
        content = {"action": "request_cancellation", "request_id": "r1"}
        content["requesting_device_id"] = BOT_DEVICE
        queued = ToDeviceMessage("m.room_key_request", "@p:example.org", "PDEV", content)
        offline.olm.outgoing_to_device_messages.append(queued)
        responses = await offline.client.send_to_device_messages()
        assert [type(r) for r in responses] == [ToDeviceResponse]
        assert outbox.sent == [("m.room_key_request", {"@p:example.org": {"PDEV": content}}, None)]
        assert offline.client.outgoing_to_device_messages == []  # nio counts it as sent

        direct = ToDeviceMessage("org.example.ping", "@p:example.org", "PDEV", {"n": 1})
        assert isinstance(await offline.client.to_device(direct, "txn-1"), ToDeviceResponse)
        assert outbox.sent[-1] == (
            "org.example.ping",
            {"@p:example.org": {"PDEV": {"n": 1}}},
            "txn-1",
        )
    finally:
        await sharing.close()


async def test_a_message_the_outbox_did_not_store_stays_in_nios_queue(offline: Offline) -> None:
    sharing = await key_sharing.attach(
        offline.client, store=offline.store, outbox=_BrokenOutbox(), dispatcher=offline.dispatcher
    )
    try:
        queued = ToDeviceMessage("org.example.ping", "@p:example.org", "PDEV", {"n": 1})
        offline.olm.outgoing_to_device_messages.append(queued)
        [response] = await offline.client.send_to_device_messages()
        assert isinstance(response, ToDeviceError)
        assert response.to_device_message is queued
        assert offline.client.outgoing_to_device_messages == [queued]  # tried again next time
    finally:
        await sharing.close()


async def test_only_a_real_unknown_token_soft_logout_clears_the_token(offline: Offline) -> None:
    client = offline.client
    sharing = await key_sharing.attach(
        client, store=offline.store, outbox=FakeOutbox(), dispatcher=offline.dispatcher
    )
    try:
        # nio 0.26's defect: the device set lands in soft_logout, the room id in retry_after_ms.
        misparsed = ShareGroupSessionError.from_dict(
            {"errcode": "M_UNKNOWN", "error": "Internal error"},
            "!room:example.org",
            {("@p:example.org", "PDEV")},
        )
        assert misparsed.soft_logout == {("@p:example.org", "PDEV")}
        await client.receive_response(misparsed)
        assert client.access_token == "not-a-token"
        assert misparsed.soft_logout is False
        wrong_code = ErrorResponse("throttled", "M_LIMIT_EXCEEDED", 500, True)
        await client.receive_response(wrong_code)
        assert client.access_token == "not-a-token"
        ignored = offline.metrics.get("nio_soft_logout_ignored_total")
        assert ignored is not None and ignored.get() == 2

        real = ErrorResponse.from_dict(
            {"errcode": "M_UNKNOWN_TOKEN", "error": "expired", "soft_logout": True}
        )
        await client.receive_response(real)
        assert client.access_token == ""
    finally:
        await sharing.close()
