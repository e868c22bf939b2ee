"""Tests for bot_toolkit.verification.sas.

vodozemac does not let a ``Sas`` use a chosen private key, so fixed end-to-end vectors through
our code path are impossible. Instead:

* a reference implementation of the spec's formulas lives in this file only (X25519, HKDF and
  HMAC from ``cryptography``, the SAS bit arithmetic done on bit strings, libolm's buggy base64
  re-implemented from its description), itself checked against RFC 5869 / RFC 7748 vectors;
* a reference peer with a fixed private key talks to a real :class:`SasSession` (random vodozemac
  key); both compute the SAS and MACs for the same transcript and must agree;
* the pure helpers (info strings, emoji/decimal from bytes, canonical JSON, commitment) have
  hard-coded vectors worked out by hand from the spec text.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import pickle
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import vodozemac
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bot_toolkit._types import DeviceId, UserId
from bot_toolkit.verification import sas as sas_mod
from bot_toolkit.verification.errors import (
    CommitmentMismatchError,
    InvalidSasMessageError,
    KeyMismatchError,
    SasError,
    SasStateError,
    UnknownMethodError,
)
from bot_toolkit.verification.negotiation import (
    MAC_LEGACY,
    MAC_V2,
    OUR_SAS_OFFER,
    SasAgreement,
    SasOffer,
    agreement_from_accept,
    check_accept,
    common_verification_methods,
    negotiate_start,
    offer_from_start,
)
from bot_toolkit.verification.sas import (
    Emoji,
    SasSession,
    canonical_json,
    compute_commitment,
    decimals_from_bytes,
    emoji_for,
    emoji_indices_from_bytes,
    emoji_table,
    key_id_list,
    mac_info,
    sas_info,
    unpadded_b64,
    verify_commitment,
)
from bot_toolkit.verification.table import CancelCode, Party, SendCancel, State, transition

ALICE = Party(UserId("@alice:example.org"), DeviceId("ALICEDEV"))
BOB = Party(UserId("@bob:example.org"), DeviceId("BOBDEV"))
TXN = "txn1"

# ------------------------------------------------------------------------------------------
# Reference implementation of the spec's formulas (test only).

B64 = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"


def ref_hkdf(ikm: bytes, info: str, length: int) -> bytes:
    # "No salt is used": RFC 5869 then uses HashLen zero bytes.
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info.encode()).derive(ikm)


def ref_b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def ref_libolm_inplace_b64(data: bytes) -> str:
    """libolm's hkdf-hmac-sha256 bug: base64-encode the MAC into the buffer holding it.

    Encoding runs front to back, 3 bytes in, 4 characters out, in the same buffer; from the
    fourth group on it reads characters it has already written instead of MAC bytes.
    """
    buf = bytearray(data) + bytearray(44 - len(data))
    full = len(data) // 3 * 3
    src = dst = 0
    while src < full:
        v = buf[src] << 16 | buf[src + 1] << 8 | buf[src + 2]
        src += 3
        buf[dst : dst + 4] = "".join(B64[(v >> s) & 63] for s in (18, 12, 6, 0)).encode()
        dst += 4
    rest = len(data) - full  # 2 for a 32-byte MAC
    assert rest == 2
    v = (buf[src] << 8 | buf[src + 1]) << 2
    buf[dst : dst + 3] = "".join(B64[(v >> s) & 63] for s in (12, 6, 0)).encode()
    return buf[: dst + 3].decode()


def ref_mac(secret: bytes, message: str, info: str, method: str) -> str:
    key = ref_hkdf(secret, info, 32)
    digest = hmac.new(key, message.encode(), hashlib.sha256).digest()
    return ref_b64(digest) if method == MAC_V2 else ref_libolm_inplace_b64(digest)


def ref_bits(data: bytes) -> str:
    return "".join(f"{b:08b}" for b in data)


def ref_emoji_indices(data: bytes) -> tuple[int, ...]:
    bits = ref_bits(data)
    return tuple(int(bits[6 * i : 6 * i + 6], 2) for i in range(7))


def ref_decimals(data: bytes) -> tuple[int, ...]:
    bits = ref_bits(data)
    return tuple(int(bits[13 * i : 13 * i + 13], 2) + 1000 for i in range(3))


@dataclass
class RefPeer:
    """The other device, computing everything from the spec with a fixed private key."""

    party: Party
    private: X25519PrivateKey

    @classmethod
    def fixed(cls, party: Party, hex_key: str) -> RefPeer:
        return cls(party, X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_key)))

    @property
    def public_b64(self) -> str:
        return ref_b64(self.private.public_key().public_bytes_raw())

    def secret(self, their_b64: str) -> bytes:
        raw = base64.b64decode(their_b64 + "=" * (-len(their_b64) % 4))
        return self.private.exchange(X25519PublicKey.from_public_bytes(raw))


RFC7748_ALICE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
RFC7748_BOB = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"


def test_reference_hkdf_rfc5869_case3() -> None:
    # RFC 5869 A.3: SHA-256, zero-length salt and info.
    okm = ref_hkdf(b"\x0b" * 22, "", 42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


def test_reference_x25519_rfc7748() -> None:
    a = RefPeer.fixed(ALICE, RFC7748_ALICE)
    b = RefPeer.fixed(BOB, RFC7748_BOB)
    assert a.private.public_key().public_bytes_raw().hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert a.secret(b.public_b64).hex() == (
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    )


# ------------------------------------------------------------------------------------------
# Hard-coded vectors for the pure helpers.


def test_emoji_indices_vector_by_hand() -> None:
    # ff 00 aa 55 0f f0 = 11111111 00000000 10101010 01010101 00001111 11110000
    # 6-bit groups:  111111 110000 000010 101010 010101 010000 111111 (110000 unused)
    data = bytes.fromhex("ff00aa550ff0")
    assert emoji_indices_from_bytes(data) == (63, 48, 2, 42, 21, 16, 63)
    assert ref_emoji_indices(data) == (63, 48, 2, 42, 21, 16, 63)
    assert [e.description for e in emoji_for((63, 48, 2, 42, 21, 16, 63))] == [
        "Pin", "Hammer", "Lion", "Book", "Cloud", "Tree", "Pin",
    ]  # fmt: skip
    assert emoji_indices_from_bytes(bytes(6)) == (0,) * 7
    assert emoji_indices_from_bytes(b"\xff" * 6) == (63,) * 7


def test_decimals_vector_by_hand() -> None:
    # ff 00 aa 55 0f: B0<<5|B1>>3 = 8160; (B1&7)<<10|B2<<2|B3>>6 = 680|1 = 681;
    # (B3&0x3f)<<7|B4>>1 = 21*128|7 = 2695; plus 1000 each.
    data = bytes.fromhex("ff00aa550f")
    assert decimals_from_bytes(data) == (9160, 1681, 3695)
    assert ref_decimals(data) == (9160, 1681, 3695)
    assert decimals_from_bytes(bytes(5)) == (1000, 1000, 1000)
    assert decimals_from_bytes(b"\xff" * 5) == (9191, 9191, 9191)
    with pytest.raises(ValueError):
        decimals_from_bytes(bytes(6))
    with pytest.raises(ValueError):
        emoji_indices_from_bytes(bytes(5))


def test_pure_helpers_match_reference_on_many_inputs() -> None:
    for seed in range(200):
        data = hashlib.sha256(seed.to_bytes(2, "big")).digest()[:6]
        assert emoji_indices_from_bytes(data) == ref_emoji_indices(data)
        assert decimals_from_bytes(data[:5]) == ref_decimals(data[:5])


def test_emoji_table() -> None:
    table = emoji_table()
    assert len(table) == 64
    assert table[0] == Emoji("🐶", "Dog")
    assert table[1] == Emoji("🐱", "Cat")
    assert table[63] == Emoji("📌", "Pin")
    emoji, description = table[2]  # (emoji, description) pairs
    assert (emoji, description) == ("🦁", "Lion")
    assert len({e.emoji for e in table}) == 64


def test_info_strings() -> None:
    assert (
        sas_info(
            starter=ALICE,
            starter_key="AKEY",
            accepter=BOB,
            accepter_key="BKEY",
            transaction_id=TXN,
        )
        == "MATRIX_KEY_VERIFICATION_SAS|@alice:example.org|ALICEDEV|AKEY|"
        "@bob:example.org|BOBDEV|BKEY|txn1"
    )
    assert (
        mac_info(sender=ALICE, receiver=BOB, transaction_id=TXN, key_id="ed25519:ALICEDEV")
        == "MATRIX_KEY_VERIFICATION_MAC@alice:example.orgALICEDEV@bob:example.orgBOBDEV"
        "txn1ed25519:ALICEDEV"
    )
    assert (
        mac_info(sender=BOB, receiver=ALICE, transaction_id=TXN, key_id="KEY_IDS")
        == "MATRIX_KEY_VERIFICATION_MAC@bob:example.orgBOBDEV@alice:example.orgALICEDEV"
        "txn1KEY_IDS"
    )
    assert key_id_list(["ed25519:DEVICEID", "ed25519:Cross+Signing+Key"]) == (
        "ed25519:Cross+Signing+Key,ed25519:DEVICEID"  # the spec's own example
    )


def test_mac_vector_fixed_secret() -> None:
    # Fixed HKDF input: shared secret 00 01 .. 1f.
    secret = bytes(range(32))
    info = mac_info(sender=ALICE, receiver=BOB, transaction_id=TXN, key_id="ed25519:ALICEDEV")
    message = "AliceDeviceEd25519KeyBase64"
    assert ref_mac(secret, message, info, MAC_V2) == "BFd+QzhfTZxTJTx+XIlyCMMgjN9meNUqk4hXzXuwUdE"
    legacy = ref_mac(secret, message, info, MAC_LEGACY)
    assert legacy == "BFd+KzhfaGZTR1pUUjFwVVVqRndWVlZxUm5kV1ZsWng"
    # Only the first group comes from untouched MAC bytes; later groups read characters that
    # were already written over the MAC.
    assert legacy[:4] == "BFd+" and legacy[4:] != "QzhfTZxTJTx+XIlyCMMgjN9meNUqk4hXzXuwUdE"
    assert len(legacy) == 43


def test_canonical_json_and_commitment_vector() -> None:
    content = {"b": 1, "a": "é", "c": [1, {"z": None, "y": True}]}
    assert canonical_json(content) == '{"a":"é","b":1,"c":[1,{"y":true,"z":null}]}'.encode()
    key = "KEY+base64"
    start = {"method": "m.sas.v1", "transaction_id": TXN}
    expected = hashlib.sha256(b'KEY+base64{"method":"m.sas.v1","transaction_id":"txn1"}').digest()
    commitment = compute_commitment(key, start)
    assert commitment == base64.b64encode(expected).decode().rstrip("=")
    verify_commitment(commitment, key, start)
    with pytest.raises(CommitmentMismatchError):
        verify_commitment(commitment, key, {**start, "extra": 1})


def test_commitment_is_unpadded_base64_not_hex() -> None:
    # matrix-nio 0.26 sends hex (nio issue 570); the spec says unpadded base64.
    commitment = compute_commitment("k", {"method": "m.sas.v1"})
    assert len(commitment) == 43
    assert "=" not in commitment
    assert base64.b64decode(commitment + "=") == hashlib.sha256(b'k{"method":"m.sas.v1"}').digest()
    hex_form = hashlib.sha256(b'k{"method":"m.sas.v1"}').hexdigest()
    assert commitment != hex_form
    with pytest.raises(CommitmentMismatchError):
        verify_commitment(hex_form, "k", {"method": "m.sas.v1"})
    assert unpadded_b64(b"\x00") == "AA"


# ------------------------------------------------------------------------------------------
# A real SasSession against the reference peer.


def ref_start_content(peer: RefPeer, macs: list[str] | None = None) -> dict[str, Any]:
    return {
        "from_device": peer.party.device_id,
        "method": "m.sas.v1",
        "transaction_id": TXN,
        "key_agreement_protocols": ["curve25519-hkdf-sha256"],
        "hashes": ["sha256"],
        "message_authentication_codes": macs or ["hkdf-hmac-sha256.v2", "hkdf-hmac-sha256"],
        "short_authentication_string": ["decimal", "emoji"],
        "unknown_future_field": {"kept": ["in", "the", "commitment"]},
    }


def ref_accept_content(peer: RefPeer, start: Mapping[str, Any], mac: str) -> dict[str, Any]:
    key = peer.public_b64
    digest = hashlib.sha256(
        key.encode() + json.dumps(start, sort_keys=True, separators=(",", ":")).encode()
    ).digest()
    return {
        "transaction_id": TXN,
        "method": "m.sas.v1",
        "key_agreement_protocol": "curve25519-hkdf-sha256",
        "hash": "sha256",
        "message_authentication_code": mac,
        "short_authentication_string": ["decimal", "emoji"],
        "commitment": ref_b64(digest),
    }


def ref_mac_content(
    peer: RefPeer, secret: bytes, receiver: Party, keys: Mapping[str, str], method: str
) -> dict[str, Any]:
    def info(key_id: str) -> str:
        p, r = peer.party, receiver
        return f"MATRIX_KEY_VERIFICATION_MAC{p.user_id}{p.device_id}{r.user_id}{r.device_id}{TXN}{key_id}"  # noqa: E501

    return {
        "mac": {k: ref_mac(secret, v, info(k), method) for k, v in keys.items()},
        "keys": ref_mac(secret, ",".join(sorted(keys)), info("KEY_IDS"), method),
    }


OUR_KEYS = {
    "ed25519:BOBDEV": "BobDeviceEd25519PublicKeyInUnpaddedBase64xyz",
    "ed25519:BobMasterCrossSigningKeyInUnpaddedBase64": "BobMasterCrossSigningKeyInUnpaddedBase64",
}
THEIR_KEYS = {
    "ed25519:ALICEDEV": "AliceDeviceEd25519PublicKeyInUnpaddedBase64x",
    "ed25519:AliceMasterKey": "AliceMasterKey",
}


def sas_bytes_reference(
    peer: RefPeer, session: SasSession, *, session_started: bool
) -> tuple[bytes, bytes]:
    secret = peer.secret(session.public_key)
    if session_started:
        info = (
            f"MATRIX_KEY_VERIFICATION_SAS|{BOB.user_id}|{BOB.device_id}|{session.public_key}|"
            f"{ALICE.user_id}|{ALICE.device_id}|{peer.public_b64}|{TXN}"
        )
    else:
        info = (
            f"MATRIX_KEY_VERIFICATION_SAS|{ALICE.user_id}|{ALICE.device_id}|{peer.public_b64}|"
            f"{BOB.user_id}|{BOB.device_id}|{session.public_key}|{TXN}"
        )
    return secret, ref_hkdf(secret, info, 6)


@pytest.mark.parametrize("mac_method", [MAC_V2, MAC_LEGACY])
def test_session_as_accepter_matches_reference(mac_method: str) -> None:
    peer = RefPeer.fixed(ALICE, RFC7748_ALICE)
    session = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=False)
    start = ref_start_content(peer, macs=[mac_method])
    accept = session.accept(start)
    assert accept["message_authentication_code"] == mac_method
    # The commitment covers the start exactly as received, unknown fields included.
    ser = json.dumps(start, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256((session.public_key + ser).encode()).digest()
    assert accept["commitment"] == ref_b64(digest)

    session.receive_their_key(peer.public_b64)
    assert session.our_key_event_content() == {"transaction_id": TXN, "key": session.public_key}
    secret, sas = sas_bytes_reference(peer, session, session_started=False)
    assert session.emoji_indices() == ref_emoji_indices(sas)
    assert session.decimals() == ref_decimals(sas[:5])
    assert session.emoji() == emoji_for(ref_emoji_indices(sas))

    ours = session.mac_content(OUR_KEYS)
    expected = ref_mac_content(
        RefPeer(BOB, peer.private), secret, ALICE, OUR_KEYS, mac_method
    )  # the sender is BOB: only the party matters for the info strings
    assert ours == {"transaction_id": TXN, **expected}

    theirs = ref_mac_content(peer, secret, BOB, THEIR_KEYS, mac_method)
    verified = session.verify_mac(theirs["mac"], theirs["keys"], THEIR_KEYS)
    assert verified == ("ed25519:ALICEDEV", "ed25519:AliceMasterKey")  # sorted
    assert session.verified_keys == verified


@pytest.mark.parametrize("mac_method", [MAC_V2, MAC_LEGACY])
def test_session_as_starter_matches_reference(mac_method: str) -> None:
    peer = RefPeer.fixed(ALICE, RFC7748_BOB)
    session = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=True)
    start = session.start_content()
    assert start == {
        "from_device": "BOBDEV",
        "method": "m.sas.v1",
        "transaction_id": TXN,
        "key_agreement_protocols": ["curve25519-hkdf-sha256"],
        "hashes": ["sha256"],
        "message_authentication_codes": ["hkdf-hmac-sha256.v2", "hkdf-hmac-sha256"],
        "short_authentication_string": ["decimal", "emoji"],
    }
    agreement = session.receive_accept(ref_accept_content(peer, start, mac_method))
    assert agreement.message_authentication_code == mac_method
    assert session.our_key_event_content()["key"] == session.public_key
    session.receive_their_key(peer.public_b64)  # commitment checked
    secret, sas = sas_bytes_reference(peer, session, session_started=True)
    assert session.emoji_indices() == ref_emoji_indices(sas)
    assert session.decimals() == ref_decimals(sas[:5])
    ours = session.mac_content(OUR_KEYS)
    as_bob = RefPeer(BOB, peer.private)  # only the party matters for the info strings
    assert ours["mac"] == ref_mac_content(as_bob, secret, ALICE, OUR_KEYS, mac_method)["mac"]
    theirs = ref_mac_content(peer, secret, BOB, THEIR_KEYS, mac_method)
    assert session.verify_mac(theirs["mac"], theirs["keys"], THEIR_KEYS) == tuple(
        sorted(THEIR_KEYS)
    )


def test_legacy_mac_emulation_matches_vodozemac() -> None:
    peer = RefPeer.fixed(ALICE, RFC7748_ALICE)
    sas = vodozemac.Sas()
    established = sas.diffie_hellman(vodozemac.Curve25519PublicKey.from_base64(peer.public_b64))
    secret = peer.secret(sas.public_key.to_base64())
    for message, info in [("a", "b"), ("ed25519 key", "MATRIX_KEY_VERIFICATION_MAC…")]:
        assert established.calculate_mac_invalid_base64(message, info) == ref_mac(
            secret, message, info, MAC_LEGACY
        )
        assert established.calculate_mac(message, info) == ref_mac(secret, message, info, MAC_V2)


def test_starter_rejects_key_that_breaks_commitment() -> None:
    peer = RefPeer.fixed(ALICE, RFC7748_ALICE)
    other = RefPeer.fixed(ALICE, RFC7748_BOB)
    session = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=True)
    session.receive_accept(ref_accept_content(peer, session.start_content(), MAC_V2))
    with pytest.raises(CommitmentMismatchError) as info:
        session.receive_their_key(other.public_b64)
    assert info.value.code == "m.mismatched_commitment"
    assert not session.established
    with pytest.raises(SasStateError):  # and it refuses any further key
        session.receive_their_key(peer.public_b64)


# ------------------------------------------------------------------------------------------
# Two real sessions.


def run_pair(*, macs: list[str] | None = None) -> tuple[SasSession, SasSession]:
    """Alice (starter) and Bob (accepter), both SasSession, through the key exchange."""
    alice = SasSession(transaction_id=TXN, us=ALICE, them=BOB, we_started=True)
    bob = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=False)
    start = alice.start_content()
    if macs is not None:
        start["message_authentication_codes"] = macs
        alice._start_content = dict(start)  # pretend Alice offered only these
    accept = bob.accept(json.loads(json.dumps(start)))
    alice.receive_accept(accept)
    bob.receive_their_key(alice.our_key_event_content()["key"])
    alice.receive_their_key(bob.our_key_event_content()["key"])
    return alice, bob


@pytest.mark.parametrize("macs", [None, [MAC_LEGACY]])
def test_two_sessions_agree(macs: list[str] | None) -> None:
    alice, bob = run_pair(macs=macs)
    assert alice.agreement == bob.agreement
    assert alice.agreement is not None
    assert alice.agreement.message_authentication_code == (MAC_LEGACY if macs else MAC_V2)
    assert alice.emoji() == bob.emoji()
    assert alice.decimals() == bob.decimals()
    assert all(1000 <= d <= 9191 for d in alice.decimals())
    alice_keys = {"ed25519:ALICEDEV": "alicedevkey", "ed25519:alicemaster": "alicemaster"}
    bob_keys = {"ed25519:BOBDEV": "bobdevkey"}
    a_mac = alice.mac_content(alice_keys)
    b_mac = bob.mac_content(bob_keys)
    assert bob.verify_mac(a_mac["mac"], a_mac["keys"], alice_keys) == tuple(sorted(alice_keys))
    assert alice.verify_mac(b_mac["mac"], b_mac["keys"], bob_keys) == ("ed25519:BOBDEV",)


def test_start_race_loser_keeps_its_single_key() -> None:
    bob = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=True)
    key = bob.public_key
    bob.start_content()
    bob.lose_start_race()
    assert not bob.we_started
    alice = SasSession(transaction_id=TXN, us=ALICE, them=BOB, we_started=True)
    alice.receive_accept(bob.accept(alice.start_content()))
    bob.receive_their_key(alice.public_key)
    alice.receive_their_key(bob.our_key_event_content()["key"])
    assert bob.public_key == key
    assert alice.emoji() == bob.emoji()
    with pytest.raises(SasStateError):
        bob.lose_start_race()


# ------------------------------------------------------------------------------------------
# One ephemeral key per transaction.


def test_one_key_per_transaction() -> None:
    alice, bob = run_pair()
    first = bob.public_key
    assert {bob.our_key_event_content()["key"] for _ in range(5)} == {first}
    assert bob.public_key == first
    with pytest.raises(SasStateError):
        bob.receive_their_key(alice.public_key)  # no second Diffie-Hellman
    with pytest.raises(SasStateError):
        bob.receive_their_key(vodozemac.Sas().public_key.to_base64())  # nor with another key
    assert bob.our_key_event_content()["key"] == first
    # vodozemac refuses a second DH on the same Sas as well.
    raw = vodozemac.Sas()
    raw.diffie_hellman(vodozemac.Sas().public_key)
    with pytest.raises(vodozemac.SasException):
        raw.diffie_hellman(vodozemac.Sas().public_key)


def test_key_is_made_once_and_sessions_differ() -> None:
    a = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=False)
    b = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=False)
    assert a.public_key != b.public_key
    with pytest.raises(AttributeError):
        a.public_key = b.public_key  # type: ignore[misc]


def test_steps_out_of_order_raise() -> None:
    s = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=False)
    with pytest.raises(SasStateError):
        s.our_key_event_content()  # before the accept
    with pytest.raises(SasStateError):
        s.receive_their_key(vodozemac.Sas().public_key.to_base64())
    with pytest.raises(SasStateError):
        s.emoji()
    with pytest.raises(SasStateError):
        s.start_content()  # accepter
    with pytest.raises(SasStateError):
        s.receive_accept({})
    starter = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=True)
    with pytest.raises(SasStateError):
        starter.accept(ref_start_content(RefPeer.fixed(ALICE, RFC7748_ALICE)))
    with pytest.raises(SasStateError):
        starter.receive_accept({})  # start not built yet
    with pytest.raises(ValueError):
        SasSession(transaction_id=TXN, us=BOB, them=BOB, we_started=True)


def test_invalid_keys() -> None:
    for bad in ["abc", "", "!" * 43, base64.b64encode(bytes(32)).decode().rstrip("=")]:
        s = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=False)
        s.accept(ref_start_content(RefPeer.fixed(ALICE, RFC7748_ALICE)))
        with pytest.raises(InvalidSasMessageError) as info:
            s.receive_their_key(bad)
        assert info.value.code == "m.invalid_message"
        with pytest.raises(SasStateError):
            s.our_key_event_content()


# ------------------------------------------------------------------------------------------
# MAC verification rules.


@pytest.fixture
def verified_pair() -> tuple[SasSession, SasSession, dict[str, Any], dict[str, str]]:
    alice, bob = run_pair()
    alice_keys = {"ed25519:ALICEDEV": "alicedevkey", "ed25519:alicemaster": "alicemaster"}
    return alice, bob, alice.mac_content(alice_keys), alice_keys


def test_mac_tampered_key_mac(verified_pair: Any) -> None:
    _, bob, msg, keys = verified_pair
    mac = dict(msg["mac"])
    mac["ed25519:ALICEDEV"] = mac["ed25519:alicemaster"]
    with pytest.raises(KeyMismatchError) as info:
        bob.verify_mac(mac, msg["keys"], keys)
    assert info.value.code == "m.key_mismatch"
    with pytest.raises(SasStateError):  # the session is finished after a failure
        bob.verify_mac(msg["mac"], msg["keys"], keys)


def test_mac_key_removed_from_list(verified_pair: Any) -> None:
    _, bob, msg, keys = verified_pair
    mac = {k: v for k, v in msg["mac"].items() if k != "ed25519:alicemaster"}
    with pytest.raises(KeyMismatchError):
        bob.verify_mac(mac, msg["keys"], keys)


def test_mac_key_we_know_differs(verified_pair: Any) -> None:
    _, bob, msg, keys = verified_pair
    with pytest.raises(KeyMismatchError):
        bob.verify_mac(msg["mac"], msg["keys"], {**keys, "ed25519:alicemaster": "othermaster"})


def test_mac_unknown_key_ids_are_skipped_but_covered() -> None:
    alice, bob = run_pair()
    sent = {"ed25519:ALICEDEV": "alicedevkey", "ed25519:somethingnew": "newkey"}
    msg = alice.mac_content(sent)
    known = {"ed25519:ALICEDEV": "alicedevkey"}
    assert bob.verify_mac(msg["mac"], msg["keys"], known) == ("ed25519:ALICEDEV",)
    # Adding an id that the KEY_IDS MAC does not cover is detected, even if unknown to us.
    alice2, bob2 = run_pair()
    msg2 = alice2.mac_content(known)
    with pytest.raises(KeyMismatchError):
        bob2.verify_mac({**msg2["mac"], "ed25519:injected": "AAAA"}, msg2["keys"], known)


def test_mac_must_verify_the_device_key() -> None:
    alice, bob = run_pair()
    msg = alice.mac_content({"ed25519:ALICEDEV": "alicedevkey", "ed25519:master": "m"})
    with pytest.raises(KeyMismatchError, match="device key"):
        bob.verify_mac(msg["mac"], msg["keys"], {"ed25519:master": "m"})
    _, bob2 = run_pair()
    with pytest.raises(KeyMismatchError):
        bob2.verify_mac({}, "", {"ed25519:ALICEDEV": "alicedevkey"})
    _, bob3 = run_pair()
    with pytest.raises(ValueError):
        bob3.mac_content({"ed25519:NOTMYDEVICE": "k"})


def test_mac_wrong_types_and_legacy_v2_confusion() -> None:
    alice, bob = run_pair()  # v2 agreed
    keys = {"ed25519:ALICEDEV": "alicedevkey"}
    msg = alice.mac_content(keys)
    with pytest.raises(KeyMismatchError):
        bob.verify_mac({"ed25519:ALICEDEV": 5}, msg["keys"], keys)  # type: ignore[dict-item]
    alice, bob = run_pair(macs=[MAC_LEGACY])
    legacy = alice.mac_content(keys)
    alice_v2, _ = run_pair()
    assert legacy["mac"] != alice_v2.mac_content(keys)["mac"]
    assert bob.verify_mac(legacy["mac"], legacy["keys"], keys) == ("ed25519:ALICEDEV",)


# ------------------------------------------------------------------------------------------
# Negotiation.


def offer(**changes: tuple[str, ...]) -> SasOffer:
    fields = {
        "key_agreement_protocols": ("curve25519-hkdf-sha256", "curve25519"),
        "hashes": ("sha256",),
        "message_authentication_codes": (MAC_LEGACY, MAC_V2, "org.matrix.msc3783.hkdf-hmac-sha256"),
        "short_authentication_string": ("emoji", "decimal"),
    }
    fields.update(changes)
    return SasOffer(**fields)


def test_negotiate_start() -> None:
    assert negotiate_start(offer()) == SasAgreement(
        "curve25519-hkdf-sha256", "sha256", MAC_V2, ("decimal", "emoji")
    )
    assert negotiate_start(offer(message_authentication_codes=(MAC_LEGACY,))) == SasAgreement(
        "curve25519-hkdf-sha256", "sha256", MAC_LEGACY, ("decimal", "emoji")
    )
    emoji_only = negotiate_start(offer(short_authentication_string=("emoji",)))
    assert emoji_only is not None and emoji_only.short_authentication_string == ("emoji",)
    assert negotiate_start(offer(key_agreement_protocols=("curve25519",))) is None
    assert negotiate_start(offer(hashes=("sha512",))) is None
    assert negotiate_start(offer(message_authentication_codes=("hmac-sha256",))) is None
    assert negotiate_start(offer(short_authentication_string=("pictures",))) is None
    assert negotiate_start(OUR_SAS_OFFER) is not None


def test_check_accept() -> None:
    good = SasAgreement("curve25519-hkdf-sha256", "sha256", MAC_V2, ("emoji",))
    assert check_accept(good)
    assert check_accept(SasAgreement("curve25519-hkdf-sha256", "sha256", MAC_LEGACY, ("decimal",)))
    for bad in [
        SasAgreement("curve25519", "sha256", MAC_V2, ("emoji",)),
        SasAgreement("curve25519-hkdf-sha256", "sha512", MAC_V2, ("emoji",)),
        SasAgreement("curve25519-hkdf-sha256", "sha256", "hmac-sha256", ("emoji",)),
        SasAgreement("curve25519-hkdf-sha256", "sha256", MAC_V2, ()),
        SasAgreement("curve25519-hkdf-sha256", "sha256", MAC_V2, ("emoji", "pictures")),
    ]:
        assert not check_accept(bad), bad


def test_accept_with_unoffered_choice_raises_unknown_method() -> None:
    s = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=True)
    accept = ref_accept_content(RefPeer.fixed(ALICE, RFC7748_ALICE), s.start_content(), "hmac")
    with pytest.raises(UnknownMethodError) as info:
        s.receive_accept(accept)
    assert info.value.code == "m.unknown_method"


def test_parsing_peer_content() -> None:
    peer = RefPeer.fixed(ALICE, RFC7748_ALICE)
    with pytest.raises(UnknownMethodError):
        offer_from_start({**ref_start_content(peer), "method": "m.reciprocate.v1"})
    with pytest.raises(InvalidSasMessageError):
        offer_from_start({**ref_start_content(peer), "hashes": "sha256"})
    with pytest.raises(InvalidSasMessageError):
        agreement_from_accept({"key_agreement_protocol": 1})
    s = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=False)
    with pytest.raises(UnknownMethodError):
        s.accept({**ref_start_content(peer), "hashes": ["md5"]})
    s = SasSession(transaction_id=TXN, us=BOB, them=ALICE, we_started=False)
    with pytest.raises(InvalidSasMessageError):
        s.accept({**ref_start_content(peer), "bad": float("nan")})
    assert common_verification_methods(["m.qr_code.scan.v1", "m.sas.v1"]) == ("m.sas.v1",)
    assert common_verification_methods(["m.reciprocate.v1"]) == ()


@pytest.mark.parametrize(
    ("error", "state"),
    [
        (UnknownMethodError, State.STARTED_OUT),
        (CommitmentMismatchError, State.ACCEPTED),
        (KeyMismatchError, State.MAC_SENT),
        (InvalidSasMessageError, State.KEYS_EXCHANGED),
    ],
)
def test_errors_feed_the_table_to_the_same_code(error: type[SasError], state: State) -> None:
    outcome = transition(state, error.input)
    assert outcome.actions == (SendCancel(CancelCode(error.code)),)


# ------------------------------------------------------------------------------------------
# Secrets stay out of repr, logs and pickles.


def test_no_secrets_in_repr_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="bot_toolkit")
    alice, bob = run_pair()
    keys = {"ed25519:ALICEDEV": "alicedevkey"}
    msg = alice.mac_content(keys)
    bob.verify_mac(msg["mac"], msg["keys"], keys)
    texts = [repr(alice), repr(bob), caplog.text]
    for text in texts:
        for secret_ish in (alice.public_key, bob.public_key, msg["keys"], *msg["mac"].values()):
            assert secret_ish not in text
    assert "SasSession(transaction_id='txn1'" in repr(bob)
    with pytest.raises(TypeError):
        pickle.dumps(bob)
    assert not hasattr(bob, "__dict__")  # slots: no stray attributes
    assert sas_mod.log.name == "bot_toolkit.verification.sas"
