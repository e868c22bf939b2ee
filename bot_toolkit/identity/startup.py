"""The identity step of a bot's start: retried while the homeserver fails, reported in
metrics and ``/readyz``, never fatal.

:class:`IdentityStartup` runs :meth:`~bot_toolkit.identity.service.Identity.ensure` until it
succeeds or fails for a reason a retry cannot fix (a wrong recovery key, interactive auth without
a password, keys that do not match). A new recovery key is written to
``<data_dir>/recovery-key.txt`` (mode 0600), never to the log.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bot_toolkit.identity.api import HomeserverError, TransientError
from bot_toolkit.identity.errors import (
    IdentityError,
    IdentityMismatchError,
    InteractiveAuthError,
)
from bot_toolkit.identity.recovery_key import RecoveryKeyError, decode_recovery_key
from bot_toolkit.identity.service import EnsureResult, Identity, IdentityState
from bot_toolkit.identity.ssss import SecretStorageError
from bot_toolkit.identity.store import RECOVERY_KEY_FILE, write_secret_file
from bot_toolkit.metrics import Metrics

__all__ = ["IdentityOptions", "IdentityStartup"]

log = logging.getLogger("bot_toolkit.identity")

_FIRST_RETRY: Final = 1.0


def _permanent_failure(e: Exception) -> tuple[str, str]:
    """The error-counter reason and the message of a failure that retrying does not cure."""
    if isinstance(e, SecretStorageError):
        return "recovery", f"secret storage: {e}"
    if isinstance(e, InteractiveAuthError):
        return "auth", str(e)
    if isinstance(e, IdentityMismatchError):
        return "mismatch", str(e)
    return "other", str(e)


@dataclass(frozen=True, slots=True)
class IdentityOptions:
    """What the bot's ``[identity]`` section and login give the identity step."""

    recovery_key: str | None = None
    passphrase: str | None = None
    password: str | None = None
    bootstrap: bool = True
    retry_max_delay: float = 60.0

    def __repr__(self) -> str:
        return (
            f"IdentityOptions(bootstrap={self.bootstrap}, with_key={self.recovery_key is not None})"
        )


class IdentityStartup:
    """Run the identity step for ``identity`` and report it in ``metrics``."""

    def __init__(
        self, identity: Identity, options: IdentityOptions, metrics: Metrics, data_dir: Path
    ) -> None:
        self.identity = identity
        self.options = options
        self.data_dir = data_dir
        self.error: str | None = None
        self.result: EnsureResult | None = None
        self._m_state = metrics.gauge(
            "identity_cross_signed",
            "1 when this device is cross-signed by the bot user's identity, else 0",
            read=lambda: 1.0 if identity.state is IdentityState.CROSS_SIGNED else 0.0,
        )
        self._m_errors = metrics.counter(
            "identity_errors_total",
            "Failed identity steps (reason: transient, auth, recovery, mismatch, other)",
            ["reason"],
        )

    def detail(self) -> str:
        """One line for ``/readyz``: the state, the master key, the key source or the error."""
        ident = self.identity
        if ident.state is IdentityState.CROSS_SIGNED:
            return (
                f"device cross-signed (master key {ident.master_key}, keys from "
                f"{ident.source.value})"
            )
        if self.error:
            return f"device not cross-signed: {self.error}"
        if ident.state is IdentityState.UNKNOWN:
            return "identity not checked yet"
        return "device not cross-signed (give the bot the recovery key, or verify it)"

    async def run(self) -> EnsureResult | None:
        """Until done or failed for good; ``None`` after a permanent failure."""
        opts = self.options
        try:
            key = decode_recovery_key(opts.recovery_key) if opts.recovery_key else None
        except RecoveryKeyError as e:
            self._failed("recovery", f"identity.recovery_key: {e}")
            return None
        attempt = 0
        while True:
            try:
                result = await self.identity.ensure(
                    recovery_key=key,
                    passphrase=opts.passphrase,
                    password=opts.password,
                    bootstrap=opts.bootstrap,
                )
            except TransientError as e:
                attempt += 1
                self._m_errors.inc("transient")
                self.error = str(e)
                delay = min(opts.retry_max_delay, _FIRST_RETRY * 2 ** min(attempt - 1, 20))
                delay *= random.uniform(0.8, 1.2)
                log.warning("identity: %s; retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
                continue
            except (SecretStorageError, IdentityError, HomeserverError) as e:
                self._failed(*_permanent_failure(e))
                return None
            self.error = None
            self.result = result
            if result.recovery_key is not None:
                path = self.data_dir / RECOVERY_KEY_FILE
                write_secret_file(
                    path,
                    "Recovery key of the Matrix account "
                    f"{self.identity.user_id}:\n\n{result.recovery_key}\n\n"
                    "It unlocks the account's secret storage (its cross-signing keys). Keep it "
                    "somewhere safe, then delete this file. Give it to the bot (identity."
                    "recovery_key) if its data directory is lost, or to Element to verify a new "
                    "session.\n",
                )
                self.identity.acknowledge_recovery_key()
                log.warning(
                    "identity: a new recovery key was written to %s (mode 0600): store it "
                    "safely and delete the file",
                    path,
                )
            return result

    def _failed(self, reason: str, message: str) -> None:
        self._m_errors.inc(reason)
        self.error = message
        if self.identity.state is IdentityState.UNKNOWN:
            self.identity.state = IdentityState.NOT_CROSS_SIGNED
        log.error("identity: %s", message)
