"""``bot-toolkit identity [status|bootstrap|recover|reset]`` as a subprocess against the real
Synapse: what it prints, exit codes, one-line failures, and no recovery key in its log."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bot_helpers import new_admin_token, write_config
from tests.synapse import LocalSynapse, RegisteredUser, free_port

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(300)]


def _config(tmp_path: Path, synapse: LocalSynapse, user: RegisteredUser, name: str) -> Path:
    return write_config(
        tmp_path / f"{name}.toml",
        homeserver=synapse.url,
        user_id=user.user_id,
        data_dir=tmp_path / name,
        port=free_port(),
        admin_token=new_admin_token(),
    )


def _cli(config: Path, *args: str, password: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOT_TOOLKIT_")}
    if password is not None:
        env["BOT_TOOLKIT_PASSWORD"] = password
    return subprocess.run(
        [sys.executable, "-m", "bot_toolkit", "identity", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _field(out: str, name: str) -> str:
    m = re.search(rf"^{name}:\s+(.*)$", out, re.M)
    assert m, out
    return m.group(1).strip()


def _error_lines(stderr: str) -> list[str]:
    """The command's own error lines (the rest of stderr is the log)."""
    return [line for line in stderr.splitlines() if line.startswith("bot-toolkit:")]


def _recovery_key(out: str) -> str:
    m = re.search(r"Recovery key \(shown once.*?\n\n    (.+?)\n", out, re.S)
    assert m, out
    return m.group(1)


async def test_identity_commands(synapse: LocalSynapse, tmp_path: Path) -> None:
    user = await asyncio.to_thread(synapse.register)
    config = _config(tmp_path, synapse, user, "main")

    status = await asyncio.to_thread(_cli, config, password=user.password)
    assert status.returncode == 0, status.stderr
    assert _field(status.stdout, "master key") == "(none)"
    assert _field(status.stdout, "device signed") == "no"

    made = await asyncio.to_thread(_cli, config, "bootstrap", password=user.password)
    assert made.returncode == 0, made.stderr
    master = _field(made.stdout, "master key")
    assert master != "(none)" and _field(made.stdout, "device signed").startswith("yes")
    first_key = _recovery_key(made.stdout)
    assert stat.S_IMODE((tmp_path / "main" / "identity.json").stat().st_mode) == 0o600

    again = await asyncio.to_thread(_cli, config, "bootstrap", password=user.password)
    assert again.returncode == 0 and _field(again.stdout, "master key") == master
    assert "Recovery key" not in again.stdout  # shown once

    refused = await asyncio.to_thread(_cli, config, "reset", password=user.password)
    assert refused.returncode == 1
    (line,) = _error_lines(refused.stderr)
    assert "--yes" in line

    replaced = await asyncio.to_thread(_cli, config, "reset", "--yes", password=user.password)
    assert replaced.returncode == 0, replaced.stderr
    new_master = _field(replaced.stdout, "master key")
    assert new_master not in ("(none)", master)
    new_key = _recovery_key(replaced.stdout)

    # a fresh data directory (a new device): recover with the key file
    fresh = _config(tmp_path, synapse, user, "fresh")
    key_file = tmp_path / "key.txt"
    key_file.write_text(new_key + "\n")
    bad_file = tmp_path / "old-key.txt"
    bad_file.write_text(first_key + "\n")
    wrong = await asyncio.to_thread(
        _cli, fresh, "recover", "--recovery-key-file", str(bad_file), password=user.password
    )
    assert wrong.returncode == 1
    (line,) = _error_lines(wrong.stderr)
    assert "does not match" in line
    recovered = await asyncio.to_thread(
        _cli, fresh, "recover", "--recovery-key-file", str(key_file), password=user.password
    )
    assert recovered.returncode == 0, recovered.stderr
    assert _field(recovered.stdout, "master key") == new_master
    assert _field(recovered.stdout, "device signed").startswith("yes")
    assert _field(recovered.stdout, "private keys").startswith("recovery_key")

    for run in (status, made, again, refused, replaced, wrong, recovered):
        for key in (first_key, new_key):
            assert key not in run.stderr and key.replace(" ", "") not in run.stderr
