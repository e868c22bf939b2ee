"""Issue 11, inbound: SIGKILL between nio's sync token save and the handlers, against the real
Synapse fixture. After a restart every event of the batch reaches the handler, checked by id."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.synapse import LocalSynapse

pytestmark = pytest.mark.timeout(240)

CHILD = Path(__file__).with_name("inbound_crash_child.py")
ROOT = str(Path(__file__).resolve().parent.parent)
N = 25


async def _run(phase: str, synapse: LocalSynapse, user: object, tmp: Path, **extra: str) -> str:
    """Run one phase of the child to its end (bounded); returns its stdout."""
    args = [
        str(CHILD), phase, "--homeserver", synapse.url, "--data-dir", str(tmp / "data"),
        "--user-id", user.user_id, "--device-id", user.device_id,  # type: ignore[attr-defined]
        "--out", str(tmp / "handled.jsonl"),
    ]  # fmt: skip
    for key, value in extra.items():
        args += [f"--{key}", value]
    env = {**os.environ, "BOT_TOOLKIT_TEST_TOKEN": user.access_token}  # type: ignore[attr-defined]
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    stderr = tmp / f"{phase}.stderr"
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=asyncio.subprocess.PIPE, stderr=err, env=env
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 150)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = out.decode(errors="replace")
    if phase == "kill":
        assert proc.returncode == -signal.SIGKILL, (text, stderr.read_text()[-3000:])
    else:
        assert proc.returncode == 0, (text, stderr.read_text()[-3000:])
    return text


def _line(text: str, prefix: str) -> str:
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise AssertionError(f"no {prefix!r} in {text!r}")


async def test_sigkill_between_token_save_and_handlers_loses_nothing(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    bot = await asyncio.to_thread(synapse.register)
    sender = await asyncio.to_thread(synapse.register)
    run = secrets.token_hex(4)
    messages = {bot.user_id: {bot.device_id: {"n": 0, "run": run}}}

    async def send(n: int) -> None:
        body = {"messages": {bot.user_id: {bot.device_id: {"n": n, "run": run}}}}
        txn = quote(f"{run}-{n}", safe="")
        await asyncio.to_thread(
            synapse.request,
            "PUT",
            f"/_matrix/client/v3/sendToDevice/org.example.crash/{txn}",
            body,
            token=sender.access_token,
        )

    assert messages  # one batch: all N are queued on the server before the bot syncs
    for n in range(N):
        await send(n)

    killed = await _run("kill", synapse, bot, tmp_path)
    stored = json.loads(_line(killed, "STORED"))
    assert len(stored) == N and len(set(stored)) == N
    handled_file = tmp_path / "handled.jsonl"
    assert not handled_file.exists()  # killed before any handler ran

    recovered = await _run("recover", synapse, bot, tmp_path, expect=str(N))
    assert int(_line(recovered, "HANDLED")) == N
    handled = [json.loads(line) for line in handled_file.read_text().splitlines()]
    assert sorted(h["n"] for h in handled) == list(range(N))  # every event, once
    assert [h["id"] for h in handled] == stored  # by id, in arrival order
