"""Bounded floods of hostile to-device events: memory stays flat, per event type.

Against the real Synapse. The bot is the production wiring (:func:`running_bot` with key
sharing; verification allows nobody). Twenty users send it, through Synapse, event types that
used to leave an entry in memory per event (nio 0.26 ``defaultdict`` look-ups, our own maps):

* ``m.room_key_request`` cancellations and requests with a new ``requesting_device_id`` each;
* Olm ``m.room.encrypted`` with a new (valid) ``sender_key`` each, and with an invalid one;
* ``m.room_key.withheld`` ``m.no_olm`` naming a new device each (from strangers);
* ``m.key.verification.request`` with a new transaction id and device each (not allowed).

For each type: a warm-up of :data:`WARMUP` events, then :data:`FLOOD` more; the growth of the
memory Python holds (``tracemalloc``, after a garbage collection) over the flood, divided by
the number of events, must stay under its bound in :data:`BOUNDS` (a flood over it is
measured once more and the smaller figure counts: a leak is over both times). The figures are
printed (run with ``-s``) and quoted in the README. nio's stores are checked directly too:
nothing keyed by a flooder's choice is left in them.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import itertools
import logging
import os
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot_toolkit.verification import VerificationPolicy
from bot_toolkit.withheld import SharingPolicy
from tests.nio_helpers import wait_until
from tests.synapse import LocalSynapse
from tests.verification_helpers import Bot, auto_confirm, running_bot

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(900)]

USERS = 20
WARMUP = 100
FLOOD = 1000
BOUNDS = {
    "key request cancellations": 250,
    "key requests": 400,
    "Olm, new sender_key": 100,
    "Olm, invalid sender_key": 100,
    "m.no_olm from strangers": 100,
    "verification requests": 100,
}
"""Bytes of growth allowed per flood event of each kind, averaged over :data:`FLOOD` events.

Measured with the fixes (2 cores, Python 3.11): 135, 186, -9, 5, -13, -4. With the nio plugin's
filtering and cleaning switched off: 386, 208, 189, 155, 6, 12 (and nio's stores keep an entry
per flooder). What remains with the fixes is bounded, not per event: capped maps filling up
(answered key requests, rate-limit buckets), ``urllib``/``jsonschema`` caches, and the last
request each outbox worker sent (the refusals of key requests)."""
SENDERS = 16
OLM = "m.olm.v1.curve25519-aes-sha2"
MEGOLM = "m.megolm.v1.aes-sha2"

Content = Callable[[int], tuple[str, dict[str, Any]]]


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode().rstrip("=")


def _olm_body() -> str:
    """A well-formed Olm normal message (type 1) that no session of the bot can decrypt."""
    raw = b"\x03\x0a\x20" + os.urandom(32) + b"\x10\x00\x22\x10" + os.urandom(16) + os.urandom(8)
    return base64.b64encode(raw).decode().rstrip("=")


def _kinds(bot_curve: str) -> dict[str, Content]:
    def cancellation(n: int) -> tuple[str, dict[str, Any]]:
        return "m.room_key_request", {
            "action": "request_cancellation",
            "requesting_device_id": f"FLOOD{n}",
            "request_id": f"c{n}",
        }

    def request(n: int) -> tuple[str, dict[str, Any]]:
        body = {"algorithm": MEGOLM, "room_id": f"!r{n}:x", "session_id": f"s{n}"}
        return "m.room_key_request", {
            "action": "request",
            "requesting_device_id": f"FLOOD{n}",
            "request_id": f"q{n}",
            "body": {**body, "sender_key": _key()},
        }

    def olm(sender_key: Callable[[int], str]) -> Content:
        def make(n: int) -> tuple[str, dict[str, Any]]:
            ciphertext = {bot_curve: {"type": 1, "body": _olm_body()}}
            content = {"algorithm": OLM, "sender_key": sender_key(n), "ciphertext": ciphertext}
            return "m.room.encrypted", content

        return make

    def no_olm(n: int) -> tuple[str, dict[str, Any]]:
        return "m.room_key.withheld", {
            "algorithm": MEGOLM,
            "sender_key": _key(),
            "code": "m.no_olm",
            "reason": "flood",
            "from_device": f"FLOOD{n}",
        }

    def verification(n: int) -> tuple[str, dict[str, Any]]:
        return "m.key.verification.request", {
            "from_device": f"FLOOD{n}",
            "methods": ["m.sas.v1"],
            "transaction_id": f"t{n}-{uuid.uuid4().hex}",
            "timestamp": int(time.time() * 1000),
        }

    return {
        "key request cancellations": cancellation,
        "key requests": request,
        "Olm, new sender_key": olm(lambda n: _key()),
        "Olm, invalid sender_key": olm(lambda n: f"not-a-key-{n}"),
        "m.no_olm from strangers": no_olm,
        "verification requests": verification,
    }


class Flooders:
    """``USERS`` registered users sending raw to-device events to one device of the bot."""

    def __init__(self, synapse: LocalSynapse, tokens: list[str], target: tuple[str, str]):
        self.url = synapse.url
        self.tokens = tokens
        self.target = target
        self._txn = itertools.count()
        self._http = aiohttp.ClientSession()

    async def close(self) -> None:
        await self._http.close()

    async def send(self, make: Content, numbers: range) -> None:
        queue = list(numbers)

        async def worker() -> None:
            while queue:
                n = queue.pop()
                event_type, content = make(n)
                user, device = self.target
                path = f"/_matrix/client/v3/sendToDevice/{event_type}/f{next(self._txn)}"
                headers = {"Authorization": f"Bearer {self.tokens[n % len(self.tokens)]}"}
                body = {"messages": {user: {device: content}}}
                async with self._http.put(self.url + path, json=body, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()

        await asyncio.gather(*(worker() for _ in range(SENDERS)))


async def _settle(bot: Bot, flooders: Flooders, make: Content, numbers: range) -> None:
    """Send ``numbers`` events and wait until the bot has handled every one of them."""
    before = _count(bot)
    await flooders.send(make, numbers)
    await wait_until(
        lambda: _count(bot) >= before + len(numbers),
        within=300,
        interval=0.2,
        what=f"the bot takes {len(numbers)} events",
    )
    assert await bot.dispatcher.join(120)
    await bot.toolkit.key_sharing.join()
    assert await bot.outbox.flush(60)


def _count(bot: Bot) -> float:
    total = 0.0
    for name in ("nio_to_device_total", "nio_to_device_dropped_total"):
        counter = bot.metrics.get(name)
        if counter is not None:
            total += sum(counter.get(label) for label in _LABELS[name])
    return total


_LABELS = {
    "nio_to_device_total": ("plaintext", "decrypted", "undecrypted", "undecodable"),
    "nio_to_device_dropped_total": ("queue_full", "closed", "unparsed", "error"),
}


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_hostile_floods_leave_memory_flat(
    synapse: LocalSynapse, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Log records kept by pytest's capture would be counted as growth: keep them out.
    caplog.set_level(logging.CRITICAL)
    users = [await asyncio.to_thread(synapse.register) for _ in range(USERS)]
    nobody = VerificationPolicy(allowed_users=[], confirm=auto_confirm())
    async with running_bot(synapse, tmp_path, policy=nobody, key_sharing=SharingPolicy()) as bot:
        olm = bot.client.olm
        flooders = Flooders(synapse, [u.access_token for u in users], (bot.user_id, bot.device_id))
        flooder_ids = {u.user_id for u in users}
        figures: list[tuple[str, float, float]] = []
        start = 0
        tracemalloc.start()
        try:
            for name, make in _kinds(olm.account.identity_keys["curve25519"]).items():
                await _settle(bot, flooders, make, range(start, start + WARMUP))
                start += WARMUP
                # A leak grows with every flood; a one-off allocation elsewhere in the process
                # (another test's leftovers finishing, a cache filling) does not. So a flood over
                # its bound is measured once more, and the smaller figure counts.
                best: tuple[float, float] | None = None
                for _ in range(2):
                    traced, rss = _traced(), _rss()
                    await _settle(bot, flooders, make, range(start, start + FLOOD))
                    start += FLOOD
                    measured = ((_traced() - traced) / FLOOD, (_rss() - rss) / FLOOD)
                    best = measured if best is None or measured[0] < best[0] else best
                    if best[0] <= BOUNDS[name]:
                        break
                assert best is not None
                figures.append((name, *best))
        finally:
            tracemalloc.stop()
            await flooders.close()
        print(f"\nmemory growth per event over {FLOOD} events from {USERS} users:")
        for name, per_event, rss_per_event in figures:
            print(f"  {name:28s} {per_event:8.1f} B (tracemalloc)  {rss_per_event:8.1f} B (RSS)")
        assert [f for f in figures if f[1] > BOUNDS[f[0]]] == [], figures

        # nio holds nothing keyed by the flooders' choices.
        assert flooder_ids.isdisjoint(olm.device_store.users)
        assert flooder_ids.isdisjoint(olm.tracked_users)
        assert flooder_ids.isdisjoint(olm.users_for_key_query)
        assert dict(olm.key_requests_waiting_for_session) == {}
        assert olm.received_key_requests == {}
        assert [k for k, sessions in olm.session_store._entries.items() if not sessions] == []
