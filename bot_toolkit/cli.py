"""The ``bot-toolkit`` command (also ``python -m bot_toolkit``).

Commands: ``run``, ``check-config``, ``demo``, ``healthcheck``,
``identity [status|bootstrap|recover|reset]``; ``--version``.
The config file is ``-c FILE``, else ``$BOT_TOOLKIT_CONFIG``; with neither (or an empty
``BOT_TOOLKIT_CONFIG``) the configuration comes from the environment alone.

Exit codes: 0 clean stop (also after SIGTERM / SIGINT), 2 bad configuration or usage,
1 fatal runtime error. Every failure ends with one line on stderr that names the problem.

``run`` (and ``check-config``) first loads the ``[plugins]`` (a broken plugin exits 2 before
anything connects), then calls ``bot_toolkit.bot.run_bot(config)`` (with ``plugins=`` the loaded
plugins when there are any), which may return an int, None, or an awaitable
of either. An awaitable runs in a fresh event loop; SIGTERM and SIGINT cancel it (exit 0) unless
it installs its own handlers with ``loop.add_signal_handler``. ``demo`` calls
``bot_toolkit.demo.main()`` the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import inspect
import ipaddress
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any, NoReturn

from bot_toolkit import __version__
from bot_toolkit.config import ENV_PREFIX, BotConfig, ConfigError, load_config
from bot_toolkit.logging_setup import active_redactor, setup_logging

__all__ = ["EXIT_CONFIG", "EXIT_FATAL", "EXIT_OK", "main"]

log = logging.getLogger("bot_toolkit.cli")

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CONFIG = 2  # also usage errors (argparse's code)

PROG = "bot-toolkit"


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Matrix bot toolkit: the standalone bot.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help="TOML config file (default: $BOT_TOOLKIT_CONFIG; none: environment only)",
        )

    config_arg(sub.add_parser("run", help="log in, sync and serve HTTP until stopped"))
    config_arg(sub.add_parser("check-config", help="validate the configuration; no network"))
    sub.add_parser("demo", help="throwaway local Synapse, bot, scripted peer verifying by SAS")
    ident = sub.add_parser(
        "identity",
        help="the bot's cross-signing identity: status, bootstrap, recover, reset",
    )
    config_arg(ident)
    ident.add_argument(
        "action",
        nargs="?",
        default="status",
        metavar="ACTION",
        help="status (the default), bootstrap, recover or reset",
    )
    ident.add_argument(
        "--recovery-key-file", metavar="FILE", help="recover: read the recovery key from FILE"
    )
    ident.add_argument(
        "--yes", action="store_true", help="reset: yes, replace the identity (users see a change)"
    )
    health = sub.add_parser("healthcheck", help="GET /healthz of a running bot (for containers)")
    config_arg(health)
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    return parser


def _err(message: str) -> None:
    line = " ".join(active_redactor().redact(message).split())
    print(f"{PROG}: {line}", file=sys.stderr)


def _config_path(args: argparse.Namespace) -> str | None:
    path: str | None = args.config or os.environ.get(f"{ENV_PREFIX}CONFIG") or None
    return path


def _load(args: argparse.Namespace) -> BotConfig | None:
    try:
        return load_config(_config_path(args))
    except ConfigError as e:
        where = e.source
        if where and where != e.key and not where.startswith(ENV_PREFIX):
            _err(f"config error in {where}: {e}")
        else:
            _err(f"config error: {e}")
        return None


def _load_and_log(args: argparse.Namespace) -> BotConfig | None:
    """:func:`_load`, then logging as the config says (for the commands that connect)."""
    config = _load(args)
    if config is not None:
        setup_logging(config.logging.level, config.logging.format, secrets=config.secrets())
    return config


def _with_plugins(config: BotConfig | None) -> tuple[BotConfig, tuple[Any, ...]] | None:
    """``config`` (when it loaded) and its ``[plugins]``, imported, configured and set up;
    None (error printed) when either failed."""
    if config is None:
        return None
    # imported here: nio and the plugins' own imports are not needed by the other commands
    from bot_toolkit.plugin_host import load_plugins  # noqa: PLC0415

    try:
        return config, load_plugins(config.plugins)
    except ConfigError as e:
        _err(f"config error: {e}")
        return None


def _check_config(args: argparse.Namespace) -> int:
    loaded = _with_plugins(_load(args))  # as `run` does before it connects
    if loaded is None:
        return EXIT_CONFIG
    _, plugins = loaded
    names = f" (plugins: {', '.join(p.name for p in plugins)})" if plugins else ""
    print(f"config OK: {_config_path(args) or '(environment)'}{names}")
    return EXIT_OK


async def _until_signal(awaitable: Awaitable[Any]) -> Any:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(awaitable)
    received: list[int] = []

    def stop(signum: int) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        received.append(signum)
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await task
    except asyncio.CancelledError:
        if received:
            return EXIT_OK
        raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _call(target: Callable[..., Any], *call_args: Any) -> int:
    """Run a sync or async entry point and turn its result into an exit code."""
    result = target(*call_args)
    if inspect.isawaitable(result):
        result = asyncio.run(_until_signal(result))
    return result if isinstance(result, int) else EXIT_OK


def _command_module(command: str, name: str) -> ModuleType | None:
    """The module ``command`` runs; None (error printed) when this build does not have it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
    _err(f"fatal: {command} is not available: this build has no {name} module")
    return None


def _guarded(what: str, run: Callable[[], int]) -> int:
    try:
        return run()
    except ConfigError as e:
        _err(f"config error: {e}")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as e:
        # An expected fatal problem (a refused password, an unusable data directory) says all
        # in its one line; anything else is a bug and gets its traceback in the log.
        expected = getattr(e, "one_line", False) is True
        log.critical("%s failed: %s", what, e, exc_info=not expected)
        _err(f"fatal: {what}: {type(e).__name__}: {e}")
        return EXIT_FATAL


def _run(args: argparse.Namespace) -> int:
    loaded = _with_plugins(_load_and_log(args))
    if loaded is None:
        return EXIT_CONFIG
    config, plugins = loaded

    def start() -> int:
        bot = _command_module("run", "bot_toolkit.bot")
        if bot is None:
            return EXIT_FATAL
        log.info("bot-toolkit %s starting as %s", __version__, config.matrix.user_id)
        entry = functools.partial(bot.run_bot, plugins=plugins) if plugins else bot.run_bot
        return _call(entry, config)

    return _guarded("run", start)


def _demo(args: argparse.Namespace) -> int:
    setup_logging("INFO", "text")

    def start() -> int:
        demo = _command_module("demo", "bot_toolkit.demo")
        if demo is None:
            return EXIT_FATAL
        return _call(demo.main)

    return _guarded("demo", start)


def _health_url(config: BotConfig) -> str:
    host = config.http.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"http://{host}:{config.http.port}/healthz"


def _healthcheck(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    if not config.http.enabled:
        print("http is disabled (http.enabled = false); nothing to check")
        return EXIT_OK
    url = _health_url(config)
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        _err(f"unhealthy: {url}: {getattr(e, 'reason', e)}")
        return EXIT_FATAL
    if status != 200:
        _err(f"unhealthy: {url} answered {status}")
        return EXIT_FATAL
    print(f"healthy: {url}")
    return EXIT_OK


def _identity(args: argparse.Namespace) -> int:
    config = _load_and_log(args)
    if config is None:
        return EXIT_CONFIG
    from bot_toolkit.identity.operator import (  # noqa: PLC0415 - nio only for this command
        IdentityCommandError,
        run_identity_command,
    )

    def start() -> int:
        try:
            _call(
                functools.partial(
                    run_identity_command,
                    config,
                    args.action,
                    recovery_key_file=args.recovery_key_file,
                    yes=args.yes,
                )
            )
        except IdentityCommandError as e:
            _err(f"identity {args.action}: {e}")
            return EXIT_FATAL
        return EXIT_OK

    return _guarded("identity", start)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run,
    "check-config": _check_config,
    "demo": _demo,
    "healthcheck": _healthcheck,
    "identity": _identity,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return the exit code."""
    args = _parser().parse_args(argv)
    return _COMMANDS[args.command](args)
