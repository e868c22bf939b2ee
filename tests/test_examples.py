"""``examples/nio_bot.py`` works as the README shows it.

* The README's code block under "Turn on verification" is the example file, byte for byte, so
  the two cannot drift apart.
* The example runs as a subprocess (a fresh interpreter, as a user would run it) against the
  real Synapse; the matrix-js-sdk peer (Element's crypto engine) verifies its device by SAS;
  SIGTERM then stops it with exit code 0, and its output never shows the access token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop_peer import JsPeer, require_node_peer, started_peer
from tests.nio_helpers import stored_trust
from tests.synapse import LocalSynapse

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "nio_bot.py"
README = ROOT / "README.md"

T = 60.0
"""Seconds any one step may take."""


def readme_verification_block() -> str:
    """The first ```python block after the "### Turn on verification" heading."""
    text = README.read_text(encoding="utf-8")
    head = text.find("### Turn on verification\n")
    assert head >= 0, "README has no '### Turn on verification' section"
    end = text.find("\n## ", head)
    section = text[head:] if end < 0 else text[head:end]
    match = re.search(r"^```python\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    assert match, "no ```python block in the README's verification section"
    return match.group(1)


def test_readme_shows_the_example_verbatim() -> None:
    assert readme_verification_block() == EXAMPLE.read_text(encoding="utf-8")


class Output:
    """The lines a subprocess writes, collected in the background; waits are bounded."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while raw := await stream.readline():
            self.lines.append(raw.decode("utf-8", errors="replace"))
            self._changed.set()
        self._changed.set()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    async def wait_for(self, predicate: Callable[[str], bool], what: str) -> str:
        """The first line matching ``predicate``, waiting at most ``T`` seconds."""
        try:
            async with asyncio.timeout(T):
                while True:
                    for line in self.lines:
                        if predicate(line):
                            return line
                    if self._task.done():
                        raise AssertionError(f"example exited before {what}:\n{self.text}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} within {T}s; output so far:\n{self.text}") from None

    async def finish(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        self._task.cancel()


@pytest.mark.synapse
@pytest.mark.interop
@pytest.mark.timeout(300)
async def test_example_is_verified_by_element_and_stops_cleanly(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    require_node_peer()
    bot = await asyncio.to_thread(synapse.register)
    human = await asyncio.to_thread(synapse.register)
    store_dir = tmp_path / "store"
    env = {
        **os.environ,
        "HOMESERVER": synapse.url,
        "USER_ID": bot.user_id,
        "DEVICE_ID": bot.device_id,
        "ACCESS_TOKEN": bot.access_token,
        "STORE_DIR": str(store_dir),
        "ALLOWED_USERS": f"@nobody:example.org,{human.user_id}",
        "PYTHONIOENCODING": "utf-8",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        cwd=tmp_path,  # the example depends on nothing but the installed package
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    out = Output(proc.stdout)
    peer: JsPeer | None = None
    try:
        await out.wait_for(lambda line: line.startswith("ready: verify"), "ready line")
        peer = await started_peer(synapse, "example-verifier", user=human, timeout=T)
        # Element ignores requests to and from devices whose keys it has not downloaded.
        devices = await peer.download_keys(bot.user_id, bot.device_id, timeout=T)
        assert any(d.get("device_id") == bot.device_id for d in devices), devices

        txn = (await peer.request_verification(bot.user_id, bot.device_id, timeout=T))[
            "transaction_id"
        ]
        await peer.wait_phase(txn, "ready", timeout=T)
        await peer.start_sas(txn, timeout=T)
        sas = (await peer.wait_sas(txn, timeout=T))["sas"]
        shown = await out.wait_for(lambda line: line.startswith("SAS with "), "SAS line")
        assert f"{human.user_id} {human.device_id}" in shown, shown
        for emoji, _name in sas["emoji"]:
            assert emoji in shown, (sas, shown)
        assert " ".join(map(str, sas["decimal"])) in shown, (sas, shown)
        await peer.confirm_sas(txn, timeout=T)
        await peer.wait_phase(txn, "done", timeout=T)
        done = f"verified {human.user_id} {human.device_id}"
        await out.wait_for(lambda line: line.strip() == done, "done line")
        status = await peer.device_status(bot.user_id, bot.device_id)
        assert status["verified"] and status["locally_verified"], status

        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            raise AssertionError(f"no exit within 30s of SIGTERM:\n{out.text}") from None
        await out.finish()
        assert code == 0, out.text
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await out.finish()
        if peer is not None:
            await peer.close()

    text = out.text
    assert bot.access_token not in text
    assert human.access_token not in text
    for noise in ("Traceback", "Unclosed", "was destroyed", "never awaited"):
        assert noise not in text, text  # a clean shutdown leaves no leaked session or task
    # The bot's side of "both verified": nio's trust store on disk, read after the exit.
    assert stored_trust(
        synapse.url,
        bot.user_id,
        bot.device_id,
        bot.access_token,
        store_dir,
        devices=[(human.user_id, human.device_id)],
        pickle_key=(store_dir / "store.key").read_text().strip(),  # the example's own key
    ) == [True]
    assert stat.S_IMODE((store_dir / "store.key").stat().st_mode) == 0o600
