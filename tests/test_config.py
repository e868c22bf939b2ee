"""Config loading: the example passes, every kind of mistake names its key, secrets stay hidden."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from bot_toolkit.config import (
    SECRET_ENV,
    SECTIONS,
    BotConfig,
    ConfigError,
    Secret,
    load_config,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
ENV = {"BOT_TOOLKIT_PASSWORD": "correct horse battery staple"}

MINIMAL = """
[matrix]
homeserver = "https://matrix.example.org"
user_id = "@bot:example.org"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), ENV if env is None else env)
    return info.value


# ---- the example


def test_example_loads_with_password_from_env() -> None:
    config = load_config(EXAMPLE, ENV)
    assert config.matrix.homeserver == "https://matrix.example.org"
    assert config.matrix.password == Secret(ENV["BOT_TOOLKIT_PASSWORD"])
    assert config.http.host == "127.0.0.1"
    assert config.http.admin_token is None
    assert config.verification.confirm == "operator"
    assert config.storage.data_dir == EXAMPLE.parent / "data"


def test_example_without_secret_names_matrix_password() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, {})
    assert info.value.key == "matrix.password"
    assert "BOT_TOOLKIT_PASSWORD" in str(info.value)


def test_example_documents_every_key_with_its_default() -> None:
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    # Each section's own text, so a key documented in one section ("enabled", "timeout")
    # does not count for another.
    parts = re.split(r"^\[(\w+)\]\n", text, flags=re.M)
    bodies = dict(zip(parts[1::2], parts[2::2], strict=True))
    assert set(bodies) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        body = bodies[section]
        for f in dataclasses.fields(cls):
            if not f.metadata.get("toml", True):
                continue  # filled by load_config, not a key (plugins.settings)
            assert re.search(rf"^#? ?{f.name} = ", body, re.M), f"{section}.{f.name} undocumented"
            shown = data.get(section, {}).get(f.name)
            if shown is not None and isinstance(f.default, bool | int | float | str):
                assert shown == f.default, f"{section}.{f.name}: example differs from default"


def test_defaults_are_safe(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), ENV)
    assert config.http.host == "127.0.0.1"
    assert config.http.admin_token is None
    assert config.verification.allowed_users == ()
    assert config.verification.confirm == "operator"
    assert config.keys.share_with == "cross_signed"
    assert config.logging.format == "text"


# ---- errors name the key


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (MINIMAL + 'homeserverr = "x"\n', "matrix.homeserverr", "did you mean 'homeserver'"),
        (MINIMAL + "[verifcation]\n", "verifcation", "did you mean 'verification'"),
        (
            MINIMAL + '[verification]\nconfirm = "maybe"\n',
            "verification.confirm",
            "expected one of 'auto', 'operator', got 'maybe'",
        ),
        (MINIMAL + '[http]\nport = "8080"\n', "http.port", "expected an integer, got string"),
        (MINIMAL + "[http]\nport = 70000\n", "http.port", "between 1 and 65535"),
        (MINIMAL + "[http]\nport = true\n", "http.port", "expected an integer, got boolean"),
        (MINIMAL + '[http]\nhost = "not a host"\n', "http.host", "IP address or host name"),
        (MINIMAL + '[http]\nadmin_token = "short"\n', "http.admin_token", "too short"),
        (MINIMAL + "[outbox]\nbatch_size = 0\n", "outbox.batch_size", "at least 1"),
        (
            MINIMAL + '[outbox]\nflush_deadline = "soon"\n',
            "outbox.flush_deadline",
            "expected a number",
        ),
        (MINIMAL + "[verification]\nenabled = 1\n", "verification.enabled", "expected a boolean"),
        (
            MINIMAL + "[verification]\ntimeout = 601\n",
            "verification.timeout",
            "at most 600 (the spec's 10 minutes)",
        ),
        (MINIMAL + "[verification]\ntimeout = 0\n", "verification.timeout", "more than 0"),
        (
            MINIMAL + '[verification]\nallowed_users = "@a:b"\n',
            "verification.allowed_users",
            "expected an array",
        ),
        (
            MINIMAL + '[verification]\nallowed_users = ["@a:b", 3]\n',
            "verification.allowed_users[1]",
            "expected a string, got integer",
        ),
        (
            MINIMAL + '[verification]\nallowed_users = ["example.org"]\n',
            "verification.allowed_users[0]",
            "glob",
        ),
        (
            MINIMAL + '[keys]\nshare_with = "everyone"\n',
            "keys.share_with",
            "'all', 'cross_signed', 'verified'",
        ),
        (
            MINIMAL + '[http]\nallowed_hosts = ["ok.example", "bad host"]\n',
            "http.allowed_hosts[1]",
            "IP address or host name",
        ),
        (MINIMAL + "[outbox]\nmax_pending = 0\n", "outbox.max_pending", "at least 1"),
        (MINIMAL + '[logging]\nlevel = "LOUD"\n', "logging.level", "expected one of"),
        (MINIMAL + '[logging]\nformat = "xml"\n', "logging.format", "'text', 'json'"),
        ("storage = 3\n" + MINIMAL, "storage", "expected a table"),
        ('[matrix]\nuser_id = "@bot:example.org"\n', "matrix.homeserver", "required"),
        ('[matrix]\nhomeserver = "https://hs"\n', "matrix.user_id", "required"),
        (
            '[matrix]\nhomeserver = "ftp://hs"\nuser_id = "@b:hs"\n',
            "matrix.homeserver",
            "http:// or https://",
        ),
        (
            '[matrix]\nhomeserver = "https://hs?x=1"\nuser_id = "@b:hs"\n',
            "matrix.homeserver",
            "query",
        ),
        (
            '[matrix]\nhomeserver = "https://hs"\nuser_id = "bot"\n',
            "matrix.user_id",
            "Matrix user id",
        ),
        (
            '[matrix]\nhomeserver = "https://hs"\nuser_id = "@bot"\n',
            "matrix.user_id",
            "Matrix user id",
        ),
        (MINIMAL + 'device_id = "A B"\n', "matrix.device_id", "without spaces"),
        (MINIMAL + "sync_timeout = -1\n", "matrix.sync_timeout", "greater than 0"),
        (MINIMAL + "sync_timeout = nan\n", "matrix.sync_timeout", "finite"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    e = error(tmp_path, text)
    assert e.key == key
    assert str(e).startswith(f"{key}: ")
    assert words in str(e)
    assert "\n" not in str(e)


def test_confirm_message_exact(tmp_path: Path) -> None:
    e = error(tmp_path, MINIMAL + '[verification]\nconfirm = "maybe"\n')
    assert str(e) == "verification.confirm: expected one of 'auto', 'operator', got 'maybe'"


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    e = error(tmp_path, '[matrix]\nhomeserver = "x"\nuser_id = \n')
    path = str(tmp_path / "config.toml")
    assert e.key == path
    assert str(e).startswith(f"{path}: invalid TOML")
    assert "line 3" in str(e)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml", ENV)
    assert "absent.toml" in str(info.value)
    assert "cannot read" in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[matrix]\nhomeserver = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV)
    assert str(path) in str(info.value)


# ---- environment


def test_env_secrets_and_overrides(tmp_path: Path) -> None:
    env = {
        "BOT_TOOLKIT_ACCESS_TOKEN": "syt_token_value",
        "BOT_TOOLKIT_ADMIN_TOKEN": "a" * 32,
        "BOT_TOOLKIT_HTTP_PORT": "9999",
        "BOT_TOOLKIT_VERIFICATION_ALLOWED_USERS": "@a:x.org, @*:y.org",
        "BOT_TOOLKIT_VERIFICATION_ENABLED": "no",
        "BOT_TOOLKIT_LOGGING_LEVEL": "debug",
        "BOT_TOOLKIT_OUTBOX_BACKOFF_MAX": "2.5",
        "BOT_TOOLKIT_CONFIG": "/ignored",
        "BOT_TOOLKIT_CONTAINER_TEST": "1",
        "BOT_TOOLKIT_STORAGE_DATA_DIR": "",  # empty: unset
    }
    config = load_config(write(tmp_path, MINIMAL + "[http]\nport = 1234\n"), env)
    assert config.matrix.access_token == Secret("syt_token_value")
    assert config.matrix.password is None
    assert config.http.admin_token == Secret("a" * 32)
    assert config.http.port == 9999
    assert config.verification.allowed_users == ("@a:x.org", "@*:y.org")
    assert config.verification.enabled is False
    assert config.logging.level == "DEBUG"
    assert config.outbox.backoff_max == 2.5
    assert config.storage.data_dir == tmp_path / "data"


def test_env_overrides_file_secret(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, MINIMAL + 'password = "from-file"\n'), {"BOT_TOOLKIT_PASSWORD": "env!"}
    )
    assert config.matrix.password == Secret("env!")


def test_env_only() -> None:
    env = {
        "BOT_TOOLKIT_MATRIX_HOMESERVER": "http://127.0.0.1:8008/",
        "BOT_TOOLKIT_MATRIX_USER_ID": "@bot:localhost",
        "BOT_TOOLKIT_PASSWORD": "pw12",
        "BOT_TOOLKIT_STORAGE_DATA_DIR": "/data",
    }
    config = load_config(None, env)
    assert config.matrix.homeserver == "http://127.0.0.1:8008"
    assert config.matrix.server_name == "localhost"
    assert config.storage.data_dir == Path("/data")


def test_env_only_missing_names_key_and_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"BOT_TOOLKIT_PASSWORD": "x"})
    assert info.value.key == "matrix.homeserver"
    assert "BOT_TOOLKIT_MATRIX_HOMESERVER" in str(info.value)


@pytest.mark.parametrize(
    ("var", "value", "key", "words"),
    [
        ("BOT_TOOLKIT_HTTP_PROT", "1", "http.prot", "did you mean 'port'"),
        ("BOT_TOOLKIT_HTTP_PORT", "eighty", "http.port", "from BOT_TOOLKIT_HTTP_PORT"),
        ("BOT_TOOLKIT_KEYS_SEND_WITHHELD", "perhaps", "keys.send_withheld", "boolean"),
        ("BOT_TOOLKIT_VERIFICATION_CONFIRM", "maybe", "verification.confirm", "'auto'"),
        ("BOT_TOOLKIT_MATRIX_PASSWORD", "pw", "matrix.password", "BOT_TOOLKIT_PASSWORD"),
        ("BOT_TOOLKIT_ADMIN_TOKEN", "short", "http.admin_token", "too short"),
    ],
)
def test_env_errors_name_the_key(
    tmp_path: Path, var: str, value: str, key: str, words: str
) -> None:
    e = error(tmp_path, MINIMAL, {**ENV, var: value})
    assert e.key == key
    assert words in str(e)


def test_secret_env_names_are_documented_in_example() -> None:
    text = EXAMPLE.read_text()
    for var in SECRET_ENV.values():
        assert var in text


# ---- secrets stay hidden


def test_repr_and_str_hide_secrets(tmp_path: Path) -> None:
    env = {
        "BOT_TOOLKIT_PASSWORD": "pw-SECRET-1",
        "BOT_TOOLKIT_ACCESS_TOKEN": "tok-SECRET-2",
        "BOT_TOOLKIT_ADMIN_TOKEN": "admin-SECRET-3-long-enough",
    }
    config = load_config(write(tmp_path, MINIMAL), env)
    for text in (
        repr(config),
        str(config),
        repr(config.matrix),
        repr(config.http),
        f"{config.matrix.password}",
        repr(config.matrix.access_token),
    ):
        assert "SECRET" not in text
    assert config.matrix.password is not None
    assert config.matrix.password.reveal() == "pw-SECRET-1"
    assert sorted(config.secrets()) == sorted(env.values())


def test_secret_value_semantics() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert not Secret("")
    assert str(Secret("x")) == "**********"


def test_empty_password_counts_as_missing(tmp_path: Path) -> None:
    e = error(tmp_path, MINIMAL + 'password = ""\n', {})
    assert e.key == "matrix.password"


# ---- behaviour of the result


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.http.port = 1  # type: ignore[misc]


def test_allowed_users_globs(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, MINIMAL + '[verification]\nallowed_users = ["@*:example.org", "@op:x"]\n'),
        ENV,
    )
    v = config.verification
    assert v.allows("@alice:example.org")
    assert v.allows("@op:x")
    assert not v.allows("@alice:evil.org")
    assert not v.allows("@alice:example.org.evil")
    assert not v.allows("@OP:x")


def test_answered_hosts(tmp_path: Path) -> None:
    """/readyz and /metrics answer loopback names, the listen host unless a wildcard, and the
    configured extra names."""
    base = load_config(write(tmp_path, MINIMAL), ENV).http
    assert base.answered_hosts() == ("localhost", "127.0.0.1", "::1", "127.0.0.1")
    text = MINIMAL + '[http]\nhost = "0.0.0.0"\nallowed_hosts = ["bot.svc", "*"]\n'
    wide = load_config(write(tmp_path, text), ENV).http
    assert wide.answered_hosts() == ("localhost", "127.0.0.1", "::1", "bot.svc", "*")


def test_relative_data_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = sub / "bot.toml"
    path.write_text(MINIMAL + '[storage]\ndata_dir = "../state"\n')
    assert load_config(path, ENV).storage.data_dir == tmp_path / "state"


def test_botconfig_has_every_section() -> None:
    assert set(SECTIONS) == {f.name for f in dataclasses.fields(BotConfig)}
