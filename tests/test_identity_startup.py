"""Unit tests of the identity start step and the interactive-auth answer (recorded-answer
homeserver fakes; the real paths run against Synapse in test_identity_bootstrap.py)."""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Any

import pytest

from bot_toolkit.identity.api import IdentityApi, TransientError
from bot_toolkit.identity.errors import InteractiveAuthError
from bot_toolkit.identity.keys import CrossSigningKeys
from bot_toolkit.identity.service import EnsureResult, Identity, IdentityState, KeySource
from bot_toolkit.identity.startup import IdentityOptions, IdentityStartup
from bot_toolkit.identity.store import IdentityStore
from bot_toolkit.metrics import Metrics

ME = "@bot:localhost"
KEY = "EsT1 H3Wm yHnZ VYce KwM9 c6Gk nX71 3FkR Yz9x vary hjQh 5m7X"


class Device:
    device_id = "BOTDEVICE"
    ed25519 = "unused"

    def sign(self, message: bytes) -> str:
        raise AssertionError("not reached")


class UiaServer:
    """No identity published; every device_signing upload answers 401 with a password flow."""

    def __init__(self) -> None:
        self.uploads: list[dict[str, Any]] = []

    async def __call__(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if path.endswith("/keys/query"):
            return 200, {"device_keys": {ME: {}}}
        assert path.endswith("/keys/device_signing/upload"), path
        self.uploads.append(body)
        flows = {"flows": [{"stages": ["m.login.password"]}], "session": "s1", "params": {}}
        if "auth" in body:
            return 401, {"errcode": "M_FORBIDDEN", "error": "Invalid password", **flows}
        return 401, flows


async def test_uia_demand_without_password_is_one_clear_line(tmp_path: Path) -> None:
    server = UiaServer()
    identity = Identity(IdentityApi(server, ME), IdentityStore(tmp_path), Device())
    with pytest.raises(InteractiveAuthError) as info:
        await identity.ensure()
    message = str(info.value)
    assert "\n" not in message and "matrix.password" in message
    # the keys made for the attempt are kept: a retry with the password uploads the same ones
    stored = IdentityStore(tmp_path).load(ME)
    assert stored is not None and not stored.published
    with pytest.raises(InteractiveAuthError, match="refused the password"):
        await identity.ensure(password="wrong")
    auth = server.uploads[-1]["auth"]
    assert auth["type"] == "m.login.password" and auth["session"] == "s1"
    assert auth["identifier"] == {"type": "m.id.user", "user": ME}
    masters = {str(u["master_key"]["keys"]) for u in server.uploads}
    assert len(masters) == 1  # the same keys every time


class FlakyIdentity:
    """Stands in for Identity: fails ``failures`` times with a 5xx, then succeeds."""

    def __init__(self, tmp_path: Path, failures: int) -> None:
        self.user_id = ME
        self.state = IdentityState.UNKNOWN
        self.source = KeySource.NONE
        self.master_key: str | None = None
        self.failures = failures
        self.calls = 0
        self.acknowledged = False
        self.keys = CrossSigningKeys.generate(ME)

    async def ensure(self, **kwargs: Any) -> EnsureResult:
        self.calls += 1
        assert kwargs["recovery_key"] is None and kwargs["password"] == "pw"
        if self.calls <= self.failures:
            raise TransientError("keys/device_signing/upload", 502, {})
        self.state, self.source = IdentityState.CROSS_SIGNED, KeySource.CREATED
        self.master_key = self.keys.master.public_key
        return EnsureResult(self.state, self.source, self.master_key, KEY)

    def acknowledge_recovery_key(self) -> None:
        self.acknowledged = True


async def test_startup_retries_5xx_and_hands_over_the_recovery_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    metrics = Metrics()
    identity = FlakyIdentity(tmp_path, failures=1)
    startup = IdentityStartup(
        identity,  # type: ignore[arg-type]
        IdentityOptions(password="pw", retry_max_delay=0.2),
        metrics,
        tmp_path,
    )
    assert startup.detail() == "identity not checked yet"
    result = await startup.run()
    assert result is not None and identity.calls == 2
    errors = metrics.get("identity_errors_total")
    assert errors is not None and errors.get("transient") == 1
    gauge = metrics.get("identity_cross_signed")
    assert gauge is not None and gauge.get() == 1.0
    assert "device cross-signed" in startup.detail() and identity.master_key in startup.detail()
    path = tmp_path / "recovery-key.txt"
    assert KEY in path.read_text() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert identity.acknowledged
    assert KEY not in caplog.text and KEY.replace(" ", "") not in caplog.text


async def test_startup_bad_recovery_key_is_permanent(tmp_path: Path) -> None:
    metrics = Metrics()
    identity = FlakyIdentity(tmp_path, failures=0)
    startup = IdentityStartup(
        identity,  # type: ignore[arg-type]
        IdentityOptions(recovery_key="EsT1 not a recovery key", password="pw"),
        metrics,
        tmp_path,
    )
    assert await startup.run() is None
    assert identity.calls == 0  # nothing tried with a malformed key
    assert startup.detail().startswith("device not cross-signed: identity.recovery_key")
    errors = metrics.get("identity_errors_total")
    assert errors is not None and errors.get("recovery") == 1
    gauge = metrics.get("identity_cross_signed")
    assert gauge is not None and gauge.get() == 0.0
