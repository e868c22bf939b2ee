"""Room-key fan-out: the first message in an encrypted room with many devices, stock nio against
bot_toolkit, in one process, against a local Synapse.

The world: ``--users`` users with ``--devices-per-user`` devices each (default 100 x 10 = 1,000
devices), every device with real identity keys and one-time keys (vodozemac accounts, uploaded
with ``/keys/upload``), all joined to one Megolm-encrypted room. Four bots join it: for each of
the two runs (no faults, then a fault mix) one stock nio ``AsyncClient`` and one nio client run
by :class:`bot_toolkit.BotToolkit` (``share_with = "all"``). Each bot sends the first message
of its life into the room, so each claims one-time keys, opens an Olm session per device,
encrypts the Megolm key for every device and sends it.

Timed per bot: from ``room_send`` until the homeserver accepted every device's key (stock nio:
``room_send`` returned, since nio awaits its key requests inside it; bot_toolkit: ``room_send``
returned and the outbox is flushed). Counted: the ``PUT /sendToDevice/m.room.encrypted`` requests
(attempts, from a :class:`tests.fault_proxy.FaultProxy` in front of Synapse that every bot goes
through; the floor is ``ceil(devices / 250)``), the Python heap peak over the send (tracemalloc,
on for both), and afterwards, from every device's real ``/sync``: how many devices received the
key of the session the message was encrypted with (decrypted with the device's own Olm account)
and how many received it more than once.

The fault mix: the proxy answers 10% of the room-key requests with 429 (Synapse's JSON body,
``retry_after_ms`` 500) and 5% with an HTML 502 from a "reverse proxy", seeded.

    python benchmarks/room_key_fanout.py                       # 1,000 devices
    python benchmarks/room_key_fanout.py --users 1000          # 10,000 devices
    python benchmarks/room_key_fanout.py --json

Without ``--homeserver`` a throwaway Synapse is started on 127.0.0.1 (cheap password hashing).

nio writes every Olm session to its crypto store one by one, twice per device on a first
message (created by the claim, advanced by the encryption), and its whole Olm account after each
new session; each write costs ~15-40 ms of CPU
here (peewee rebinds its models on every call) plus an ``fsync``: ~80 ms per device, the same in
both bots, which drowns what is compared (a 1,000-device first message takes ~100 s either way).
So, unless ``--nio-session-writes`` is given, both bots skip those writes during the timed send
(``olm.store.save_session`` and ``save_account`` replaced on the two instances), and both keep
nio's crypto store in ``--nio-store-dir`` (default ``/dev/shm``, a tmpfs). bot_toolkit's own
store (outbox, room-key log) stays on disk and is written as always: its durability cost is in
its figure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import random
import secrets
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import vodozemac
from nio import AsyncClient, AsyncClientConfig, RoomSendResponse, SyncResponse

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from outbox_fanout import Device, _FastRegistrationSynapse, _post, _register_users  # noqa: E402

from bot_toolkit import BotToolkit  # noqa: E402
from bot_toolkit.encoding import canonical_json  # noqa: E402
from bot_toolkit.withheld import SharingPolicy  # noqa: E402
from tests.fault_proxy import Fault, FaultProxy  # noqa: E402

MEGOLM = "m.megolm.v1.aes-sha2"
OLM = "m.olm.v1.curve25519-aes-sha2"
ROOM_KEY_PUT = "/sendToDevice/m.room.encrypted/"
BATCH = 250


@dataclass
class Member:
    """One recipient device: its login and the vodozemac account behind its keys."""

    device: Device
    account: vodozemac.Account


@dataclass
class Send:
    """One bot's first message."""

    bot: str  # "nio" or "bot_toolkit"
    faults: bool
    seconds: float
    requests: int
    floor: int
    tracemalloc_peak_mib: float
    session_id: str
    user_id: str
    logged_in_after: bool
    devices_with_key: int = 0
    duplicates: int = 0


@dataclass
class Stage:
    """Where the bots send: the proxy in front of Synapse, the room, its device count."""

    proxy: FaultProxy
    room_id: str
    devices: int
    tmp: Path  # bot_toolkit's own store (on disk: its durability cost is part of the figure)
    nio_tmp: Path  # nio's crypto stores, of both bots
    nio_session_writes: bool = False  # keep nio's per-Olm-session store writes (see the docs)


@dataclass
class Result:
    devices: int
    users: int
    setup_seconds: float
    sends: list[Send] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------ the world


def _sign(account: vodozemac.Account, obj: dict[str, Any], user_id: str, key_id: str) -> None:
    body = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    signature = account.sign(canonical_json(body)).to_base64()
    obj["signatures"] = {user_id: {key_id: signature}}


def _keys_body(member: Member, one_time_keys: int) -> dict[str, Any]:
    dev, account = member.device, member.account
    ed = account.ed25519_key.to_base64()
    curve = account.curve25519_key.to_base64()
    device_keys: dict[str, Any] = {
        "user_id": dev.user_id,
        "device_id": dev.device_id,
        "algorithms": [OLM, MEGOLM],
        "keys": {f"curve25519:{dev.device_id}": curve, f"ed25519:{dev.device_id}": ed},
    }
    _sign(account, device_keys, dev.user_id, f"ed25519:{dev.device_id}")
    account.generate_one_time_keys(one_time_keys)
    otks: dict[str, Any] = {}
    for key_id, key in account.one_time_keys.items():
        signed: dict[str, Any] = {"key": key.to_base64()}
        _sign(account, signed, dev.user_id, f"ed25519:{dev.device_id}")
        otks[f"signed_curve25519:{key_id}"] = signed
    account.mark_keys_as_published()
    return {"device_keys": device_keys, "one_time_keys": otks}


async def _bounded(parallel: int, jobs: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    sem = asyncio.Semaphore(parallel)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await job()

    return list(await asyncio.gather(*(one(j) for j in jobs)))


async def build_world(
    http: aiohttp.ClientSession, hs: str, users: int, per_user: int, *, bots: int, parallel: int
) -> tuple[list[Member], list[Device], str]:
    """Register the recipients (keys uploaded, one one-time key per bot) and ``bots`` bots;
    every one of them joins one encrypted room. Returns (members, bots, room id)."""
    first_bot, devices = await _register_users(http, hs, users, per_user, parallel)
    extra = await _bounded(
        parallel,
        [
            lambda i=i: _post(
                http,
                hs + "/_matrix/client/v3/register",
                {
                    "username": f"rk_bot_{secrets.token_hex(3)}_{i}",
                    "password": secrets.token_urlsafe(12),
                    "auth": {"type": "m.login.dummy"},
                },
            )
            for i in range(bots - 1)
        ],
    )
    bot_devices = [first_bot] + [
        Device(r["user_id"], r["device_id"], r["access_token"]) for r in extra
    ]
    members = [Member(d, vodozemac.Account()) for d in devices]
    upload = hs + "/_matrix/client/v3/keys/upload"
    await _bounded(
        parallel,
        [lambda m=m: _post(http, upload, _keys_body(m, bots), m.device.token) for m in members],
    )
    encryption = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}
    created = await _post(
        http,
        hs + "/_matrix/client/v3/createRoom",
        {"preset": "public_chat", "initial_state": [encryption]},
        bot_devices[0].token,
    )
    room_id: str = created["room_id"]
    joiners: dict[str, str] = {d.user_id: d.token for d in devices}
    joiners.update({b.user_id: b.token for b in bot_devices[1:]})
    join = f"{hs}/_matrix/client/v3/join/{room_id}"
    await _bounded(
        min(parallel, 8),
        [lambda t=t: _post(http, join, {}, t) for t in joiners.values()],
    )
    return members, bot_devices, room_id


# ------------------------------------------------------------------------------ the bots


async def _client(hs: str, bot: Device, store: Path) -> AsyncClient:
    await asyncio.to_thread(store.mkdir, parents=True, exist_ok=True)
    config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
    client = AsyncClient(
        hs, bot.user_id, device_id=bot.device_id, store_path=str(store), config=config
    )
    client.restore_login(bot.user_id, bot.device_id, bot.token)
    if client.should_upload_keys:
        await client.keys_upload()
    return client


async def _ready(client: AsyncClient, room_id: str, members: int) -> None:
    """First sync, members loaded, every member's device keys known."""
    resp = await client.sync(timeout=0, full_state=True)
    if not isinstance(resp, SyncResponse):
        raise RuntimeError(f"sync failed: {resp}")
    await client.joined_members(room_id)
    users = client.rooms[room_id].users
    known = 0
    for _ in range(100):  # bot_toolkit's key-query guard may answer a big query in parts
        # (the other bots may have no device keys yet: only recipients are waited for)
        missing = [u for u in users if u not in client.device_store.users and "_bot_" not in u]
        if not missing:
            break
        client.users_for_key_query.update(missing)
        await client.keys_query()
    known = sum(sum(1 for _ in client.device_store.active_user_devices(u)) for u in users)
    if known < members:
        raise RuntimeError(f"the bot knows {known} devices, expected at least {members}")


async def _timed_send(
    kind: str,
    client: AsyncClient,
    stage: Stage,
    *,
    faults: bool,
    flush: Callable[[], Awaitable[bool]] | None,
) -> Send:
    token = client.access_token
    proxy, room_id = stage.proxy, stage.room_id
    before = len(proxy.hits)
    tracemalloc.start()
    t0 = time.perf_counter()
    res = await client.room_send(
        room_id,
        "m.room.message",
        {"msgtype": "m.text", "body": f"first message from {kind}"},
        ignore_unverified_devices=True,
    )
    if flush is not None and not await flush():
        raise RuntimeError("the outbox did not flush")
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if not isinstance(res, RoomSendResponse):
        raise RuntimeError(f"{kind}: room_send failed: {res}")
    session = client.olm.outbound_group_sessions[room_id]  # type: ignore[union-attr]
    return Send(
        bot=kind,
        faults=faults,
        seconds=seconds,
        requests=len(proxy.hits) - before,
        floor=math.ceil(len(session.users_shared_with) / BATCH),
        tracemalloc_peak_mib=peak / 2**20,
        session_id=session.id,
        user_id=client.user_id,
        logged_in_after=bool(client.access_token) and client.access_token == token,
    )


def _skip_session_writes(client: AsyncClient, stage: Stage) -> None:
    if stage.nio_session_writes:
        return

    def not_written(*_args: Any) -> None:
        """Not written (the benchmark's choice, the same for both bots)."""

    store: Any = client.olm.store  # type: ignore[union-attr]
    store.save_session = not_written
    store.save_account = not_written  # nio saves the account after each outbound Olm session


async def _stock(bot: Device, stage: Stage, *, faults: bool) -> Send:
    client = await _client(stage.proxy.url, bot, stage.nio_tmp / f"nio-{bot.device_id}")
    try:
        await _ready(client, stage.room_id, stage.devices)
        _skip_session_writes(client, stage)
        return await _timed_send("nio", client, stage, faults=faults, flush=None)
    finally:
        await client.close()


async def _toolkit(bot: Device, stage: Stage, *, faults: bool) -> Send:
    data_dir = stage.tmp / f"bt-{bot.device_id}"
    client = await _client(stage.proxy.url, bot, stage.nio_tmp / f"bt-{bot.device_id}")
    policy = SharingPolicy(share_with="all")  # type: ignore[arg-type]
    toolkit = BotToolkit(client, data_dir, key_sharing=policy)
    await toolkit.start()
    try:
        await _ready(client, stage.room_id, stage.devices)
        _skip_session_writes(client, stage)
        outbox = toolkit.outbox
        return await _timed_send(
            "bot_toolkit", client, stage, faults=faults, flush=lambda: outbox.flush(600.0)
        )
    finally:
        await toolkit.close()


# ------------------------------------------------------------------------------ verifying


async def count_keys(
    http: aiohttp.ClientSession,
    hs: str,
    members: Sequence[Member],
    sends: Sequence[Send],
    parallel: int,
) -> None:
    """Drain every device's to-device inbox and decrypt the room keys with its Olm account;
    fills ``devices_with_key`` and ``duplicates`` of each send."""
    wanted = {s.session_id: s for s in sends}
    flt = json.dumps(
        {"room": {"rooms": []}, "presence": {"types": []}, "account_data": {"types": []}}
    )

    async def drain(m: Member) -> dict[str, int]:
        got: dict[str, int] = {}
        since: str | None = None
        for _ in range(100):  # bounded; 100 to-device events per sync at most
            params = {"filter": flt, "timeout": "0"}
            if since:
                params["since"] = since
            url = hs + "/_matrix/client/v3/sync"
            async with http.get(
                url, params=params, headers={"Authorization": f"Bearer {m.device.token}"}
            ) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"/sync {m.device.user_id} -> {resp.status}")
                body = await resp.json()
            events = body.get("to_device", {}).get("events", [])
            for event in events:
                session_id = _room_key_session(m, event)
                if session_id in wanted:
                    got[session_id] = got.get(session_id, 0) + 1
            since = body["next_batch"]
            if not events:
                return got
        raise RuntimeError(f"inbox of {m.device.user_id} {m.device.device_id} not drained")

    for got in await _bounded(parallel, [lambda m=m: drain(m) for m in members]):
        for session_id, n in got.items():
            wanted[session_id].devices_with_key += 1
            wanted[session_id].duplicates += n - 1


def _room_key_session(m: Member, event: dict[str, Any]) -> str | None:
    content = event.get("content", {})
    if event.get("type") != "m.room.encrypted" or content.get("algorithm") != OLM:
        return None
    mine = content.get("ciphertext", {}).get(m.account.curve25519_key.to_base64())
    if mine is None or mine.get("type") != 0:
        return None
    body = mine["body"]
    message = vodozemac.AnyOlmMessage.from_parts(0, _b64(body))
    pre_key = message.to_pre_key()
    if pre_key is None:
        return None
    try:
        _, plaintext = m.account.create_inbound_session(
            vodozemac.Curve25519PublicKey.from_base64(content["sender_key"]), pre_key
        )
    except (vodozemac.SessionCreationException, vodozemac.OlmDecryptionException):
        return None
    payload = json.loads(plaintext)
    if payload.get("type") != "m.room_key":
        return None
    session_id: str = payload["content"]["session_id"]
    return session_id


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


# ------------------------------------------------------------------------------ the run


def fault_mix(seed: int) -> Callable[[int], Fault]:
    """10% JSON 429 (retry_after_ms 500), 5% HTML 502, the rest passed through."""
    rng = random.Random(seed)

    def policy(_n: int) -> Fault:
        r = rng.random()
        if r < 0.10:
            return Fault.rate_limited(500)
        if r < 0.15:
            return Fault.reply(502, "html")
        return Fault.passthrough()

    return policy


async def run(
    hs: str,
    users: int,
    per_user: int,
    *,
    parallel: int = 32,
    seed: int = 10,
    nio_dir: str | None = None,
    nio_session_writes: bool = False,
) -> Result:
    devices = users * per_user
    async with aiohttp.ClientSession() as http, FaultProxy(hs, match=ROOM_KEY_PUT) as proxy:
        t0 = time.perf_counter()
        members, bots, room_id = await build_world(
            http, hs, users, per_user, bots=4, parallel=parallel
        )
        result = Result(devices=devices, users=users, setup_seconds=time.perf_counter() - t0)
        with (
            tempfile.TemporaryDirectory(prefix="room-key-bench-") as tmp_dir,
            tempfile.TemporaryDirectory(prefix="room-key-bench-nio-", dir=nio_dir) as nio_tmp,
        ):
            stage = Stage(proxy, room_id, devices, Path(tmp_dir), Path(nio_tmp), nio_session_writes)
            for faults, (nio_bot, bt_bot) in ((False, bots[0:2]), (True, bots[2:4])):
                proxy.policy = fault_mix(seed) if faults else None
                result.sends.append(await _stock(nio_bot, stage, faults=faults))
                proxy.policy = fault_mix(seed) if faults else None
                result.sends.append(await _toolkit(bt_bot, stage, faults=faults))
            proxy.policy = None
        await count_keys(http, hs, members, result.sends, parallel)
    for faults in (False, True):
        nio_send, bt_send = (s for s in result.sends if s.faults == faults)
        result.ratios["faults" if faults else "clean"] = nio_send.seconds / bt_send.seconds
    return result


def _table(result: Result) -> str:
    lines = [
        f"{result.devices} devices ({result.users} users), setup {result.setup_seconds:.1f}s",
        "run     bot          seconds  requests (floor)  peak MiB  with key  dup  logged in",
    ]
    for s in result.sends:
        run_name = "faults" if s.faults else "clean"
        lines.append(
            f"{run_name:7} {s.bot:12} {s.seconds:7.2f}  {s.requests:8} ({s.floor})"
            f"  {s.tracemalloc_peak_mib:8.1f}  {s.devices_with_key:6}/{result.devices:<9}"
            f"  {s.duplicates:3}  {s.logged_in_after}"
        )
    for name, ratio in result.ratios.items():
        lines.append(f"speed ratio (nio seconds / bot_toolkit seconds), {name}: {ratio:.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--devices-per-user", type=int, default=10)
    parser.add_argument("--homeserver", help="an existing local homeserver (open registration)")
    parser.add_argument("--parallel", type=int, default=32)
    parser.add_argument(
        "--nio-store-dir",
        default="/dev/shm" if Path("/dev/shm").is_dir() else None,
        help="where both bots keep nio's crypto store (default: a tmpfs, see the module docs)",
    )
    parser.add_argument(
        "--nio-session-writes",
        action="store_true",
        help="keep nio's per-Olm-session store writes in the timed send (see the module docs)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    async def go(hs: str) -> Result:
        return await run(
            hs,
            args.users,
            args.devices_per_user,
            parallel=args.parallel,
            nio_dir=args.nio_store_dir,
            nio_session_writes=args.nio_session_writes,
        )

    if args.homeserver:
        result = asyncio.run(go(args.homeserver))
    else:
        synapse = _FastRegistrationSynapse()
        synapse.start()
        try:
            result = asyncio.run(go(synapse.url))
        finally:
            synapse.stop()
    print(json.dumps(asdict(result), indent=1) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
