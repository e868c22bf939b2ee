"""Key queries that peers cause cannot stall the bot: a slow homeserver for them delays nothing
else.

Against the real Synapse, with the bot's traffic through :class:`tests.fault_proxy.FaultProxy`,
which holds every ``/keys/query`` once the flood starts (a remote homeserver that never
answers). Ten users who share a room with the bot and ten strangers send it 200 ``m.no_olm``
notices naming devices it does not know. The members' notices make the bot query their device
lists (off the dispatcher, each user on its own, at most four at once), and those queries hang,
as does any query nio's sync loop starts for a member; the strangers' cause no query at all.
Meanwhile Alice, an allowed user the bot already knows, verifies the bot: her verification
finishes while every held query is still held (the order of events is asserted, not wall
time).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from nio import RoomCreateResponse

from bot_toolkit.key_queries import CONCURRENCY
from bot_toolkit.verification import VerificationDone, VerificationPolicy
from bot_toolkit.withheld import SharingPolicy
from tests.fault_proxy import FaultProxy, delay_while
from tests.nio_helpers import close_clients, make_client, wait_until
from tests.synapse import LocalSynapse
from tests.test_hostile_flood import Flooders
from tests.test_verification_encrypted import running_peer
from tests.verification_helpers import auto_confirm, running_bot

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(300)]

T = 60.0
MEMBERS = 10
STRANGERS = 10
PER_USER = 10
ENCRYPTION = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}


def _no_olm(n: int) -> tuple[str, dict[str, Any]]:
    key = os.urandom(32).hex()[:43]
    return "m.room_key.withheld", {
        "algorithm": "m.megolm.v1.aes-sha2",
        "sender_key": key,
        "code": "m.no_olm",
        "reason": "flood",
        "from_device": f"UNKNOWN{n}",
    }


async def test_stalled_key_queries_do_not_delay_an_allowed_verification(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    stall = asyncio.Event()
    proxy = FaultProxy(
        synapse.url,
        match="/keys/query",
        policy=delay_while(stall, 3 * T),
    )
    await proxy.start()
    members = [await asyncio.to_thread(synapse.register) for _ in range(MEMBERS)]
    strangers = [await asyncio.to_thread(synapse.register) for _ in range(STRANGERS)]
    alice = await make_client(synapse, tmp_path)
    via_proxy = SimpleNamespace(url=proxy.url, register=synapse.register)
    policy = VerificationPolicy(allowed_users=[alice.user_id], confirm=auto_confirm())
    try:
        async with running_bot(
            via_proxy, tmp_path, policy=policy, key_sharing=SharingPolicy()
        ) as bot:
            olm = bot.client.olm
            created = await bot.client.room_create(
                invite=[alice.user_id, *(m.user_id for m in members)], initial_state=[ENCRYPTION]
            )
            assert isinstance(created, RoomCreateResponse), created
            room_id = created.room_id
            await alice.join(room_id)
            for member in members:
                await asyncio.to_thread(
                    synapse.request,
                    "POST",
                    f"/_matrix/client/v3/join/{room_id}",
                    {},
                    token=member.access_token,
                )
            member_ids = {m.user_id for m in members}
            await wait_until(
                lambda: (
                    (member_ids | {alice.user_id}) <= olm.tracked_users
                    and alice.device_id in olm.device_store[alice.user_id]
                ),
                within=T,
                what="the bot tracks the members and knows Alice's device",
            )

            stall.set()
            tokens = [u.access_token for u in members + strangers]
            flooders = Flooders(synapse, tokens, (bot.user_id, bot.device_id))
            try:
                await flooders.send(_no_olm, range(len(tokens) * PER_USER))
            finally:
                await flooders.close()

            def held() -> list[Any]:
                return [h for h in proxy.hits if h.fault.kind == "delay"]

            # The cap: CONCURRENCY queries hang; the other members' wait for a slot and give up.
            await wait_until(
                lambda: len(held()) >= CONCURRENCY, within=T, what="the members' queries hang"
            )
            peer_policy = VerificationPolicy(allowed_users=[bot.user_id], confirm=auto_confirm())
            async with running_peer(alice, peer_policy, tmp_path / "peer") as peer:
                txn = await peer.manager.request_verification(bot.user_id, bot.device_id)
                outcome = await peer.manager.wait_finished(txn, T)
                assert isinstance(outcome, VerificationDone), outcome
                await wait_until(lambda: bool(bot.of(VerificationDone)), within=T)
                # The order: every held query is still held when the verification is done.
                assert [h for h in held() if h.forwarded] == []
            # No query for a stranger, and nio tracks none.
            assert {s.user_id for s in strangers}.isdisjoint(olm.tracked_users)
            assert {s.user_id for s in strangers}.isdisjoint(olm.device_store.users)
            dummies = bot.metrics.get("withheld_dummy_total")
            assert dummies is not None and dummies.get("stranger") == STRANGERS * PER_USER
            proxy.release()
    finally:
        await proxy.stop()
        await close_clients(alice)
