"""Unit tests of the identity maths against fixed vectors computed by other implementations.

* Secret storage (HKDF / AES-CTR / HMAC key check and secret), PBKDF2 and the recovery-key text:
  computed by matrix-js-sdk 43 with ``tests/interop/identity_vectors.mjs`` (Web Crypto inside),
  pasted here; ``tests/test_identity_interop.py`` re-runs the script and compares.
* Signed JSON and canonical JSON: computed by Synapse's ``signedjson`` / ``canonicaljson`` (PyNaCl)
  and pasted here; a property test also compares live against ``canonicaljson``.
* Raw Ed25519: RFC 8032 section 7.1, test 1.
"""

from __future__ import annotations

import base64

import canonicaljson  # Synapse's (the test extra installs it)
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot_toolkit.encoding import Base64Error, canonical_json, decode_b64, unpadded_b64
from bot_toolkit.identity.keys import CrossSigningKeys, KeyMismatchError, PublishedKeys
from bot_toolkit.identity.recovery_key import (
    RecoveryKeyError,
    _b58decode,
    _b58encode,
    decode_recovery_key,
    encode_recovery_key,
)
from bot_toolkit.identity.signing import SignatureError, SigningKey, verify_signature
from bot_toolkit.identity.ssss import (
    BadMacError,
    KeyDescription,
    MalformedSecretError,
    WrongKeyError,
    check_key,
    decrypt_secret,
    encrypt_secret,
    key_check,
    passphrase_key,
)

# --- vectors from matrix-js-sdk (tests/interop/identity_vectors.mjs) ---------------------------
JS = {
    "key_hex": "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20",
    "recovery_key": "EsT1 H3Wm yHnZ VYce KwM9 c6Gk nX71 3FkR Yz9x vary hjQh 5m7X",
    "recovery_key_zeros": "EsSz ygLv VP1b xF1C v7kE eBQx MxDP buG5 w25T L3b6 hfyG Kkrd",
    "iv_b64": "ABEiM0RVZncIGSo7TF1ufw==",
    "key_check": {
        "iv": "ABEiM0RVZncIGSo7TF1ufw==",
        "mac": "yjAetQ3CKLVuO2DBcaFisQUAFE6jP/1ZbwLLpLn6LVU=",
    },
    "secret_plain": "c2VlZCBvZiB0aGUgbWFzdGVyIGtleQ",
    "secret_name": "m.cross_signing.master",
    "secret": {
        "iv": "ABEiM0RVZncIGSo7TF1ufw==",
        "ciphertext": "IvspKBi8ZQlg58mj4MiRIQf4FlPkTTlXHdjtbBWp",
        "mac": "CHg7bq+KcgnkFmiZAhOek2dGJQJ+3Uzhj91Av4SiXNQ=",
    },
    "passphrase": ("correct horse battery staple", "MmMsAlty", 1000),
    "passphrase_hex": "2321998332a004103e526592d93c08adce8ec2b6a0f9ffe00ab4f9b757d320af",
}
KEY = bytes.fromhex(JS["key_hex"])
IV = base64.b64decode(JS["iv_b64"])

# --- vectors from signedjson / canonicaljson (Synapse's libraries) ----------------------------
SEED = bytes(range(32))
SEED_PUBLIC = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg"
SIGNED_OBJ = {
    "user_id": "@bot:localhost",
    "usage": ["self_signing"],
    "keys": {"ed25519:x": "x"},
    "unsigned": {"a": 1},
    "é": "ü",
}
SIGNED_SIG = (
    "AbDUOaB12dSz7ABGqh1O3wUfCXb5RZi+5xQXidQIi4JMRVQaqHMOZC8yY+v38nFGPIXfQdMrcfdu5youES4/Cw"
)
CANONICAL_IN = {"b": 1, "a": [1, "é", "\u2028"], "c": {"z": None, "y": True}}
CANONICAL_OUT = b'{"a":[1,"\xc3\xa9","\xe2\x80\xa8"],"b":1,"c":{"y":true,"z":null}}'


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------- encodings


def test_canonical_json_vector() -> None:
    assert canonical_json(CANONICAL_IN) == CANONICAL_OUT


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(json_values)
def test_canonical_json_matches_canonicaljson(value: object) -> None:
    assert canonical_json(value) == canonicaljson.encode_canonical_json(value)


def test_unpadded_b64_and_lenient_decode() -> None:
    assert unpadded_b64(b"\xff\xee") == "/+4"
    assert decode_b64("/+4") == decode_b64("/+4=") == b"\xff\xee"
    for bad in ("a", "ab!c", "abcd===", "-_-_"):
        with pytest.raises(Base64Error):
            decode_b64(bad)


# --------------------------------------------------------------------------- signing


def test_rfc8032_test1() -> None:
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    key = SigningKey(seed)
    assert _b64(key.public_key).hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    assert _b64(key.sign(b"")).hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e"
        "39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )


def test_sign_json_matches_signedjson() -> None:
    key = SigningKey(SEED)
    assert key.public_key == SEED_PUBLIC
    signed = key.sign_json(SIGNED_OBJ, "@bot:localhost")
    assert signed["signatures"] == {"@bot:localhost": {key.key_id: SIGNED_SIG}}
    assert signed["unsigned"] == {"a": 1}  # kept, not covered
    assert "signatures" not in SIGNED_OBJ  # the input is not modified
    verify_signature(signed, "@bot:localhost", key.key_id, key.public_key)


def test_verify_signature_rejects_tampering() -> None:
    key = SigningKey(SEED)
    signed = key.sign_json(SIGNED_OBJ, "@bot:localhost")
    with pytest.raises(SignatureError):
        verify_signature(
            {**signed, "usage": ["master"]}, "@bot:localhost", key.key_id, key.public_key
        )
    with pytest.raises(SignatureError):
        verify_signature(signed, "@other:localhost", key.key_id, key.public_key)
    other = SigningKey.generate()
    with pytest.raises(SignatureError):
        verify_signature(signed, "@bot:localhost", key.key_id, other.public_key)
    broken = {**signed, "signatures": {"@bot:localhost": {key.key_id: "!!"}}}
    with pytest.raises(SignatureError):
        verify_signature(broken, "@bot:localhost", key.key_id, key.public_key)


def test_signing_key_repr_and_seed_roundtrip() -> None:
    key = SigningKey.generate()
    assert key.seed_b64() not in repr(key)
    assert SigningKey.from_b64(key.seed_b64()).public_key == key.public_key
    assert "=" not in key.public_key and "=" not in key.key_id
    with pytest.raises(ValueError):
        SigningKey(b"short")
    with pytest.raises(ValueError):
        SigningKey.from_b64("not base64!")


def test_cross_signing_upload_body_is_signed_by_master() -> None:
    keys = CrossSigningKeys.generate("@bot:localhost")
    body = keys.upload_body()
    query = {
        "master_keys": {"@bot:localhost": body["master_key"]},
        "self_signing_keys": {"@bot:localhost": body["self_signing_key"]},
        "user_signing_keys": {"@bot:localhost": body["user_signing_key"]},
    }
    published = PublishedKeys.from_query("@bot:localhost", query)
    assert published is not None
    assert published.master == keys.master.public_key
    keys.check_against(published)
    assert keys.master.seed_b64() not in repr(keys)
    with pytest.raises(KeyMismatchError):
        CrossSigningKeys.generate("@bot:localhost").check_against(published)
    # a self-signing key not signed by the master key is refused
    query["self_signing_keys"] = {
        "@bot:localhost": CrossSigningKeys.generate("@bot:localhost").upload_body()[
            "self_signing_key"
        ]
    }
    with pytest.raises(ValueError, match="not signed by the master key"):
        PublishedKeys.from_query("@bot:localhost", query)
    assert PublishedKeys.from_query("@bot:localhost", {}) is None


def test_device_signed_by_self_signing_key() -> None:
    keys = CrossSigningKeys.generate("@bot:localhost")
    body = keys.upload_body()
    published = PublishedKeys.from_query(
        "@bot:localhost",
        {
            "master_keys": {"@bot:localhost": body["master_key"]},
            "self_signing_keys": {"@bot:localhost": body["self_signing_key"]},
        },
    )
    assert published is not None and published.user_signing is None
    device = {"user_id": "@bot:localhost", "device_id": "D", "keys": {"ed25519:D": "abc"}}
    assert not published.device_signed(device)
    assert published.device_signed(keys.self_signing.sign_json(device, "@bot:localhost"))
    assert not published.device_signed(keys.master.sign_json(device, "@bot:localhost"))


# --------------------------------------------------------------------------- secret storage


def test_key_check_matches_js_sdk() -> None:
    check = key_check(KEY, iv=IV)
    assert _b64(check["iv"]) == IV
    assert _b64(check["mac"]) == base64.b64decode(JS["key_check"]["mac"])
    desc = KeyDescription.parse(
        "k", {"algorithm": "m.secret_storage.v1.aes-hmac-sha2", **JS["key_check"]}
    )
    check_key(KEY, desc)  # padded base64 from js-sdk is accepted
    with pytest.raises(WrongKeyError):
        check_key(bytes(32), desc)


def test_secret_matches_js_sdk_both_ways() -> None:
    mine = encrypt_secret(KEY, JS["secret_name"], JS["secret_plain"], iv=IV)
    for field in ("iv", "ciphertext", "mac"):
        assert _b64(mine[field]) == base64.b64decode(JS["secret"][field])
        assert "=" not in mine[field]
    assert decrypt_secret(KEY, JS["secret_name"], JS["secret"]) == JS["secret_plain"]


def test_random_iv_has_bit_63_clear() -> None:
    for _ in range(64):
        iv = _b64(encrypt_secret(KEY, "n", "x")["iv"])
        assert len(iv) == 16 and iv[8] & 0x80 == 0


def test_secret_errors() -> None:
    good = encrypt_secret(KEY, "name", "secret")
    with pytest.raises(BadMacError):
        decrypt_secret(bytes(32), "name", good)
    with pytest.raises(BadMacError):
        decrypt_secret(KEY, "other.name", good)  # the name is bound into the keys
    flipped = {
        **good,
        "ciphertext": unpadded_b64(
            bytes([_b64(good["ciphertext"])[0] ^ 1]) + _b64(good["ciphertext"])[1:]
        ),
    }
    with pytest.raises(BadMacError):
        decrypt_secret(KEY, "name", flipped)
    for broken in (
        {},
        {**good, "iv": 5},
        {**good, "mac": "%%%"},
        {**good, "iv": unpadded_b64(b"short")},
    ):
        with pytest.raises(MalformedSecretError):
            decrypt_secret(KEY, "name", broken)


def test_passphrase_matches_js_sdk() -> None:
    phrase, salt, iterations = JS["passphrase"]
    assert passphrase_key(phrase, salt, iterations).hex() == JS["passphrase_hex"]
    desc = KeyDescription.parse(
        "k",
        {
            "algorithm": "m.secret_storage.v1.aes-hmac-sha2",
            "passphrase": {"algorithm": "m.pbkdf2", "salt": salt, "iterations": iterations},
        },
    )
    assert desc.key_from_passphrase(phrase).hex() == JS["passphrase_hex"]
    with pytest.raises(MalformedSecretError):
        passphrase_key(phrase, salt, 10**9)  # a hostile description cannot stall us


def test_key_description_parse_errors() -> None:
    alg = "m.secret_storage.v1.aes-hmac-sha2"
    for bad in (
        None,
        {"algorithm": "m.other"},
        {"algorithm": alg, "iv": "AAAA"},
        {"algorithm": alg, "iv": 1, "mac": 2},
        {"algorithm": alg, "passphrase": {"algorithm": "m.scrypt"}},
        {"algorithm": alg, "passphrase": {"algorithm": "m.pbkdf2", "salt": "s", "iterations": "9"}},
    ):
        with pytest.raises(MalformedSecretError):
            KeyDescription.parse("k", bad)
    desc = KeyDescription.parse("k", {"algorithm": alg, "name": "n"})
    check_key(bytes(32), desc)  # no iv/mac: the spec says assume the key is valid
    with pytest.raises(WrongKeyError):
        desc.key_from_passphrase("x")
    full = {"algorithm": alg, "name": "n", **key_check(KEY)}
    assert KeyDescription.parse("k", full).content() == full


# --------------------------------------------------------------------------- recovery key


def test_recovery_key_matches_js_sdk() -> None:
    assert encode_recovery_key(KEY) == JS["recovery_key"]
    assert encode_recovery_key(bytes(32)) == JS["recovery_key_zeros"]
    assert decode_recovery_key(JS["recovery_key"]) == KEY
    assert decode_recovery_key(JS["recovery_key"].replace(" ", "")) == KEY
    assert decode_recovery_key("  " + JS["recovery_key"].replace(" ", "\n") + "\t") == KEY


def test_recovery_key_prefix_and_parity() -> None:
    raw = _b58decode(JS["recovery_key"].replace(" ", ""))
    assert raw[:2] == b"\x8b\x01" and len(raw) == 35
    parity = 0
    for b in raw[:-1]:
        parity ^= b
    assert raw[-1] == parity
    wrong_parity = _b58encode(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(RecoveryKeyError, match="parity"):
        decode_recovery_key(wrong_parity)
    wrong_prefix = b"\x8b\x02" + raw[2:-1]
    p = 0
    for b in wrong_prefix:
        p ^= b
    with pytest.raises(RecoveryKeyError, match="prefix"):
        decode_recovery_key(_b58encode(wrong_prefix + bytes([p])))
    with pytest.raises(RecoveryKeyError, match="length"):
        decode_recovery_key(_b58encode(raw[:-2]))
    with pytest.raises(RecoveryKeyError, match="base58"):
        decode_recovery_key(JS["recovery_key"].replace("E", "0"))  # 0 is not base58
    with pytest.raises(RecoveryKeyError):
        decode_recovery_key("")


def test_recovery_key_error_does_not_echo_the_text() -> None:
    text = JS["recovery_key"][:-1] + ("Y" if JS["recovery_key"][-1] != "Y" else "Z")
    with pytest.raises(RecoveryKeyError) as info:
        decode_recovery_key(text)
    assert text.replace(" ", "")[:8] not in str(info.value)


@given(st.binary(min_size=32, max_size=32))
def test_recovery_key_roundtrip(key: bytes) -> None:
    text = encode_recovery_key(key)
    assert decode_recovery_key(text) == key
    assert all(len(group) <= 4 for group in text.split(" "))
