"""End to end: ``bot-toolkit run`` as a subprocess against the real Synapse, verified by the
matrix-js-sdk peer (the crypto engine inside Element).

One bot account lives through two runs on one data directory:

1. run 1 (``confirm = "operator"``): /healthz and /readyz answer; a js peer verifies the bot;
   the admin API shows the same emoji and decimals as the peer; a confirm without the bearer
   token gets 401 and changes nothing; the confirm with it completes the verification; /metrics
   counts it; SIGTERM exits 0 within the flush deadline with the outbox flushed;
2. run 2 (``confirm = "auto"``): the same device id (session file and /whoami) and token; a
   second js peer verifies the bot with no admin call; SIGTERM; the bot's nio store on disk
   says both peer devices are verified.

The logs of both runs never contain the password or the access token.
Also: the homeserver down at start (and mid-run) is retried and reported by /readyz, and bad
credentials end the process with exit code 1 and one line naming the problem.
"""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from bot_toolkit.install_secret import store_secret
from tests.bot_helpers import BotRun, TcpForwarder, metric, new_admin_token, write_config
from tests.interop_peer import JsPeer, require_node_peer, started_peer
from tests.nio_helpers import stored_trust
from tests.secret_scan import assert_no_key_material
from tests.synapse import LocalSynapse, RegisteredUser, free_port

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(420)]

T = 60.0
FLUSH_DEADLINE = 10.0


@pytest.fixture
async def peers(synapse: LocalSynapse) -> AsyncIterator[list[JsPeer]]:
    require_node_peer()
    made: list[JsPeer] = []
    try:
        made.append(await started_peer(synapse, "e2e-operator", timeout=T))
        made.append(await started_peer(synapse, "e2e-auto", timeout=T))
        yield made
    finally:
        for p in made:
            await p.close()


def _session(data_dir: Path) -> dict[str, Any]:
    path = data_dir / "session.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # nio's pickle key is the install's own (not nio's public default), owner-only too.
    assert stat.S_IMODE((data_dir / "store.key").stat().st_mode) == 0o600
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def _sas_in_admin(run: BotRun, token: str, txn: str) -> dict[str, Any]:
    for _ in range(int(T / 0.2)):
        code, body = await run.get("/admin/verifications", token=token)
        assert code == 200, body
        for v in body["verifications"]:
            if v["id"] == txn and v["emoji"]:
                found: dict[str, Any] = v
                return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"verification {txn} never showed its SAS in the admin API")


async def _metrics_until(run: BotRun, name: str, value: float, **labels: str) -> str:
    text = ""
    for _ in range(int(T / 0.2)):
        code, body = await run.get("/metrics")
        text = str(body)
        assert code == 200
        if metric(text, name, **labels) >= value:
            return text
        await asyncio.sleep(0.2)
    raise AssertionError(f"{name}{labels} never reached {value}:\n{text}")


async def _stop(run: BotRun) -> None:
    # The wait is a hang guard, not a measurement: that the outbox drained before its
    # deadline is proven by the bot's own log line below (else it logs what stays stored).
    rc = await run.terminate(within=FLUSH_DEADLINE + 20)
    log = run.log()
    assert rc == 0, log[-3000:]
    assert "shutdown: outbox flushed (queue depth 0)" in log, log[-3000:]
    assert "stay stored for the next run" not in log, log[-3000:]


async def _dm_text(synapse: LocalSynapse, token: str, peer_user: str) -> str:
    """The bot's latest message in its room with ``peer_user`` (read with the bot's token)."""
    rooms = await asyncio.to_thread(
        synapse.request, "GET", "/_matrix/client/v3/joined_rooms", token=token
    )
    for room_id in rooms["joined_rooms"]:
        room = quote(room_id, safe="")
        members = await asyncio.to_thread(
            synapse.request, "GET", f"/_matrix/client/v3/rooms/{room}/members", token=token
        )
        if peer_user not in {m["state_key"] for m in members["chunk"]}:
            continue
        messages = await asyncio.to_thread(
            synapse.request,
            "GET",
            f"/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10",
            token=token,
        )
        for event in messages["chunk"]:
            if event["type"] == "m.room.message":
                return str(event["content"]["body"])
    raise AssertionError(f"no direct room with {peer_user}")


@pytest.mark.interop
async def test_run_verify_stop_restart(
    synapse: LocalSynapse, tmp_path: Path, peers: list[JsPeer]
) -> None:
    operator_peer, auto_peer = peers
    bot_user = await asyncio.to_thread(synapse.register)
    data_dir = tmp_path / "data"
    port = free_port()
    admin = new_admin_token()
    allowed = [str(operator_peer.user_id), str(auto_peer.user_id)]
    config = write_config(
        tmp_path / "bot.toml",
        homeserver=synapse.url,
        user_id=bot_user.user_id,
        data_dir=data_dir,
        port=port,
        admin_token=admin,
        confirm="operator",
        allowed_users=allowed,
        flush_deadline=FLUSH_DEADLINE,
    )
    env = {"BOT_TOOLKIT_PASSWORD": bot_user.password}
    runs: list[BotRun] = []
    try:
        # ---- run 1: operator confirms through the admin API
        run = BotRun(config, port, tmp_path / "run1.log", env).start()
        runs.append(run)
        assert await run.wait_status("/healthz", 200, within=T) == {"status": "ok"}
        await run.wait_status("/readyz", 200, within=T)
        session = _session(data_dir)
        bot_device = session["device_id"]
        assert bot_device != bot_user.device_id  # the bot logged in a device of its own

        peer = operator_peer
        await peer.download_keys(bot_user.user_id, bot_device, timeout=T)
        txn = (await peer.request_verification(bot_user.user_id, bot_device, timeout=T))[
            "transaction_id"
        ]
        await peer.wait_phase(txn, "ready", timeout=T)
        await peer.start_sas(txn, timeout=T)
        sas = (await peer.wait_sas(txn, timeout=T))["sas"]
        shown = await _sas_in_admin(run, admin, txn)
        assert [e["emoji"] for e in shown["emoji"]] == [e[0] for e in sas["emoji"]]
        assert shown["decimals"] == list(sas["decimal"])
        assert (shown["user_id"], shown["device_id"]) == (peer.user_id, peer.device_id)

        for bad in (None, "not-the-admin-token-at-all"):
            code, body = await run.post(f"/admin/verifications/{txn}/confirm", token=bad)
            assert code == 401, body
        code, body = await run.get(f"/admin/verifications/{txn}", token=admin)
        assert code == 200 and body["state"] == shown["state"], body
        code, body = await run.post(f"/admin/verifications/{txn}/confirm", token=admin)
        assert (code, body) == (200, {"id": txn, "result": "confirmed"})
        await peer.confirm_sas(txn, timeout=T)
        await peer.wait_phase(txn, "done", timeout=T)
        status = await peer.device_status(bot_user.user_id, bot_device)
        assert status["verified"] and status["locally_verified"], status

        text = await _metrics_until(run, "bot_toolkit_verifications_total", 1, outcome="done")
        assert metric(text, "bot_toolkit_verifications_total", outcome="cancelled") == 0
        assert metric(text, "bot_toolkit_admin_actions_total", action="confirm", result="ok") == 1
        assert metric(text, "bot_toolkit_admin_auth_failures_total") == 2
        assert metric(text, "bot_toolkit_nio_to_device_total") > 0
        assert (
            metric(
                text, "bot_toolkit_events_dispatched_total", event_type="m.key.verification.request"
            )
            == 1
        ), text
        assert metric(text, "bot_toolkit_outbox_requests_sent_total") > 0
        assert "bot_toolkit_outbox_queue_depth 0" in text
        code, body = await run.get("/admin/verifications", token=admin)
        assert body == {"verifications": []}

        await _stop(run)

        # ---- run 2: same data dir, automatic confirmation
        write_config(
            config,
            homeserver=synapse.url,
            user_id=bot_user.user_id,
            data_dir=data_dir,
            port=port,
            admin_token=admin,
            confirm="auto",
            allowed_users=allowed,
            flush_deadline=FLUSH_DEADLINE,
            post_sas_in_dm=True,
        )
        run = BotRun(config, port, tmp_path / "run2.log", env).start()
        runs.append(run)
        await run.wait_status("/readyz", 200, within=T)
        again = _session(data_dir)
        assert again["device_id"] == bot_device
        assert again["access_token"] == session["access_token"]  # the session was reused
        who = await asyncio.to_thread(
            synapse.request, "GET", "/_matrix/client/v3/account/whoami", token=again["access_token"]
        )
        assert who["device_id"] == bot_device
        assert "restored session" in run.log()
        # "auto" compares nothing: the operator is told so at start (and only in run 2).
        assert "verification.confirm = auto" in run.log()
        assert "verification.confirm = auto" not in runs[0].log()

        peer = auto_peer
        await peer.download_keys(bot_user.user_id, bot_device, timeout=T)
        txn = (await peer.request_verification(bot_user.user_id, bot_device, timeout=T))[
            "transaction_id"
        ]
        await peer.wait_phase(txn, "ready", timeout=T)
        await peer.start_sas(txn, timeout=T)
        sas = (await peer.wait_sas(txn, timeout=T))["sas"]
        await peer.confirm_sas(txn, timeout=T)
        await peer.wait_phase(txn, "done", timeout=T)
        status = await peer.device_status(bot_user.user_id, bot_device)
        assert status["verified"] and status["locally_verified"], status
        text = await _metrics_until(run, "bot_toolkit_verifications_total", 1, outcome="done")
        assert metric(text, "bot_toolkit_admin_actions_total", action="confirm") == 0
        # post_sas_in_dm: the SAS went to the peer user in a direct room.
        text = await _metrics_until(run, "bot_toolkit_sas_dm_posts_total", 1, result="sent")
        body = await _dm_text(synapse, again["access_token"], str(peer.user_id))
        for e, name in sas["emoji"]:
            assert f"{e} {name}" in body, body
        assert " ".join(map(str, sas["decimal"])) in body, body
        await _stop(run)

        # ---- the trust is on disk
        verified = await asyncio.to_thread(
            stored_trust,
            synapse.url,
            again["user_id"],
            again["device_id"],
            again["access_token"],
            data_dir / "nio",
            devices=[
                (str(operator_peer.user_id), str(operator_peer.device_id)),
                (str(auto_peer.user_id), str(auto_peer.device_id)),
            ],
            pickle_key=store_secret(data_dir, {}),
        )
        assert verified == [True, True]

        # ---- no secrets in any log (DEBUG): nor any key material the stores hold
        for r in runs:
            log = r.log()
            for secret in (bot_user.password, session["access_token"], admin):
                assert secret not in log
            assert_no_key_material(log, data_dir)
    finally:
        for r in runs:
            r.kill()


@pytest.mark.interop
async def test_sigkill_mid_verification_stays_cancelled_after_restart(
    synapse: LocalSynapse, tmp_path: Path, peers: list[JsPeer]
) -> None:
    """Issue 11 (8): the bot is SIGKILLed after its ready; the peer's start arrives while it is
    down. The restarted bot cancels the transaction ("verifier restarted") and then ignores
    that start: no accept, no new start-first flow, no second cancel."""
    peer = peers[0]
    bot_user = await asyncio.to_thread(synapse.register)
    data_dir = tmp_path / "data"
    port = free_port()
    admin = new_admin_token()
    config = write_config(
        tmp_path / "bot.toml",
        homeserver=synapse.url,
        user_id=bot_user.user_id,
        data_dir=data_dir,
        port=port,
        admin_token=admin,
        confirm="operator",
        allowed_users=[str(peer.user_id)],
    )
    env = {"BOT_TOOLKIT_PASSWORD": bot_user.password}
    runs: list[BotRun] = []
    try:
        run = BotRun(config, port, tmp_path / "run1.log", env).start()
        runs.append(run)
        await run.wait_status("/readyz", 200, within=T)
        bot_device = _session(data_dir)["device_id"]
        await peer.download_keys(bot_user.user_id, bot_device, timeout=T)
        txn = (await peer.request_verification(bot_user.user_id, bot_device, timeout=T))[
            "transaction_id"
        ]
        await peer.wait_phase(txn, "ready", timeout=T)
        run.kill()  # SIGKILL: nothing is cleaned up
        await peer.start_sas(txn, timeout=T)  # reaches the homeserver while the bot is down

        run = BotRun(config, port, tmp_path / "run2.log", env).start()
        runs.append(run)
        await run.wait_status("/readyz", 200, within=T)
        cancelled = await peer.wait_phase(txn, "cancelled", timeout=T)
        text = await _metrics_until(
            run,
            "bot_toolkit_events_dispatched_total",
            1,
            event_type="m.key.verification.start",
        )
        await run.wait_log(f"verification {txn}: cancelled --start--> cancelled", within=T)
        log = run.log()
        assert f"{txn}: new --start-->" not in log  # never a new (start-first) flow
        assert "legacy_started_in" not in log
        assert "cancelling verification " + txn + " left by a restart" in log
        assert metric(text, "bot_toolkit_verification_cancels_sent_total", code="m.user") == 1
        assert metric(text, "bot_toolkit_verification_cancels_sent_total") == 1
        code, body = await run.get("/admin/verifications", token=admin)
        assert (code, body) == (200, {"verifications": []})
        assert "m.user" in json.dumps(cancelled), cancelled
    finally:
        for r in runs:
            r.kill()


async def test_homeserver_down_at_start_and_mid_run(synapse: LocalSynapse, tmp_path: Path) -> None:
    bot_user: RegisteredUser = await asyncio.to_thread(synapse.register)
    hs_port = free_port()  # nothing listens here yet: the homeserver is "down"
    port = free_port()
    admin = new_admin_token()
    config = write_config(
        tmp_path / "bot.toml",
        homeserver=f"http://127.0.0.1:{hs_port}",
        user_id=bot_user.user_id,
        data_dir=tmp_path / "data",
        port=port,
        admin_token=admin,
        sync_timeout=1.0,
        retry_max_delay=1.0,
        sync_stale_after=4.0,
    )
    run = BotRun(config, port, tmp_path / "run.log", {"BOT_TOOLKIT_PASSWORD": bot_user.password})
    forwarder = TcpForwarder(hs_port, int(synapse.url.rsplit(":", 1)[1]))
    run.start()
    try:
        await run.wait_status("/healthz", 200, within=T)
        body = await run.wait_status("/readyz", 503, within=T)
        await run.wait_log("login failed", count=2, within=T)  # a few failed attempts
        code, body = await run.get("/readyz")
        assert code == 503
        assert "detail" not in body["checks"]["logged_in"], body  # not for anyone
        code, body = await run.get("/readyz", token=admin)
        assert code == 503
        assert "login" in body["checks"]["logged_in"]["detail"], body
        assert "retrying" in run.log()
        run.check_alive()

        await forwarder.start()  # the homeserver comes up
        await run.wait_status("/readyz", 200, within=T)

        await forwarder.stop()  # ... and goes down again
        body = await run.wait_status("/readyz", 503, within=T)
        assert "sync" in body["failing"], body
        run.check_alive()
        await forwarder.start()
        await run.wait_status("/readyz", 200, within=T)

        rc = await run.terminate(within=30)
        assert rc == 0, run.log()[-3000:]
        assert bot_user.password not in run.log()
    finally:
        run.kill()
        await forwarder.stop()


async def test_bad_password_is_fatal_with_one_line(synapse: LocalSynapse, tmp_path: Path) -> None:
    bot_user = await asyncio.to_thread(synapse.register)
    port = free_port()
    config = write_config(
        tmp_path / "bot.toml",
        homeserver=synapse.url,
        user_id=bot_user.user_id,
        data_dir=tmp_path / "data",
        port=port,
        admin_token=new_admin_token(),
    )
    wrong = "definitely-not-the-password"
    run = BotRun(config, port, tmp_path / "run.log", {"BOT_TOOLKIT_PASSWORD": wrong}).start()
    try:
        assert run.proc is not None
        rc = await asyncio.to_thread(run.proc.wait, T)
        log = run.log()
        assert rc == 1, log[-3000:]
        last = log.strip().splitlines()[-1]
        assert last.startswith("bot-toolkit: fatal: run: BotError: login as "), last
        assert "M_FORBIDDEN" in last, last
        assert wrong not in log
        assert "Traceback" not in log, log[-3000:]  # the one line, not a traceback before it
    finally:
        run.kill()


def test_unusable_data_dir_is_fatal_with_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    port = free_port()
    config = write_config(
        tmp_path / "bot.toml",
        homeserver="http://127.0.0.1:9",
        user_id="@bot:localhost",
        data_dir=not_a_dir,
        port=port,
        admin_token=new_admin_token(),
    )
    run = BotRun(config, port, tmp_path / "run.log", {"BOT_TOOLKIT_PASSWORD": "pw-1234"}).start()
    try:
        assert run.proc is not None
        assert run.proc.wait(30) == 1, run.log()
        last = run.log().strip().splitlines()[-1]
        assert last.startswith("bot-toolkit: fatal: run: BotError: storage.data_dir: cannot use"), (
            last
        )
    finally:
        run.kill()
