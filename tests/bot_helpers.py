"""Helpers for the standalone-bot tests: a generated config, ``bot-toolkit run`` as a subprocess,
HTTP calls to its endpoints, Prometheus text parsing and a TCP forwarder that can be switched
on and off (a homeserver that is down, then up).

Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

__all__ = [
    "BotRun",
    "TcpForwarder",
    "http_call",
    "metric",
    "new_admin_token",
    "write_config",
]


def write_config(
    path: Path,
    *,
    homeserver: str,
    user_id: str,
    data_dir: Path,
    port: int,
    admin_token: str,
    confirm: str = "operator",
    allowed_users: Sequence[str] = ("@*:localhost",),
    sync_timeout: float = 2.0,
    retry_max_delay: float = 2.0,
    sync_stale_after: float = 120.0,
    flush_deadline: float = 10.0,
    post_sas_in_dm: bool = False,
) -> Path:
    """A TOML config for the bot (no secrets: those come from the environment)."""
    users = ", ".join(json.dumps(u) for u in allowed_users)
    path.write_text(
        f"""
[matrix]
homeserver = {json.dumps(homeserver)}
user_id = {json.dumps(user_id)}
device_name = "bot_toolkit e2e"
sync_timeout = {sync_timeout}
retry_max_delay = {retry_max_delay}

[storage]
data_dir = {json.dumps(str(data_dir))}

[verification]
allowed_users = [{users}]
confirm = {json.dumps(confirm)}
post_sas_in_dm = {"true" if post_sas_in_dm else "false"}

[outbox]
flush_deadline = {flush_deadline}

[http]
host = "127.0.0.1"
port = {port}
admin_token = {json.dumps(admin_token)}
sync_stale_after = {sync_stale_after}

[logging]
level = "DEBUG"
""",
        encoding="utf-8",
    )
    return path


def new_admin_token() -> str:
    """A random admin token (32 characters)."""
    return secrets.token_hex(16)


class BotRun:
    """``python -m bot_toolkit run -c CONFIG`` in a subprocess; output goes to ``log_path``."""

    def __init__(self, config: Path, port: int, log_path: Path, env: dict[str, str]) -> None:
        self.config = config
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BotRun:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bot_toolkit", "run", "-c", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        return self

    def log(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def get(self, path: str, *, token: str | None = None) -> tuple[int, Any]:
        return await http_call("GET", self.base + path, token=token)

    async def post(self, path: str, *, token: str | None = None) -> tuple[int, Any]:
        return await http_call("POST", self.base + path, token=token)

    async def wait_status(self, path: str, status: int, *, within: float = 60.0) -> Any:
        """Poll ``path`` until it answers ``status``; returns the body."""
        deadline = time.monotonic() + within
        last: Any = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                code, body = await self.get(path)
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                last = e
            else:
                last = (code, body)
                if code == status:
                    return body
            await asyncio.sleep(0.2)
        raise TimeoutError(
            f"{path} did not answer {status} within {within}s (last: {last!r})\n"
            + self.log()[-3000:]
        )

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the bot exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
            )

    async def wait_log(self, text: str, *, count: int = 1, within: float = 60.0) -> None:
        """Poll the log until ``text`` occurs at least ``count`` times (bounded)."""
        deadline = time.monotonic() + within
        while self.log().count(text) < count:
            self.check_alive()
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{text!r} not logged {count} times within {within}s\n" + self.log()[-3000:]
                )
            await asyncio.sleep(0.1)

    async def terminate(self, within: float = 30.0) -> int:
        """SIGTERM; returns the exit code (``subprocess.TimeoutExpired`` after ``within`` s)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, within)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def http_call(
    method: str, url: str, *, token: str | None = None, time_limit: float = 10.0
) -> tuple[int, Any]:
    """(status, body): JSON when it parses, else text."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=time_limit)
        ) as resp,
    ):
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return 0.0


class TcpForwarder:
    """Listens on ``127.0.0.1:port`` and forwards every connection to ``target_port``.

    :meth:`stop` closes the listener and every open connection (the homeserver "goes down").
    """

    def __init__(self, port: int, target_port: int) -> None:
        self.port = port
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Tracked at once, so a stop() while the upstream connection is being opened closes it;
        # the server it came from tells whether stop() ran meanwhile (then nothing is forwarded:
        # a connection accepted just before the homeserver "went down" must not outlive it).
        server = self._server
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self._writers.discard(writer)
            return
        if server is None or self._server is not server:
            writer.close()
            up_writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)
