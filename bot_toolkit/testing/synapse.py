"""Start and stop a throwaway Synapse homeserver on 127.0.0.1 with SQLite.

Synapse must already be installed (the ``test`` or ``demo`` extra): nothing is installed
at run time.
The server listens on a free loopback port, has open registration and raised rate limits, and
keeps everything in one temporary directory that :meth:`LocalSynapse.stop` removes.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LocalSynapse", "RegisteredUser", "SynapseError"]

log = logging.getLogger("bot_toolkit.testing.synapse")

_RATE = {"per_second": 10000, "burst_count": 100000}


class SynapseError(RuntimeError):
    """Synapse could not be started, or a request to it failed."""


@dataclass(frozen=True, slots=True)
class RegisteredUser:
    """A user registered on the local homeserver."""

    user_id: str
    access_token: str
    device_id: str
    password: str

    def __repr__(self) -> str:  # never show the token or password
        return f"RegisteredUser(user_id={self.user_id!r}, device_id={self.device_id!r})"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _config(base: Path, server_name: str, port: int) -> dict[str, Any]:
    return {
        "server_name": server_name,
        "pid_file": str(base / "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(base / "homeserver.db")}},
        "log_config": str(base / "log.config"),
        "media_store_path": str(base / "media_store"),
        "signing_key_path": str(base / "signing.key"),
        "registration_shared_secret": secrets.token_hex(16),
        "macaroon_secret_key": secrets.token_hex(16),
        "form_secret": secrets.token_hex(16),
        "report_stats": False,
        "enable_registration": True,
        "enable_registration_without_verification": True,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "federation_domain_whitelist": [],
        "enable_metrics": False,
        "presence": {"enabled": False},
        "url_preview_enabled": False,
        "rc_message": _RATE,
        "rc_registration": _RATE,
        "rc_login": {"address": _RATE, "account": _RATE, "failed_attempts": _RATE},
        "rc_admin_redaction": _RATE,
        "rc_joins": {"local": _RATE, "remote": _RATE},
        "rc_joins_per_room": _RATE,
        "rc_invites": {"per_room": _RATE, "per_user": _RATE, "per_issuer": _RATE},
        "rc_3pid_validation": _RATE,
        "rc_key_requests": _RATE,
        "rc_room_creation": _RATE,
        "rc_delayed_event_mgmt": _RATE,
        "rc_reports": _RATE,
        "rc_presence": {"per_user": _RATE},
        "rc_media_create": _RATE,
        "rc_send_to_device": _RATE,
        "max_upload_size": "1M",
    }


_LOG_CONFIG = """\
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: {path}
loggers:
  synapse.storage.SQL:
    level: WARNING
  synapse.app:
    level: INFO
root:
  level: WARNING
  handlers: [file]
disable_existing_loggers: false
"""


class LocalSynapse:
    """A Synapse process on 127.0.0.1 for tests and the demo.

    Use :meth:`start` and :meth:`stop`, or the instance as a context manager.
    """

    def __init__(self, server_name: str = "localhost", *, base_dir: Path | None = None) -> None:
        self.server_name = server_name
        self._own_dir = base_dir is None
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="bot-toolkit-synapse-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._counter = 0

    @property
    def log_path(self) -> Path:
        """Where Synapse writes its log."""
        return self.base_dir / "homeserver.log"

    def _write_config(self) -> Path:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "media_store").mkdir(exist_ok=True)
        (self.base_dir / "log.config").write_text(_LOG_CONFIG.format(path=self.log_path))
        path = self.base_dir / "homeserver.yaml"
        # JSON is valid YAML, so no YAML writer is needed.
        path.write_text(json.dumps(_config(self.base_dir, self.server_name, self.port), indent=1))
        return path

    def start(self, timeout: float = 90.0) -> LocalSynapse:
        """Generate the config and keys, start Synapse and wait until it answers.

        The free port is picked before Synapse binds it, so another process can take it in
        between; when the bind fails, this starts again on a new port (three tries).
        """
        for attempt in range(3):
            try:
                return self._start_once(timeout)
            except SynapseError as e:
                if "Address already in use" not in str(e) or attempt == 2:
                    raise
                log.warning("port %d was taken; trying another", self.port)
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> LocalSynapse:
        config = self._write_config()
        cmd = [sys.executable, "-m", "synapse.app.homeserver", "-c", str(config)]
        env = {**os.environ, "SYNAPSE_ASYNC_IO_REACTOR": "0"}
        gen = subprocess.run(
            [*cmd, "--generate-keys"], capture_output=True, env=env, timeout=120, check=False
        )
        if gen.returncode != 0:
            raise SynapseError(f"synapse --generate-keys failed: {gen.stderr.decode()[-2000:]}")
        out = open(self.base_dir / "stdout.log", "wb")  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SynapseError(f"synapse exited with {self._proc.returncode}: {self._tail()}")
            # Only trust an answer once our own process says it bound the port: another
            # server could hold a recycled port.
            if self._listening():
                try:
                    self.request("GET", "/_matrix/client/versions", timeout=2)
                    log.info("synapse is up at %s", self.url)
                    return self
                except (OSError, SynapseError):
                    pass
            time.sleep(0.2)
        self._stop_process()
        raise SynapseError(f"synapse did not answer within {timeout}s: {self._tail()}")

    def _listening(self) -> bool:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        return f"now listening on TCP port {self.port}" in text

    def _tail(self) -> str:
        parts = []
        for name in ("stdout.log", "homeserver.log"):
            p = self.base_dir / name
            if p.exists():
                parts.append(p.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the process and remove the directory this instance created."""
        self._stop_process()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _stop_process(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def __enter__(self) -> LocalSynapse:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the Synapse process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """A blocking JSON request to the homeserver; raises :class:`SynapseError` on non-2xx."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise SynapseError(f"{method} {path} -> {e.code}: {detail}") from None
        return json.loads(raw) if raw else {}

    def register(
        self,
        localpart: str | None = None,
        *,
        password: str | None = None,
        device_id: str | None = None,
    ) -> RegisteredUser:
        """Register a user (a unique localpart when none is given) and log in one device."""
        if localpart is None:
            self._counter += 1
            localpart = f"user{self._counter}_{secrets.token_hex(3)}"
        password = password or secrets.token_urlsafe(12)
        body: dict[str, Any] = {
            "username": localpart,
            "password": password,
            "auth": {"type": "m.login.dummy"},
            "inhibit_login": False,
        }
        if device_id:
            body["device_id"] = device_id
        res = self.request("POST", "/_matrix/client/v3/register", body)
        return RegisteredUser(res["user_id"], res["access_token"], res["device_id"], password)

    def login(self, user_id: str, password: str, device_id: str | None = None) -> RegisteredUser:
        """Log in another device of an existing user."""
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user_id},
            "password": password,
        }
        if device_id:
            body["device_id"] = device_id
        res = self.request("POST", "/_matrix/client/v3/login", body)
        return RegisteredUser(res["user_id"], res["access_token"], res["device_id"], password)
