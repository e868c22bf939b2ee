"""The container image: builds, runs as non-root, checks config, logs in, answers /healthz.

Also: examples/plugins mounted at /plugins answers in an encrypted room (no rebuild), and a
missing plugin is named by ``check-config`` inside the image.

Needs podman/buildah through ``container-check`` (``../shared/tools`` beside the clone;
``CONTAINER_CHECK`` overrides its path) and runs when ``BOT_TOOLKIT_CONTAINER_TEST=1``: CI
(``.ci/run``) always sets it, so there a missing tool fails the tests; locally they are opt-in
(about 2 minutes with a built base image, 4-5 on a fresh machine).
The containers share the host's network, so the bot reaches the test Synapse on 127.0.0.1 and its
HTTP port is on 127.0.0.1 too.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from nio import AsyncClient

from tests.nio_helpers import close_clients, make_client, syncing
from tests.plugin_helpers import Replies, room_with_bot
from tests.synapse import LocalSynapse, free_port

ROOT = Path(__file__).resolve().parent.parent
TAG = "bot-toolkit:test"
BOT_UID = "10001"

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(
        os.environ.get("BOT_TOOLKIT_CONTAINER_TEST") != "1",
        reason="container tests are opt-in here (CI runs them): BOT_TOOLKIT_CONTAINER_TEST=1",
    ),
]


def _tool() -> str:
    found = (
        os.environ.get("CONTAINER_CHECK")
        or shutil.which("container-check")
        or str(Path(__file__).resolve().parents[2] / "shared" / "tools" / "container-check")
    )
    if not Path(found).is_file():
        pytest.fail(f"container-check not found (looked for {found}); set CONTAINER_CHECK")
    return found


def cc(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def image() -> str:
    res = cc("build", TAG, timeout=1800)
    assert res.returncode == 0, (
        f"container-check build failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return TAG


def test_build_succeeds(image: str) -> None:
    res = cc("exec", image, "--", "bot-toolkit", "--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("bot-toolkit ")


def test_runs_as_non_root(image: str) -> None:
    res = cc("exec", image, "--", "id", "-u")
    assert res.returncode == 0, res.stderr
    uid = res.stdout.strip()
    assert uid != "0"
    assert uid == BOT_UID


def test_image_has_no_tests_or_caches(image: str) -> None:
    res = cc(
        "exec",
        image,
        "--",
        "sh",
        "-c",
        "find / -xdev \\( -path /proc -o -path /sys \\) -prune -o "
        "\\( -name .git -o -name .pytest_cache -o -name .mypy_cache -o -name node_modules "
        "-o -name test_config.py \\) -print 2>/dev/null; true",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


def _config_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(body)
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    return path


def test_check_config_inside(image: str, tmp_path: Path) -> None:
    path = _config_file(tmp_path, (ROOT / "config.example.toml").read_text())
    res = cc(
        "run",
        "-v",
        f"{path}:/config/config.toml:ro",
        "-e",
        "BOT_TOOLKIT_PASSWORD=x",
        image,
        "--",
        "check-config",
    )
    assert res.returncode == 0, res.stderr
    assert "config OK: /config/config.toml" in res.stdout


def test_check_config_inside_reports_bad_key(image: str, tmp_path: Path) -> None:
    path = _config_file(tmp_path, (ROOT / "config.example.toml").read_text() + "bogus = 1\n")
    res = cc(
        "run",
        "-v",
        f"{path}:/config/config.toml:ro",
        "-e",
        "BOT_TOOLKIT_PASSWORD=x",
        image,
        "--",
        "check-config",
    )
    assert res.returncode == 2, (res.returncode, res.stderr)  # the CLI's bad-config exit code
    # the key lands in the example's last table, whichever that is
    assert re.search(r"config error in /config/config.toml: \w+\.bogus: unknown key", res.stderr)


def test_check_config_inside_from_environment_only(image: str) -> None:
    res = cc(
        "run",
        "-e", "BOT_TOOLKIT_CONFIG=",
        "-e", "BOT_TOOLKIT_MATRIX_HOMESERVER=http://127.0.0.1:8008",
        "-e", "BOT_TOOLKIT_MATRIX_USER_ID=@bot:localhost",
        "-e", "BOT_TOOLKIT_PASSWORD=x",
        image, "--", "check-config",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "config OK: (environment)" in res.stdout


# ---- the bot itself


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [
                    int(k)
                    for k in Path(f"/proc/{current}/task/{task}/children").read_text().split()
                ]
            except OSError:
                kids = []
            found += kids
            stack += kids
    return found


def _bot_process(pid: int) -> int | None:
    """The containerised bot: buildah does not pass SIGTERM on, so the test signals it directly."""
    for child in reversed(_descendants(pid)):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv[0].startswith(b"buildah") and any(b"bot-toolkit" in a for a in argv):
            return child
    return None


class RunningBot:
    def __init__(
        self,
        image: str,
        config: Path,
        data: Path,
        password: str,
        port: int,
        *,
        extra: Sequence[str] = (),
    ) -> None:
        self.port = port
        self.log = config.parent / f"bot-{time.monotonic_ns()}.log"
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            [_tool(), "run", "-v", f"{config}:/config/config.toml:ro", "-v", f"{data}:/data",
             "-e", f"BOT_TOOLKIT_PASSWORD={password}", *extra, image],
            cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 180) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        body: dict[str, object] = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"bot exited early:\n{self.output()}"
            status, raw = _get(f"http://127.0.0.1:{self.port}/readyz")
            if raw:
                body = json.loads(raw)
            if status == 200:
                return body
            time.sleep(1)
        raise AssertionError(f"not ready after {timeout}s: {body}\n{self.output()}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            bot = _bot_process(self.proc.pid)
            if bot is not None:
                os.kill(bot, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._out.close()
        return self.proc.returncode

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")


@pytest.fixture
def bot_setup(synapse: LocalSynapse, tmp_path: Path) -> Iterator[tuple[Path, Path, str, str, int]]:
    user = synapse.register()
    port = free_port()
    config = _config_file(
        tmp_path,
        f"""
[matrix]
homeserver = "{synapse.url}"
user_id = "{user.user_id}"
device_name = "container test bot"

[http]
host = "127.0.0.1"
port = {port}

[logging]
level = "DEBUG"
format = "json"
""",
    )
    data = tmp_path / "data"
    data.mkdir()
    try:
        os.chown(data, int(BOT_UID), int(BOT_UID))
    except PermissionError:
        data.chmod(0o777)
    yield config, data, user.user_id, user.password, port


def _bot_devices(synapse: LocalSynapse, user_id: str, password: str) -> list[str]:
    me = synapse.login(user_id, password)
    devices = synapse.request("GET", "/_matrix/client/v3/devices", token=me.access_token)
    synapse.request("POST", "/_matrix/client/v3/logout", {}, token=me.access_token)
    return [
        d["device_id"] for d in devices["devices"] if d.get("display_name") == "container test bot"
    ]


@pytest.mark.synapse
def test_bot_logs_in_and_answers_healthz(
    image: str, synapse: LocalSynapse, bot_setup: tuple[Path, Path, str, str, int]
) -> None:
    config, data, user_id, password, port = bot_setup
    bot = RunningBot(image, config, data, password, port)
    try:
        ready = bot.wait_ready()
        assert ready["status"] == "ready"
        status, raw = _get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200
        assert json.loads(raw) == {"status": "ok"}
        status, raw = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b"# TYPE" in raw
        first = _bot_devices(synapse, user_id, password)
        assert len(first) == 1, first
    finally:
        rc = bot.stop()
    output = bot.output()
    assert rc == 0, f"SIGTERM should stop the bot cleanly:\n{output[-3000:]}"
    assert password not in output
    assert any(data.iterdir()), "the bot left nothing in its data volume"

    # A restart reuses the device (and its keys) from the data volume.
    again = RunningBot(image, config, data, password, port)
    try:
        again.wait_ready()
    finally:
        again.stop()
    assert _bot_devices(synapse, user_id, password) == first


# ---- plugins from a mounted folder


@pytest.fixture
async def user(synapse: LocalSynapse, tmp_path: Path) -> AsyncIterator[AsyncClient]:
    client = await make_client(synapse, tmp_path)
    try:
        yield client
    finally:
        await close_clients(client)


@pytest.mark.synapse
async def test_mounted_plugins_answer_in_an_encrypted_room(
    image: str,
    synapse: LocalSynapse,
    bot_setup: tuple[Path, Path, str, str, int],
    user: AsyncClient,
) -> None:
    """examples/plugins mounted at /plugins (no rebuild): the README's ``hello`` plugin and the
    shipped ``ping`` answer a real nio client in an encrypted room, and it decrypts both."""
    config, data, user_id, password, port = bot_setup
    with config.open("a") as fh:
        fh.write(
            '\n[verification]\nallowed_users = ["@*:localhost"]\n'
            '\n[keys]\nshare_with = "all"\n'
            '\n[plugins]\nmodules = ["hello", "bot_toolkit.plugins.ping"]\n'
            '\n[plugins.hello]\ngreeting = "hi from the container"\n'
        )
    mount = ["-v", f"{ROOT / 'examples' / 'plugins'}:/plugins:ro"]
    bot = RunningBot(image, config, data, password, port, extra=mount)
    failed: Exception | None = None
    try:
        await asyncio.to_thread(bot.wait_ready)
        replies = Replies(user, user_id)
        async with syncing(user):
            room_id = await room_with_bot(user, user_id)
            pong = await replies.ask(user, room_id, "!ping container")
            assert (pong.body, pong.decrypted) == ("pong container", True)
            hello = await replies.ask(user, room_id, "!hello world")
            assert (hello.body, hello.decrypted) == ("hi from the container, world", True)
    except Exception as e:
        failed = e
    finally:
        rc = await asyncio.to_thread(bot.stop)
    output = bot.output()
    if failed is not None:
        raise AssertionError(f"{failed}\nthe bot's output:\n{output[-6000:]}") from failed
    assert rc == 0, output[-3000:]
    assert "plugin hello stopped" in output and "plugin ping stopped" in output, output[-3000:]
    assert password not in output


def test_check_config_inside_names_a_missing_plugin(image: str, tmp_path: Path) -> None:
    path = _config_file(
        tmp_path,
        (ROOT / "config.example.toml")
        .read_text()
        .replace("modules = []", 'modules = ["not_mounted"]'),
    )
    res = cc(
        "run", "-v", f"{path}:/config/config.toml:ro", "-e", "BOT_TOOLKIT_PASSWORD=x",
        image, "--", "check-config",
    )  # fmt: skip
    assert res.returncode == 2, (res.returncode, res.stderr)
    ours = [line for line in res.stderr.splitlines() if line.startswith("bot-toolkit: ")]
    assert len(ours) == 1, res.stderr  # the rest is podman's own exit report
    expected = "bot-toolkit: config error: plugins.not_mounted: cannot import 'not_mounted'"
    assert ours[0].startswith(expected), res.stderr


# ---- plugins installed into a derived image (the README's recipe)

DERIVED_DOCKERFILE = f"""\
ARG BASE_IMAGE
FROM localhost/{TAG}
USER root
COPY hello_plugin/ /tmp/hello_plugin/
RUN PATH=/usr/local/bin:/usr/bin:/bin python3 -m pip --python /opt/venv/bin/python install \\
      --no-cache-dir /tmp/hello_plugin \\
 && rm -rf /tmp/hello_plugin
USER 10001:10001
"""

HELLO_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "hello-plugin"
version = "1.0"

[project.entry-points."bot_toolkit.plugins"]
hello = "hello_plugin"

[tool.setuptools]
py-modules = ["hello_plugin"]
"""


def test_derived_image_installs_a_plugin_package(image: str, tmp_path: Path) -> None:
    """``FROM`` our image, ``pip install`` a package whose entry point is the README's plugin:
    ``check-config`` in the derived image finds it through ``entry_point_group``."""
    context = tmp_path / "derived"
    package = context / "hello_plugin"
    package.mkdir(parents=True)
    (context / "Dockerfile").write_text(DERIVED_DOCKERFILE)
    (package / "pyproject.toml").write_text(HELLO_PYPROJECT)
    shutil.copy(ROOT / "examples" / "plugins" / "hello.py", package / "hello_plugin.py")
    for path in (context, package, *context.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    derived = "bot-toolkit:derived-test"
    res = subprocess.run(
        [_tool(), "build", derived], cwd=context, capture_output=True, text=True, timeout=900,
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    config = _config_file(
        tmp_path,
        (ROOT / "config.example.toml")
        .read_text()
        .replace(
            '# entry_point_group = "bot_toolkit.plugins"',
            'entry_point_group = "bot_toolkit.plugins"',
        ),
    )
    res = cc(
        "run", "-v", f"{config}:/config/config.toml:ro", "-e", "BOT_TOOLKIT_PASSWORD=x",
        derived, "--", "check-config",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "config OK: /config/config.toml (plugins: hello)" in res.stdout, res.stdout
