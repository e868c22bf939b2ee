"""``bot-toolkit demo`` end to end: a subprocess, as a new user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(300)]


def test_demo_runs_the_whole_flow_and_cleans_up(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "TMPDIR": str(tmp)}
    for name in [k for k in env if k.startswith("BOT_TOOLKIT_")]:
        del env[name]
    proc = subprocess.run(
        [sys.executable, "-m", "bot_toolkit", "demo"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=240,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr[-4000:]}"
    lines = out.splitlines()
    steps = [line[:3] for line in lines if re.match(r"\[\d\]", line)]
    assert steps == [f"[{i}]" for i in range(1, 9)], out
    bot_shows = next(line for line in lines if "Bot shows:" in line)
    alice_sees = next(line for line in lines if "Alice sees:" in line)
    # Seven emoji with their names, the same on both sides.
    assert bot_shows.split(":", 1)[1].strip() == alice_sees.split(":", 1)[1].strip()
    assert len(bot_shows.split(":", 1)[1].split(",")) == 7
    assert re.search(r"decimals:\s+\d{4} \d{4} \d{4}", out), out
    assert "Same on both screens: yes" in out
    assert "Verification done: Alice trusts the bot's device: yes" in out
    assert "the bot trusts Alice's device: yes" in out
    assert "Alice decrypted the bot's answer: 'pong demo' (encrypted: yes)" in out, out
    assert re.search(r"Carol received m\.room_key\.withheld .* code=m\.no_olm", out), out
    assert lines[-1].startswith("Demo finished"), out
    # Everything the demo made in the temporary directory is gone.
    assert list(tmp.iterdir()) == [], list(tmp.iterdir())
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]


def test_demo_without_synapse_names_the_extra(tmp_path: Path) -> None:
    # A sitecustomize that hides the synapse package, as if the demo extra were not installed.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'synapse' or name.startswith('synapse.'):\n"
        "            raise ModuleNotFoundError(name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Hide())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "bot_toolkit", "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'bot_toolkit[demo]'" in proc.stderr.strip().splitlines()[-1]
