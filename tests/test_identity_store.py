"""The bot's local copy of its cross-signing keys: 0600, encrypted with the install's store
secret, corrupt or foreign files refused with one clear error, old plaintext files migrated."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from bot_toolkit.identity import CrossSigningKeys, IdentityError, IdentityStore, StoredIdentity

USER = "@bot:localhost"


def _stored() -> StoredIdentity:
    return StoredIdentity(CrossSigningKeys.generate(USER), True, b"\x07" * 32, None)


def _secrets(stored: StoredIdentity) -> list[str]:
    return [k.seed_b64() for k in stored.keys.by_usage().values()]


def test_roundtrip_encrypted_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BOT_TOOLKIT_STORE_PASSPHRASE", raising=False)
    store = IdentityStore(tmp_path / "data")
    stored = _stored()
    store.save(stored)
    text = store.path.read_text()
    for secret in _secrets(stored):
        assert secret not in text
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "data" / "store.key").stat().st_mode) == 0o600
    loaded = store.load(USER)
    assert loaded is not None
    assert _secrets(loaded) == _secrets(stored)
    assert (loaded.published, loaded.storage_key, loaded.storage_key_id) == (
        True,
        b"\x07" * 32,
        None,
    )
    assert store.load("@other:localhost") is None  # another user's file is not used


def test_wrong_store_secret_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOT_TOOLKIT_STORE_PASSPHRASE", "first passphrase")
    store = IdentityStore(tmp_path)
    store.save(_stored())
    monkeypatch.setenv("BOT_TOOLKIT_STORE_PASSPHRASE", "another passphrase")
    with pytest.raises(IdentityError, match="cannot be decrypted with this install's store secret"):
        store.load(USER)


def test_plaintext_version_1_is_migrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BOT_TOOLKIT_STORE_PASSPHRASE", raising=False)
    stored = _stored()
    keys = stored.keys
    store = IdentityStore(tmp_path)
    store.path.write_text(
        json.dumps(
            {
                "version": 1,
                "user_id": USER,
                "master": keys.master.seed_b64(),
                "self_signing": keys.self_signing.seed_b64(),
                "user_signing": keys.user_signing.seed_b64(),
                "published": True,
                "storage_key": None,
                "storage_key_id": None,
            }
        )
    )
    store.path.chmod(0o644)
    loaded = store.load(USER)
    assert loaded is not None and _secrets(loaded) == _secrets(stored)
    text = store.path.read_text()
    assert json.loads(text)["version"] == 2
    assert all(secret not in text for secret in _secrets(stored))
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "content",
    ["not json", "{}", '{"version": 9, "user_id": "@bot:localhost"}',
     '{"version": 2, "user_id": "@bot:localhost", "encrypted": {"master": {"iv": "x"}}}'],
)  # fmt: skip
def test_corrupt_store_is_one_clear_error(tmp_path: Path, content: str) -> None:
    store = IdentityStore(tmp_path)
    store.path.write_text(content)
    with pytest.raises(IdentityError, match="is corrupt"):
        store.load(USER)
