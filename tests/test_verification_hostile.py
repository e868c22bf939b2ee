"""Hostile and buggy peers against the running bot, over the real Synapse.

Each peer is a registered user driven by raw HTTP (tests/raw_device.py): it uploads signed device
keys (the bot downloads them when a request arrives: the request is held meanwhile), sends crafted
plaintext to-device events with ``PUT /sendToDevice`` and reads what the bot sends back with its
own ``/sync``. Each case checks the exact cancel code the bot sends, or that it sends none.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot_toolkit.verification import State, VerificationPolicy
from bot_toolkit.verification.sas import SasSession
from bot_toolkit.verification.table import Party
from tests.raw_device import RawDevice
from tests.synapse import LocalSynapse
from tests.verification_helpers import Bot, auto_confirm, bot_took, running_bot

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(180)]

T = 30.0
CAP = 3  # the bot's error replies per peer device per minute in these tests


def _policy() -> VerificationPolicy:
    return VerificationPolicy(allowed_users=["@*:*"], confirm=auto_confirm(), max_error_replies=CAP)


@pytest.fixture
async def bot(synapse: LocalSynapse, tmp_path: Path) -> AsyncIterator[Bot]:
    async with running_bot(synapse, tmp_path, policy=_policy()) as b:
        yield b


@pytest.fixture
async def mallory(synapse: LocalSynapse) -> AsyncIterator[RawDevice]:
    dev = await RawDevice.registered(synapse)
    try:
        yield dev
    finally:
        await dev.close()


async def _send(dev: RawDevice, bot: Bot, kind: str, content: dict[str, Any]) -> None:
    await dev.send_to_device(f"m.key.verification.{kind}", {bot.user_id: {bot.device_id: content}})


def _from_bot(dev: RawDevice, bot: Bot, kind: str, txn: str | None = None) -> list[dict[str, Any]]:
    return [
        e["content"]
        for e in dev.to_device_events
        if e.get("sender") == bot.user_id
        and e.get("type") == f"m.key.verification.{kind}"
        and (txn is None or e["content"].get("transaction_id") == txn)
    ]


def _request(dev: RawDevice, txn: str) -> dict[str, Any]:
    return {
        "from_device": dev.device_id,
        "methods": ["m.sas.v1"],
        "timestamp": int(time.time() * 1000),
        "transaction_id": txn,
    }


async def _wait_for(dev: RawDevice, bot: Bot, kind: str, txn: str, n: int = 1) -> None:
    await dev.sync_until(lambda _evs: len(_from_bot(dev, bot, kind, txn)) >= n, within=T)


async def _ready_txn(dev: RawDevice, bot: Bot, txn: str) -> None:
    await _send(dev, bot, "request", _request(dev, txn))
    await _wait_for(dev, bot, "ready", txn)


def _sas(dev: RawDevice, bot: Bot, txn: str, *, we_started: bool) -> SasSession:
    return SasSession(
        transaction_id=txn,
        us=Party(dev.user_id, dev.device_id),  # type: ignore[arg-type]
        them=Party(bot.user_id, bot.device_id),  # type: ignore[arg-type]
        we_started=we_started,
    )


async def test_unknown_transactions(bot: Bot, mallory: RawDevice) -> None:
    """A key for an unknown txn: m.unknown_transaction; a cancel or a start: never that."""
    await _send(mallory, bot, "key", {"transaction_id": "nope-key", "key": "abc"})
    await _send(
        mallory, bot, "cancel", {"transaction_id": "nope-cancel", "code": "m.user", "reason": "x"}
    )
    # A start for an unknown id begins the (deprecated) start-first flow: accepted, not refused.
    start = _sas(mallory, bot, "nope-start", we_started=True).start_content()
    await _send(mallory, bot, "start", start)
    await _wait_for(mallory, bot, "cancel", "nope-key")
    await _wait_for(mallory, bot, "accept", "nope-start")
    await bot_took(bot, {"key": 1, "cancel": 1, "start": 1})
    await mallory.drain()
    assert [c["code"] for c in _from_bot(mallory, bot, "cancel", "nope-key")] == [
        "m.unknown_transaction"
    ]
    assert _from_bot(mallory, bot, "cancel", "nope-cancel") == []
    assert _from_bot(mallory, bot, "cancel", "nope-start") == []


async def test_key_before_accept(bot: Bot, mallory: RawDevice) -> None:
    await _ready_txn(mallory, bot, "early-key")
    await _send(mallory, bot, "key", {"transaction_id": "early-key", "key": "abc"})
    await _wait_for(mallory, bot, "cancel", "early-key")
    assert [c["code"] for c in _from_bot(mallory, bot, "cancel", "early-key")] == [
        "m.unexpected_message"
    ]
    assert bot.manager.state_of("early-key") is State.CANCELLED


async def test_wrong_sender(synapse: LocalSynapse, bot: Bot, mallory: RawDevice) -> None:
    alice = await RawDevice.registered(synapse)
    try:
        await _ready_txn(alice, bot, "victim")
        await _send(mallory, bot, "key", {"transaction_id": "victim", "key": "abc"})
        await _wait_for(mallory, bot, "cancel", "victim")
        assert [c["code"] for c in _from_bot(mallory, bot, "cancel", "victim")] == [
            "m.user_mismatch"
        ]
        await bot_took(bot, {"request": 1, "key": 1})
        await alice.drain()
        assert _from_bot(alice, bot, "cancel", "victim") == []
        assert bot.manager.state_of("victim") is State.READY  # the intruder cannot end it
    finally:
        await alice.close()


async def test_malformed_mac(bot: Bot, mallory: RawDevice) -> None:
    """A MAC whose ``mac`` is not an object cannot be decoded: m.invalid_message.

    The table cancels a malformed event of a known transaction with ``m.invalid_message``
    in every live state (before any out-of-sequence check). A well-formed MAC that does not
    verify is ``m.key_mismatch`` instead (see the unit tests).
    """
    await _ready_txn(mallory, bot, "bad-mac")
    await _send(mallory, bot, "mac", {"transaction_id": "bad-mac", "mac": "oops", "keys": 5})
    await _wait_for(mallory, bot, "cancel", "bad-mac")
    assert [c["code"] for c in _from_bot(mallory, bot, "cancel", "bad-mac")] == [
        "m.invalid_message"
    ]


async def test_flood_of_requests_from_one_device(bot: Bot, mallory: RawDevice) -> None:
    n = 12
    for i in range(n):
        await _send(mallory, bot, "request", _request(mallory, f"flood-{i}"))
    await mallory.sync_until(lambda _evs: len(_from_bot(mallory, bot, "cancel")) >= CAP, within=T)
    await bot_took(bot, {"request": n})
    await mallory.drain()
    # flood-0 was either answered and then cancelled, or refused while its keys were queried.
    assert bot.manager.state_of("flood-0") in (None, State.CANCELLED)
    cancels = _from_bot(mallory, bot, "cancel")
    # Every attempt is cancelled (the first when the second came, the rest refused), but the
    # bot's cancels to this device are capped.
    assert len(cancels) == CAP, cancels
    assert {c["code"] for c in cancels} == {"m.user"}
    assert [v for v in bot.manager.list_in_progress() if v.user_id == mallory.user_id] == []
    # Everything the bot sent back: the capped cancels, plus a ready if the first got one.
    from_bot = [e for e in mallory.to_device_events if e.get("sender") == bot.user_id]
    assert len(from_bot) - CAP == len(_from_bot(mallory, bot, "ready")) <= 1, from_bot


async def test_start_method_conflict(bot: Bot, mallory: RawDevice) -> None:
    """The bot's start and a start with another method cross: m.unexpected_message."""
    txn = await bot.manager.request_verification(mallory.user_id, mallory.device_id)
    await _wait_for(mallory, bot, "request", txn)
    ready = {"from_device": mallory.device_id, "methods": ["m.sas.v1"], "transaction_id": txn}
    other = {"from_device": mallory.device_id, "method": "org.example.other", "transaction_id": txn}
    await _send(mallory, bot, "ready", ready)
    await _send(mallory, bot, "start", other)
    await _wait_for(mallory, bot, "cancel", txn)
    assert len(_from_bot(mallory, bot, "start", txn)) == 1
    assert [c["code"] for c in _from_bot(mallory, bot, "cancel", txn)] == ["m.unexpected_message"]


@pytest.mark.parametrize("bot_wins", [True, False], ids=["bot-wins", "bot-loses"])
async def test_start_race_same_method(
    synapse: LocalSynapse, tmp_path: Path, bot_wins: bool
) -> None:
    """Both start m.sas.v1: the smaller user id wins; the loser's start is ignored.

    The user ids are chosen so that each case runs every time (random ids would test one).
    """
    tag = secrets.token_hex(3)
    first, last = f"aaa_race_{tag}", f"zzz_race_{tag}"
    bot_user = await asyncio.to_thread(synapse.register, first if bot_wins else last)
    mallory = await RawDevice.registered(synapse, last if bot_wins else first)
    try:
        async with running_bot(synapse, tmp_path, policy=_policy(), user=bot_user) as bot:
            assert ((bot.user_id, bot.device_id) < (mallory.user_id, mallory.device_id)) is bot_wins
            txn = await bot.manager.request_verification(mallory.user_id, mallory.device_id)
            await _wait_for(mallory, bot, "request", txn)
            ready = {
                "from_device": mallory.device_id,
                "methods": ["m.sas.v1"],
                "transaction_id": txn,
            }
            theirs = _sas(mallory, bot, txn, we_started=True).start_content()
            await _send(mallory, bot, "ready", ready)
            await _send(mallory, bot, "start", theirs)
            await _wait_for(mallory, bot, "start", txn)
            if bot_wins:
                await bot_took(bot, {"ready": 1, "start": 1})
                await mallory.drain()
                assert _from_bot(mallory, bot, "accept", txn) == []
                assert bot.manager.state_of(txn) is State.STARTED_OUT
            else:
                await _wait_for(mallory, bot, "accept", txn)
                assert bot.manager.state_of(txn) is State.STARTED_IN
            assert _from_bot(mallory, bot, "cancel", txn) == []
    finally:
        await mallory.close()
