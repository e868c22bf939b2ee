"""The log scanner of the end-to-end tests finds what it looks for (so its silence means
something): a nio pickle, a piece of one, a Megolm session key, the store key."""

from __future__ import annotations

from pathlib import Path

import pytest
import vodozemac
from nio import AsyncClient, AsyncClientConfig

from bot_toolkit.install_secret import store_secret
from tests.secret_scan import assert_no_key_material, stored_secrets

USER, DEVICE = "@bot:example.org", "BOTDEV"


async def test_scanner_finds_each_kind_of_key_material(tmp_path: Path) -> None:
    key = store_secret(tmp_path, {})
    (tmp_path / "nio").mkdir()
    client = AsyncClient(
        "http://127.0.0.1:1", USER, device_id=DEVICE, store_path=str(tmp_path / "nio")
    )
    client.config = AsyncClientConfig(encryption_enabled=True, pickle_key=key)
    client.restore_login(USER, DEVICE, "token")
    assert client.olm is not None
    client.olm.create_outbound_group_session("!r:example.org")
    outbound = client.olm.outbound_group_sessions["!r:example.org"]
    await client.close()

    clean = "2026-01-01T00:00:00.000Z DEBUG nio: sharing a session with 3 devices"
    assert assert_no_key_material(clean, tmp_path) == 0
    pickle = next(value for label, value in stored_secrets(tmp_path) if label == "nio accounts")
    for leak in (
        pickle,
        f"peewee: INSERT ... ['{pickle[40:120]}']",  # a piece is enough
        key,
        f"m.room_key content: session_key={outbound.session_key}",
    ):
        with pytest.raises(AssertionError):
            assert_no_key_material(f"{clean}\n{leak}\n", tmp_path)
    # Material the stores do not hold is found by trying to open it.
    other = vodozemac.GroupSession()
    exported = vodozemac.InboundGroupSession(other.session_key).export_at(0)
    with pytest.raises(AssertionError, match="Megolm session key"):
        assert_no_key_material(f"{clean} {other.session_key.to_base64()}", tmp_path)
    with pytest.raises(AssertionError, match="exported session key"):
        assert_no_key_material(f"{clean} {exported.to_base64()}", tmp_path)
