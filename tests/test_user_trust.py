"""UserTrust: signing a verified user's master key, trusting their cross-signed devices, noticing
identity changes. Real Ed25519 signatures (``bot_toolkit.identity.signing``), a real store; the
homeserver's ``/keys/query`` answers and nio's trust store are fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bot_toolkit.identity.signing import SigningKey
from bot_toolkit.metrics import Metrics
from bot_toolkit.store import Store
from bot_toolkit.verification.user_trust import UserIdentityChanged, UserTrust, UserVerified

ALICE = "@alice:test"


def key_json(user: str, usage: str, key: SigningKey) -> dict[str, Any]:
    return {"user_id": user, "usage": [usage], "keys": {key.key_id: key.public_key}}


def device_json(user: str, device: str) -> dict[str, Any]:
    return {
        "user_id": user,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {f"ed25519:{device}": f"ed-{device}", f"curve25519:{device}": f"cv-{device}"},
    }


@dataclass
class Published:
    """Alice's keys as the homeserver publishes them."""

    master: SigningKey = field(default_factory=SigningKey.generate)
    ssk: SigningKey = field(default_factory=SigningKey.generate)
    signed_devices: list[str] = field(default_factory=lambda: ["D1"])
    unsigned_devices: list[str] = field(default_factory=lambda: ["D2"])
    ssk_signed_by_master: bool = True

    def body(self) -> dict[str, Any]:
        ssk_json = key_json(ALICE, "self_signing", self.ssk)
        if self.ssk_signed_by_master:
            ssk_json = self.master.sign_json(ssk_json, ALICE)
        devices = {d: self.ssk.sign_json(device_json(ALICE, d), ALICE) for d in self.signed_devices}
        devices |= {d: device_json(ALICE, d) for d in self.unsigned_devices}
        return {
            "master_keys": {ALICE: key_json(ALICE, "master", self.master)},
            "self_signing_keys": {ALICE: ssk_json},
            "device_keys": {ALICE: devices},
        }


@dataclass
class FakeSigner:
    master_key: str | None = "our-master"
    signed: list[tuple[str, Mapping[str, Any]]] = field(default_factory=list)
    fail: bool = False

    async def sign_user(self, user_id: str, master_key_json: Mapping[str, Any]) -> None:
        if self.fail:
            raise RuntimeError("upload refused")
        self.signed.append((user_id, master_key_json))


@dataclass
class FakeDevices:
    known: set[tuple[str, str]] = field(default_factory=set)
    marked: set[tuple[str, str]] = field(default_factory=set)
    refreshed: list[str] = field(default_factory=list)

    async def refresh(self, user_id: str) -> None:
        self.refreshed.append(user_id)

    def mark(self, user_id: str, device_id: str) -> bool:
        if (user_id, device_id) not in self.known:
            return False
        self.marked.add((user_id, device_id))
        return True

    def unmark(self, user_id: str, device_id: str) -> None:
        self.marked.discard((user_id, device_id))


@dataclass
class Rig:
    published: Published
    signer: FakeSigner
    devices: FakeDevices
    store: Store
    metrics: Metrics
    events: list[object]
    trust: UserTrust

    async def query(self, users: list[str]) -> Mapping[str, Any]:
        return self.published.body()

    async def reopened(self) -> UserTrust:
        trust = UserTrust(
            self.signer, self.query, self.devices, self.store, self.events.append, Metrics()
        )
        await trust.start()
        return trust


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = await Store.open(tmp_path / "s.sqlite3")
    published = Published()
    devices = FakeDevices(known={(ALICE, "D1"), (ALICE, "D2"), (ALICE, "D3")})
    events: list[object] = []
    metrics = Metrics()
    rig = Rig(published, FakeSigner(), devices, store, metrics, events, None)  # type: ignore[arg-type]
    rig.trust = UserTrust(rig.signer, rig.query, devices, store, events.append, metrics)
    await rig.trust.start()
    try:
        yield rig
    finally:
        await store.close()


async def test_verified_user_is_signed_and_cross_signed_devices_trusted(rig: Rig) -> None:
    master = rig.published.master.public_key
    assert await rig.trust.verified(ALICE, master)
    assert [u for u, _ in rig.signer.signed] == [ALICE]
    assert rig.signer.signed[0][1]["keys"] == {f"ed25519:{master}": master}
    assert rig.devices.marked == {(ALICE, "D1")}  # D2 carries no self-signing signature
    assert rig.trust.is_verified(ALICE)
    assert UserVerified(ALICE, master) in rig.events
    assert rig.metrics.get("user_verifications_total").get("signed") == 1  # type: ignore[union-attr]
    assert (await rig.reopened()).is_verified(ALICE)  # kept across a restart


async def test_a_new_cross_signed_device_is_trusted_on_refresh(rig: Rig) -> None:
    assert await rig.trust.verified(ALICE, rig.published.master.public_key)
    rig.published.signed_devices.append("D3")
    await rig.trust.refresh([ALICE, "@stranger:test"])
    assert rig.devices.marked == {(ALICE, "D1"), (ALICE, "D3")}


async def test_master_key_that_is_not_the_published_one_is_not_signed(rig: Rig) -> None:
    assert not await rig.trust.verified(ALICE, SigningKey.generate().public_key)
    assert rig.signer.signed == [] and not rig.trust.is_verified(ALICE)
    assert rig.metrics.get("user_verifications_total").get("failed") == 1  # type: ignore[union-attr]


async def test_failed_upload_leaves_the_user_unverified(rig: Rig) -> None:
    rig.signer.fail = True
    assert not await rig.trust.verified(ALICE, rig.published.master.public_key)
    assert not rig.trust.is_verified(ALICE) and rig.devices.marked == set()


async def test_self_signing_key_not_signed_by_the_master_trusts_nothing(rig: Rig) -> None:
    rig.published.ssk_signed_by_master = False
    assert await rig.trust.verified(ALICE, rig.published.master.public_key)
    assert rig.devices.marked == set()


async def test_identity_change_is_noticed(rig: Rig) -> None:
    old = rig.published.master.public_key
    assert await rig.trust.verified(ALICE, old)
    rig.published.master = SigningKey.generate()  # a reset (or an attack)
    await rig.trust.refresh([ALICE])
    assert not rig.trust.is_verified(ALICE)
    assert rig.devices.marked == set()  # the devices trusted through the old identity
    assert UserIdentityChanged(ALICE, old, rig.published.master.public_key) in rig.events
    assert rig.metrics.get("user_identity_changes_total").get() == 1  # type: ignore[union-attr]
    assert not (await rig.reopened()).is_verified(ALICE)
