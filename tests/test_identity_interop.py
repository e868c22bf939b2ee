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
    tmp_path.mkdir(parents=True, exist_ok=True)
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


async def test_recovery_key_works_in_the_js_sdk(synapse: LocalSynapse, tmp_path: Path) -> None:
    """(a) The peer, logged in as the bot's user with the recovery key the bot wrote, finds the
    cross-signing keys in secret storage: its bootstrapCrossSigning makes no new identity."""
    require_node_peer()
    user = await asyncio.to_thread(synapse.register)
    data = tmp_path / "data"
    bot = _start_bot(tmp_path, synapse, user, "run")
    try:
        await _identity_detail(bot, "device cross-signed")
        recovery_key = (data / "recovery-key.txt").read_text().split("\n\n")[1].strip()
        stored = IdentityStore(data).load(user.user_id)
        assert stored is not None and stored.storage_key is None  # only in secret storage now
        master = stored.keys.master.public_key
        bot_device = _device_id(data)
    finally:
        assert await bot.terminate() == 0
    second = await asyncio.to_thread(synapse.login, user.user_id, user.password)
    peer = await started_peer(synapse, "identity-recover-js", user=second, timeout=T)
    try:
        await peer.download_keys(user.user_id, bot_device, timeout=T)  # our own identity
        await peer.set_recovery_key(recovery_key)
        status = await peer.bootstrap_cross_signing()
        assert status["master_key"] == master
        assert status["private_keys_cached"] == {
            "masterKey": True,
            "selfSigningKey": True,
            "userSigningKey": True,
        }
        assert status["private_keys_in_secret_storage"] is True
        assert status["ready"] is True
        # the bot's device is signed by the identity the peer now holds
        assert (await peer.device_status(user.user_id, bot_device))["signed_by_owner"] is True
    finally:
        await peer.close()


async def test_bot_recovers_an_identity_made_by_the_js_sdk(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    """(b) The peer creates the identity and secret storage first (as Element does for an account
    made by a person) and hands over its recovery key; the bot, on a fresh data directory,
    recovers and self-signs; the peer sees the same master key and the new device signed."""
    require_node_peer()
    user = await asyncio.to_thread(synapse.register)
    peer = await started_peer(synapse, "identity-create-js", user=user, timeout=T)
    bot: BotRun | None = None
    try:
        status = await peer.bootstrap_cross_signing(password=user.password)
        master = status["master_key"]
        assert master
        recovery_key = await peer.create_secret_storage()
        assert (await peer.cross_signing_status())["private_keys_in_secret_storage"] is True

        # without the key: the bot never overwrites the identity; it says why
        bot = _start_bot(tmp_path, synapse, user, "no-key")
        detail = await _identity_detail(bot, "device not cross-signed")
        assert await bot.terminate() == 0
        assert (await peer.user_identity(user.user_id))["master_key"] == master
        assert "already has a cross-signing identity" in bot.log()

        # with the key (a fresh data directory: a new device, the same identity)
        bot = _start_bot(
            tmp_path / "fresh",
            synapse,
            user,
            "recover",
            BOT_TOOLKIT_IDENTITY_RECOVERY_KEY=recovery_key,
        )
        detail = await _identity_detail(bot, "device cross-signed")
        assert "keys from recovery_key" in detail and master in detail
        device_id = _device_id(tmp_path / "fresh" / "data")
        identity = await _peer_sees_cross_signed(peer, user.user_id, device_id)
        assert identity["master_key"] == master
        assert (await peer.cross_signing_status())["master_key"] == master
        assert await bot.terminate() == 0
        assert recovery_key not in bot.log()
        assert recovery_key.replace(" ", "") not in bot.log()
    finally:
        if bot is not None:
            bot.kill()
        await peer.close()


async def test_self_verification_gets_the_keys_from_our_own_session(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    """The peer, logged in as the bot's user with its own cross-signing keys, verifies the bot's
    device by SAS and answers the bot's m.secret.request; the bot ends cross-signed, holding
    the same identity's private keys."""
    require_node_peer()
    user = await asyncio.to_thread(synapse.register)
    peer = await started_peer(synapse, "identity-self-verify", user=user, timeout=T)
    bot: BotRun | None = None
    try:
        master = (await peer.bootstrap_cross_signing(password=user.password))["master_key"]
        config = tmp_path / "self.toml"
        write_config(
            config,
            homeserver=synapse.url,
            user_id=user.user_id,
            data_dir=tmp_path / "data",
            port=(port := free_port()),
            admin_token=ADMIN_TOKEN,
            confirm="auto",
        )
        text = config.read_text().replace(
            "[verification]\n", f"[verification]\nown_devices = [{json.dumps(user.device_id)}]\n"
        )
        config.write_text(text)
        bot = BotRun(
            config, port, tmp_path / "self.log", {"BOT_TOOLKIT_PASSWORD": user.password}
        ).start()
        await _identity_detail(bot, "device not cross-signed")
        bot_device = _device_id(tmp_path / "data")

        await peer.download_keys(user.user_id, bot_device, timeout=T)
        txn = (await peer.request_verification(user.user_id, bot_device, timeout=T))[
            "transaction_id"
        ]
        await peer.wait_phase(txn, "ready", timeout=T)
        await peer.start_sas(txn, timeout=T)
        await peer.confirm_sas(txn, timeout=T)
        await peer.wait_phase(txn, "done", timeout=T)

        detail = await _identity_detail(bot, "device cross-signed")
        assert "keys from secret_sharing" in detail and master in detail
        stored = IdentityStore(tmp_path / "data").load(user.user_id)
        assert stored is not None and stored.keys.master.public_key == master
        assert (await peer.device_status(user.user_id, bot_device))["signed_by_owner"] is True
        _, metrics = await bot.get("/metrics")
        assert metric(metrics, "bot_toolkit_identity_secret_requests_total") == 3.0
        assert metric(metrics, "bot_toolkit_identity_secrets_rejected_total") == 0.0
        assert await bot.terminate() == 0
        for secret in _secrets_of(tmp_path / "data", user.user_id):
            assert secret not in bot.log()
    finally:
        if bot is not None:
            bot.kill()
        await peer.close()
