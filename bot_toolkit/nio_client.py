"""A nio ``AsyncClient`` set up the way :class:`~bot_toolkit.BotToolkit` needs it, in one call.

A bot that already has an access token and a device id (see the README: how to create the bot
account) gets a logged-in, encrypting client with :func:`restore_client`::

    client = bot_toolkit.restore_client(homeserver, user_id, device_id, token, "store")

It does, in order, what is easy to get wrong by hand:

1. reads (or creates, 0600) the install's store secret (:func:`bot_toolkit.store_secret`), so
   nio's crypto store is not pickled with nio's public default key;
2. moves an existing store of that device from nio's default key to that secret, in one SQLite
   transaction (:func:`adopt_pickle_key`), before nio opens it;
3. builds the client with encryption on and sync tokens stored (:func:`client_config`);
4. ``restore_login``, which loads the device's Olm account from the store.

Everything here uses nio's public API. The calls block briefly on file and SQLite I/O: call them
before the event loop does other work, or through ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nio import AsyncClient, AsyncClientConfig

from bot_toolkit._nio_store import WrongStoreSecret, adopt_pickle_key
from bot_toolkit.install_secret import store_secret

__all__ = ["WrongStoreSecret", "adopt_pickle_key", "client_config", "restore_client"]


def client_config(pickle_key: str, /, **options: Any) -> AsyncClientConfig:
    """nio's client config for a bot: encryption on, sync tokens stored, ``pickle_key`` set.

    ``options`` are further :class:`nio.AsyncClientConfig` fields (e.g. ``request_timeout``);
    they may not turn encryption off.

    Raises:
        ValueError: ``options`` sets ``encryption_enabled=False`` or ``pickle_key``.
    """
    if options.get("encryption_enabled", True) is not True:
        raise ValueError("bot_toolkit needs encryption_enabled=True")
    if "pickle_key" in options:
        raise ValueError("pass the pickle key as the first argument")
    options.setdefault("store_sync_tokens", True)
    return AsyncClientConfig(encryption_enabled=True, pickle_key=pickle_key, **options)


def restore_client(
    homeserver: str,
    user_id: str,
    device_id: str,
    access_token: str,
    data_dir: str | os.PathLike[str],
    *,
    store_dir: str | os.PathLike[str] | None = None,
    pickle_key: str | None = None,
    **options: Any,
) -> AsyncClient:
    """A logged-in nio client for an existing device, its store under the install's own key.

    Args:
        homeserver: the homeserver's base URL.
        user_id, device_id, access_token: the bot's login (the token is only kept by the client).
        data_dir: the install's data directory (the one given to ``BotToolkit``); the store
            secret lives there as ``store.key`` unless ``BOT_TOOLKIT_STORE_PASSPHRASE`` is set.
        store_dir: nio's store directory; ``data_dir`` by default.
        pickle_key: the secret to pickle nio's store with; :func:`bot_toolkit.store_secret`
            of ``data_dir`` by default.
        options: further :class:`nio.AsyncClientConfig` fields (see :func:`client_config`).

    Raises:
        WrongStoreSecret: the device's stored account opens neither with the secret nor with
            nio's default key (another passphrase, a lost ``store.key``).
        OSError: the data or store directory cannot be read or created.
        ValueError: the store passphrase or ``options`` are invalid.
    """
    data = Path(data_dir)
    store = Path(store_dir) if store_dir is not None else data
    key = pickle_key if pickle_key is not None else store_secret(data)
    adopt_pickle_key(store, user_id, device_id, key)
    client = AsyncClient(
        homeserver, user_id, device_id, str(store), config=client_config(key, **options)
    )
    client.restore_login(user_id, device_id, access_token)
    return client
