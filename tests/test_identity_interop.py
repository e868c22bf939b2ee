"""The bot's cross-signing identity against the real Synapse, checked by matrix-js-sdk 43's Rust
crypto (the engine inside Element) as the independent peer.

* a fresh account: the standalone bot bootstraps an identity at start; the peer sees
  ``userHasCrossSigningKeys(bot)`` and the bot's device ``signedByOwner``; a restart keeps the
  same identity; the key files are 0600 and no key reaches the log;
* the fixed secret-storage / recovery-key vectors of ``tests/test_identity_crypto.py`` are still
  what matrix-js-sdk computes.
"""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot_toolkit.encoding import unpadded_b64
from bot_toolkit.identity import IdentityStore, decode_recovery_key
from tests.bot_helpers import BotRun, metric, new_admin_token, write_config
from tests.interop_peer import INTEROP_DIR, JsPeer, require_node_peer, started_peer
from tests.synapse import LocalSynapse, RegisteredUser, free_port
from tests.test_identity_crypto import JS

pytestmark = [pytest.mark.synapse, pytest.mark.interop, pytest.mark.timeout(300)]

T = 60.0


def test_js_sdk_vectors_unchanged() -> None:
    require_node_peer()
    out = subprocess.run(
        ["node", str(INTEROP_DIR / "identity_vectors.mjs")],
        cwd=INTEROP_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    got = json.loads(out.stdout)
    assert got["recovery_key"] == JS["recovery_key"]
    assert got["recovery_key_zeros"] == JS["recovery_key_zeros"]
    assert got["key_check"]["mac"] == JS["key_check"]["mac"]
    assert got["secret"] == JS["secret"]
    assert got["passphrase_hex"] == JS["passphrase_hex"]


ADMIN_TOKEN = new_admin_token()


def _start_bot(
    tmp_path: Path, synapse: LocalSynapse, user: RegisteredUser, name: str, **env: str
) -> BotRun:
    port = free_port()
    data = tmp_path / "data"
    config = write_config(
        tmp_path / f"{name}.toml",
        homeserver=synapse.url,
        user_id=user.user_id,
        data_dir=data,
        port=port,
        admin_token=ADMIN_TOKEN,
    )
    return BotRun(
        config, port, tmp_path / f"{name}.log", {"BOT_TOOLKIT_PASSWORD": user.password, **env}
    ).start()


async def _identity_detail(bot: BotRun, want: str, within: float = T) -> str:
    """Poll /readyz until its identity detail contains ``want``."""
    deadline = time.monotonic() + within
    detail = ""
    while time.monotonic() < deadline:
        bot.check_alive()
        try:
            _, body = await bot.get("/readyz", token=ADMIN_TOKEN)
        except (aiohttp.ClientError, OSError):
            body = None  # not listening yet
        if isinstance(body, dict):
            detail = body.get("checks", {}).get("identity", {}).get("detail", "")
            if want in detail:
                return str(detail)
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"identity detail never showed {want!r} (last {detail!r})\n{bot.log()[-3000:]}"
    )


def _device_id(data: Path) -> str:
    return str(json.loads((data / "session.json").read_text())["device_id"])


def _secrets_of(data: Path, user_id: str) -> list[str]:
    """Every private value the bot holds for its identity, in the forms a log could show."""
    stored = IdentityStore(data).load(user_id)
    assert stored is not None
    keys = stored.keys
    out = []
    for key in (keys.master, keys.self_signing, keys.user_signing):
        out += [key.seed_b64(), key.seed().hex()]
    return out


async def _peer_sees_cross_signed(peer: JsPeer, user_id: str, device_id: str) -> dict[str, Any]:
    await peer.download_keys(user_id, device_id, timeout=T)
    identity = await peer.user_identity(user_id)
    assert identity["has_keys"] is True
    status = await peer.device_status(user_id, device_id)
    assert status["known"] is True
    assert status["signed_by_owner"] is True, status
    return identity


async def test_fresh_account_bootstraps_and_element_sees_it(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    require_node_peer()
    user = await asyncio.to_thread(synapse.register)
    data = tmp_path / "data"
    peer = await started_peer(synapse, "identity-bootstrap", timeout=T)
    bot = _start_bot(tmp_path, synapse, user, "run1")
    try:
        detail = await _identity_detail(bot, "device cross-signed")
        assert "keys from created" in detail
        device_id = _device_id(data)
        identity = await _peer_sees_cross_signed(peer, user.user_id, device_id)
        master = identity["master_key"]
        assert master and master in detail
        _, metrics = await bot.get("/metrics")
        assert metric(metrics, "bot_toolkit_identity_cross_signed") == 1.0

        # the recovery key: in a 0600 file, never in the log; it opens the secret storage
        recovery_file = data / "recovery-key.txt"
        assert stat.S_IMODE(recovery_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((data / "identity.json").stat().st_mode) == 0o600
        recovery_key = recovery_file.read_text().split("\n\n")[1].strip()
        raw = decode_recovery_key(recovery_key)
        secrets_ = [*_secrets_of(data, user.user_id), recovery_key, recovery_key.replace(" ", "")]
        secrets_ += [unpadded_b64(raw), raw.hex()]
        assert await bot.terminate() == 0

        # a restart keeps the identity (keys from the store), no new recovery key
        bot = _start_bot(tmp_path, synapse, user, "run2")
        detail = await _identity_detail(bot, "device cross-signed")
        assert "keys from store" in detail and master in detail
        assert (await peer.user_identity(user.user_id))["master_key"] == master
        assert await bot.terminate() == 0
        logs = (tmp_path / "run1.log").read_text() + (tmp_path / "run2.log").read_text()
        assert "recovery key was written" in logs
        for secret in secrets_:
            assert secret not in logs
    finally:
        bot.kill()
        await peer.close()
