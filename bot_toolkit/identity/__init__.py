"""The bot's cross-signing identity: keys, signing, secret storage, recovery key, bootstrap.

Matrix users are trusted through cross-signing (spec: "Cross-signing"): a master key is the
user's identity; it signs a self-signing key (which signs the user's devices) and a user-signing
key (which signs other users' master keys). Element shows "Verify" only for users who have one
and a red shield for devices their owner has not signed. This package gives a bot one.

One call on the bot's stack (the standalone bot makes it after its first sync)::

    from bot_toolkit.identity import ensure_identity

    identity, result = await ensure_identity(
        client, data_dir, recovery_key=os.environ.get("RECOVERY_KEY"), password=password
    )
    if result.recovery_key:          # a new identity was created now: show it once
        print("Save this recovery key:", result.recovery_key)
    identity.state                   # IdentityState.CROSS_SIGNED / NOT_CROSS_SIGNED
    identity.master_key              # our master public key (unpadded base64)

For in-room verification of other users (what Element does), after a successful SAS that
covered their master key::

    body = identity.user_signature(user_id, their_master_key_json)   # pure, no I/O
    await identity.sign_user(user_id, their_master_key_json)         # signs and uploads

``identity.keys`` holds the private :class:`CrossSigningKeys` once loaded (never log them);
:func:`load_keys` reads them from a data directory without network access.

Modules: :mod:`.signing` (Ed25519 keys, signed JSON), :mod:`.keys` (the three keys, published
form), :mod:`.ssss` (secret storage maths), :mod:`.recovery_key` (base58 text),
:mod:`.secret_storage` (account data), :mod:`.store` (the 0600 file), :mod:`.api` (endpoints),
:mod:`.service` (ensure / recover / reset), :mod:`.nio_glue` (a nio client's device).
"""

from __future__ import annotations

from pathlib import Path

from bot_toolkit.identity.api import (
    AuthRequired,
    HomeserverError,
    IdentityApi,
    TransientError,
)
from bot_toolkit.identity.errors import (
    IdentityError,
    IdentityMismatchError,
    InteractiveAuthError,
    NoSecretStorageError,
)
from bot_toolkit.identity.keys import CrossSigningKeys, KeyMismatchError, PublishedKeys
from bot_toolkit.identity.nio_glue import NioDevice, ensure_identity, identity_for
from bot_toolkit.identity.recovery_key import (
    RecoveryKeyError,
    decode_recovery_key,
    encode_recovery_key,
)
from bot_toolkit.identity.service import (
    DeviceSigner,
    EnsureResult,
    Identity,
    IdentityState,
    KeySource,
)
from bot_toolkit.identity.signing import SignatureError, SigningKey
from bot_toolkit.identity.ssss import (
    BadMacError,
    MalformedSecretError,
    SecretStorageError,
    WrongKeyError,
)
from bot_toolkit.identity.store import IdentityStore, StoredIdentity

__all__ = [
    "AuthRequired",
    "BadMacError",
    "CrossSigningKeys",
    "DeviceSigner",
    "EnsureResult",
    "HomeserverError",
    "Identity",
    "IdentityApi",
    "IdentityError",
    "IdentityMismatchError",
    "IdentityState",
    "IdentityStore",
    "InteractiveAuthError",
    "KeyMismatchError",
    "KeySource",
    "MalformedSecretError",
    "NioDevice",
    "NoSecretStorageError",
    "PublishedKeys",
    "RecoveryKeyError",
    "SecretStorageError",
    "SignatureError",
    "SigningKey",
    "StoredIdentity",
    "TransientError",
    "WrongKeyError",
    "decode_recovery_key",
    "encode_recovery_key",
    "ensure_identity",
    "identity_for",
    "load_keys",
]


def load_keys(data_dir: Path | str, user_id: str) -> CrossSigningKeys | None:
    """The private cross-signing keys stored in ``data_dir`` for ``user_id`` (no network)."""
    stored = IdentityStore(data_dir).load(user_id)
    return None if stored is None else stored.keys
