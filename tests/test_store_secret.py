"""The per-install store secret and nio's store under it (real nio stores on disk)."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from nio import AsyncClient, AsyncClientConfig
from nio.crypto import OlmAccount

from bot_toolkit._nio_store import NIO_DEFAULT_PICKLE_KEY, WrongStoreSecret, adopt_pickle_key
from bot_toolkit.install_secret import (
    STORE_KEY_FILE,
    STORE_PASSPHRASE_ENV,
    store_secret,
    write_private,
)

USER, DEVICE = "@bot:example.org", "BOTDEV"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_is_random_private_and_stable(tmp_path: Path) -> None:
    first = store_secret(tmp_path / "a", {})
    assert _mode(tmp_path / "a" / STORE_KEY_FILE) == 0o600
    assert len(first) >= 40 and first != NIO_DEFAULT_PICKLE_KEY
    assert store_secret(tmp_path / "a", {}) == first  # the same install keeps its key
    assert store_secret(tmp_path / "b", {}) != first  # another install gets another one
    assert [p.name for p in (tmp_path / "a").iterdir()] == [STORE_KEY_FILE]  # no temp file left


def test_passphrase_from_the_environment_wins_and_writes_nothing(tmp_path: Path) -> None:
    assert store_secret(tmp_path, {STORE_PASSPHRASE_ENV: "correct horse"}) == "correct horse"
    assert not (tmp_path / STORE_KEY_FILE).exists()
    assert store_secret(tmp_path, {STORE_PASSPHRASE_ENV: ""}) != ""  # empty: the key file


def test_readable_key_file_is_made_private(tmp_path: Path) -> None:
    key = store_secret(tmp_path, {})
    os.chmod(tmp_path / STORE_KEY_FILE, 0o644)
    assert store_secret(tmp_path, {}) == key
    assert _mode(tmp_path / STORE_KEY_FILE) == 0o600


def test_empty_key_file_is_an_error(tmp_path: Path) -> None:
    write_private(tmp_path / STORE_KEY_FILE, b"")
    with pytest.raises(ValueError, match="empty"):
        store_secret(tmp_path, {})


def _client(store: Path, pickle_key: str) -> AsyncClient:
    config = AsyncClientConfig(encryption_enabled=True, pickle_key=pickle_key)
    client = AsyncClient("http://127.0.0.1:1", USER, device_id=DEVICE, store_path=str(store))
    client.config = config
    client.restore_login(USER, DEVICE, "token")
    return client


async def test_old_install_moves_from_the_default_key(tmp_path: Path) -> None:
    """A store pickled with nio's public default key is re-pickled under the install's key: the
    same identity opens with the new key and no longer with the default one."""
    store = tmp_path / "nio"
    store.mkdir()
    old = _client(store, NIO_DEFAULT_PICKLE_KEY)
    assert old.olm is not None
    identity = old.olm.account.identity_keys
    # The Megolm sessions move too.
    old.olm.create_outbound_group_session("!r:example.org")
    megolm = old.olm.outbound_group_sessions["!r:example.org"].id
    await old.close()
    key = store_secret(tmp_path, {})

    assert adopt_pickle_key(store, USER, DEVICE, key) == "migrated"
    assert adopt_pickle_key(store, USER, DEVICE, key) == "current"
    new = _client(store, key)
    assert new.olm is not None and new.olm.account.identity_keys == identity
    assert [s.id for s in new.olm.inbound_group_store] == [megolm]
    await new.close()
    with pytest.raises(WrongStoreSecret):
        adopt_pickle_key(store, USER, DEVICE, "another secret entirely")
    # The default key opens nothing any more; the install's key does.
    db = next(store.glob("*.db"))
    with sqlite3.connect(db) as conn:
        (pickle,) = conn.execute("SELECT account FROM accounts").fetchone()
    assert OlmAccount.from_pickle(pickle, key, True).identity_keys == identity
    with pytest.raises(Exception):  # noqa: B017 - vodozemac's PickleException
        OlmAccount.from_pickle(pickle, NIO_DEFAULT_PICKLE_KEY, True)


def test_new_device_has_nothing_to_move(tmp_path: Path) -> None:
    assert adopt_pickle_key(tmp_path / "nio", USER, DEVICE, "k" * 40) == "new"


async def test_restore_client_moves_an_old_store_and_keeps_the_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bot_toolkit.restore_client``, as the README's bots use it: an existing store under nio's
    default key opens with the same identity, under the install's key, logged in."""
    import bot_toolkit as bt  # noqa: PLC0415 - the front door, as a user imports it

    monkeypatch.delenv(STORE_PASSPHRASE_ENV, raising=False)
    old = _client(tmp_path, NIO_DEFAULT_PICKLE_KEY)
    assert old.olm is not None
    identity = old.olm.account.identity_keys
    await old.close()

    client = bt.restore_client("http://127.0.0.1:1", USER, DEVICE, "token", tmp_path)
    try:
        assert client.olm is not None and client.olm.account.identity_keys == identity
        key = (tmp_path / STORE_KEY_FILE).read_text().strip()
        assert _mode(tmp_path / STORE_KEY_FILE) == 0o600
        assert client.config.pickle_key == key != NIO_DEFAULT_PICKLE_KEY
        assert client.config.encryption_enabled and client.config.store_sync_tokens
        assert (client.user_id, client.device_id, client.access_token) == (USER, DEVICE, "token")
    finally:
        await client.close()
    assert adopt_pickle_key(tmp_path, USER, DEVICE, key) == "current"


async def test_restore_client_separate_store_and_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bot_toolkit as bt  # noqa: PLC0415

    monkeypatch.setenv(STORE_PASSPHRASE_ENV, "correct horse")
    client = bt.restore_client(
        "http://127.0.0.1:1",
        USER,
        DEVICE,
        "token",
        tmp_path / "data",
        store_dir=tmp_path / "nio",
        request_timeout=7.0,
    )
    try:
        assert client.config.pickle_key == "correct horse"
        assert client.config.request_timeout == 7.0
        assert client.store_path == str(tmp_path / "nio") and any((tmp_path / "nio").iterdir())
    finally:
        await client.close()
    assert not (tmp_path / "data" / STORE_KEY_FILE).exists()  # the passphrase wins
    # Another passphrase does not open the store: a typed error, not nio's pickle exception.
    monkeypatch.setenv(STORE_PASSPHRASE_ENV, "wrong")
    with pytest.raises(bt.WrongStoreSecret):
        bt.restore_client(
            "http://127.0.0.1:1", USER, DEVICE, "t", tmp_path / "data", store_dir=tmp_path / "nio"
        )


def test_client_config_keeps_encryption_on() -> None:
    import bot_toolkit as bt  # noqa: PLC0415

    config = bt.client_config("k" * 40, store_sync_tokens=False)
    assert config.encryption_enabled and config.pickle_key == "k" * 40
    assert not config.store_sync_tokens  # an explicit option wins over the default
    with pytest.raises(ValueError, match="encryption_enabled"):
        bt.client_config("k" * 40, encryption_enabled=False)
    with pytest.raises(ValueError, match="pickle key"):
        bt.client_config("k" * 40, pickle_key="other")
