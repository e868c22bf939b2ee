"""Unit tests: the sharing policy's cross-signing rules and CrossSigningTrust's answers, over a
recorded-answer homeserver (a dict standing in for /keys/query: a fake is fine for unit tests)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from nio import MatrixRoom, RoomMessageText

from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.identity.api import IdentityApi
from bot_toolkit.identity.keys import CrossSigningKeys
from bot_toolkit.identity.signing import SigningKey
from bot_toolkit.identity.trust import CrossSigningTrust, SenderTrustResolver
from bot_toolkit.metrics import Metrics
from bot_toolkit.room_messages import RoomMessage, RoomMessageFeed, SenderTrust
from bot_toolkit.withheld import DeviceTrust, ShareWith, SharingPolicy, WithheldError

BOT = "@bot:localhost"
ALICE = "@alice:localhost"


@pytest.mark.parametrize(
    ("trust", "all_", "cross", "verified"),
    [
        (DeviceTrust(), True, False, False),
        (DeviceTrust(verified=True), True, False, True),  # local trust is not cross-signing
        (DeviceTrust(cross_signed=True), True, True, False),
        (DeviceTrust(cross_signed=True, owner_verified=True), True, True, True),
        (
            DeviceTrust(owner_verified=True),
            True,
            False,
            False,
        ),  # unsigned device of a verified user
    ],
)
def test_policy_rules(trust: DeviceTrust, all_: bool, cross: bool, verified: bool) -> None:
    for mode, expected in (
        (ShareWith.ALL, all_),
        (ShareWith.CROSS_SIGNED, cross),
        (ShareWith.VERIFIED, verified),
    ):
        policy = SharingPolicy(share_with=mode)
        if expected:
            assert policy.check_share(trust) is True
        else:
            with pytest.raises(WithheldError) as info:
                policy.check_share(trust)
            assert info.value.code == "m.unverified"
            assert SharingPolicy(share_with=mode, send_withheld=False).check_share(trust) is False


def test_share_with_accepts_cross_signed_text() -> None:
    assert SharingPolicy(share_with="cross_signed").share_with is ShareWith.CROSS_SIGNED  # type: ignore[arg-type]


class RecordedServer:
    """Answers /keys/query from a dict; counts requests."""

    def __init__(self) -> None:
        self.body: dict[str, Any] = {
            "device_keys": {},
            "master_keys": {},
            "self_signing_keys": {},
            "user_signing_keys": {},
        }
        self.queries = 0
        self.fail = False

    async def __call__(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        assert path.endswith("/keys/query")
        self.queries += 1
        if self.fail:
            return 502, {}
        return 200, self.body

    def add_identity(self, keys: CrossSigningKeys, *, with_usk: bool) -> None:
        upload = keys.upload_body()
        self.body["master_keys"][keys.user_id] = upload["master_key"]
        self.body["self_signing_keys"][keys.user_id] = upload["self_signing_key"]
        if with_usk:
            self.body["user_signing_keys"][keys.user_id] = upload["user_signing_key"]

    def add_device(self, user_id: str, device_id: str, signer: SigningKey | None) -> str:
        key = SigningKey.generate()
        device: Mapping[str, Any] = {
            "user_id": user_id,
            "device_id": device_id,
            "keys": {f"ed25519:{device_id}": key.public_key},
        }
        if signer is not None:
            device = signer.sign_json(device, user_id)
        self.body["device_keys"].setdefault(user_id, {})[device_id] = device
        return key.public_key


async def test_cross_signing_trust_answers() -> None:
    server = RecordedServer()
    now = [0.0]
    trust = CrossSigningTrust(IdentityApi(server, BOT), clock=lambda: now[0])
    ours = CrossSigningKeys.generate(BOT)
    alice = CrossSigningKeys.generate(ALICE)
    server.add_identity(ours, with_usk=True)
    server.add_identity(alice, with_usk=False)
    signed = server.add_device(ALICE, "SIGNED", alice.self_signing)
    unsigned = server.add_device(ALICE, "UNSIGNED", None)
    wrong = server.add_device(ALICE, "BYMASTER", alice.master)  # not the self-signing key

    await trust.refresh({ALICE: {"SIGNED": signed, "UNSIGNED": unsigned, "BYMASTER": wrong}})
    assert server.queries == 1
    assert trust.cross_signed(ALICE, "SIGNED", signed)
    assert not trust.cross_signed(ALICE, "SIGNED", unsigned)  # another key for that id
    assert not trust.cross_signed(ALICE, "UNSIGNED", unsigned)
    assert not trust.cross_signed(ALICE, "BYMASTER", wrong)
    assert not trust.owner_verified(ALICE)
    assert trust.master_key(ALICE) == alice.master.public_key
    assert trust.sender_trust(ALICE, "SIGNED", signed, verified=False) is SenderTrust.CROSS_SIGNED
    assert trust.sender_trust(ALICE, "UNSIGNED", unsigned, verified=False) is (
        SenderTrust.NOT_CROSS_SIGNED
    )
    assert trust.sender_trust(ALICE, "UNSIGNED", unsigned, verified=True) is SenderTrust.VERIFIED
    assert trust.sender_trust(ALICE, None, None, verified=False) is SenderTrust.UNKNOWN

    # fresh answers are reused; a device the answer did not show makes it ask again
    await trust.refresh({ALICE: {"SIGNED": signed}})
    assert server.queries == 1
    await trust.refresh({ALICE: {"NEW": "x"}})
    assert server.queries == 2

    # we verify Alice: her master key signed by our user-signing key
    master = alice.master_json()
    server.body["master_keys"][ALICE] = ours.user_signing.sign_json(master, BOT)
    trust.invalidate([ALICE])
    await trust.refresh({ALICE: {"SIGNED": signed}})
    assert trust.owner_verified(ALICE)
    assert trust.sender_trust(ALICE, "SIGNED", signed, verified=False) is SenderTrust.VERIFIED

    # a failed query keeps the old answers
    server.fail = True
    now[0] += 1000
    await trust.refresh({ALICE: {"SIGNED": signed}})
    assert trust.cross_signed(ALICE, "SIGNED", signed)


async def test_cross_signing_trust_rejects_forged_self_signing_key() -> None:
    server = RecordedServer()
    trust = CrossSigningTrust(IdentityApi(server, BOT))
    alice = CrossSigningKeys.generate(ALICE)
    server.add_identity(alice, with_usk=False)
    # the homeserver swaps in a self-signing key the master key never signed
    forged = CrossSigningKeys.generate(ALICE)
    server.body["self_signing_keys"][ALICE] = forged.upload_body()["self_signing_key"]
    device = server.add_device(ALICE, "D", forged.self_signing)
    await trust.refresh({ALICE: {"D": device}})
    assert not trust.cross_signed(ALICE, "D", device)
    assert trust.master_key(ALICE) is None


async def test_sender_trust_resolver_maps_the_sending_key() -> None:
    server = RecordedServer()
    trust = CrossSigningTrust(IdentityApi(server, BOT))
    alice = CrossSigningKeys.generate(ALICE)
    server.add_identity(alice, with_usk=False)
    signed = server.add_device(ALICE, "SIGNED", alice.self_signing)
    unsigned = server.add_device(ALICE, "UNSIGNED", None)
    devices = {"curve-signed": ("SIGNED", signed), "curve-unsigned": ("UNSIGNED", unsigned)}
    resolver = SenderTrustResolver(trust, lambda user, curve: devices.get(curve))
    assert await resolver.sender_trust(ALICE, "curve-signed", verified=False) is (
        SenderTrust.CROSS_SIGNED
    )
    assert await resolver.sender_trust(ALICE, "curve-unsigned", verified=False) is (
        SenderTrust.NOT_CROSS_SIGNED
    )
    assert await resolver.sender_trust(ALICE, "curve-nobody", verified=False) is (
        SenderTrust.UNKNOWN
    )
    assert server.queries == 1  # one query answered both devices


async def test_feed_refines_sender_trust_of_encrypted_messages() -> None:
    class Source:
        def __init__(self) -> None:
            self.asked: list[tuple[str, str, bool]] = []

        async def sender_trust(
            self, user_id: str, sender_key: str, *, verified: bool
        ) -> SenderTrust:
            self.asked.append((user_id, sender_key, verified))
            return SenderTrust.NOT_CROSS_SIGNED

    class Client:
        user_id = "@bot:localhost"

        def add_event_callback(self, callback: Any, filters: Any) -> None:
            self.callback = callback

    source, client = Source(), Client()
    dispatcher = Dispatcher(Metrics())
    got: list[RoomMessage] = []

    @dispatcher.on(RoomMessage)
    async def record(msg: RoomMessage) -> None:
        got.append(msg)

    RoomMessageFeed(client, dispatcher, since_ms=0, trust=source)  # type: ignore[arg-type]
    await dispatcher.start()
    try:
        room = MatrixRoom("!r:localhost", "@bot:localhost")
        for event_id, encrypted in (("$plain", False), ("$enc", True)):
            event = RoomMessageText.from_dict(
                {
                    "type": "m.room.message",
                    "event_id": event_id,
                    "sender": ALICE,
                    "origin_server_ts": 1234,
                    "content": {"msgtype": "m.text", "body": "hi"},
                }
            )
            if encrypted:
                event.decrypted, event.verified, event.sender_key = True, False, "curve"
            await client.callback(room, event)
        assert await dispatcher.join()
    finally:
        await dispatcher.close(5)
    trusts = {m.event_id: m.sender_trust for m in got}
    assert trusts == {"$plain": SenderTrust.UNKNOWN, "$enc": SenderTrust.NOT_CROSS_SIGNED}
    assert source.asked == [(ALICE, "curve", False)]
