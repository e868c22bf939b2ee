"""bot_toolkit.key_sharing: the nio hooks, offline and against the real Synapse.

Offline tests use a nio client whose Olm machine lives in tmp_path and never talks to a server,
a fake outbox that records what it is given, and the real store. The ``synapse`` tests use real
encrypted nio peers (``tests.nio_helpers``) and hand-made raw devices (``tests.raw_device``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import vodozemac
from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    MegolmEvent,
    RoomCreateResponse,
    RoomMessageText,
)
from nio import (
    ToDeviceEvent as NioToDeviceEvent,
)
from nio.crypto import OlmDevice

from bot_toolkit import key_sharing, withheld
from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.events import RequestedKeyInfo, RoomKeyRequest, RoomKeyWithheld, WithheldCode
from bot_toolkit.key_queries import NEGATIVE_TTL, KeyQueries
from bot_toolkit.metrics import Metrics
from bot_toolkit.store import Store
from bot_toolkit.withheld import NoOlmLedger, PeerDevice, SharingPolicy
from tests.bot_process import BotProcess, room_with
from tests.fakes import FakeClock
from tests.nio_helpers import close_clients, know_each_other, make_client, send_plaintext
from tests.raw_device import RawDevice
from tests.synapse import LocalSynapse

BOT = "@bot:example.org"
BOT_DEVICE = "BOTDEVICE"


class FakeOutbox:
    """Records ``send`` calls, with the ``txn_id`` each came with."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], str | None]] = []

    async def send(
        self,
        event_type: str,
        messages: Mapping[str, Mapping[str, Mapping[str, Any]]],
        *,
        txn_id: str | None = None,
    ) -> list[str]:
        self.sent.append((event_type, _plain(messages), txn_id))
        return [txn_id or f"outbox-{len(self.sent)}"]


def _plain(messages: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    return {u: {d: dict(c) for d, c in devs.items()} for u, devs in messages.items()}


class Offline:
    """A nio client with an Olm machine (no server), a store and a dispatcher."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    async def open(self) -> Offline:
        nio_dir = self.tmp_path / "nio"
        nio_dir.mkdir(parents=True, exist_ok=True)
        self.client = AsyncClient(
            "http://127.0.0.1:9",
            BOT,
            device_id=BOT_DEVICE,
            store_path=str(nio_dir),
            config=AsyncClientConfig(encryption_enabled=True),
        )
        self.client.restore_login(BOT, BOT_DEVICE, "not-a-token")
        assert self.client.olm is not None
        self.store = await Store.open(self.tmp_path / "bot.sqlite3")
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(self.metrics)
        return self

    async def close(self) -> None:
        await self.store.close()
        await self.client.close()

    @property
    def olm(self) -> Any:
        return self.client.olm

    def add_device(self, user_id: str, device_id: str) -> tuple[OlmDevice, vodozemac.Account]:
        account = vodozemac.Account()
        device = OlmDevice(
            user_id,
            device_id,
            {
                "ed25519": account.ed25519_key.to_base64(),
                "curve25519": account.curve25519_key.to_base64(),
            },
        )
        self.olm.device_store.add(device)
        return device, account


@pytest.fixture
async def offline(tmp_path: Path) -> AsyncIterator[Offline]:
    o = await Offline(tmp_path).open()
    try:
        yield o
    finally:
        await o.close()


# ---------------------------------------------------------------------------------------------
# offline


async def test_attach_patches_instances_and_detach_restores(offline: Offline) -> None:
    client, olm = offline.client, offline.olm
    sharing = await key_sharing.attach(
        client, store=offline.store, outbox=FakeOutbox(), dispatcher=offline.dispatcher
    )
    for name in ("share_group_session", "keys_claim"):
        assert name in vars(client)
    for name in (
        "should_share_group_session",
        "get_missing_sessions",
        "share_group_session_parallel",
        "is_device_blacklisted",
        "save_session",
    ):
        assert name in vars(olm)
    # The class is untouched: another client is not affected.
    assert not hasattr(vars(AsyncClient)["share_group_session"], "_bot_toolkit_ks")
    with pytest.raises(RuntimeError, match="already attached"):
        await key_sharing.attach(
            client, store=offline.store, outbox=FakeOutbox(), dispatcher=offline.dispatcher
        )
    await sharing.close()
    assert "share_group_session" not in vars(client)
    assert "save_session" not in vars(olm)


async def test_join_waits_for_background_work_and_cancels_nothing(offline: Offline) -> None:
    sharing = await key_sharing.attach(
        offline.client, store=offline.store, outbox=FakeOutbox(), dispatcher=offline.dispatcher
    )
    assert sharing.idle
    assert await sharing.join(0)
    release = asyncio.Event()
    finished: list[str] = []

    async def work() -> None:  # background work that starts more background work
        await release.wait()
        sharing._spawn(more())

    async def more() -> None:
        finished.append("more")

    sharing._spawn(work())
    assert not sharing.idle
    assert not await sharing.join(0.01)  # times out: the work goes on, not cancelled
    assert not sharing.idle
    release.set()
    assert await sharing.join(10)
    assert finished == ["more"]  # the work it started was waited for too
    assert sharing.idle
    await sharing.close()


async def test_recover_resends_a_pending_notice_with_its_recorded_txn_id(
    offline: Offline,
) -> None:
    # A previous run decided a notice and died before handing it to the outbox.
    ledger = await NoOlmLedger.open(offline.store)
    peer = PeerDevice("@p:example.org", "PDEV", "curveP")
    txn = await ledger.decide(peer)
    assert txn is not None

    outbox = FakeOutbox()
    sharing = await key_sharing.attach(
        offline.client, store=offline.store, outbox=outbox, dispatcher=offline.dispatcher
    )
    assert len(outbox.sent) == 1
    event_type, messages, sent_txn = outbox.sent[0]
    assert event_type == "m.room_key.withheld"
    assert sent_txn == txn  # the wire transaction id is the one recorded before the crash
    content = messages["@p:example.org"]["PDEV"]
    assert content["code"] == "m.no_olm" and "session_id" not in content
    assert content["sender_key"] == offline.olm.account.identity_keys["curve25519"]
    assert content["from_device"] == BOT_DEVICE
    assert await sharing.ledger.pending() == []
    assert offline.metrics.get("withheld_sent_total").get("m.no_olm") == 1  # type: ignore[union-attr]
    # A new failure for the device now stays silent: one notice in all.
    assert await sharing.ledger.decide(peer) is None
    assert await sharing.recover() == 0
    assert len(outbox.sent) == 1
    await sharing.close()


async def test_recover_records_sessions_made_before_a_crash(offline: Offline) -> None:
    device, account = offline.add_device("@p:example.org", "PDEV")
    ledger = await NoOlmLedger.open(offline.store)
    peer = PeerDevice(device.user_id, device.device_id, device.curve25519)
    txn = await ledger.decide(peer)
    assert txn is not None
    await ledger.mark_sent(peer, txn)
    # nio created (and saved) a session, and the process died before the ledger heard of it.
    account.generate_one_time_keys(1)
    otk = next(iter(account.one_time_keys.values())).to_base64()
    offline.olm.create_session(otk, device.curve25519)

    sharing = await key_sharing.attach(
        offline.client, store=offline.store, outbox=FakeOutbox(), dispatcher=offline.dispatcher
    )
    entry = await sharing.ledger.entry(peer)
    assert entry is not None and entry.session_since_notice
    await sharing.close()


async def test_a_new_session_rearms_the_ledger(offline: Offline) -> None:
    device, account = offline.add_device("@p:example.org", "PDEV")
    sharing = await key_sharing.attach(
        offline.client, store=offline.store, outbox=FakeOutbox(), dispatcher=offline.dispatcher
    )
    peer = PeerDevice(device.user_id, device.device_id, device.curve25519)
    assert await sharing.ledger.decide(peer) is not None
    account.generate_one_time_keys(1)
    otk = next(iter(account.one_time_keys.values())).to_base64()
    offline.olm.create_session(otk, device.curve25519)  # -> save_session hook
    await sharing.flush()
    entry = await sharing.ledger.entry(peer)
    assert entry is not None and entry.session_since_notice
    await sharing.close()


def _request(
    sender: str, device_id: str, session_id: str, *, sender_key: str | None, request_id: str = "r1"
) -> RoomKeyRequest:
    return RoomKeyRequest(
        sender=sender,
        body=RequestedKeyInfo(
            algorithm="m.megolm.v1.aes-sha2",
            room_id="!room:example.org",
            session_id=session_id,
            sender_key=sender_key,
        ),
        requesting_device_id=device_id,
        request_id=request_id,
    )


async def test_key_requests_are_answered_only_where_nio_does_not(offline: Offline) -> None:
    olm = offline.olm
    outbox = FakeOutbox()
    sharing = await key_sharing.attach(
        offline.client,
        store=offline.store,
        outbox=outbox,
        dispatcher=offline.dispatcher,
        policy=SharingPolicy(own_devices=frozenset({"OTHERDEV", "UNVERIFIED"})),
    )
    own_curve = olm.account.identity_keys["curve25519"]
    olm.create_outbound_group_session("!room:example.org")
    held = olm.outbound_group_sessions["!room:example.org"].id
    mine, _ = offline.add_device(BOT, "OTHERDEV")
    olm.verify_device(mine)
    offline.add_device(BOT, "UNVERIFIED")
    unlisted, _ = offline.add_device(BOT, "NOTLISTED")
    olm.verify_device(unlisted)

    async def answer(event: RoomKeyRequest) -> str | None:
        before = len(outbox.sent)
        await sharing._on_key_request(event)
        if len(outbox.sent) == before:
            return None
        event_type, messages, _ = outbox.sent[-1]
        assert event_type == "m.room_key.withheld"
        content = messages[event.sender][event.requesting_device_id]
        assert content["room_id"] == "!room:example.org"
        assert content["session_id"] == event.body.session_id
        code: str = content["code"]
        return code

    # Another user: m.unauthorised, whether or not we hold the key.
    assert await answer(_request("@eve:example.org", "EVE", held, sender_key=own_curve)) == (
        "m.unauthorised"
    )
    assert (
        await answer(
            _request("@eve:example.org", "EVE", "unknown", sender_key=None, request_id="r2")
        )
        == "m.unauthorised"
    )
    # Our own unverified and unknown devices: m.unauthorised.
    assert await answer(_request(BOT, "UNVERIFIED", held, sender_key=own_curve)) == (
        "m.unauthorised"
    )
    assert await answer(_request(BOT, "GHOST", held, sender_key=own_curve)) == "m.unauthorised"
    # Our own verified device that the operator did not name: m.unauthorised.
    assert await answer(
        _request(BOT, "NOTLISTED", held, sender_key=own_curve, request_id="r6")
    ) == ("m.unauthorised")
    # Our own verified device, a session we do not hold: m.unavailable.
    assert await answer(_request(BOT, "OTHERDEV", "unknown", sender_key=own_curve)) == (
        "m.unavailable"
    )
    assert (
        await answer(_request(BOT, "OTHERDEV", "unknown2", sender_key=None, request_id="r3"))
        == "m.unavailable"
    )
    # ...a session we hold: nio forwards the key, we stay silent (no double answer).
    assert (
        await answer(_request(BOT, "OTHERDEV", held, sender_key=own_curve, request_id="r4")) is None
    )
    assert await answer(_request(BOT, "OTHERDEV", held, sender_key=None, request_id="r5")) is None
    # The same request again: answered once.
    assert await answer(_request("@eve:example.org", "EVE", held, sender_key=own_curve)) is None
    sent = offline.metrics.get("withheld_sent_total")
    assert sent is not None
    assert (sent.get("m.unauthorised"), sent.get("m.unavailable")) == (5, 2)
    await sharing.close()


def _group_store_shape(olm: Any) -> dict[str, dict[str, int]]:
    """nio's inbound Megolm store as room -> sender key -> number of sessions."""
    entries = olm.inbound_group_store._entries
    return {room: {key: len(s) for key, s in by.items()} for room, by in entries.items()}


async def test_key_requests_do_not_grow_nios_session_store(offline: Offline) -> None:
    olm = offline.olm
    sharing = await key_sharing.attach(
        offline.client, store=offline.store, outbox=FakeOutbox(), dispatcher=offline.dispatcher
    )
    mine, _ = offline.add_device(BOT, "OTHERDEV")
    olm.verify_device(mine)
    before = _group_store_shape(olm)

    def request(sender: str, device_id: str, n: int, *, sender_key: bool) -> RoomKeyRequest:
        return RoomKeyRequest(
            sender=sender,
            body=RequestedKeyInfo(
                algorithm="m.megolm.v1.aes-sha2",
                room_id=f"!random{n}:example.org",
                session_id=f"session{n}",
                sender_key=f"curve{n}" if sender_key else None,
            ),
            requesting_device_id=device_id,
            request_id=f"req{n}",
        )

    # Unauthorised requesters: nio's store is never even looked at.
    for n in range(1000):
        await sharing._on_key_request(request("@eve:example.org", "EVE", n, sender_key=n % 2 == 0))
    assert _group_store_shape(olm) == before
    # An authorised one, for rooms and sender keys nio has never seen: looked up, not inserted.
    for n in range(1000, 1010):
        await sharing._on_key_request(request(BOT, "OTHERDEV", n, sender_key=n % 2 == 0))
    assert _group_store_shape(olm) == before
    await sharing.close()


async def test_key_requests_left_alone_when_the_policy_says_so(offline: Offline) -> None:
    outbox = FakeOutbox()
    sharing = await key_sharing.attach(
        offline.client,
        store=offline.store,
        outbox=outbox,
        dispatcher=offline.dispatcher,
        policy=SharingPolicy(answer_key_requests=False),
    )
    await sharing._on_key_request(_request("@eve:example.org", "EVE", "s", sender_key=None))
    assert outbox.sent == []
    await sharing.close()


class FlakyOutbox(FakeOutbox):
    """A :class:`FakeOutbox` whose next ``failures`` sends raise."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    async def send(
        self,
        event_type: str,
        messages: Mapping[str, Mapping[str, Mapping[str, Any]]],
        *,
        txn_id: str | None = None,
    ) -> list[str]:
        if self.failures:
            self.failures -= 1
            raise OSError("outbox down")
        return await super().send(event_type, messages, txn_id=txn_id)


def _no_olm(device: OlmDevice) -> RoomKeyWithheld:
    return RoomKeyWithheld(
        sender=device.user_id,
        algorithm="m.megolm.v1.aes-sha2",
        sender_key=device.curve25519,
        code=WithheldCode.NO_OLM,
        from_device=device.device_id,
    )


async def test_the_dummy_slot_is_given_back_when_nothing_was_sent(offline: Offline) -> None:
    device, account = offline.add_device("@p:example.org", "PDEV")
    claim = {"key": False, "raise": False}

    async def keys_claim(user_set: Mapping[str, Any]) -> Any:
        if claim["raise"]:
            raise OSError("homeserver unreachable")
        if claim["key"]:
            account.generate_one_time_keys(1)
            otk = next(iter(account.one_time_keys.values())).to_base64()
            account.mark_keys_as_published()
            offline.olm.create_session(otk, device.curve25519)
        return "an error response"

    setattr(offline.client, "keys_claim", keys_claim)  # noqa: B010 (wrapped by attach below)
    outbox = FlakyOutbox()
    sharing = await key_sharing.attach(
        offline.client, store=offline.store, outbox=outbox, dispatcher=offline.dispatcher
    )
    dummies = offline.metrics.get("withheld_dummy_total")
    assert dummies is not None

    errors = offline.metrics.get("key_sharing_errors_total")
    assert errors is not None

    async def answer() -> None:  # the answer runs off the dispatcher, in the background
        await sharing._on_withheld(_no_olm(device))
        assert await sharing.join(10)

    # No one-time key: nothing sent, so the next m.no_olm may try again within the hour.
    await answer()
    assert dummies.get("no_key") == 1
    # The claim itself raises: the slot is given back too (the failure is counted).
    claim["raise"] = True
    await answer()
    assert errors.get("background") == 1
    claim["raise"] = False
    # A session is opened but the outbox fails: still nothing sent, slot given back.
    claim["key"] = True
    outbox.failures = 1
    await answer()
    assert errors.get("background") == 2
    assert outbox.sent == []
    # Now it goes out; and only then is the peer throttled for the hour.
    await answer()
    assert [t for t, _, _ in outbox.sent] == ["m.room.encrypted"]
    await answer()
    assert (dummies.get("sent"), dummies.get("throttled")) == (1, 1)
    assert len(outbox.sent) == 1
    await sharing.close()


async def test_key_request_replies_are_rate_limited_per_sender(offline: Offline) -> None:
    clock = FakeClock(1000.0)
    outbox = FakeOutbox()
    sharing = await key_sharing.attach(
        offline.client,
        store=offline.store,
        outbox=outbox,
        dispatcher=offline.dispatcher,
        clock=clock,
    )

    async def burst(sender: str, tag: str, n: int) -> int:
        before = len(outbox.sent)
        for i in range(n):
            event = _request(sender, "DEV", f"s{i}", sender_key=None, request_id=f"{tag}{i}")
            await sharing._on_key_request(event)
        return len(outbox.sent) - before

    # A burst of 100 new requests from one user: at most the bucket's worth of replies.
    assert await burst("@eve:example.org", "a", 100) == withheld.SENDER_BURST
    limited = offline.metrics.get("key_sharing_rate_limited_total")
    assert limited is not None and limited.get("key_request") == 100 - withheld.SENDER_BURST
    # Another user is not affected.
    assert await burst("@bob:example.org", "a", 3) == 3
    # Time passes: replies resume, one per refill interval.
    clock.now += 2 * withheld.SENDER_REFILL
    assert await burst("@eve:example.org", "b", 10) == 2
    clock.now += 3600
    assert await burst("@eve:example.org", "c", 100) == withheld.SENDER_BURST
    await sharing.close()


async def test_no_olm_answers_are_rate_limited_per_sender(offline: Offline) -> None:
    clock = FakeClock(1000.0)
    queried: list[set[str]] = []

    async def query(user_id: str) -> None:  # the device-list query (no device turns up)
        queried.append({user_id})

    sharing = await key_sharing.attach(
        offline.client,
        store=offline.store,
        outbox=FakeOutbox(),
        dispatcher=offline.dispatcher,
        clock=clock,
    )

    sharing._no_olm._queries = KeyQueries(query, clock=clock, metrics=offline.metrics)
    offline.olm.tracked_users.update({"@eve:example.org", "@bob:example.org"})

    def notice(sender: str, n: int) -> RoomKeyWithheld:
        return RoomKeyWithheld(
            sender=sender,
            algorithm="m.megolm.v1.aes-sha2",
            sender_key=f"curve{n}",
            code=WithheldCode.NO_OLM,
            from_device=f"DEV{n}",
        )

    async def answer(sender: str, n: int) -> None:
        await sharing._on_withheld(notice(sender, n))
        assert await sharing.join(10)

    # 100 m.no_olm naming unknown devices: the bucket's worth of answers, and of those only
    # one device-list query (the per-user negative cache).
    for n in range(100):
        await answer("@eve:example.org", n)
    assert queried == [{"@eve:example.org"}]
    limited = offline.metrics.get("key_sharing_rate_limited_total")
    assert limited is not None and limited.get("no_olm") == 100 - withheld.SENDER_BURST
    dummies = offline.metrics.get("withheld_dummy_total")
    assert dummies is not None and dummies.get("no_device") == withheld.SENDER_BURST
    queries = offline.metrics.get("key_queries_total")
    assert queries is not None and queries.get("cached") == withheld.SENDER_BURST - 1
    await answer("@bob:example.org", 0)
    assert queried[-1] == {"@bob:example.org"}
    # A user the bot shares no room with causes no query at all (nor tracking).
    for n in range(20):
        await answer("@stranger:example.org", n)
    assert dummies.get("stranger") == withheld.SENDER_BURST
    assert "@stranger:example.org" not in offline.olm.tracked_users
    assert len(queried) == 2
    # After the negative cache expires (and the bucket refilled), eve is queried again.
    clock.now += max(withheld.SENDER_REFILL, NEGATIVE_TTL)
    await answer("@eve:example.org", 100)
    await answer("@eve:example.org", 101)
    assert len(queried) == 3
    await sharing.close()


# ---------------------------------------------------------------------------------------------
# against the real Synapse


class NioPeer:
    """A real nio client that records every to-device event and decrypted room message."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.to_device: list[dict[str, Any]] = []
        self.messages: list[str] = []
        self.undecrypted: list[MegolmEvent] = []

        async def on_to_device(event: NioToDeviceEvent) -> None:
            source = getattr(event, "source", None)
            self.to_device.append(
                {"nio": type(event).__name__, **(source if isinstance(source, dict) else {})}
            )

        async def on_message(room: Any, event: Any) -> None:
            if isinstance(event, RoomMessageText):
                self.messages.append(event.body)
            elif isinstance(event, MegolmEvent):
                self.undecrypted.append(event)

        client.add_to_device_callback(on_to_device, (NioToDeviceEvent,))
        client.add_event_callback(on_message, (RoomMessageText, MegolmEvent))

    def withheld(self, code: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.to_device
            if e.get("type") == "m.room_key.withheld"
            and (code is None or e["content"].get("code") == code)
        ]

    async def sync(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            await self.client.sync(timeout=300)


async def _shared_room(bot: BotProcess, peer: AsyncClient, *raws: RawDevice) -> str:
    """An encrypted room of the bot with ``peer`` (and the raw devices' users) joined."""
    encryption = {
        "type": "m.room.encryption",
        "state_key": "",
        "content": {"algorithm": "m.megolm.v1.aes-sha2"},
    }
    created = await bot.client.room_create(
        invite=[peer.user_id, *(r.user_id for r in raws)], initial_state=[encryption]
    )
    assert isinstance(created, RoomCreateResponse), created
    room_id: str = created.room_id
    joined = await peer.join(room_id)
    assert isinstance(joined, JoinResponse), joined
    for raw in raws:
        await raw.join(room_id)
    members = {peer.user_id, *(r.user_id for r in raws)}
    deadline = asyncio.get_running_loop().time() + 30
    while asyncio.get_running_loop().time() < deadline:
        await bot.refresh(poll_ms=200)
        await peer.sync(timeout=0)
        room = bot.client.rooms.get(room_id)
        other = peer.rooms.get(room_id)
        if room and other and room.encrypted and members <= set(room.users) and other.encrypted:
            if bot.client.should_query_keys:
                await bot.client.keys_query()
            return room_id
    raise AssertionError("the room never settled")


BACKUP = "BACKUPDEVICE"
"""The one device of the bot's own account that the operator opted in (``own_devices``)."""


@pytest.fixture
async def verified_only_bot(synapse: LocalSynapse, tmp_path: Path) -> AsyncIterator[BotProcess]:
    process = BotProcess(
        synapse,
        synapse.register(),
        tmp_path / "bot",
        policy=SharingPolicy(share_with="verified", own_devices=frozenset({BACKUP})),  # type: ignore[arg-type]
    )
    await process.start()
    try:
        yield process
    finally:
        await process.stop()


@pytest.mark.synapse
async def test_unverified_then_verified_real_nio_peer(
    verified_only_bot: BotProcess, synapse: LocalSynapse, tmp_path: Path
) -> None:
    bot = verified_only_bot
    peer = NioPeer(await make_client(synapse, tmp_path))
    # A verified device without one-time keys in the same room makes the bot re-share the
    # session on a later message, which meets the unverified peer a second time.
    raw = await RawDevice.registered(synapse, sync=False)  # no one-time keys
    try:
        room_id = await _shared_room(bot, peer.client, raw)
        bot.client.verify_device(bot.client.olm.device_store[raw.user_id][raw.device_id])
        await bot.say(room_id, "secret one")
        bot.clock.advance(60)
        await bot.say(room_id, "secret two")  # same Megolm session, re-shared: no new notice
        session_id = bot.client.olm.outbound_group_sessions[room_id].id
        await peer.sync()
        notices = peer.withheld()
        assert [n["content"]["code"] for n in notices] == ["m.unverified"]
        content = notices[0]["content"]
        assert (content["room_id"], content["session_id"]) == (room_id, session_id)
        assert content["sender_key"] == bot.client.olm.account.identity_keys["curve25519"]
        assert peer.messages == [] and len(peer.undecrypted) == 2
        assert bot.sent("m.unverified") == 1
        assert bot.suppressed("m.unverified") == 1
        assert (bot.sent("m.no_olm"), bot.suppressed("m.no_olm")) == (1, 1)  # the raw device
        await raw.drain()
        assert [e["content"]["code"] for e in raw.withheld()] == ["m.no_olm"]

        # Verified now: nio rotates the session and the peer gets the key.
        device = bot.client.olm.device_store[peer.client.user_id][peer.client.device_id]
        bot.client.verify_device(device)
        await bot.say(room_id, "secret three")
        await peer.sync()
        assert peer.messages == ["secret three"]
        assert len(peer.withheld()) == 1
    finally:
        await close_clients(peer.client)
        await raw.close()


@pytest.mark.synapse
async def test_blacklisted_real_nio_peer(synapse: LocalSynapse, tmp_path: Path) -> None:
    bot = await BotProcess(synapse, synapse.register(), tmp_path / "bot").start()  # share: all
    peer = NioPeer(await make_client(synapse, tmp_path))
    try:
        room_id = await _shared_room(bot, peer.client)
        await bot.say(room_id, "hello")  # shared with the unverified peer ("all")
        await peer.sync()
        assert peer.messages == ["hello"] and peer.withheld() == []
        device = bot.client.olm.device_store[peer.client.user_id][peer.client.device_id]
        bot.client.blacklist_device(device)
        await bot.say(room_id, "not for you")
        await bot.say(room_id, "nor this")
        await peer.sync()
        notices = peer.withheld()
        assert [n["content"]["code"] for n in notices] == ["m.blacklisted"]
        assert notices[0]["content"]["session_id"] == (
            bot.client.olm.outbound_group_sessions[room_id].id
        )
        assert peer.messages == ["hello"]
        assert bot.sent("m.blacklisted") == 1
    finally:
        await close_clients(peer.client)
        await bot.stop()


@pytest.mark.synapse
async def test_real_key_requests_get_unauthorised_and_unavailable(
    verified_only_bot: BotProcess, synapse: LocalSynapse, tmp_path: Path
) -> None:
    bot = verified_only_bot
    outsider = NioPeer(await make_client(synapse, tmp_path))
    second = NioPeer(
        await make_client(
            synapse, tmp_path, synapse.login(bot.user.user_id, bot.user.password, BACKUP)
        )
    )
    try:
        room_id = await _shared_room(bot, outsider.client)
        await bot.say(room_id, "can you read me")
        await outsider.sync()
        assert len(outsider.undecrypted) == 1
        event = outsider.undecrypted[0]

        # 1. Another user asks the bot for the key (nio builds the request): m.unauthorised.
        request = event.as_key_request(bot.user.user_id, outsider.client.device_id)
        await outsider.client.to_device(request)
        await bot.refresh()
        await outsider.sync()
        refusals = outsider.withheld("m.unauthorised")
        assert len(refusals) == 1
        assert refusals[0]["content"]["session_id"] == event.session_id
        assert refusals[0]["content"]["room_id"] == room_id

        # 2. The bot's own verified second device asks for a session the bot does not hold.
        await know_each_other(bot.client, second.client)
        mine = bot.client.olm.device_store[bot.user.user_id][second.client.device_id]
        bot.client.verify_device(mine)
        body = {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": room_id,
            "session_id": "no-such-session",
            "sender_key": outsider.client.olm.account.identity_keys["curve25519"],
        }
        await send_plaintext(
            second.client,
            bot.user.user_id,
            bot.user.device_id,
            "m.room_key_request",
            {
                "action": "request",
                "body": body,
                "requesting_device_id": second.client.device_id,
                "request_id": "req-unavailable",
            },
        )
        await bot.refresh()
        await second.sync()
        unavailable = second.withheld("m.unavailable")
        assert len(unavailable) == 1
        assert unavailable[0]["content"]["session_id"] == "no-such-session"

        # 3. ...and for a session it holds: nio forwards the key; no withheld from us.
        held = event.session_id  # the bot's session of "can you read me" (nio keeps it)
        told_before = len(second.withheld())
        await send_plaintext(
            second.client,
            bot.user.user_id,
            bot.user.device_id,
            "m.room_key_request",
            {
                "action": "request",
                "body": {
                    **body,
                    "session_id": held,
                    "sender_key": bot.client.olm.account.identity_keys["curve25519"],
                },
                "requesting_device_id": second.client.device_id,
                "request_id": "req-held",
            },
        )
        for _ in range(4):  # what sync_forever does: sync, claim keys, send nio's queue
            await bot.refresh()
            if bot.client.should_claim_keys:
                await bot.client.keys_claim(bot.client.get_users_for_key_claiming())
            await bot.client.send_to_device_messages()
            # nio looks at queued key requests only after a sync that brought something new.
            await send_plaintext(
                second.client, bot.user.user_id, bot.user.device_id, "org.example.ping", {"n": 1}
            )
        await second.sync()
        assert len(second.withheld()) == told_before  # nio answered; we did not
        from_bot = [
            e
            for e in second.to_device
            if e.get("sender") == bot.user.user_id and e.get("type") == "m.room.encrypted"
        ]
        assert from_bot, second.to_device
        sent = bot.metrics.get("withheld_sent_total")
        assert sent is not None
        assert (sent.get("m.unauthorised"), sent.get("m.unavailable")) == (1, 1)
    finally:
        await close_clients(outsider.client, second.client)


@pytest.fixture
async def keyed_peer(synapse: LocalSynapse) -> AsyncIterator[RawDevice]:
    device = await RawDevice.registered(synapse, one_time_keys=5)
    try:
        yield device
    finally:
        await device.close()


@pytest.mark.synapse
async def test_received_no_olm_opens_a_session_and_sends_one_dummy_per_hour(
    synapse: LocalSynapse, tmp_path: Path, keyed_peer: RawDevice
) -> None:
    peer = keyed_peer
    bot = await BotProcess(synapse, synapse.register(), tmp_path / "bot").start()
    try:
        await peer.create_room(invite=[bot.user.user_id])  # so that the bot tracks the peer
        notice = {
            "algorithm": "m.megolm.v1.aes-sha2",
            "sender_key": peer.curve25519,
            "code": "m.no_olm",
            "reason": "Unable to establish a secure channel.",
            "from_device": peer.device_id,
        }
        for _ in range(2):
            await peer.send_to_device(
                "m.room_key.withheld", {bot.user.user_id: {bot.user.device_id: notice}}
            )
            await bot.refresh()
            await bot.dispatcher_idle()
            assert await bot.outbox.flush(10.0)
        await peer.drain()
        payloads = [
            p
            for e in peer.to_device_events
            if e["type"] == "m.room.encrypted" and (p := peer.decrypt_olm(e)) is not None
        ]
        assert [p["type"] for p in payloads] == ["m.dummy"]
        assert payloads[0]["sender"] == bot.user.user_id
        assert payloads[0]["sender_device"] == bot.user.device_id
        dummies = bot.metrics.get("withheld_dummy_total")
        assert dummies is not None
        assert (dummies.get("sent"), dummies.get("throttled")) == (1, 1)
        # The bot's own handlers saw the notices as typed events.
        seen = [e for e in bot.events if isinstance(e, RoomKeyWithheld)]
        assert [e.code for e in seen] == [WithheldCode.NO_OLM] * 2
        assert seen[0].from_device == peer.device_id
    finally:
        await bot.stop()


@pytest.mark.synapse
async def test_a_session_the_peer_opens_allows_one_more_notice(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    peer = await RawDevice.registered(synapse, sync=False)  # no one-time keys
    try:
        bot = await BotProcess(synapse, synapse.register(), tmp_path / "bot").start()
    except BaseException:
        await peer.close()
        raise
    try:
        room_id = await room_with(bot, peer)
        await bot.say(room_id, "one")
        await peer.drain()
        assert len(peer.withheld("m.no_olm")) == 1

        # The peer answers with an m.dummy over a session it opens to the bot.
        await peer.send_dummy(bot.user.user_id, bot.user.device_id)
        for _ in range(20):
            await bot.refresh()
            await bot.sharing.flush()
            entry = await bot.sharing.ledger.entry(
                PeerDevice(peer.user_id, peer.device_id, peer.curve25519)
            )
            if entry is not None and entry.session_since_notice:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the inbound session never reached the ledger")
        # With that session the bot can share now; once it is discarded, one more notice.
        bot.discard_session(peer.curve25519)
        bot.client.invalidate_outbound_session(room_id)
        await bot.say(room_id, "two")
        bot.clock.advance(3600)
        bot.client.invalidate_outbound_session(room_id)
        await bot.say(room_id, "three")
        await peer.drain()
        assert len(peer.withheld("m.no_olm")) == 2
    finally:
        await bot.stop()
        await peer.close()
