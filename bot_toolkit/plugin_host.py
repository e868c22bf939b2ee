"""The user's handler modules ("plugins") in the standalone bot: loading, settings, lifecycle.

A plugin is an importable module with a ``setup(plugin)`` function and, optionally, a ``Config``
class (a frozen dataclass or a ``msgspec.Struct``) that its ``[plugins.<name>]`` table is
converted into::

    # my_bot/hello.py
    @dataclass(frozen=True)
    class Config:
        greeting: str = "hello"

    def setup(plugin: Plugin[Config]) -> None:
        @plugin.command("hello")
        async def hello(msg: RoomMessage, cmd: Command) -> None:
            await plugin.reply(msg, f"{plugin.config.greeting}, {cmd.text or msg.sender}")

:func:`load_plugins` imports the modules named in ``[plugins] modules`` and the entry points of
``[plugins] entry_point_group``, converts each settings table and calls ``setup``, which
registers handlers (:meth:`Plugin.on` for any event class the dispatcher carries: to-device
events, verification lifecycle events, :class:`~bot_toolkit.room_messages.RoomMessage`;
:meth:`Plugin.command` for ``!name args``) and start/stop hooks. Every problem there (a missing
module, a syntax error, bad settings, a failing ``setup``, a handler that is not ``async def``)
raises :class:`PluginError`, a :class:`~bot_toolkit.config.ConfigError` naming the plugin, so
``check-config`` finds it and ``run`` stops before it connects (exit code 2).

:class:`PluginHost` runs them: :meth:`PluginHost.attach` registers the handlers on the bot's
dispatcher (and feeds it room messages), :meth:`PluginHost.start` runs the start hooks (a
failure is a :class:`PluginError` too), :meth:`PluginHost.stop` the stop hooks in reverse order.
Each handler and hook is cut off after ``[plugins] handler_timeout`` seconds
(:class:`PluginTimeout`); a handler that raises or times out is logged and counted by the
dispatcher like any handler (``handler_errors_total``) and affects nothing else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import ModuleType
from typing import Any, Generic, TypeVar

import msgspec
from nio import AsyncClient, RoomSendResponse

from bot_toolkit.config import ConfigError, PluginsConfig
from bot_toolkit.dispatcher import Dispatcher, _check_async
from bot_toolkit.room_messages import (
    Command,
    RoomMessage,
    RoomMessageFeed,
    parse_command,
    reply_content,
)
from bot_toolkit.toolkit import BotToolkit

__all__ = [
    "Plugin",
    "PluginError",
    "PluginHost",
    "PluginSendError",
    "PluginTimeout",
    "load_plugins",
]

log = logging.getLogger("bot_toolkit.plugin_host")

C = TypeVar("C")
E = TypeVar("E")
Handler = Callable[[Any], Awaitable[None]]
CommandHandler = Callable[[RoomMessage, Command], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]


class PluginError(ConfigError):
    """A plugin cannot be loaded, configured or started; the key is ``plugins.<name>``."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"plugins.{name}", message)
        self.plugin = name


class PluginTimeout(TimeoutError):
    """A plugin's handler or hook ran longer than ``[plugins] handler_timeout``."""

    def __init__(self, plugin: str, what: str, timeout: float) -> None:
        super().__init__(f"plugin {plugin}: {what} did not finish within {timeout:g}s")


class PluginSendError(RuntimeError):
    """The homeserver (or nio) refused a message a plugin sent."""


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def _named(func: Callable[..., Any], like: object, suffix: str = "") -> None:
    """Give a wrapper the name of what it wraps (metrics and logs name the user's function)."""
    func.__module__ = getattr(like, "__module__", None) or func.__module__
    func.__qualname__ = (getattr(like, "__qualname__", None) or func.__qualname__) + suffix


@dataclasses.dataclass(frozen=True, slots=True)
class _Registration:
    event_cls: type[Any]
    handler: Handler
    filters: tuple[Callable[[Any], bool], ...]


class Plugin(Generic[C]):
    """What a plugin's ``setup(plugin)`` receives: its name, settings, logger and registrations.

    ``config`` is the plugin's ``Config`` built from ``[plugins.<name>]`` (``None`` when the
    plugin has no ``Config``). :attr:`client` and the send helpers work once the bot runs (in
    handlers and start/stop hooks), not inside ``setup``.
    """

    def __init__(self, name: str, config: C, command_prefix: str) -> None:
        self.name = name
        self.config = config
        self.command_prefix = command_prefix
        self.log = logging.getLogger(f"bot_toolkit.plugin.{name}")
        self._registrations: list[_Registration] = []
        self._start: list[Hook] = []
        self._stop: list[Hook] = []
        self._checker = Dispatcher()  # validates registrations now, like the real one will
        self._client: AsyncClient | None = None

    # ------------------------------------------------------------------ registration

    def on(
        self, event_cls: type[E], *filters: Callable[[E], bool]
    ) -> Callable[[Callable[[E], Awaitable[None]]], Callable[[E], Awaitable[None]]]:
        """Decorator: call ``async def handler(event)`` for each ``event_cls`` event passing
        ``filters`` (like :meth:`Dispatcher.on <bot_toolkit.dispatcher.Dispatcher.on>`)."""

        def decorate(handler: Callable[[E], Awaitable[None]]) -> Callable[[E], Awaitable[None]]:
            self._checker.register(event_cls, handler, *filters)
            self._registrations.append(_Registration(event_cls, handler, tuple(filters)))
            return handler

        return decorate

    def command(self, name: str) -> Callable[[CommandHandler], CommandHandler]:
        """Decorator: call ``async def handler(msg, cmd)`` for messages ``<prefix><name> ...``.

        The prefix is ``[plugins] command_prefix`` (``!``); names compare case-insensitively.
        """
        wanted = name.lower()
        if not wanted or any(c.isspace() for c in wanted):
            raise ValueError(f"command name must be one word, got {name!r}")
        prefix = self.command_prefix

        def matches(msg: RoomMessage) -> bool:
            cmd = parse_command(msg.body, prefix)
            return cmd is not None and cmd.name == wanted

        def decorate(handler: CommandHandler) -> CommandHandler:
            _check_async(handler, 2, "command handler")

            async def run(msg: RoomMessage) -> None:
                cmd = parse_command(msg.body, prefix)
                assert cmd is not None  # the filter matched
                await handler(msg, cmd)

            _named(run, handler)
            self.on(RoomMessage, matches)(run)
            return handler

        return decorate

    def on_start(self, hook: Hook) -> Hook:
        """Decorator: ``async def hook()`` once the bot is logged in, before it syncs.

        A hook that raises (or times out) stops the bot with a config error naming the plugin.
        """
        _check_async(hook, 0, "start hook")
        self._start.append(hook)
        return hook

    def on_stop(self, hook: Hook) -> Hook:
        """Decorator: ``async def hook()`` at shutdown (failures are logged)."""
        _check_async(hook, 0, "stop hook")
        self._stop.append(hook)
        return hook

    # ------------------------------------------------------------------ at run time

    @property
    def client(self) -> AsyncClient:
        """The bot's nio client (``RuntimeError`` before the bot runs)."""
        if self._client is None:
            raise RuntimeError(f"plugin {self.name}: the client exists once the bot runs")
        return self._client

    async def send_text(self, room_id: str, text: str, *, notice: bool = True) -> str:
        """Send ``text`` to a room (encrypted when the room is); returns the event id."""
        return await self._send(
            room_id, {"msgtype": "m.notice" if notice else "m.text", "body": text}
        )

    async def reply(self, to: RoomMessage, text: str, *, notice: bool = True) -> str:
        """Answer ``to`` in its room with a rich reply (encrypted when the room is)."""
        return await self._send(to.room_id, reply_content(to, text, notice=notice))

    async def _send(self, room_id: str, content: dict[str, Any]) -> str:
        # nio encrypts for encrypted rooms; which devices get the room key is the bot's
        # [keys] policy (key sharing), so unverified devices are not refused here.
        resp = await self.client.room_send(
            room_id, "m.room.message", content, ignore_unverified_devices=True
        )
        if not isinstance(resp, RoomSendResponse):
            raise PluginSendError(f"sending to {room_id} failed: {resp}")
        return str(resp.event_id)


# ----------------------------------------------------------------------------- loading


def _settings(name: str, source: object, table: Mapping[str, Any] | None) -> Any:
    cls = getattr(source, "Config", None)
    if cls is None:
        if table:
            raise PluginError(name, "this plugin takes no settings; remove the table")
        return None
    if not isinstance(cls, type):
        raise PluginError(name, "Config must be a class (a dataclass or msgspec.Struct)")
    table = dict(table or {})
    if dataclasses.is_dataclass(cls):
        known = [f.name for f in dataclasses.fields(cls)]
    elif issubclass(cls, msgspec.Struct):
        known = list(cls.__struct_fields__)
    else:
        raise PluginError(name, "Config must be a dataclass or a msgspec.Struct")
    for key in table:
        if key not in known:
            raise PluginError(name, f"unknown setting {key!r} (known: {', '.join(known)})")
    try:
        return msgspec.convert(table, cls, strict=True)
    except msgspec.ValidationError as e:
        raise PluginError(name, f"bad settings: {e}") from None


def _import(name: str, module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except SyntaxError as e:
        where = f" ({e.filename}, line {e.lineno})" if e.filename else ""
        raise PluginError(name, f"cannot import {module!r}: SyntaxError: {e.msg}{where}") from None
    except Exception as e:
        raise PluginError(name, f"cannot import {module!r}: {_describe(e)}") from None


def _sources(config: PluginsConfig) -> list[tuple[str, Callable[[], object]]]:
    """(plugin name, loader) for every configured module and entry point, in config order."""
    found: list[tuple[str, Callable[[], object]]] = []
    for module in config.modules:
        short = module.rsplit(".", 1)[-1]
        found.append((short, functools.partial(_import, short, module)))
    if config.entry_point_group:
        for ep in importlib.metadata.entry_points(group=config.entry_point_group):

            def load(ep: importlib.metadata.EntryPoint = ep) -> object:
                try:
                    return ep.load()
                except Exception as e:
                    raise PluginError(
                        ep.name, f"cannot load entry point {ep.value!r}: {_describe(e)}"
                    ) from None

            found.append((ep.name, load))
    return found


def load_plugins(config: PluginsConfig) -> tuple[Plugin[Any], ...]:
    """Import, configure and set up every plugin of ``config``; see the module doc.

    Raises:
        PluginError: the first plugin that fails, with its name and the reason on one line.
    """
    reserved = {f.name for f in dataclasses.fields(PluginsConfig)}
    sources = _sources(config)
    names = [name for name, _ in sources]
    for name in names:
        if name in reserved:
            raise PluginError(name, f"a plugin cannot be named {name!r} (a [plugins] key)")
        if names.count(name) > 1:
            raise PluginError(name, "two plugins have this name")
    for table in config.settings:
        if table not in names:
            loaded = ", ".join(names) or "none"
            raise PluginError(table, f"settings for a plugin that is not loaded (loaded: {loaded})")
    plugins: list[Plugin[Any]] = []
    for name, load in sources:
        source = load()
        setup = getattr(source, "setup", None)
        if not callable(setup):
            raise PluginError(name, "has no setup(plugin) function")
        plugin: Plugin[Any] = Plugin(
            name, _settings(name, source, config.settings.get(name)), config.command_prefix
        )
        try:
            result = setup(plugin)
        except PluginError:
            raise
        except Exception as e:
            raise PluginError(name, f"setup failed: {_describe(e)}") from None
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise PluginError(name, "setup must be a plain function; use plugin.on_start")
        plugins.append(plugin)
        log.debug("plugin %s loaded (%d handlers)", name, len(plugin._registrations))
    return tuple(plugins)


# ----------------------------------------------------------------------------- running


class PluginHost:
    """Runs loaded plugins on one client and dispatcher; see the module doc."""

    def __init__(self, plugins: tuple[Plugin[Any], ...], config: PluginsConfig) -> None:
        self.plugins = plugins
        self.timeout = config.handler_timeout
        self.feed: RoomMessageFeed | None = None
        self._started: list[Plugin[Any]] = []

    @property
    def running(self) -> bool:
        """Whether some plugin has started and not stopped yet."""
        return bool(self._started)

    def attach(self, toolkit: BotToolkit) -> None:
        """Register every plugin's handlers on ``toolkit`` and feed its dispatcher room
        messages (before :meth:`BotToolkit.start <bot_toolkit.toolkit.BotToolkit.start>`)."""
        for plugin in self.plugins:
            plugin._client = toolkit.client
            for reg in plugin._registrations:
                toolkit.on(reg.event_cls, *reg.filters)(self._guarded(plugin, reg.handler))
        if self.plugins:
            self.feed = RoomMessageFeed(
                toolkit.client, toolkit.dispatcher, trust=toolkit.sender_trust
            )

    def _guarded(self, plugin: Plugin[Any], handler: Handler) -> Handler:
        timeout = self.timeout

        async def guarded(event: Any) -> None:
            scope = asyncio.timeout(timeout)
            try:
                async with scope:
                    await handler(event)
            except TimeoutError:
                if scope.expired():
                    raise PluginTimeout(plugin.name, "a handler", timeout) from None
                raise

        _named(guarded, handler)
        return guarded

    async def _hook(self, plugin: Plugin[Any], hook: Hook, what: str) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await hook()
        except TimeoutError:
            raise PluginTimeout(plugin.name, what, self.timeout) from None

    async def start(self) -> None:
        """Run the start hooks, plugin by plugin. Raises :class:`PluginError` on the first
        failure (the plugins started before it are stopped by :meth:`stop`)."""
        for plugin in self.plugins:
            self._started.append(plugin)
            for hook in plugin._start:
                try:
                    await self._hook(plugin, hook, "start hook")
                except Exception as e:
                    raise PluginError(plugin.name, f"start failed: {_describe(e)}") from None
            log.info("plugin %s started", plugin.name)

    async def stop(self) -> None:
        """Run the stop hooks of the started plugins, last started first; failures are logged."""
        if self.feed is not None:
            self.feed.detach()
        while self._started:
            plugin = self._started.pop()
            for hook in reversed(plugin._stop):
                try:
                    await self._hook(plugin, hook, "stop hook")
                except Exception as e:
                    log.error("plugin %s: stop hook failed: %s", plugin.name, _describe(e))
            log.info("plugin %s stopped", plugin.name)
