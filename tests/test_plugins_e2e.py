"""Plugins end to end: ``bot-toolkit run`` (a subprocess) against the real Synapse.

* with the example plugin (``bot_toolkit.plugins.ping``) and a misbehaving one, the bot answers
  ``!ping`` from a real nio client in an encrypted room; the client decrypts the answer, a rich
  reply to its message. The misbehaving plugin raises on ``boom`` and hangs on ``hang``: the
  answers still come, the bot keeps running, the failures are logged and counted;
* the example plugin logs the verification a matrix-js-sdk peer (Element's crypto) completes;
* a plugin whose start hook fails ends ``run`` with exit code 2 and one line naming it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nio import AsyncClient

from tests.bot_helpers import BotRun, metric, new_admin_token, write_config
from tests.interop_peer import JsPeer, require_node_peer, started_peer
from tests.nio_helpers import close_clients, make_client, syncing
from tests.plugin_helpers import Replies, room_with_bot
from tests.secret_scan import assert_no_key_material
from tests.synapse import LocalSynapse, RegisteredUser, free_port

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(300)]

T = 60.0
HANDLER_TIMEOUT = 3

FAULTY = """
    import asyncio
    from bot_toolkit.room_messages import RoomMessage

    def setup(plugin):
        @plugin.on(RoomMessage)
        async def misbehave(msg):
            if "boom" in msg.body:
                raise RuntimeError("faulty plugin exploded")
            if "hang" in msg.body:
                await asyncio.Event().wait()
"""

FAILING_START = """
    def setup(plugin):
        @plugin.on_start
        async def start():
            raise RuntimeError("cannot reach the database")
"""


def plugin_config(
    tmp_path: Path, synapse: LocalSynapse, bot: RegisteredUser, modules: list[str]
) -> tuple[Path, int, dict[str, str]]:
    """A config running ``modules``, sharing room keys with all devices; (path, port, env)."""
    port = free_port()
    path = write_config(
        tmp_path / "bot.toml",
        homeserver=synapse.url,
        user_id=bot.user_id,
        data_dir=tmp_path / "data",
        port=port,
        admin_token=new_admin_token(),
        confirm="auto",
    )
    names = ", ".join(f'"{m}"' for m in modules)
    with path.open("a") as fh:
        fh.write(
            f'\n[keys]\nshare_with = "all"\n\n[plugins]\nmodules = [{names}]\n'
            f"handler_timeout = {HANDLER_TIMEOUT}\n"
        )
    plugin_dir = tmp_path / "user-plugins"
    plugin_dir.mkdir(exist_ok=True)
    (plugin_dir / "faulty.py").write_text(textwrap.dedent(FAULTY))
    (plugin_dir / "failing_start.py").write_text(textwrap.dedent(FAILING_START))
    pythonpath = os.pathsep.join(p for p in (str(plugin_dir), os.environ.get("PYTHONPATH")) if p)
    return path, port, {"BOT_TOOLKIT_PASSWORD": bot.password, "PYTHONPATH": pythonpath}


@pytest.fixture
async def user(synapse: LocalSynapse, tmp_path: Path) -> AsyncIterator[AsyncClient]:
    client = await make_client(synapse, tmp_path)
    try:
        yield client
    finally:
        await close_clients(client)


@pytest.fixture
async def js_peer(synapse: LocalSynapse) -> AsyncIterator[JsPeer]:
    require_node_peer()
    peer = await started_peer(synapse, "plugins-verifier", timeout=T)
    try:
        yield peer
    finally:
        await peer.close()


@pytest.mark.interop
async def test_ping_in_encrypted_room_despite_faulty_plugin(
    synapse: LocalSynapse, tmp_path: Path, user: AsyncClient, js_peer: JsPeer
) -> None:
    bot = await asyncio.to_thread(synapse.register)
    config, port, env = plugin_config(
        tmp_path, synapse, bot, ["faulty", "bot_toolkit.plugins.ping"]
    )
    run = BotRun(config, port, tmp_path / "bot.log", env).start()
    try:
        await run.wait_status("/readyz", 200, within=T)
        await run.wait_log("plugin ping started", within=T)
        replies = Replies(user, bot.user_id)
        async with syncing(user):
            room_id = await room_with_bot(user, bot.user_id)

            answer = await replies.ask(user, room_id, "!ping")
            assert answer.body == "pong"
            assert answer.decrypted, "the answer in the encrypted room was not encrypted"
            # The plugin saw a typed, decrypted message from a device the bot has not verified
            # and its owner has not cross-signed (a nio client has no cross-signing identity).
            await run.wait_log(
                f"from {user.user_id} (encrypted: True, device trust: not_cross_signed)", within=T
            )

            # The faulty plugin raises on this very message; the ping plugin still answers.
            assert (await replies.ask(user, room_id, "!ping boom")).body == "pong boom"
            # The faulty plugin hangs on this one; the answer does not wait for it ...
            assert (await replies.ask(user, room_id, "!ping hang")).body == "pong hang"
            # ... and the next message of the same sender runs once the hang is cut off.
            later = await replies.ask(user, room_id, "!PING   later  ")
            assert (later.body, later.decrypted) == ("pong later", True)
            await run.wait_log(
                f"plugin faulty: a handler did not finish within {HANDLER_TIMEOUT}s", within=T
            )
            await run.wait_log("RuntimeError: faulty plugin exploded", within=T)
            run.check_alive()
            _, text = await run.get("/metrics")
            handler = "faulty.setup.<locals>.misbehave"
            assert metric(str(text), "bot_toolkit_handler_errors_total", handler=handler) == 2
            assert metric(str(text), "bot_toolkit_room_messages_total", result="dispatched") >= 4

        # The ping plugin logs every verification done (a lifecycle event of the manager).
        device = await _bot_device(run, tmp_path)
        await js_peer.download_keys(bot.user_id, device, timeout=T)
        txn = (await js_peer.request_verification(bot.user_id, device, timeout=T))["transaction_id"]
        await js_peer.wait_phase(txn, "ready", timeout=T)
        await js_peer.start_sas(txn, timeout=T)
        await js_peer.wait_sas(txn, timeout=T)
        await js_peer.confirm_sas(txn, timeout=T)
        await js_peer.wait_phase(txn, "done", timeout=T)
        await run.wait_log(
            f"verification {txn} done: {js_peer.user_id} device {js_peer.device_id} is verified",
            within=T,
        )
    finally:
        rc = await run.terminate(within=T)
    log = run.log()
    assert rc == 0, log[-3000:]
    assert "plugin ping stopped" in log and "plugin faulty stopped" in log
    assert bot.password not in log
    # Issue 11: a whole DEBUG run (key sharing both ways, a verification) logs no key material:
    # no stored secret or piece of one, nothing that unpickles or imports as Olm/Megolm keys.
    tried = assert_no_key_material(log, tmp_path / "data")
    print(f"DEBUG log: {len(log)} bytes, {tried} key-like strings tried, none opened")


async def _bot_device(run: BotRun, tmp_path: Path) -> str:
    session = json.loads((tmp_path / "data" / "session.json").read_text())
    device: str = session["device_id"]
    return device


async def test_failing_start_hook_exits_2_naming_the_plugin(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    bot = await asyncio.to_thread(synapse.register)
    config, _, env = plugin_config(
        tmp_path, synapse, bot, ["bot_toolkit.plugins.ping", "failing_start"]
    )
    res = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bot_toolkit", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=T * 2,
        check=False,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("bot-toolkit: ")]
    assert errors == [
        "bot-toolkit: config error: plugins.failing_start: start failed: RuntimeError: "
        "cannot reach the database"
    ], res.stderr[-3000:]
    # The plugin started before it was stopped again; the bot shut down cleanly.
    assert "plugin ping stopped" in res.stderr
