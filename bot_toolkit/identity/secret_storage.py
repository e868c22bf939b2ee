"""The cross-signing keys in the account's secret storage (account data), both directions.

Writing (:func:`store_keys`): a key description ``m.secret_storage.key.<id>`` with the key check,
the three private keys encrypted under it (``m.cross_signing.*``), then
``m.secret_storage.default_key``. Every PUT is idempotent, so a retry after a 5xx just repeats.

Reading (:func:`read_keys`): the default key's description, the key check (a wrong recovery key
or passphrase fails here, before anything is decrypted), then the three secrets.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Final

from bot_toolkit.identity.api import IdentityApi
from bot_toolkit.identity.errors import NoSecretStorageError
from bot_toolkit.identity.keys import SECRET_NAMES, CrossSigningKeys
from bot_toolkit.identity.signing import SigningKey
from bot_toolkit.identity.ssss import (
    AES_HMAC_SHA2,
    KeyDescription,
    MalformedSecretError,
    check_key,
    decrypt_secret,
    encrypt_secret,
    key_check,
)

__all__ = ["DEFAULT_KEY", "KEY_PREFIX", "new_storage_key", "read_keys", "store_keys"]

DEFAULT_KEY: Final = "m.secret_storage.default_key"
KEY_PREFIX: Final = "m.secret_storage.key."


def new_storage_key() -> tuple[str, bytes]:
    """A new (key id, 32-byte key) pair."""
    return secrets.token_urlsafe(24), secrets.token_bytes(32)


async def store_keys(
    api: IdentityApi, keys: CrossSigningKeys, key_id: str, storage_key: bytes
) -> None:
    """Put the three private keys into secret storage under a new default key."""
    description = {"algorithm": AES_HMAC_SHA2, "name": "bot_toolkit recovery key"}
    description.update(key_check(storage_key))
    await api.put_account_data(KEY_PREFIX + key_id, description)
    for usage, key in keys.by_usage().items():
        name = SECRET_NAMES[usage]
        encrypted = encrypt_secret(storage_key, name, key.seed_b64())
        await api.put_account_data(name, {"encrypted": {key_id: encrypted}})
    await api.put_account_data(DEFAULT_KEY, {"key": key_id})


async def default_key(api: IdentityApi) -> KeyDescription:
    """The default key's description. Raises :class:`NoSecretStorageError` when absent."""
    default = await api.get_account_data(DEFAULT_KEY)
    key_id = default.get("key") if default is not None else None
    if not isinstance(key_id, str):
        raise NoSecretStorageError(
            "the account has no default secret storage key (m.secret_storage.default_key)"
        )
    content = await api.get_account_data(KEY_PREFIX + key_id)
    if content is None:
        raise NoSecretStorageError(f"secret storage key {key_id[:80]!r} has no description")
    return KeyDescription.parse(key_id, content)


async def read_keys(
    api: IdentityApi,
    *,
    storage_key: bytes | None = None,
    passphrase: str | None = None,
) -> CrossSigningKeys:
    """The private cross-signing keys from secret storage, with the recovery key or passphrase.

    Raises :class:`~bot_toolkit.identity.ssss.WrongKeyError` (wrong key),
    :class:`~bot_toolkit.identity.ssss.BadMacError` /
    :class:`~bot_toolkit.identity.ssss.MalformedSecretError` (corrupted entry) or
    :class:`NoSecretStorageError`. The caller checks them against the published keys.
    """
    description = await default_key(api)
    if storage_key is None:
        if passphrase is None:
            raise ValueError("give the recovery key or the passphrase")
        storage_key = description.key_from_passphrase(passphrase)
    check_key(storage_key, description)
    found: dict[str, SigningKey] = {}
    for usage, name in SECRET_NAMES.items():
        content = await api.get_account_data(name)
        encrypted = content.get("encrypted") if content is not None else None
        data = encrypted.get(description.key_id) if isinstance(encrypted, Mapping) else None
        if data is None:
            raise NoSecretStorageError(f"secret {name} is not stored under the default key")
        seed = decrypt_secret(storage_key, name, data)
        try:
            found[usage] = SigningKey.from_b64(seed)
        except ValueError:
            raise MalformedSecretError(f"secret {name} is not an Ed25519 seed") from None
    return CrossSigningKeys(
        api.user_id, found["master"], found["self_signing"], found["user_signing"]
    )
