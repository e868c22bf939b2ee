"""Configuration of the standalone bot: a TOML file plus environment overrides, checked once.

:func:`load_config` reads the file (or nothing), applies the environment, and returns a frozen
:class:`BotConfig`. Every problem raises :class:`ConfigError`, whose message starts with the
dotted key (``verification.confirm: expected one of 'auto', 'operator', got 'maybe'``).

Environment scheme (the environment wins over the file; an empty variable counts as unset):

- secrets have short names: ``BOT_TOOLKIT_PASSWORD`` (``matrix.password``),
  ``BOT_TOOLKIT_ACCESS_TOKEN`` (``matrix.access_token``), ``BOT_TOOLKIT_ADMIN_TOKEN``
  (``http.admin_token``);
- every other key is ``BOT_TOOLKIT_<SECTION>_<KEY>``, e.g. ``BOT_TOOLKIT_MATRIX_HOMESERVER``,
  ``BOT_TOOLKIT_HTTP_PORT``, ``BOT_TOOLKIT_VERIFICATION_ALLOWED_USERS`` (lists: comma-separated;
  booleans: true/false/1/0/yes/no/on/off).

Without a file the whole configuration comes from the environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hmac
import ipaddress
import math
import os
import re
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, Union, final, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

__all__ = [
    "ENV_PREFIX",
    "LOOPBACK_HOSTS",
    "SECRET_ENV",
    "BotConfig",
    "ConfigError",
    "HttpConfig",
    "IdentityConfig",
    "KeysConfig",
    "LoggingConfig",
    "MatrixConfig",
    "OutboxConfig",
    "PluginsConfig",
    "Secret",
    "StorageConfig",
    "VerificationConfig",
    "load_config",
]

ENV_PREFIX: Final = "BOT_TOOLKIT_"
"""Prefix of every environment variable the configuration reads."""

SECRET_ENV: Final[Mapping[str, str]] = {
    "matrix.password": "BOT_TOOLKIT_PASSWORD",
    "matrix.access_token": "BOT_TOOLKIT_ACCESS_TOKEN",
    "http.admin_token": "BOT_TOOLKIT_ADMIN_TOKEN",
    "identity.recovery_key": "BOT_TOOLKIT_IDENTITY_RECOVERY_KEY",
    "identity.passphrase": "BOT_TOOLKIT_IDENTITY_PASSPHRASE",
}
"""The environment variable that supplies each secret key."""


class ConfigError(ValueError):
    """A configuration problem; ``str()`` is ``"<dotted key>: <message>"``.

    ``source`` says where the bad value came from (a file path or an environment variable), if
    known. For unreadable or invalid TOML the key is the file path.
    """

    def __init__(self, key: str, message: str, *, source: str | None = None) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
        self.source = source


@final
class Secret:
    """A string that never shows itself in ``repr()``, ``str()`` or f-strings.

    :meth:`reveal` gives the value; equality is compared in constant time.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value itself."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


# ---- value checks: (key, value) -> value

_USER_ID = re.compile(
    r"@(?P<localpart>[^:\s]+):(?P<server>(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::\d{1,5})?)"
)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_MIN_ADMIN_TOKEN = 16


def _homeserver(key: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"expected an http:// or https:// URL, got {url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(key, "must not contain credentials, a query or a fragment")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(key, f"bad port in {url!r}") from None
    return url.rstrip("/")


def _user_id(key: str, value: str) -> str:
    if len(value) > 255 or not _USER_ID.fullmatch(value):
        raise ConfigError(key, f"expected a Matrix user id like '@bot:example.org', got {value!r}")
    return value


def _device_id(key: str, value: str | None) -> str | None:
    if value is not None and (not value or any(c.isspace() for c in value)):
        raise ConfigError(key, f"expected a device id without spaces, got {value!r}")
    return value


def _nonempty(key: str, value: str) -> str:
    if not value.strip():
        raise ConfigError(key, "must not be empty")
    return value


def _host(key: str, value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.fullmatch(value):
            raise ConfigError(key, f"expected an IP address or host name, got {value!r}") from None
    return value


LOOPBACK_HOSTS: Final = ("localhost", "127.0.0.1", "::1")
"""The ``Host`` names /readyz and /metrics always answer."""


def _hosts(key: str, value: tuple[str, ...]) -> tuple[str, ...]:
    for i, host in enumerate(value):
        if host != "*":
            _host(f"{key}[{i}]", host)
    return value


def _port(key: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(key, f"expected a port between 1 and 65535, got {value}")
    return value


def _at_least(low: float) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if value < low:
            raise ConfigError(key, f"must be at least {low:g}, got {value:g}")
        return value

    return check


def _positive(key: str, value: float) -> float:
    if value <= 0:
        raise ConfigError(key, f"must be greater than 0, got {value:g}")
    return value


def _verification_timeout(key: str, value: float) -> float:
    # The spec: "Clients should time out a verification that does not complete within 10 minutes".
    if not 0 < value <= 600:
        raise ConfigError(
            key, f"must be more than 0 and at most 600 (the spec's 10 minutes), got {value:g}"
        )
    return value


def _patterns(key: str, value: tuple[str, ...]) -> tuple[str, ...]:
    for i, pattern in enumerate(value):
        if not pattern.startswith("@"):
            raise ConfigError(
                f"{key}[{i}]",
                f"expected a user id or a glob like '@*:example.org', got {pattern!r}",
            )
    return value


def _device_ids(key: str, value: tuple[str, ...]) -> tuple[str, ...]:
    for i, device_id in enumerate(value):
        if not device_id or device_id.strip() != device_id or "*" in device_id:
            raise ConfigError(f"{key}[{i}]", f"expected an exact device id, got {device_id!r}")
    return value


def _admin_token(key: str, value: Secret | None) -> Secret | None:
    if value is not None and len(value.reveal()) < _MIN_ADMIN_TOKEN:
        raise ConfigError(key, f"too short: use at least {_MIN_ADMIN_TOKEN} random characters")
    return value


def _level(key: str, value: str) -> str:
    level = value.upper()
    if level not in _LEVELS:
        raise ConfigError(key, f"expected one of {', '.join(map(repr, _LEVELS))}, got {value!r}")
    return level


_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _modules(key: str, value: tuple[str, ...]) -> tuple[str, ...]:
    for i, name in enumerate(value):
        if not _MODULE.fullmatch(name):
            raise ConfigError(
                f"{key}[{i}]", f"expected a module name like 'my_bot.plugin', got {name!r}"
            )
    return value


def _entry_point_group(key: str, value: str | None) -> str | None:
    if value is not None and not _MODULE.fullmatch(value):
        raise ConfigError(
            key, f"expected an entry-point group like 'my_bot.plugins', got {value!r}"
        )
    return value


_NOT_IN_TOML: Final = {"toml": False}
"""Field metadata: the field is filled by :func:`load_config`, not read as a key."""


def _check(check: Callable[[str, Any], Any]) -> dict[str, Any]:
    """Field metadata: run ``check(key, value)`` after the type conversion."""
    return {"check": check}


# ---- the schema


@dataclass(frozen=True, slots=True)
class MatrixConfig:
    """``[matrix]``: the account the bot logs in as."""

    homeserver: str = field(metadata=_check(_homeserver))
    """Client-server API base URL, ``http(s)://host[:port]``; required."""
    user_id: str = field(metadata=_check(_user_id))
    """The bot's full user id, ``@bot:example.org``; required."""
    device_id: str | None = field(default=None, metadata=_check(_device_id))
    """Device id to log in as; unset: the homeserver picks one, which is kept in the data dir."""
    device_name: str = field(default="bot_toolkit", metadata=_check(_nonempty))
    """Display name of the bot's device, shown to users when they verify it."""
    password: Secret | None = field(default=None, repr=False)
    """Password login; or ``BOT_TOOLKIT_PASSWORD``."""
    access_token: Secret | None = field(default=None, repr=False)
    """Access token, used instead of the password when both are set; or
    ``BOT_TOOLKIT_ACCESS_TOKEN``."""
    sync_timeout: float = field(default=30.0, metadata=_check(_positive))
    """Long-poll timeout of one /sync, in seconds."""
    retry_max_delay: float = field(default=60.0, metadata=_check(_positive))
    """Longest wait between retries while the homeserver is unreachable, in seconds."""

    @property
    def server_name(self) -> str:
        """The server part of :attr:`user_id`."""
        return self.user_id.split(":", 1)[1]


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``[storage]``: where the bot keeps its state."""

    data_dir: Path = Path("data")
    """Directory for the nio store, the session (device id, token) and the bot's database.
    Relative paths are resolved against the config file's directory (the working directory when the
    value comes from the environment)."""


@dataclass(frozen=True, slots=True)
class VerificationConfig:
    """``[verification]``: who may verify the bot, and how the SAS is confirmed."""

    enabled: bool = True
    """Answer verification requests at all."""
    allowed_users: tuple[str, ...] = field(default=(), metadata=_check(_patterns))
    """User ids or glob patterns (``@*:example.org``) allowed to verify; others are refused.
    Empty: nobody. The bot also joins rooms these users invite it to."""
    confirm: Literal["auto", "operator"] = "operator"
    """``operator``: wait for the operator to compare and confirm the SAS (admin API);
    ``auto``: confirm automatically for allowed users."""
    post_sas_in_dm: bool = False
    """Also send the emoji and decimals to the verifying user in a direct message."""
    timeout: float = field(default=600.0, metadata=_check(_verification_timeout))
    """Seconds before an unfinished verification is cancelled with ``m.timeout``."""
    max_error_replies: int = field(default=5, metadata=_check(_at_least(0)))
    """At most this many cancel replies per peer user per minute for malformed or unexpected
    events; more are dropped, so a misbehaving peer cannot make the bot flood (the library's
    :class:`~bot_toolkit.verification.VerificationPolicy` default too)."""
    own_devices: tuple[str, ...] = field(default=(), metadata=_check(_device_ids))
    """Device ids of the bot's own account that may verify the bot and get its room keys.
    Empty (the default): no other device of the bot's account is ever verified or given a key,
    whatever :attr:`allowed_users` says."""

    def allows(self, user_id: str) -> bool:
        """Whether ``user_id`` matches one of :attr:`allowed_users` (case-sensitive globbing)."""
        return any(fnmatch.fnmatchcase(user_id, p) for p in self.allowed_users)


@dataclass(frozen=True, slots=True)
class KeysConfig:
    """``[keys]``: room-key sharing and ``m.room_key.withheld`` notices."""

    share_with: Literal["all", "cross_signed", "verified"] = "cross_signed"
    """Which devices get room keys: ``cross_signed`` (the default; spec v1.18 "Recommended
    client behaviour": devices cross-signed by their owner), ``verified`` (devices the bot
    verified, or cross-signed by a user whose identity it verified) or ``all`` (every device
    that is not blacklisted). The others get ``m.unverified``."""
    send_withheld: bool = True
    """Send ``m.room_key.withheld`` (``m.unverified`` ...) to devices that do not get the key."""
    no_olm_notices: bool = True
    """Send ``m.no_olm`` when no Olm session can be set up with a device."""
    notify_blacklisted: bool = True
    """Tell blacklisted devices with ``m.blacklisted``; false: skip them silently."""


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """``[identity]``: the bot's cross-signing identity (see the README's "Identity" section)."""

    enabled: bool = True
    """Check the identity at start, bootstrap or recover it, and sign this device."""
    bootstrap: bool = True
    """Create an identity (and a recovery key) when the account has none."""
    recovery_key: Secret | None = field(default=None, repr=False)
    """The account's recovery key, to recover an existing identity; or
    ``BOT_TOOLKIT_IDENTITY_RECOVERY_KEY``."""
    passphrase: Secret | None = field(default=None, repr=False)
    """The secret storage passphrase instead of the recovery key; or
    ``BOT_TOOLKIT_IDENTITY_PASSPHRASE``."""
    from_own_devices: bool = True
    """Self-verification: after a session of the bot's own account verified this device (SAS),
    ask it for the private cross-signing keys (only over Olm, checked against the published
    keys). The session must be in ``verification.own_devices``."""


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    """``[outbox]``: outbound to-device messages."""

    batch_size: int = field(default=250, metadata=_check(_at_least(1)))
    """Most messages (user, device pairs) in one ``/sendToDevice`` request."""
    concurrency: int = field(default=20, metadata=_check(_at_least(1)))
    """Most requests in flight at once."""
    backoff_max: float = field(default=60.0, metadata=_check(_positive))
    """Longest wait between retries of a failed request, in seconds."""
    flush_deadline: float = field(default=10.0, metadata=_check(_at_least(0)))
    """Seconds to keep sending queued messages at shutdown; the rest stays stored for next start."""
    stuck_after: float = field(default=300.0, metadata=_check(_positive))
    """/readyz fails when the oldest unsent message has waited longer than this, in seconds."""
    max_pending: int = field(default=100_000, metadata=_check(_at_least(1)))
    """Most messages waiting to be sent; beyond, new ones are refused (counted, logged, /readyz
    fails) rather than piling up while the homeserver keeps failing."""


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """``[http]``: health, metrics and admin endpoints."""

    enabled: bool = True
    """Serve HTTP at all."""
    host: str = field(default="127.0.0.1", metadata=_check(_host))
    """Listen address; keep it on loopback unless a proxy or a container network needs more."""
    port: int = field(default=8080, metadata=_check(_port))
    """Listen port."""
    admin_token: Secret | None = field(default=None, metadata=_check(_admin_token), repr=False)
    """Bearer token for ``/admin/*`` (16 characters or more); unset: the admin API answers 403.
    Or ``BOT_TOOLKIT_ADMIN_TOKEN``."""
    sync_stale_after: float = field(default=120.0, metadata=_check(_positive))
    """/readyz fails when the last successful sync is older than this, in seconds."""
    allowed_hosts: tuple[str, ...] = field(default=(), metadata=_check(_hosts))
    """``Host`` names /readyz and /metrics answer (403 otherwise), besides ``localhost``,
    ``127.0.0.1``, ``::1`` and :attr:`host` (unless a wildcard); ``"*"`` allows any."""

    def answered_hosts(self) -> tuple[str, ...]:
        """Every ``Host`` name /readyz and /metrics answer (see :attr:`allowed_hosts`)."""
        own = () if self.host in ("0.0.0.0", "::") else (self.host,)
        return (*LOOPBACK_HOSTS, *own, *self.allowed_hosts)


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """``[logging]``."""

    level: str = field(default="INFO", metadata=_check(_level))
    """DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)."""
    format: Literal["text", "json"] = "text"
    """``text`` for people, ``json`` for one object per line."""


@dataclass(frozen=True, slots=True)
class PluginsConfig:
    """``[plugins]``: the user's handler modules (see :mod:`bot_toolkit.plugin_host`).

    Each plugin's own settings are the table ``[plugins.<name>]``, where the name is the last
    part of the module name (``my_bot.ping`` -> ``ping``) or the entry point's name.
    """

    modules: tuple[str, ...] = field(default=(), metadata=_check(_modules))
    """Importable modules, each defining ``setup(plugin)``; or ``BOT_TOOLKIT_PLUGINS_MODULES``
    (comma-separated)."""
    entry_point_group: str | None = field(default=None, metadata=_check(_entry_point_group))
    """Also load every installed entry point of this group (e.g. ``bot_toolkit.plugins``)."""
    command_prefix: str = field(default="!", metadata=_check(_nonempty))
    """What starts a command in a message (``!ping``)."""
    handler_timeout: float = field(default=30.0, metadata=_check(_positive))
    """Seconds after which a plugin's handler, start or stop hook is cancelled."""
    settings: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({}), metadata=_NOT_IN_TOML
    )
    """The ``[plugins.<name>]`` tables, by plugin name (checked when the plugins load)."""


@dataclass(frozen=True, slots=True)
class BotConfig:
    """The whole configuration; one attribute per TOML table."""

    matrix: MatrixConfig
    storage: StorageConfig = field(default_factory=StorageConfig)
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)

    def secrets(self) -> list[str]:
        """Every secret value set here (for log redaction)."""
        found = (
            self.matrix.password,
            self.matrix.access_token,
            self.http.admin_token,
            self.identity.recovery_key,
            self.identity.passphrase,
        )
        return [s.reveal() for s in found if s]


SECTIONS: Final[Mapping[str, type[Any]]] = get_type_hints(BotConfig)
"""Section name -> its dataclass, in file order."""


# ---- reading and converting


def _toml_type(value: object) -> str:
    names = {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
    }
    return names.get(type(value), type(value).__name__)


def _close(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _parse_bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(key, f"expected a boolean (true/false), got {text!r}")


def _convert(key: str, value: Any, tp: Any, from_env: bool) -> Any:
    """Check ``value`` against the annotation ``tp``; strings from the environment are parsed."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):  # X | None
        inner = next(a for a in get_args(tp) if a is not type(None))
        return _convert(key, value, inner, from_env)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            expected = ", ".join(map(repr, choices))
            raise ConfigError(key, f"expected one of {expected}, got {value!r}")
        return value
    if origin is tuple:
        if from_env:
            return tuple(p.strip() for p in value.split(",") if p.strip())
        if not isinstance(value, list):
            raise ConfigError(key, f"expected an array of strings, got {_toml_type(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{key}[{i}]", f"expected a string, got {_toml_type(item)}")
        return tuple(value)
    if tp is bool:
        if from_env:
            return _parse_bool(key, value)
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected a boolean, got {_toml_type(value)}")
        return value
    if tp is int:
        if from_env:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(key, f"expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_toml_type(value)}")
        return value
    if tp is float:
        if from_env:
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {_toml_type(value)}")
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {_toml_type(value)}")
    if tp is Secret:
        return Secret(value)
    if tp is Path:
        return Path(value)
    return value


def _env_name(section: str, name: str) -> str:
    return SECRET_ENV.get(f"{section}.{name}", f"{ENV_PREFIX}{section}_{name}".upper())


def _env_values(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``{section: {key: text}}`` from the environment.

    Unknown keys of known sections are errors; other ``BOT_TOOLKIT_*`` variables are ignored.
    """
    out: dict[str, dict[str, str]] = {}
    by_secret = {v: k for k, v in SECRET_ENV.items()}
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX) or text == "":
            continue
        if var in by_secret:
            secret_section, secret_name = by_secret[var].split(".")
            out.setdefault(secret_section, {})[secret_name] = text
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue  # BOT_TOOLKIT_CONFIG and other variables that are not keys
        name = rest[len(section) + 1 :]
        names = list(_keys(SECTIONS[section]))
        dotted = f"{section}.{name}"
        if dotted in SECRET_ENV:
            raise ConfigError(dotted, f"set it with {SECRET_ENV[dotted]}, not {var}", source=var)
        if name not in names:
            hint = _close(name, names)
            raise ConfigError(dotted, f"unknown key{hint}", source=var)
        out.setdefault(section, {})[name] = text
    return out


def _keys(cls: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    """The fields of a section that are keys of its table (and of the environment)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("toml", True)}


def _plugin_tables(table: dict[str, Any]) -> dict[str, Any]:
    """Move the ``[plugins.<name>]`` sub-tables out of the ``[plugins]`` table."""
    return {name: table.pop(name) for name in list(table) if isinstance(table[name], dict)}


def _build_section(
    section: str,
    table: Mapping[str, Any],
    env: Mapping[str, str],
    base_dir: Path,
    source: str | None,
) -> Any:
    cls = SECTIONS[section]
    hints = get_type_hints(cls)
    fields = _keys(cls)
    for name in table:
        if name not in fields:
            raise ConfigError(
                f"{section}.{name}", f"unknown key{_close(name, list(fields))}", source=source
            )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        from_env = name in env
        if from_env or name in table:
            raw = env[name] if from_env else table[name]
            where = _env_name(section, name) if from_env else source
            try:
                value = _convert(key, raw, hints[name], from_env)
                check = f.metadata.get("check")
                if check is not None:
                    value = check(key, value)
            except ConfigError as e:
                suffix = f" (from {where})" if from_env else ""
                raise ConfigError(e.key, e.message + suffix, source=where) from None
        elif f.default is dataclasses.MISSING:
            raise ConfigError(
                key, f"required; set it in the file or in {_env_name(section, name)}", source=source
            )
        else:
            value = f.default
        if isinstance(value, Path) and not value.is_absolute():
            value = ((Path.cwd() if from_env else base_dir) / value).resolve()
        kwargs[name] = value
    return cls(**kwargs)


def load_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> BotConfig:
    """Read ``path`` (TOML; ``None``: no file) and ``env`` (default ``os.environ``) into a config.

    Raises :class:`ConfigError` naming the key (or the file, for unreadable or invalid TOML).
    Nothing here touches the network or the data directory.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source: str | None = None
    base_dir = Path.cwd()
    if path is not None:
        source = os.fspath(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as e:
            raise ConfigError(source, f"cannot read: {e.strerror or e}", source=source) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(source, f"invalid TOML: {e}", source=source) from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                source, f"invalid TOML: not UTF-8 ({e.reason})", source=source
            ) from None
        base_dir = Path(path).resolve().parent
    for name, value in data.items():
        if name not in SECTIONS:
            raise ConfigError(name, f"unknown section{_close(name, list(SECTIONS))}", source=source)
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a table, got {_toml_type(value)}", source=source)
    env_values = _env_values(env)
    plugin_tables = _plugin_tables(data.get("plugins", {}))
    sections = {
        name: _build_section(name, data.get(name, {}), env_values.get(name, {}), base_dir, source)
        for name in SECTIONS
    }
    sections["plugins"] = dataclasses.replace(
        sections["plugins"], settings=MappingProxyType(plugin_tables)
    )
    matrix: MatrixConfig = sections["matrix"]
    if not (matrix.password or matrix.access_token):
        raise ConfigError(
            "matrix.password",
            "required: set matrix.password or matrix.access_token in the file, or "
            "BOT_TOOLKIT_PASSWORD / BOT_TOOLKIT_ACCESS_TOKEN in the environment",
            source=source,
        )
    return BotConfig(**sections)
