"""Identity bootstrap / recovery against the real Synapse with real nio clients: bad input and
homeserver faults. Each case ends with a clear, typed error and nothing lost or half-made.

* a 5xx (or a lost answer) at every step of a bootstrap: retried with the same keys, never a
  half-made identity (``tests/fault_proxy.py`` in front of Synapse);
* a wrong or malformed recovery key, a corrupted secret-storage entry, keys in secret storage
  that do not match the published ones: typed errors, nothing stored, nothing changed;
* replacing an identity needs interactive auth: without a password one clear line, with a wrong
  one another, and the old identity stays in use; with the password it is replaced;
* secrets never reach a log line, store files are 0600.
"""

from __future__ import annotations

import logging
import stat
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nio import AsyncClient

from bot_toolkit.encoding import unpadded_b64
from bot_toolkit.identity import (
    BadMacError,
    EnsureResult,
    Identity,
    IdentityMismatchError,
    IdentityState,
    IdentityStore,
    InteractiveAuthError,
    KeySource,
    RecoveryKeyError,
    TransientError,
    WrongKeyError,
    decode_recovery_key,
    encode_recovery_key,
    identity_for,
    secret_storage,
)
from bot_toolkit.identity.keys import CrossSigningKeys
from bot_toolkit.identity.ssss import encrypt_secret
from tests.fault_proxy import Fault, FaultProxy
from tests.nio_helpers import close_clients, make_client
from tests.synapse import LocalSynapse, RegisteredUser

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(180)]


@pytest.fixture
async def bot_user(synapse: LocalSynapse) -> RegisteredUser:
    return synapse.register()


@pytest.fixture
async def client(
    synapse: LocalSynapse, tmp_path: Path, bot_user: RegisteredUser
) -> AsyncIterator[AsyncClient]:
    c = await make_client(synapse, tmp_path, bot_user)
    try:
        yield c
    finally:
        await close_clients(c)


async def _second_device(
    synapse: LocalSynapse, tmp_path: Path, user: RegisteredUser
) -> AsyncClient:
    """Another device of the same account (a bot that lost its data directory)."""
    again = synapse.login(user.user_id, user.password)
    return await make_client(synapse, tmp_path / "second", again)


def _assert_whole(identity: Identity, result: EnsureResult) -> None:
    assert result.state is IdentityState.CROSS_SIGNED
    assert identity.state is IdentityState.CROSS_SIGNED
    stored = identity.store.load(identity.user_id)
    assert stored is not None and stored.published
    assert stored.storage_key_id is None  # the secret storage is written
    assert stored.keys.master.public_key == result.master_key
    assert stat.S_IMODE(identity.store.path.stat().st_mode) == 0o600


# ---------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("match", "faults"),
    [
        ("/keys/device_signing/upload", [Fault.server_error()]),
        ("/keys/device_signing/upload", [Fault.forward_then_500()]),  # done, answer lost
        ("/keys/device_signing/upload", [Fault.reply(502, "html")]),
        ("/account_data/m.cross_signing", [Fault.passthrough(), Fault.server_error()]),
        ("/account_data/m.secret_storage.default_key", [Fault.server_error()]),
        ("/keys/signatures/upload", [Fault.forward_then_500()]),
        ("/keys/query", [Fault.passthrough(), Fault.server_error()]),
    ],
    ids=[
        "upload-500",
        "upload-lost",
        "upload-html-502",
        "secret-500",
        "default-500",
        "signatures-lost",
        "requery-500",
    ],
)
async def test_bootstrap_survives_a_failing_step(
    synapse: LocalSynapse, client: AsyncClient, tmp_path: Path, match: str, faults: list[Fault]
) -> None:
    async with FaultProxy(synapse.url, match=match, plan=deque(faults)) as proxy:
        client.homeserver = proxy.url
        identity = identity_for(client, tmp_path / "data")
        with pytest.raises(TransientError):
            await identity.ensure()
        assert proxy.counts[faults[-1].kind] == 1
        # whatever the homeserver publishes now is what we hold: never someone else's keys
        stored = identity.store.load(client.user_id)
        assert stored is not None
        published = await identity.published()
        if published is not None:
            assert published.master == stored.keys.master.public_key
        # the next start finishes the job with the same keys, and shows the recovery key
        result = await identity.ensure()
    client.homeserver = synapse.url
    _assert_whole(identity, result)
    assert result.master_key == stored.keys.master.public_key
    assert result.recovery_key is not None and result.source is KeySource.CREATED
    # the secret storage is complete: the recovery key opens all three keys
    keys = await secret_storage.read_keys(
        identity.api, storage_key=decode_recovery_key(result.recovery_key)
    )
    assert keys.master.public_key == result.master_key
    # shown until acknowledged; then a third start changes nothing
    assert (await identity.ensure()).recovery_key == result.recovery_key
    identity.acknowledge_recovery_key()
    again = await identity.ensure()
    assert again.source is KeySource.STORE and again.recovery_key is None
    assert again.master_key == result.master_key


# ---------------------------------------------------------------------------- bad input


async def test_bad_recovery_input_changes_nothing(
    synapse: LocalSynapse, client: AsyncClient, tmp_path: Path, bot_user: RegisteredUser
) -> None:
    first = identity_for(client, tmp_path / "data")
    made = await first.ensure()
    _assert_whole(first, made)
    assert made.recovery_key is not None
    right = decode_recovery_key(made.recovery_key)

    other = await _second_device(synapse, tmp_path, bot_user)
    try:
        lost = identity_for(other, tmp_path / "fresh")
        # without a key: not cross-signed, the identity is not replaced
        result = await lost.ensure()
        assert result.state is IdentityState.NOT_CROSS_SIGNED
        assert result.master_key == made.master_key

        with pytest.raises(RecoveryKeyError):
            await lost.ensure(recovery_key="EsT1 not a key")
        with pytest.raises(WrongKeyError):
            await lost.ensure(recovery_key=encode_recovery_key(bytes(32)))
        with pytest.raises(WrongKeyError):
            await lost.ensure(passphrase="no passphrase was set")

        # a corrupted secret-storage entry: the MAC catches it
        api = first.api
        description = await secret_storage.default_key(api)
        good = await api.get_account_data("m.cross_signing.self_signing")
        assert good is not None
        entry = dict(good["encrypted"][description.key_id])
        entry["ciphertext"] = unpadded_b64(b"\x00" * 43)
        await api.put_account_data(
            "m.cross_signing.self_signing", {"encrypted": {description.key_id: entry}}
        )
        with pytest.raises(BadMacError):
            await lost.ensure(recovery_key=made.recovery_key)

        # keys in secret storage that are not the published ones
        impostor = CrossSigningKeys.generate(bot_user.user_id)
        for usage, key in impostor.by_usage().items():
            name = f"m.cross_signing.{usage}"
            await api.put_account_data(
                name,
                {"encrypted": {description.key_id: encrypt_secret(right, name, key.seed_b64())}},
            )
        with pytest.raises(IdentityMismatchError):
            await lost.ensure(recovery_key=made.recovery_key)

        # nothing stored by the failed attempts, the identity untouched
        assert not lost.store.path.exists()
        assert (await lost.published()).master == made.master_key  # type: ignore[union-attr]
        assert lost.state is not IdentityState.CROSS_SIGNED

        # repaired storage: the same attempt now works, same identity
        await secret_storage.store_keys(api, first.keys, description.key_id, right)  # type: ignore[arg-type]
        recovered = await lost.ensure(recovery_key=made.recovery_key)
        _assert_whole(lost, recovered)
        assert recovered.source is KeySource.RECOVERY_KEY
        assert recovered.master_key == made.master_key
    finally:
        await close_clients(other)


async def test_reset_needs_interactive_auth(
    client: AsyncClient, tmp_path: Path, bot_user: RegisteredUser
) -> None:
    identity = identity_for(client, tmp_path / "data")
    made = await identity.ensure()
    identity.acknowledge_recovery_key()
    with pytest.raises(InteractiveAuthError, match="wants the account password"):
        await identity.reset()
    with pytest.raises(InteractiveAuthError, match="refused the password"):
        await identity.reset(password="wrong password")
    # the old identity is still the one in use and stored
    assert (await identity.published()).master == made.master_key  # type: ignore[union-attr]
    assert (await identity.ensure()).source is KeySource.STORE

    replaced = await identity.reset(password=bot_user.password)
    _assert_whole(identity, replaced)
    assert replaced.master_key != made.master_key
    assert replaced.recovery_key is not None


async def test_no_secret_in_any_log_line(
    synapse: LocalSynapse,
    client: AsyncClient,
    tmp_path: Path,
    bot_user: RegisteredUser,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    identity = identity_for(client, tmp_path / "data")
    made = await identity.ensure()
    other = await _second_device(synapse, tmp_path, bot_user)
    try:
        lost = identity_for(other, tmp_path / "fresh")
        with pytest.raises(WrongKeyError) as wrong:
            await lost.ensure(recovery_key=encode_recovery_key(b"\x01" * 32))
        recovered = await lost.ensure(recovery_key=made.recovery_key)
        _assert_whole(lost, recovered)
    finally:
        await close_clients(other)
    assert made.recovery_key is not None
    raw = decode_recovery_key(made.recovery_key)
    keys = identity.keys
    assert keys is not None
    secrets_ = [made.recovery_key, made.recovery_key.replace(" ", ""), raw.hex(), unpadded_b64(raw)]
    for key in keys.by_usage().values():
        secrets_ += [key.seed_b64(), key.seed().hex()]
    text = (
        caplog.text
        + repr(made)
        + repr(keys)
        + str(wrong.value)
        + repr(identity.store.load(bot_user.user_id))
    )
    assert "identity" in caplog.text  # the steps were logged
    for secret in secrets_:
        assert secret not in text
    for path in (identity.store.path, lost.store.path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert IdentityStore(tmp_path / "data").load(bot_user.user_id) is not None
