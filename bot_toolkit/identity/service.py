"""One user's cross-signing identity as the bot sees it: check, bootstrap, recover, reset.

:class:`Identity` works over :class:`~bot_toolkit.identity.api.IdentityApi` (the homeserver),
:class:`~bot_toolkit.identity.store.IdentityStore` (the private keys, 0600) and a
:class:`DeviceSigner` (our device key). :meth:`Identity.ensure` is the safe start-up step:

* keys in our store that match the published ones: finish what a crash left undone (secret
  storage, the device's signature, the master key's signature by the device);
* no identity published: bootstrap one (keys are stored locally *before* any upload, so a
  retry after a 5xx or a crash uploads the same keys: never a half-made identity);
* an identity published that we do not hold: recover it with the recovery key / passphrase
  when given; otherwise stay ``not_cross_signed`` with one warning (never overwrite it);
* :meth:`Identity.reset` replaces an identity: an explicit operator action only.

Private keys and the recovery key never reach a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from bot_toolkit.identity import secret_storage
from bot_toolkit.identity.api import AuthRequired, IdentityApi
from bot_toolkit.identity.errors import (
    IdentityError,
    IdentityMismatchError,
    InteractiveAuthError,
)
from bot_toolkit.identity.keys import (
    CrossSigningKeys,
    KeyMismatchError,
    PublishedKeys,
    public_key_of,
)
from bot_toolkit.identity.recovery_key import decode_recovery_key, encode_recovery_key
from bot_toolkit.identity.signing import SignatureError, signable_bytes, verify_signature
from bot_toolkit.identity.store import IdentityStore, StoredIdentity

__all__ = ["DeviceSigner", "EnsureResult", "Identity", "IdentityState", "KeySource"]

log = logging.getLogger("bot_toolkit.identity")


class IdentityState(StrEnum):
    """Whether this device is cross-signed by its owner's identity."""

    UNKNOWN = "unknown"
    CROSS_SIGNED = "cross_signed"
    NOT_CROSS_SIGNED = "not_cross_signed"
    DISABLED = "disabled"


class KeySource(StrEnum):
    """Where the private keys we hold came from."""

    NONE = "none"
    CREATED = "created"
    STORE = "store"
    RECOVERY_KEY = "recovery_key"
    SECRET_SHARING = "secret_sharing"


class DeviceSigner(Protocol):
    """Our own device: its id, its Ed25519 key and a signature with it."""

    @property
    def device_id(self) -> str: ...

    @property
    def ed25519(self) -> str: ...

    def sign(self, message: bytes) -> str:
        """Ed25519 signature of ``message`` by the device key, unpadded base64."""
        ...


@dataclass(frozen=True, slots=True)
class EnsureResult:
    """What :meth:`Identity.ensure` found or did. ``recovery_key`` is set when a new identity
    was created (now, or by an earlier run that did not finish): show it to the operator, then
    call :meth:`Identity.acknowledge_recovery_key`. It is a secret."""

    state: IdentityState
    source: KeySource
    master_key: str | None
    recovery_key: str | None = None

    def __repr__(self) -> str:
        return (
            f"EnsureResult(state={self.state.value}, source={self.source.value}, "
            f"master_key={self.master_key!r}, new_recovery_key={self.recovery_key is not None})"
        )


@dataclass(frozen=True, slots=True)
class _Published:
    keys: PublishedKeys | None
    device_json: Mapping[str, Any] | None


class Identity:
    """The cross-signing identity of ``api.user_id`` for the device ``device``."""

    def __init__(self, api: IdentityApi, store: IdentityStore, device: DeviceSigner) -> None:
        self.api = api
        self.store = store
        self.device = device
        self.user_id = api.user_id
        self.state = IdentityState.UNKNOWN
        self.source = KeySource.NONE
        self.master_key: str | None = None
        self.keys: CrossSigningKeys | None = None
        """The private keys once we hold them (never log them)."""
        self.device_keys_json: Mapping[str, Any] | None = None
        """Our device's keys as the homeserver last published them (with every signature,
        the self-signing key's too once cross-signed): sent as ``sender_device_keys``."""

    # ----------------------------------------------------------------- reading

    async def _published(self) -> _Published:
        body = await self.api.query_keys([self.user_id])
        try:
            keys = PublishedKeys.from_query(self.user_id, body)
        except ValueError as e:
            raise IdentityError(f"the published cross-signing keys are unusable: {e}") from None
        devices = body.get("device_keys")
        mine = devices.get(self.user_id) if isinstance(devices, Mapping) else None
        device_json = mine.get(self.device.device_id) if isinstance(mine, Mapping) else None
        if not isinstance(device_json, Mapping):
            return _Published(keys, None)
        self.device_keys_json = {k: v for k, v in device_json.items() if k != "unsigned"}
        return _Published(keys, device_json)

    async def published(self) -> PublishedKeys | None:
        """The public keys the homeserver publishes for our user now (checked)."""
        return (await self._published()).keys

    async def refresh_state(self) -> IdentityState:
        """Re-read whether our device is cross-signed (no changes made)."""
        pub = await self._published()
        self.master_key = pub.keys.master if pub.keys else None
        signed = (
            pub.keys is not None
            and pub.device_json is not None
            and pub.keys.device_signed(pub.device_json)
        )
        self.state = IdentityState.CROSS_SIGNED if signed else IdentityState.NOT_CROSS_SIGNED
        return self.state

    # ----------------------------------------------------------------- the safe start

    async def ensure(
        self,
        *,
        recovery_key: str | bytes | None = None,
        passphrase: str | None = None,
        password: str | None = None,
        bootstrap: bool = True,
    ) -> EnsureResult:
        """Make this device cross-signed if that can be done safely (see the module docs).

        ``recovery_key`` is the recovery key text (Element's or ours) or the decoded 32-byte
        secret storage key; ``password`` answers interactive auth. Raises
        :class:`~bot_toolkit.identity.recovery_key.RecoveryKeyError` (malformed key),
        :class:`~bot_toolkit.identity.api.TransientError` (retry later; nothing half-made),
        :class:`IdentityError` subclasses (one-line reason) and the secret-storage errors of
        :func:`~bot_toolkit.identity.secret_storage.read_keys`.
        """
        if isinstance(recovery_key, str):
            recovery_key = decode_recovery_key(recovery_key)
        pub = await self._published()
        stored = self.store.load(self.user_id)
        if pub.keys is None:
            if not bootstrap:
                return self._not_signed(None, "the account has no cross-signing identity")
            if stored is None or stored.published:
                # published=True but nothing on the server: the identity was deleted
                # server-side; start over with new keys.
                stored = self._new_identity()
                source = KeySource.CREATED
            else:
                source = KeySource.CREATED
                log.info("identity: resuming an unfinished bootstrap")
            await self._upload(stored.keys, password)
            stored = stored.with_(published=True)
            self.store.save(stored)
            pub = await self._published()
            if pub.keys is None:
                raise IdentityError(
                    "the homeserver accepted the cross-signing keys but does not publish them"
                )
        elif stored is not None and self._matches(stored.keys, pub.keys):
            source = KeySource.CREATED if stored.storage_key is not None else KeySource.STORE
            if not stored.published:
                stored = stored.with_(published=True)
                self.store.save(stored)
        elif recovery_key is not None or passphrase is not None:
            keys = await secret_storage.read_keys(
                self.api, storage_key=recovery_key, passphrase=passphrase
            )
            self._check(keys, pub.keys)
            stored = StoredIdentity(keys, published=True)
            self.store.save(stored)
            source = KeySource.RECOVERY_KEY
            log.info("identity: recovered the cross-signing keys from secret storage")
        else:
            why = (
                "the identity in the local store is not the one the homeserver publishes "
                "(it was reset elsewhere)"
                if stored is not None
                else "the account already has a cross-signing identity and the bot holds no "
                "key for it"
            )
            return self._not_signed(pub.keys.master, why)
        return await self._finish(stored, pub, source)

    def _new_identity(self) -> StoredIdentity:
        keys = CrossSigningKeys.generate(self.user_id)
        key_id, storage_key = secret_storage.new_storage_key()
        stored = StoredIdentity(keys, False, storage_key, key_id)
        self.store.save(stored)  # before any upload: a retry reuses these keys
        log.info("identity: created new cross-signing keys (master %s)", keys.master.public_key)
        return stored

    @staticmethod
    def _matches(keys: CrossSigningKeys, published: PublishedKeys) -> bool:
        try:
            keys.check_against(published)
        except KeyMismatchError:
            return False
        return True

    @staticmethod
    def _check(keys: CrossSigningKeys, published: PublishedKeys) -> None:
        try:
            keys.check_against(published)
        except KeyMismatchError as e:
            raise IdentityMismatchError(str(e)) from None

    def _not_signed(self, master: str | None, why: str) -> EnsureResult:
        self.state = IdentityState.NOT_CROSS_SIGNED
        self.master_key = master
        log.warning(
            "identity: this device is not cross-signed: %s. Give the bot the recovery key "
            "(identity.recovery_key, BOT_TOOLKIT_IDENTITY_RECOVERY_KEY or `bot-toolkit identity "
            "recover`), or verify this session from another session of the account; "
            "`bot-toolkit identity reset` replaces the identity (everyone sees a change).",
            why,
        )
        return EnsureResult(self.state, self.source, master)

    async def _finish(
        self,
        stored: StoredIdentity,
        pub: _Published,
        source: KeySource,
    ) -> EnsureResult:
        assert pub.keys is not None
        keys = stored.keys
        new_recovery_key = None
        if stored.storage_key is not None:
            # Returned by every run until acknowledge_recovery_key(): a run that fails after
            # the secret storage was written must not lose it.
            new_recovery_key = encode_recovery_key(stored.storage_key)
            if stored.storage_key_id is not None:
                await secret_storage.store_keys(
                    self.api, keys, stored.storage_key_id, stored.storage_key
                )
                stored = stored.with_(storage_key_id=None)
                self.store.save(stored)
                log.info("identity: the cross-signing keys are in secret storage")
        await self._sign_device(keys, pub)
        self.keys = keys
        self.source = source
        self.master_key = keys.master.public_key
        if await self.refresh_state() is not IdentityState.CROSS_SIGNED:
            raise IdentityError(
                "the device signature was uploaded but the homeserver does not show it"
            )
        log.info(
            "identity: device %s is cross-signed (master key %s, keys from %s)",
            self.device.device_id,
            self.master_key,
            source.value,
        )
        return EnsureResult(self.state, source, self.master_key, new_recovery_key)

    async def adopt(self, keys: CrossSigningKeys, source: KeySource) -> EnsureResult:
        """Use private keys obtained another way (secret sharing): check against the published
        keys, store them, sign this device. Raises :class:`IdentityMismatchError`."""
        pub = await self._published()
        if pub.keys is None:
            raise IdentityMismatchError("the account has no published cross-signing identity")
        self._check(keys, pub.keys)
        stored = StoredIdentity(keys, published=True)
        self.store.save(stored)
        return await self._finish(stored, pub, source)

    # ----------------------------------------------------------------- uploads

    async def _upload(self, keys: CrossSigningKeys, password: str | None) -> None:
        body = keys.upload_body()
        try:
            await self.api.upload_cross_signing_keys(body)
            return
        except AuthRequired as e:
            if password is None:
                raise InteractiveAuthError(
                    "identity: the homeserver wants the account password to publish "
                    "cross-signing keys; set matrix.password (or run `bot-toolkit identity "
                    "bootstrap` with it), or create the identity in Element and give the bot "
                    "its recovery key"
                ) from None
            if "m.login.password" not in e.stages:
                raise InteractiveAuthError(
                    "identity: the homeserver asks for interactive auth without a password "
                    f"stage ({', '.join(sorted(e.stages))[:200] or 'no stages'}); create the "
                    "identity in Element and give the bot its recovery key"
                ) from None
            auth = {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": self.user_id},
                "password": password,
                "session": e.session,
            }
        try:
            await self.api.upload_cross_signing_keys(body, auth)
        except AuthRequired:
            raise InteractiveAuthError(
                "identity: the homeserver refused the password for publishing cross-signing keys"
            ) from None

    async def _sign_device(self, keys: CrossSigningKeys, pub: _Published) -> None:
        """Upload the device's signature by the self-signing key and the master key's signature
        by the device key, each only when the homeserver does not show it yet."""
        assert pub.keys is not None
        uploads: dict[str, dict[str, Any]] = {}
        device_json = pub.device_json
        if device_json is None:
            raise IdentityError(
                f"the homeserver shows no keys for device {self.device.device_id}: upload the "
                "device keys first"
            )
        if (
            device_json.get("keys", {}).get(f"ed25519:{self.device.device_id}")
            != self.device.ed25519
        ):
            raise IdentityError("the homeserver publishes another key for this device")
        if not pub.keys.device_signed(device_json):
            stripped = {k: v for k, v in device_json.items() if k not in ("signatures", "unsigned")}
            signature = keys.self_signing.sign(signable_bytes(stripped))
            stripped["signatures"] = {self.user_id: {keys.self_signing.key_id: signature}}
            uploads[self.device.device_id] = stripped
        device_key_id = f"ed25519:{self.device.device_id}"
        try:
            verify_signature(pub.keys.master_json, self.user_id, device_key_id, self.device.ed25519)
        except SignatureError:
            master = {
                k: v for k, v in pub.keys.master_json.items() if k not in ("signatures", "unsigned")
            }
            master["signatures"] = {
                self.user_id: {device_key_id: self.device.sign(signable_bytes(master))}
            }
            uploads[keys.master.public_key] = master
        if uploads:
            await self.api.upload_signatures({self.user_id: uploads})

    def acknowledge_recovery_key(self) -> None:
        """The operator has the new recovery key: stop keeping (and returning) it."""
        stored = self.store.load(self.user_id)
        if stored is not None and stored.storage_key is not None and stored.storage_key_id is None:
            self.store.save(stored.with_(storage_key=None))

    # ----------------------------------------------------------------- other users

    def user_signature(self, user_id: str, master_key_json: Mapping[str, Any]) -> dict[str, Any]:
        """The ``/keys/signatures/upload`` body that signs ``user_id``'s master key with our
        user-signing key (after verifying that user). Raises :class:`IdentityError` when we
        hold no keys, :class:`ValueError` for a malformed master key object."""
        if self.keys is None:
            raise IdentityError("no cross-signing keys: run ensure() (or recover) first")
        public = public_key_of(master_key_json, "master", user_id)
        stripped = {k: v for k, v in master_key_json.items() if k not in ("signatures", "unsigned")}
        signed = self.keys.user_signing.sign_json(stripped, self.user_id)
        return {user_id: {public: signed}}

    async def sign_user(self, user_id: str, master_key_json: Mapping[str, Any]) -> None:
        """Sign ``user_id``'s master key with our user-signing key and upload the signature."""
        await self.api.upload_signatures(self.user_signature(user_id, master_key_json))

    # ----------------------------------------------------------------- explicit actions

    async def reset(self, *, password: str | None = None) -> EnsureResult:
        """Replace the identity with a new one (operator action: everyone who verified this
        user sees an identity change). The result carries the new recovery key.

        The new keys replace the stored ones only after the homeserver accepted them: a reset
        that fails (interactive auth refused, 5xx) leaves the bot with its old identity.
        """
        keys = CrossSigningKeys.generate(self.user_id)
        key_id, storage_key = secret_storage.new_storage_key()
        await self._upload(keys, password)
        stored = StoredIdentity(keys, True, storage_key, key_id)
        self.store.save(stored)
        log.warning(
            "identity: replaced the cross-signing identity (new master key %s); users who "
            "verified this account will see an identity change",
            keys.master.public_key,
        )
        pub = await self._published()
        return await self._finish(stored, pub, KeySource.CREATED)
