"""nio's crypto store under the install's own pickle key (see :mod:`bot_toolkit.install_secret`).

nio pickles the Olm account, the Olm sessions and the inbound Megolm sessions with
``AsyncClientConfig.pickle_key`` (default ``"DEFAULT_KEY"``, public). :func:`adopt_pickle_key`
runs before nio loads a device's store: a store still pickled with nio's default key (an install
from before the per-install key) is re-pickled with the new key in one SQLite transaction, so it
is either all old or all new, whatever happens. Uses nio's public store API only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final, Literal

from nio.store import DefaultStore

from bot_toolkit import log_guard  # noqa: F401 - SQL parameters never reach a log

__all__ = ["NIO_DEFAULT_PICKLE_KEY", "WrongStoreSecret", "adopt_pickle_key"]

log = logging.getLogger("bot_toolkit.nio_store")

NIO_DEFAULT_PICKLE_KEY: Final = "DEFAULT_KEY"
"""nio 0.26's ``AsyncClientConfig.pickle_key`` default."""


class WrongStoreSecret(RuntimeError):
    """nio's store for this device opens neither with the store secret nor with nio's default
    key: the secret changed (another ``BOT_TOOLKIT_STORE_PASSPHRASE``, a lost ``store.key``)."""


def adopt_pickle_key(
    store_path: Path, user_id: str, device_id: str, key: str
) -> Literal["new", "current", "migrated"]:
    """Make the device's nio store use ``key``; returns what was found.

    ``"new"``: no account stored yet (nio creates it with ``key``); ``"current"``: already under
    ``key``; ``"migrated"``: it was under nio's default key and now is under ``key``.

    Raises:
        WrongStoreSecret: neither key opens the stored account.
    """
    store_path.mkdir(parents=True, exist_ok=True)
    store = DefaultStore(user_id, device_id, str(store_path), pickle_key=key)
    try:
        try:
            if store.load_account() is None:
                return "new"
            return "current"
        except Exception:  # vodozemac refuses the pickle: another key
            pass
        store.pickle_key = NIO_DEFAULT_PICKLE_KEY
        try:
            account = store.load_account()
        except Exception:
            raise WrongStoreSecret(
                f"nio's store for {user_id} {device_id} does not open with the store secret"
            ) from None
        assert account is not None
        sessions = store.load_sessions()
        groups = list(store.load_inbound_group_sessions())
        store.pickle_key = key
        with store.database.atomic():
            store.save_account(account)
            for curve, found in sessions.items():
                for session in found:
                    store.save_session(curve, session)
            for group in groups:
                store.save_inbound_group_session(group)
        log.info(
            "nio's store for device %s now uses the install's own pickle key "
            "(%d Olm sessions, %d Megolm sessions re-pickled)",
            device_id,
            sum(len(found) for _, found in sessions.items()),
            len(groups),
        )
        return "migrated"
    finally:
        store.database.close()
