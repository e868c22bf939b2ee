"""nio's own key queries go out in bounded batches, a user never in two requests at once.

Against the real Synapse, with the bot's ``/keys/query`` requests through
:class:`tests.fault_proxy.FaultProxy` (counted, and held when the test says so). The batch size
is made small (:data:`BATCH`) so that a few registered users make several batches. Before the
batching, each pending user was a request of its own (four at a time, each given ten seconds
including the wait for a slot), so a room of a thousand members took minutes and most queries
timed out.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from bot_toolkit import _key_query_guard
from bot_toolkit.withheld import SharingPolicy
from tests.fault_proxy import FaultProxy, delay_while
from tests.nio_helpers import wait_until
from tests.synapse import LocalSynapse
from tests.verification_helpers import running_bot

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(300)]

T = 60.0
BATCH = 4
USERS = 10  # three batches: 4 + 4 + 2


async def test_pending_users_are_queried_in_batches_once(
    synapse: LocalSynapse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_key_query_guard, "BATCH_USERS", BATCH)
    hold = asyncio.Event()
    proxy = FaultProxy(
        synapse.url,
        match="/keys/query",
        policy=delay_while(hold, 3 * T),
    )
    await proxy.start()
    first = [(await asyncio.to_thread(synapse.register)).user_id for _ in range(USERS)]
    second = [(await asyncio.to_thread(synapse.register)).user_id for _ in range(USERS)]
    via_proxy = SimpleNamespace(url=proxy.url, register=synapse.register)
    try:
        async with running_bot(via_proxy, tmp_path, key_sharing=SharingPolicy()) as bot:
            olm = bot.client.olm
            await wait_until(lambda: not olm.users_for_key_query, within=T, what="start settles")

            # Ten pending users: three requests, every user's answer reaches nio.
            before = len(proxy.hits)
            olm.users_for_key_query.update(first)
            await bot.client.keys_query()  # the sync loop may call it too: no request twice
            await wait_until(
                lambda: set(first) <= olm.tracked_users, within=T, what="the first ten tracked"
            )
            assert len(proxy.hits) - before == 3
            assert olm.users_for_key_query.isdisjoint(first)

            # Held: callers get an error after a bounded wait, and asking again (nio's sync loop
            # does, every round) sends nothing more while the batches are still out.
            hold.set()
            before = len(proxy.hits)
            olm.users_for_key_query.update(second)
            assert type(await bot.client.keys_query()).__name__ == "KeysQueryError"
            await wait_until(
                lambda: len(proxy.hits) - before == 3, within=T, what="three held batches"
            )
            assert type(await bot.client.keys_query()).__name__ == "KeysQueryError"
            assert len(proxy.hits) - before == 3
            assert all(not h.forwarded for h in proxy.hits[before:])

            # Released: the held answers arrive and go to nio.
            hold.clear()
            proxy.release()
            await wait_until(
                lambda: set(second) <= olm.tracked_users, within=T, what="the second ten tracked"
            )
            assert olm.users_for_key_query.isdisjoint(second)
    finally:
        await proxy.stop()


async def test_a_caller_waits_for_the_batch_already_asking_for_its_users(
    synapse: LocalSynapse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``room_send`` calls ``keys_query()`` just after the sync loop did: while the sync loop's
    batch for a new member is out, ``room_send``'s call waits for that answer (bounded), so the
    room key is shared once the member's devices are known. It used to return at once, and the
    message went out without the member's devices (no key, no withheld notice)."""
    monkeypatch.setattr(_key_query_guard, "KEY_QUERY_WAIT", T)
    hold = asyncio.Event()
    proxy = FaultProxy(
        synapse.url,
        match="/keys/query",
        policy=delay_while(hold, 3 * T),
    )
    await proxy.start()
    member = (await asyncio.to_thread(synapse.register)).user_id
    via_proxy = SimpleNamespace(url=proxy.url, register=synapse.register)
    try:
        async with running_bot(via_proxy, tmp_path, key_sharing=SharingPolicy()) as bot:
            olm = bot.client.olm
            await wait_until(lambda: not olm.users_for_key_query, within=T, what="start settles")
            hold.set()
            before = len(proxy.hits)
            olm.users_for_key_query.add(member)
            first = asyncio.create_task(bot.client.keys_query())  # the sync loop's
            await wait_until(lambda: len(proxy.hits) > before, within=T, what="the held batch")
            assert member not in olm.tracked_users
            second = asyncio.create_task(bot.client.keys_query())  # room_send's
            # The release runs after the second call's first step (callbacks run in order):
            # it is waiting by then, and only the batch's answer can end its wait early.
            hold.clear()
            asyncio.get_running_loop().call_soon(proxy.release)
            answer = await second
            assert type(answer).__name__ == "KeysQueryResponse", answer
            assert member in olm.tracked_users  # known when keys_query() returned
            assert len(proxy.hits) - before == 1  # the second call asked nothing itself
            assert type(await first).__name__ == "KeysQueryResponse"
    finally:
        await proxy.stop()
