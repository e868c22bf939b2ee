"""Plugins without a homeserver: loading, settings, every config-time error, commands, the
room-message conversion, and handler isolation on a real Dispatcher.

The end-to-end half (``bot-toolkit run`` answering ``!ping`` in an encrypted room) is
``tests/test_plugins_e2e.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from nio import (
    AsyncClient,
    AsyncClientConfig,
    MatrixRoom,
    RoomMessageNotice,
    RoomMessageText,
    SyncResponse,
)

from bot_toolkit.config import ConfigError, PluginsConfig, load_config
from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.metrics import Metrics
from bot_toolkit.plugin_host import Plugin, PluginError, PluginHost, PluginTimeout, load_plugins
from bot_toolkit.plugins import ping
from bot_toolkit.room_messages import (
    Command,
    RoomMessage,
    RoomMessageFeed,
    SenderTrust,
    parse_command,
    reply_content,
    to_room_message,
)
from bot_toolkit.verification import VerificationDone

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = '[matrix]\nhomeserver = "http://127.0.0.1:1"\nuser_id = "@bot:localhost"\n'
ENV = {"BOT_TOOLKIT_PASSWORD": "x"}


def _config(tmp_path: Path, extra: str, env: dict[str, str] | None = None) -> PluginsConfig:
    path = tmp_path / "bot.toml"
    path.write_text(MINIMAL + textwrap.dedent(extra))
    return load_config(path, {**ENV, **(env or {})}).plugins


def _module(where: Path, name: str, code: str) -> None:
    (where / f"{name}.py").write_text(textwrap.dedent(code))


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "plugins"
    where.mkdir()
    monkeypatch.syspath_prepend(str(where))
    return where


def _message(body: str, sender: str = "@alice:localhost", **kw: Any) -> RoomMessage:
    return RoomMessage(
        room_id="!room:localhost",
        event_id=f"$ev-{body}",
        sender=sender,
        body=body,
        msgtype="m.text",
        encrypted=True,
        origin_server_ts=1,
        **kw,
    )


# ---- loading and settings


def test_example_plugin_loads_with_defaults_and_settings(tmp_path: Path) -> None:
    cfg = _config(tmp_path, '[plugins]\nmodules = ["bot_toolkit.plugins.ping"]\n')
    (plugin,) = load_plugins(cfg)
    assert plugin.name == "ping"
    assert plugin.config == ping.Config()
    assert {r.event_cls for r in plugin._registrations} == {RoomMessage, VerificationDone}

    cfg = _config(
        tmp_path,
        """
        [plugins]
        modules = ["bot_toolkit.plugins.ping"]
        command_prefix = "?"
        [plugins.ping]
        answer = "PONG"
        """,
    )
    (plugin,) = load_plugins(cfg)
    assert plugin.config == ping.Config(answer="PONG")
    assert plugin.command_prefix == "?"


def test_modules_from_the_environment(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "", {"BOT_TOOLKIT_PLUGINS_MODULES": "bot_toolkit.plugins.ping, "})
    assert cfg.modules == ("bot_toolkit.plugins.ping",)
    assert [p.name for p in load_plugins(cfg)] == ["ping"]


def test_no_plugins_configured_loads_nothing(tmp_path: Path) -> None:
    assert load_plugins(_config(tmp_path, "")) == ()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            '[plugins]\nmodules = ["no_such_plugin_xyz"]\n',
            "plugins.no_such_plugin_xyz: cannot import 'no_such_plugin_xyz': "
            "ModuleNotFoundError: No module named 'no_such_plugin_xyz'",
        ),
        (
            '[plugins]\nmodules = ["bot_toolkit.plugins.ping"]\n[plugins.ping]\nanswer = 5\n',
            "plugins.ping: bad settings: Expected `str`, got `int` - at `$.answer`",
        ),
        (
            '[plugins]\nmodules = ["bot_toolkit.plugins.ping"]\n[plugins.ping]\nanwser = "x"\n',
            "plugins.ping: unknown setting 'anwser' (known: answer)",
        ),
        (
            '[plugins]\nmodules = ["bot_toolkit.plugins.ping"]\n[plugins.pong]\nanswer = "x"\n',
            "plugins.pong: settings for a plugin that is not loaded (loaded: ping)",
        ),
        (
            '[plugins]\nmodules = ["bot_toolkit.plugins.ping", "x.ping"]\n',
            "plugins.ping: two plugins have this name",
        ),
        ('[plugins]\nmodules = ["a.modules"]\n', "plugins.modules: a plugin cannot be named"),
        ('[plugins]\nmodules = ["json"]\n', "plugins.json: has no setup(plugin) function"),
        ('[plugins]\nmodules = ["not a module"]\n', "plugins.modules[0]: expected a module name"),
        ("[plugins]\nhandler_timeout = 0\n", "plugins.handler_timeout: must be greater than 0"),
    ],
)
def test_config_errors_name_the_plugin(tmp_path: Path, extra: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:  # PluginError is one
        load_plugins(_config(tmp_path, extra))
    assert str(info.value).startswith(expected), str(info.value)


def test_broken_plugin_modules(tmp_path: Path, plugin_dir: Path) -> None:
    _module(plugin_dir, "broken_syntax", "def setup(plugin:\n    pass\n")
    _module(plugin_dir, "raises_on_import", "raise RuntimeError('no database')\n")
    _module(plugin_dir, "setup_raises", "def setup(plugin):\n    raise KeyError('token')\n")
    _module(
        plugin_dir,
        "sync_handler",
        """
        from bot_toolkit.room_messages import RoomMessage
        def setup(plugin):
            @plugin.on(RoomMessage)
            def handler(msg):
                pass
        """,
    )
    _module(plugin_dir, "async_setup", "async def setup(plugin):\n    pass\n")
    _module(plugin_dir, "bad_config", "Config = 3\ndef setup(plugin):\n    pass\n")
    expected = {
        "broken_syntax": "plugins.broken_syntax: cannot import 'broken_syntax': SyntaxError: ",
        "raises_on_import": "plugins.raises_on_import: cannot import 'raises_on_import': "
        "RuntimeError: no database",
        "setup_raises": "plugins.setup_raises: setup failed: KeyError: 'token'",
        "sync_handler": "plugins.sync_handler: setup failed: TypeError: handler must be an "
        "async function",
        "async_setup": "plugins.async_setup: setup must be a plain function",
        "bad_config": "plugins.bad_config: Config must be a class",
    }
    for module, message in expected.items():
        with pytest.raises(PluginError) as info:
            load_plugins(_config(tmp_path, f'[plugins]\nmodules = ["{module}"]\n'))
        assert str(info.value).startswith(message), str(info.value)
        assert info.value.plugin == module
        assert "\n" not in str(info.value)


def test_msgspec_struct_settings_and_required_fields(tmp_path: Path, plugin_dir: Path) -> None:
    _module(
        plugin_dir,
        "structured",
        """
        import msgspec
        class Config(msgspec.Struct, frozen=True):
            room: str
            limit: int = 3
        def setup(plugin):
            pass
        """,
    )
    base = '[plugins]\nmodules = ["structured"]\n'
    (plugin,) = load_plugins(_config(tmp_path, base + '[plugins.structured]\nroom = "!r:x"\n'))
    assert (plugin.config.room, plugin.config.limit) == ("!r:x", 3)
    with pytest.raises(PluginError, match=r"^plugins.structured: bad settings: Object missing"):
        load_plugins(_config(tmp_path, base))


def test_entry_point_group(tmp_path: Path, plugin_dir: Path) -> None:
    """A pip-installed plugin: an entry point in a real dist-info on sys.path."""
    _module(plugin_dir, "ep_plugin_impl", "def setup(plugin):\n    plugin.log.info('hi')\n")
    info = plugin_dir / "ep_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[bot_toolkit_test.plugins]\nhello = ep_plugin_impl\nbroken = no_such_module_xyz\n"
    )
    cfg = _config(tmp_path, '[plugins]\nentry_point_group = "bot_toolkit_test.plugins"\n')
    with pytest.raises(PluginError, match=r"^plugins.broken: cannot load entry point"):
        load_plugins(cfg)
    (info / "entry_points.txt").write_text("[bot_toolkit_test.plugins]\nhello = ep_plugin_impl\n")
    assert [p.name for p in load_plugins(cfg)] == ["hello"]


# ---- commands, messages


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("!ping", Command("ping", (), "")),
        ("  !PING a  b\nsecond line", Command("ping", ("a", "b"), "a  b")),
        ("!ping   spaced ", Command("ping", ("spaced",), "spaced")),
        ("! ping", None),
        ("!", None),
        ("ping", None),
        ("", None),
    ],
)
def test_parse_command(body: str, expected: Command | None) -> None:
    assert parse_command(body) == expected


def test_reply_content_is_a_rich_reply_notice() -> None:
    content = reply_content(_message("!ping"), "pong")
    assert content == {
        "msgtype": "m.notice",
        "body": "pong",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$ev-!ping"}},
    }
    assert reply_content(_message("!x"), "y", notice=False)["msgtype"] == "m.text"


def _nio_event(cls: Any, content: dict[str, Any]) -> Any:
    return cls.from_dict(
        {
            "type": "m.room.message",
            "event_id": "$e1",
            "sender": "@alice:localhost",
            "origin_server_ts": 1234,
            "content": content,
        }
    )


def test_room_message_from_nio_events() -> None:
    room = MatrixRoom("!r:localhost", "@bot:localhost")
    plain = to_room_message(room, _nio_event(RoomMessageText, {"msgtype": "m.text", "body": "hi"}))
    assert plain == RoomMessage(
        "!r:localhost", "$e1", "@alice:localhost", "hi", "m.text", False, 1234
    )
    assert plain.sender_trust is SenderTrust.UNKNOWN

    event = _nio_event(RoomMessageNotice, {"msgtype": "m.notice", "body": "n"})
    event.decrypted, event.verified, event.sender_key = True, False, "curve"
    msg = to_room_message(room, event)
    assert msg is not None
    assert (msg.encrypted, msg.msgtype, msg.sender_key) == (True, "m.notice", "curve")
    assert msg.sender_trust is SenderTrust.UNVERIFIED
    event.verified = True
    verified = to_room_message(room, event)
    assert verified is not None and verified.sender_trust is SenderTrust.VERIFIED


# ---- isolation on a real dispatcher


def _plugin(name: str, setup: Any, timeout: float = 0.5) -> tuple[PluginHost, Plugin[Any]]:
    plugin: Plugin[Any] = Plugin(name, None, "!")
    setup(plugin)
    return PluginHost((plugin,), PluginsConfig(handler_timeout=timeout)), plugin


@pytest.mark.handler_errors
async def test_raising_and_hanging_handlers_are_isolated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answered: list[str] = []
    hung = asyncio.Event()

    def faulty(plugin: Plugin[Any]) -> None:
        @plugin.on(RoomMessage)
        async def misbehave(msg: RoomMessage) -> None:
            if "boom" in msg.body:
                raise RuntimeError("boom")
            if "hang" in msg.body:
                hung.set()
                await asyncio.Event().wait()

    def good(plugin: Plugin[Any]) -> None:
        @plugin.command("ping")
        async def pong(msg: RoomMessage, cmd: Command) -> None:
            answered.append(cmd.text)

    metrics = Metrics()
    dispatcher = Dispatcher(metrics)
    hosts = [_plugin("faulty", faulty)[0], _plugin("good", good)[0]]
    for host in hosts:
        # no client in this test: register the handlers the way attach() does
        for plugin in host.plugins:
            for reg in plugin._registrations:
                dispatcher.register(reg.event_cls, host._guarded(plugin, reg.handler), *reg.filters)
    await dispatcher.start()
    try:
        with caplog.at_level(logging.ERROR):
            await dispatcher.put(_message("!ping boom"))
            await dispatcher.put(_message("!ping hang"))
            await dispatcher.put(_message("!ping after"))  # same sender: waits for the hang
            async with asyncio.timeout(10):
                assert await dispatcher.join()
    finally:
        await dispatcher.close(5)
    assert hung.is_set()
    assert answered == ["boom", "hang", "after"]
    errors = metrics.get("handler_errors_total")
    assert errors is not None
    name = f"{__name__}.test_raising_and_hanging_handlers_are_isolated.<locals>.faulty.<locals>"
    assert errors.get(f"{name}.misbehave", "m.room.message", "exception") == 2
    assert "plugin faulty: a handler did not finish within 0.5s" in caplog.text
    assert "RuntimeError: boom" in caplog.text


async def test_start_failure_names_the_plugin_and_stop_runs_started_ones() -> None:
    calls: list[str] = []

    def first(plugin: Plugin[Any]) -> None:
        @plugin.on_start
        async def start() -> None:
            calls.append("first start")

        @plugin.on_stop
        async def stop() -> None:
            calls.append("first stop")
            raise RuntimeError("stop fails, is logged")

    def second(plugin: Plugin[Any]) -> None:
        @plugin.on_start
        async def start() -> None:
            await asyncio.Event().wait()  # hangs: the host's timeout ends it

    p1: Plugin[Any] = Plugin("first", None, "!")
    p2: Plugin[Any] = Plugin("second", None, "!")
    first(p1)
    second(p2)
    host = PluginHost((p1, p2), PluginsConfig(handler_timeout=0.2))
    with pytest.raises(PluginError) as info:
        await host.start()
    assert str(info.value) == (
        "plugins.second: start failed: PluginTimeout: plugin second: start hook did not finish "
        "within 0.2s"
    )
    await host.stop()
    assert calls == ["first start", "first stop"]
    assert issubclass(PluginTimeout, TimeoutError)


def test_hooks_and_commands_are_checked_at_setup() -> None:
    plugin: Plugin[Any] = Plugin("p", None, "!")
    with pytest.raises(TypeError, match="start hook must be an async function"):
        plugin.on_start(lambda: None)  # type: ignore[arg-type,return-value]

    async def one_arg(msg: RoomMessage) -> None:
        pass

    with pytest.raises(TypeError, match=r"command handler .* must accept 2"):
        plugin.command("x")(one_arg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one word"):
        plugin.command("two words")
    with pytest.raises(RuntimeError, match="once the bot runs"):
        _ = plugin.client


# ---- the CLI: check-config exits 2 with one line


def _cli(
    tmp_path: Path, plugin_dir: Path, extra: str, command: str = "check-config"
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "cli.toml"
    path.write_text(MINIMAL + textwrap.dedent(extra))
    env = {
        **os.environ,
        **ENV,
        "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(ROOT)]),
    }
    return subprocess.run(
        [sys.executable, "-m", "bot_toolkit", command, "-c", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_check_config_reports_plugin_errors_in_one_line(tmp_path: Path, plugin_dir: Path) -> None:
    _module(plugin_dir, "cli_broken", "def setup(plugin)\n")
    cases = {
        '[plugins]\nmodules = ["cli_missing_xyz"]\n': "plugins.cli_missing_xyz: cannot import",
        '[plugins]\nmodules = ["cli_broken"]\n': "plugins.cli_broken: cannot import 'cli_broken': "
        "SyntaxError",
        '[plugins]\nmodules = ["bot_toolkit.plugins.ping"]\n[plugins.ping]\nanswer = []\n': (
            "plugins.ping: bad settings: Expected `str`, got `array`"
        ),
    }
    for (extra, expected), command in itertools.product(cases.items(), ("check-config", "run")):
        # `run` stops before it connects (the homeserver in MINIMAL does not exist)
        res = _cli(tmp_path, plugin_dir, extra, command)
        assert res.returncode == 2, res
        lines = res.stderr.splitlines()
        assert len(lines) == 1, res.stderr
        assert lines[0].startswith(f"bot-toolkit: config error: {expected}"), lines[0]

    res = _cli(tmp_path, plugin_dir, '[plugins]\nmodules = ["bot_toolkit.plugins.ping"]\n')
    assert res.returncode == 0, res.stderr
    assert "config OK: " in res.stdout and "(plugins: ping)" in res.stdout


# ---- the README's plugin is examples/plugins/hello.py, and it loads


def test_readme_plugin_is_the_example_file_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = ROOT / "examples" / "plugins" / "hello.py"
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{example.read_text()}```" in readme
    monkeypatch.syspath_prepend(str(example.parent))
    cfg = _config(tmp_path, '[plugins]\nmodules = ["hello"]\n[plugins.hello]\ngreeting = "hi"\n')
    (plugin,) = load_plugins(cfg)
    assert plugin.config.greeting == "hi"
    assert len(plugin._start) == len(plugin._stop) == 1


# ---- the feed, through nio's own sync handling (no network)


def _sync(events: list[dict[str, Any]], batch: str) -> SyncResponse:
    room = {
        "timeline": {"events": events, "limited": False, "prev_batch": "p0"},
        "state": {"events": []},
        "ephemeral": {"events": []},
        "account_data": {"events": []},
        "summary": {},
        "unread_notifications": {},
    }
    response = SyncResponse.from_dict(
        {
            "next_batch": batch,
            "rooms": {"join": {"!r:localhost": room}, "invite": {}, "leave": {}},
            "to_device": {"events": []},
            "presence": {"events": []},
            "account_data": {"events": []},
            "device_lists": {"changed": [], "left": []},
            "device_one_time_keys_count": {},
        }
    )
    assert isinstance(response, SyncResponse), response
    return response


def _wire(event_id: str, sender: str, ts: int, content: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": event_id,
        "sender": sender,
        "origin_server_ts": ts,
        "content": content,
    }


async def test_feed_skips_own_and_old_messages_and_keeps_order() -> None:
    client = AsyncClient(
        "http://127.0.0.1:1", "@bot:localhost", config=AsyncClientConfig(encryption_enabled=False)
    )
    client.restore_login("@bot:localhost", "BOTDEVICE", "not-a-real-token")
    metrics = Metrics()
    dispatcher = Dispatcher(metrics)
    got: list[RoomMessage] = []

    @dispatcher.on(RoomMessage)
    async def record(msg: RoomMessage) -> None:
        got.append(msg)

    feed = RoomMessageFeed(client, dispatcher, since_ms=1_000)
    await dispatcher.start()
    try:
        text = {"msgtype": "m.text", "body": "!ping"}
        await client.receive_response(
            _sync(
                [
                    _wire("$old", "@alice:localhost", 999, text),  # before the feed started
                    _wire("$own", "@bot:localhost", 2_000, text),  # the bot's own message
                    _wire("$new", "@alice:localhost", 2_000, text),
                    _wire("$emote", "@alice:localhost", 2_001, {"msgtype": "m.emote", "body": "w"}),
                    _wire("$image", "@alice:localhost", 2_002, {"msgtype": "m.image", "body": "i"}),
                ],
                "s1",
            )
        )  # fmt: skip
        async with asyncio.timeout(10):
            assert await dispatcher.join()
        feed.detach()
        await client.receive_response(
            _sync([_wire("$late", "@alice:localhost", 3_000, text)], "s2")
        )
        async with asyncio.timeout(10):
            assert await dispatcher.join()
    finally:
        await dispatcher.close(5)
        await client.close()
    assert [(m.event_id, m.msgtype, m.encrypted) for m in got] == [
        ("$new", "m.text", False),
        ("$emote", "m.emote", False),
    ]
    counted = metrics.get("room_messages_total")
    assert counted is not None
    assert (counted.get("old"), counted.get("own"), counted.get("dispatched")) == (1, 1, 2)
