"""The ``bot-toolkit`` command, run in subprocesses as an operator would run it."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from bot_toolkit import __version__
from bot_toolkit.logging_setup import RedactingFilter, Redactor, active_redactor, setup_logging
from tests.synapse import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"
SECRET = "pw-do-not-print-4711"

MINIMAL = """
[matrix]
homeserver = "https://matrix.example.org"
user_id = "@bot:example.org"
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOT_TOOLKIT_")}
    env.update(extra)
    return env


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot_toolkit", *args],
        capture_output=True,
        text=True,
        env=clean_env() if env is None else env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_version() -> None:
    res = cli("--version")
    assert res.returncode == 0
    assert one_line(res.stdout) == f"bot-toolkit {__version__}"


def test_console_script_version() -> None:
    # pyproject's [project.scripts] entry; the test install (pip install -e '.[test]') makes it.
    exe = shutil.which("bot-toolkit", path=str(Path(sys.executable).parent))
    assert exe is not None, "the bot-toolkit console script is not installed next to this Python"
    res = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0
    assert __version__ in res.stdout


def test_check_config_example_passes() -> None:
    res = cli("check-config", "-c", str(EXAMPLE), env=clean_env(BOT_TOOLKIT_PASSWORD=SECRET))
    assert res.returncode == 0, res.stderr
    assert one_line(res.stdout) == f"config OK: {EXAMPLE}"
    assert res.stderr == ""
    assert SECRET not in res.stdout


def test_check_config_from_env_variable_path() -> None:
    env = clean_env(BOT_TOOLKIT_PASSWORD=SECRET, BOT_TOOLKIT_CONFIG=str(EXAMPLE))
    res = cli("check-config", env=env)
    assert res.returncode == 0, res.stderr


def test_check_config_environment_only() -> None:
    env = clean_env(
        BOT_TOOLKIT_MATRIX_HOMESERVER="http://127.0.0.1:8008",
        BOT_TOOLKIT_MATRIX_USER_ID="@bot:localhost",
        BOT_TOOLKIT_ACCESS_TOKEN="syt_abc",
    )
    res = cli("check-config", env=env)
    assert res.returncode == 0, res.stderr
    assert one_line(res.stdout) == "config OK: (environment)"


def test_example_without_secret_fails_naming_password() -> None:
    res = cli("check-config", "-c", str(EXAMPLE))
    assert res.returncode == 2
    assert "matrix.password" in one_line(res.stderr)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (MINIMAL + 'homeservr = "x"\n', "matrix.homeservr"),  # unknown key
        (MINIMAL + "[http]\nport = 'eighty'\n", "http.port"),  # wrong type
        (MINIMAL + "[http]\nport = 0\n", "http.port"),  # bad value
        ('[matrix]\nhomeserver = "https://hs"\n', "matrix.user_id"),  # missing
        (MINIMAL + '[verification]\nconfirm = "maybe"\n', "verification.confirm"),
        (MINIMAL + "[nonsense]\n", "nonsense"),  # unknown section
        (MINIMAL + '[logging]\nformat = "xml"\n', "logging.format"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    res = cli("check-config", "-c", str(path), env=clean_env(BOT_TOOLKIT_PASSWORD=SECRET))
    assert res.returncode == 2
    line = one_line(res.stderr)
    assert f"{key}:" in line
    assert str(path) in line
    assert res.stdout == ""


def test_invalid_toml_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[matrix\n")
    res = cli("check-config", "-c", str(path), env=clean_env(BOT_TOOLKIT_PASSWORD=SECRET))
    assert res.returncode == 2
    line = one_line(res.stderr)
    assert str(path) in line and "line 1" in line


def test_missing_file_exits_2(tmp_path: Path) -> None:
    res = cli("check-config", "-c", str(tmp_path / "nope.toml"))
    assert res.returncode == 2
    assert "nope.toml" in one_line(res.stderr)


def test_bad_env_value_exits_2_naming_key_and_variable() -> None:
    env = clean_env(BOT_TOOLKIT_PASSWORD=SECRET, BOT_TOOLKIT_HTTP_PORT="http")
    res = cli("check-config", "-c", str(EXAMPLE), env=env)
    assert res.returncode == 2
    line = one_line(res.stderr)
    assert "http.port" in line and "BOT_TOOLKIT_HTTP_PORT" in line


def test_error_never_prints_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL + f'password = "{SECRET}"\n[http]\nadmin_token = "short"\n')
    res = cli("check-config", "-c", str(path))
    assert res.returncode == 2
    assert SECRET not in res.stderr + res.stdout


@pytest.mark.parametrize(
    "args",
    [(), ("bogus",), ("check-config", "--nope"), ("run", "-c"), ("--frobnicate",)],
)
def test_usage_errors_exit_2_with_one_line(args: tuple[str, ...]) -> None:
    res = cli(*args)
    assert res.returncode == 2
    line = one_line(res.stderr)
    assert line.startswith("bot-toolkit") and ": error: " in line


def test_run_with_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL + "[outbox]\nconcurrency = 0\n")
    res = cli("run", "-c", str(path), env=clean_env(BOT_TOOLKIT_PASSWORD=SECRET))
    assert res.returncode == 2
    assert "outbox.concurrency" in one_line(res.stderr)


# ---- healthcheck (used by the container's HEALTHCHECK)


@pytest.fixture
def health_server() -> Iterator[tuple[int, list[int]]]:
    statuses = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(statuses[0] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], statuses
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck(tmp_path: Path, health_server: tuple[int, list[int]]) -> None:
    port, statuses = health_server
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL + f'[http]\nhost = "0.0.0.0"\nport = {port}\n')
    env = clean_env(BOT_TOOLKIT_PASSWORD=SECRET)
    res = cli("healthcheck", "-c", str(path), env=env)
    assert res.returncode == 0, res.stderr
    assert f"127.0.0.1:{port}" in one_line(res.stdout)
    statuses[0] = 503
    res = cli("healthcheck", "-c", str(path), env=env)
    assert res.returncode == 1
    assert "503" in one_line(res.stderr)


def test_healthcheck_nothing_listening(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL + f"[http]\nport = {free_port()}\n")
    res = cli(
        "healthcheck", "-c", str(path), "--timeout", "2", env=clean_env(BOT_TOOLKIT_PASSWORD=SECRET)
    )
    assert res.returncode == 1
    assert "unhealthy" in one_line(res.stderr)


# ---- run: the contract with bot_toolkit.bot.run_bot (a stand-in module, injected)

_FAKE_BOT = """
import sys, types
module = types.ModuleType("bot_toolkit.bot")
module.__dict__.update(asyncio=__import__("asyncio"), logging=__import__("logging"))
exec(sys.argv[1], module.__dict__)
sys.modules["bot_toolkit.bot"] = module
from bot_toolkit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_with_fake_bot(
    code: str, config: Path, env: dict[str, str], wait_for: str | None = None
) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _FAKE_BOT, code, "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    if wait_for is not None:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert wait_for in line, line
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


@pytest.fixture
def run_config(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL + '[logging]\nformat = "json"\n')
    return path


def test_run_passes_config_and_returns_its_code(run_config: Path) -> None:
    code = (
        "def run_bot(config):\n"
        "    pw = config.matrix.password.reveal()\n"
        "    logging.getLogger('bot_toolkit.bot').info('pw is %s', pw)\n"
        "    print(config.matrix.user_id)\n"
        "    return 0\n"
    )
    rc, out, err = run_with_fake_bot(code, run_config, clean_env(BOT_TOOLKIT_PASSWORD=SECRET))
    assert rc == 0, err
    assert out.strip() == "@bot:example.org"
    assert SECRET not in err
    assert '"message": "pw is <redacted>"' in err


def test_run_sigterm_stops_async_bot_with_exit_0(run_config: Path) -> None:
    code = (
        "async def run_bot(config):\n"
        "    print('running', flush=True)\n"
        "    try:\n"
        "        await asyncio.sleep(3600)\n"
        "    finally:\n"
        "        print('cleaned up', flush=True)\n"
    )
    rc, out, err = run_with_fake_bot(
        code, run_config, clean_env(BOT_TOOLKIT_PASSWORD=SECRET), wait_for="running"
    )
    assert rc == 0, err
    assert "cleaned up" in out


def test_run_fatal_error_exits_1_with_one_line_summary(run_config: Path) -> None:
    code = (
        "async def run_bot(config):\n"
        "    raise RuntimeError('store is corrupt; token ' + config.matrix.password.reveal())\n"
    )
    rc, _, err = run_with_fake_bot(code, run_config, clean_env(BOT_TOOLKIT_PASSWORD=SECRET))
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last == "bot-toolkit: fatal: run: RuntimeError: store is corrupt; token <redacted>"
    assert SECRET not in err


def test_expected_fatal_error_has_no_traceback(run_config: Path) -> None:
    """A BotError (wrong password, unusable data directory) is one line, never a traceback;
    an unexpected exception keeps its traceback in the log for the bug report."""
    expected = (
        "class BotError(RuntimeError):\n"
        "    one_line = True\n"
        "async def run_bot(config):\n"
        "    raise BotError('login as @bot:localhost refused: M_FORBIDDEN Invalid password')\n"
    )
    rc, _, err = run_with_fake_bot(expected, run_config, clean_env(BOT_TOOLKIT_PASSWORD=SECRET))
    assert rc == 1
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        "bot-toolkit: fatal: run: BotError: login as @bot:localhost refused: M_FORBIDDEN "
        "Invalid password"
    )
    unexpected = "async def run_bot(config):\n    raise KeyError('bug')\n"
    rc, _, err = run_with_fake_bot(unexpected, run_config, clean_env(BOT_TOOLKIT_PASSWORD=SECRET))
    assert rc == 1
    assert "Traceback" in err


def test_run_config_error_from_bot_exits_2(run_config: Path) -> None:
    code = (
        "from bot_toolkit.config import ConfigError\n"
        "def run_bot(config):\n"
        "    raise ConfigError('storage.data_dir', 'not writable')\n"
    )
    rc, _, err = run_with_fake_bot(code, run_config, clean_env(BOT_TOOLKIT_PASSWORD=SECRET))
    assert rc == 2
    assert err.strip().splitlines()[-1].endswith("storage.data_dir: not writable")


_NO_BOT = """
import sys
sys.modules["bot_toolkit.bot"] = None  # as in a build without the module: import fails
from bot_toolkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_run_without_bot_module_exits_1_one_line(run_config: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _NO_BOT, "run", "-c", str(run_config)],
        capture_output=True,
        text=True,
        env=clean_env(BOT_TOOLKIT_PASSWORD=SECRET),
        timeout=60,
        check=False,
    )
    assert res.returncode == 1, res.stderr
    assert one_line(res.stderr) == (
        "bot-toolkit: fatal: run is not available: this build has no bot_toolkit.bot module"
    )


# ---- logging set up by the CLI: formats and redaction (bot_toolkit.logging_setup)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    yield stream
    for handler in list(root.handlers):
        if handler not in old_handlers:
            root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        ("GET /_matrix/client/v3/sync?since=s1&access_token=abc123def", "abc123def"),
        ("headers: {'Authorization': 'Bearer abc123def'}", "abc123def"),
        ("Authorization: Bearer abc.123-def", "abc.123-def"),
        ('body {"type": "m.login.password", "password": "hunter2\\"x"}', "hunter2"),
        ("{'access_token': 'abc123def', 'device_id': 'D'}", "abc123def"),
        ("LoginResponse(access_token='abc123def')", "abc123def"),
        ("password=hunter22 user=bot", "hunter22"),
        ("token is syt_Ym90_AbCdEfGhIjKlMnOp_1a2b3c in an error", "AbCdEfGhIjKlMnOp"),
        ('{"secret": "c2VjcmV0", "name": "m.megolm_backup.v1"}', "c2VjcmV0"),
        ('{"session_key": "AgAAAAB", "room_id": "!r:h"}', "AgAAAAB"),
    ],
)
def test_redactor_patterns(text: str, leak: str) -> None:
    out = Redactor().redact(text)
    assert leak not in out
    assert "<redacted>" in out


def test_redactor_keeps_ordinary_text() -> None:
    text = "user @bot:example.org device ABC synced 3 rooms; key verification started"
    assert Redactor(["ab"]).redact(text) == text


def test_redactor_literal_secrets() -> None:
    r = Redactor(["my-long-password"])
    r.add("a-token-learnt-at-login")
    assert (
        r.redact("x my-long-password y a-token-learnt-at-login z") == "x <redacted> y <redacted> z"
    )


def test_json_logs_are_redacted_one_object_per_line(log_stream: io.StringIO) -> None:
    setup_logging("DEBUG", "json", secrets=["pw-literal-1234"], stream=log_stream)
    log = logging.getLogger("bot_toolkit.test")
    log.info("login with %s", "pw-literal-1234", extra={"request": {"password": "x", "user": "u"}})
    active_redactor().add("learnt-token-5678")
    log.warning("url %s", "https://hs/x?access_token=learnt-token-5678&y=1")
    try:
        raise RuntimeError("failed with Bearer learnt-token-5678")
    except RuntimeError:
        log.exception("boom")
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert records[0]["message"] == "login with <redacted>"
    assert records[0]["request"] == {"password": "<redacted>", "user": "u"}
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    assert records[0]["level"] == "INFO" and records[0]["logger"] == "bot_toolkit.test"
    assert "learnt-token" not in lines[1] and "learnt-token" not in lines[2]
    assert "RuntimeError" in records[2]["exc"]


def test_text_logs_are_redacted(log_stream: io.StringIO) -> None:
    setup_logging("INFO", "text", stream=log_stream)
    logging.getLogger("bot_toolkit.test").info(
        "sending %s", {"access_token": "abc123def"}, extra={"peer": "@a:b"}
    )
    logging.getLogger("bot_toolkit.test").debug("hidden at INFO")
    out = log_stream.getvalue()
    assert "abc123def" not in out
    assert "INFO" in out and "bot_toolkit.test: sending" in out and "peer='@a:b'" in out
    assert "hidden" not in out


def test_peer_chosen_newlines_cannot_forge_text_log_lines(log_stream: io.StringIO) -> None:
    setup_logging("INFO", "text", stream=log_stream)
    txn = "t1\n2026-01-01T00:00:00.000Z INFO     bot_toolkit.bot: admin token accepted\r"
    logging.getLogger("bot_toolkit.test").warning("cancelled %s", txn)
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 1
    assert "t1\\x0a2026-01-01" in lines[0] and "\\x0d" in lines[0]


def test_setup_logging_twice_keeps_one_handler(log_stream: io.StringIO) -> None:
    setup_logging("INFO", "text", stream=log_stream)
    setup_logging("INFO", "json", stream=log_stream)
    logging.getLogger("bot_toolkit.test").info("once")
    assert len(log_stream.getvalue().splitlines()) == 1


def test_filter_redacts_for_foreign_handlers() -> None:
    record = logging.LogRecord(
        "nio", logging.INFO, __file__, 1, "token %s", ("Bearer abc123def",), None
    )
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "token Bearer <redacted>"
