"""``bot-toolkit identity [status|bootstrap|recover|reset]``: the operator's explicit paths.

* ``status`` (the default): the user's master key (as Element shows it, in groups of four),
  whether this device is cross-signed, and where the bot's keys come from;
* ``bootstrap``: create an identity when the account has none (never replaces one) and print
  the recovery key once, with what it is for;
* ``recover``: take the recovery key (``--recovery-key-file``, ``identity.recovery_key`` /
  ``BOT_TOOLKIT_IDENTITY_RECOVERY_KEY``, or typed at a terminal), decrypt the keys from secret
  storage, check them against the published ones, sign this device;
* ``reset --yes``: replace the identity (everyone who verified the bot sees an identity change).

Each prints what it did; a failure is one line on stderr and exit code 1. The recovery key is
printed to stdout only (never logged).
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from bot_toolkit.identity.api import HomeserverError
from bot_toolkit.identity.errors import IdentityError
from bot_toolkit.identity.nio_glue import identity_for
from bot_toolkit.identity.recovery_key import RecoveryKeyError
from bot_toolkit.identity.service import EnsureResult, Identity, IdentityState
from bot_toolkit.identity.ssss import SecretStorageError

if TYPE_CHECKING:
    from bot_toolkit.config import BotConfig

__all__ = ["ACTIONS", "IdentityCommandError", "fingerprint", "run_identity_command"]

ACTIONS = ("status", "bootstrap", "recover", "reset")


class IdentityCommandError(RuntimeError):
    """The command could not do what was asked; ``str()`` is the one line to show."""


def fingerprint(key: str | None) -> str:
    """A public key in groups of four characters (as Element shows keys)."""
    if not key:
        return "(none)"
    return " ".join(key[i : i + 4] for i in range(0, len(key), 4))


def _recovery_key(config: BotConfig, key_file: str | None) -> str | None:
    if key_file:
        try:
            return Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise IdentityCommandError(
                f"--recovery-key-file: cannot read {key_file}: {e.strerror or e}"
            ) from None
    if config.identity.recovery_key:
        return config.identity.recovery_key.reveal()
    if sys.stdin.isatty():
        return getpass.getpass("Recovery key (input hidden): ").strip() or None
    return None


def _report(identity: Identity, result: EnsureResult | None, out: TextIO) -> None:
    print(f"user:            {identity.user_id}", file=out)
    print(f"device:          {identity.device.device_id}", file=out)
    print(f"master key:      {fingerprint(identity.master_key)}", file=out)
    signed = identity.state is IdentityState.CROSS_SIGNED
    print(f"device signed:   {'yes (cross-signed)' if signed else 'no'}", file=out)
    held = identity.store.load(identity.user_id)
    source = result.source.value if result is not None and signed else None
    where = source or ("local store" if held is not None else "none held by the bot")
    print(f"private keys:    {where} ({identity.store.path})", file=out)


def _show_recovery_key(identity: Identity, key: str, out: TextIO) -> None:
    print(
        "\nRecovery key (shown once; store it somewhere safe):\n\n"
        f"    {key}\n\n"
        "It unlocks the account's secret storage, which holds the bot's cross-signing keys.\n"
        "Give it to the bot (identity.recovery_key or BOT_TOOLKIT_IDENTITY_RECOVERY_KEY) when\n"
        "its data directory is lost, or to Element to verify a new session of the account.\n",
        file=out,
    )
    identity.acknowledge_recovery_key()


async def run_identity_command(
    config: BotConfig,
    action: str,
    *,
    recovery_key_file: str | None = None,
    yes: bool = False,
    out: TextIO = sys.stdout,
) -> None:
    """Run one ``bot-toolkit identity`` action. Raises :class:`IdentityCommandError`."""
    from bot_toolkit.bot import Bot, BotError  # noqa: PLC0415 - the bot pulls in everything

    if action not in ACTIONS:
        raise IdentityCommandError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    if action == "reset" and not yes:
        raise IdentityCommandError(
            "this replaces the bot's cross-signing identity: everyone who verified "
            "the bot will see an identity change and must verify it again. Add --yes to do it."
        )
    password = config.matrix.password.reveal() if config.matrix.password else None
    bot = Bot(config, install_signal_handlers=False)
    try:
        async with bot.logged_in() as client:
            if client.should_upload_keys:
                await client.keys_upload()
            identity = identity_for(client, bot.data_dir)
            result: EnsureResult | None = None
            if action == "status":
                await identity.refresh_state()
            elif action == "bootstrap":
                result = await identity.ensure(password=password)
            elif action == "recover":
                key = _recovery_key(config, recovery_key_file)
                passphrase = config.identity.passphrase
                if key is None and passphrase is None:
                    raise IdentityCommandError(
                        "recover needs the recovery key: --recovery-key-file FILE, "
                        "BOT_TOOLKIT_IDENTITY_RECOVERY_KEY, or type it at a terminal"
                    )
                result = await identity.ensure(
                    recovery_key=key,
                    passphrase=passphrase.reveal() if passphrase and not key else None,
                    bootstrap=False,
                )
            else:
                result = await identity.reset(password=password)
            _report(identity, result, out)
            if result is not None and result.recovery_key is not None:
                _show_recovery_key(identity, result.recovery_key, out)
            if action in ("bootstrap", "recover") and identity.state is not (
                IdentityState.CROSS_SIGNED
            ):
                raise IdentityCommandError(
                    "this device is not cross-signed: the account has an identity the bot holds "
                    "no key for; use `bot-toolkit identity recover` with its recovery key"
                )
    except (
        IdentityError,
        SecretStorageError,
        RecoveryKeyError,
        HomeserverError,
        BotError,
    ) as e:
        raise IdentityCommandError(str(e)) from None
