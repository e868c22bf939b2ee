"""Users the bot verified: their master key signed, their cross-signed devices trusted.

After an in-room SAS whose MAC covered the peer's master key (checked against the key the
homeserver publishes), :meth:`UserTrust.verified` signs that master key with the bot's
user-signing key and uploads the signature (``/keys/signatures/upload``, through the bot's
:class:`~bot_toolkit.identity.Identity`), exactly as Element does: the user then shows as verified
to the bot's user everywhere. From then on every device of the user that the user's self-signing
key signs (checked: self-signing key signed by the verified master key, device signed by the
self-signing key) is marked verified in nio's trust store, so it gets room keys under
``share_with = "verified"`` and handlers see it as verified, without a SAS of its own.

The verified users and their master keys are kept in the store (table ``verified_users``). When
the homeserver later publishes another master key for such a user (their identity changed:
a reset, or an attack), :meth:`UserTrust.refresh` notices it: the devices it had trusted through
cross-signing are no longer trusted, the user is dropped, a :class:`UserIdentityChanged` event
goes to the handlers and ``user_identity_changes_total`` counts it. Refreshes run for verified
users whose device list changed (from the sync's ``device_lists.changed``).

Metrics: ``user_verifications_total{outcome}`` (``signed``, ``failed``),
``user_identity_changes_total``, ``cross_signed_devices_trusted_total``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from ..identity.signing import SignatureError, verify_signature
from ..metrics import Metrics
from .persistence import StoreLike

__all__ = [
    "CrossSigner",
    "DeviceTrustStore",
    "UserIdentityChanged",
    "UserTrust",
    "UserVerified",
]

log = logging.getLogger("bot_toolkit.verification.user_trust")

_COMPONENT: Final = "verification_users"
_MIGRATIONS: Final[dict[int, list[str]]] = {
    1: [
        """
        CREATE TABLE verified_users (
            user_id TEXT PRIMARY KEY NOT NULL,
            master_key TEXT NOT NULL,
            devices TEXT NOT NULL
        )
        """
    ]
}


@dataclass(frozen=True, slots=True)
class UserVerified:
    """We verified ``user_id``'s identity (master key) and uploaded our signature of it."""

    user_id: str
    master_key: str


@dataclass(frozen=True, slots=True)
class UserIdentityChanged:
    """A user we had verified now publishes another master key: no longer verified."""

    user_id: str
    old_master_key: str
    new_master_key: str | None


class CrossSigner(Protocol):
    """What this module needs of the bot's cross-signing identity (``bot_toolkit.identity``)."""

    @property
    def master_key(self) -> str | None:
        """Our master public key (unpadded base64) once known."""
        ...

    async def sign_user(self, user_id: str, master_key_json: Mapping[str, Any]) -> None:
        """Sign ``user_id``'s master key object with our user-signing key and upload it."""
        ...


class DeviceTrustStore(Protocol):
    """Where device trust lives (nio's device store in production)."""

    async def refresh(self, user_id: str) -> None:
        """Make sure the user's current devices are known locally (a keys query)."""
        ...

    def mark(self, user_id: str, device_id: str) -> bool:
        """Mark the device verified; False when it is unknown locally."""
        ...

    def unmark(self, user_id: str, device_id: str) -> None:
        """Stop trusting the device."""
        ...


KeysQuery = Callable[[list[str]], Awaitable[Mapping[str, Any]]]
"""``/keys/query`` for some users: the response body."""


class UserTrust:
    """See the module docs."""

    def __init__(  # noqa: PLR0917
        self,
        signer: CrossSigner,
        query: KeysQuery,
        devices: DeviceTrustStore,
        store: StoreLike | None,
        emit: Callable[[object], None],
        metrics: Metrics,
    ) -> None:
        self.signer = signer
        self._query = query
        self._devices = devices
        self._store = store
        self._emit = emit
        self._users: dict[str, tuple[str, set[str]]] = {}
        """user id -> (master key we verified, device ids we trusted through it)."""
        self._lock = asyncio.Lock()
        self._m_users = metrics.counter(
            "user_verifications_total",
            "Users verified in a room whose master key we signed (or failed to)",
            ["outcome"],
        )
        self._m_changes = metrics.counter(
            "user_identity_changes_total", "Verified users who published another master key"
        )
        self._m_devices = metrics.counter(
            "cross_signed_devices_trusted_total",
            "Devices trusted because a verified user cross-signed them",
        )

    async def start(self) -> None:
        """Load the verified users from the store."""
        if self._store is None:
            return
        await self._store.migrate(_COMPONENT, _MIGRATIONS)
        rows = await self._store.fetchall("SELECT user_id, master_key, devices FROM verified_users")
        for user_id, master, devices in rows:
            self._users[str(user_id)] = (str(master), set(json.loads(devices)))

    def is_verified(self, user_id: str) -> bool:
        """Whether we verified ``user_id``'s current identity (as far as we know)."""
        return user_id in self._users

    def verified_users(self) -> tuple[str, ...]:
        """The users whose identity we verified, sorted."""
        return tuple(sorted(self._users))

    def master_key_of(self, user_id: str) -> str | None:
        """The master key we verified for ``user_id`` (``None``: not verified)."""
        entry = self._users.get(user_id)
        return None if entry is None else entry[0]

    async def verified(self, user_id: str, master_key: str) -> bool:
        """``user_id``'s master key ``master_key`` was verified by a SAS: sign and upload it,
        remember the user, trust their cross-signed devices. False when the published master key
        is not ``master_key`` or the upload failed (logged, counted)."""
        try:
            body = await self._query([user_id])
            master_json = _section(body, "master_keys", user_id)
            if master_json is None or _only_key(master_json) != master_key:
                raise ValueError("the published master key is not the one verified")
            await self.signer.sign_user(user_id, master_json)
        except Exception as exc:
            self._m_users.inc("failed")
            log.error("could not sign the master key of %s: %s", user_id, str(exc)[:200])
            return False
        self._m_users.inc("signed")
        log.info("signed the master key of %s", user_id)
        async with self._lock:
            self._users[user_id] = (master_key, self._users.get(user_id, ("", set()))[1])
            await self._save(user_id)
        self._emit(UserVerified(user_id, master_key))
        await self.refresh([user_id], body=body)
        return True

    async def refresh(
        self, user_ids: Iterable[str], *, body: Mapping[str, Any] | None = None
    ) -> None:
        """Re-check verified users: trust their newly cross-signed devices; notice identity
        changes. Users we did not verify are skipped."""
        users = [u for u in user_ids if u in self._users]
        if not users:
            return
        log.debug("re-checking the devices of %s", users)
        if body is None:
            body = await self._query(users)
        for user_id in users:
            await self._refresh_one(user_id, body)

    async def _refresh_one(self, user_id: str, body: Mapping[str, Any]) -> None:
        async with self._lock:
            entry = self._users.get(user_id)
            if entry is None:
                return
            master, trusted = entry
            master_json = _section(body, "master_keys", user_id)
            published = _only_key(master_json) if master_json is not None else None
            if published != master:
                await self._identity_changed(user_id, master, published, trusted)
                return
            ssk = _self_signing_key(body, user_id, master)
            if ssk is None:
                return
            devices = _section(body, "device_keys", user_id) or {}
            await self._devices.refresh(user_id)
            changed = False
            for device_id, device_json in devices.items():
                if device_id in trusted or not isinstance(device_json, Mapping):
                    continue
                if _signed_by(device_json, user_id, ssk) and self._devices.mark(user_id, device_id):
                    trusted.add(device_id)
                    changed = True
                    self._m_devices.inc()
                    log.info("trusting %s %s: cross-signed by a verified user", user_id, device_id)
            if changed:
                await self._save(user_id)

    async def _identity_changed(
        self, user_id: str, old: str, new: str | None, trusted: set[str]
    ) -> None:
        log.warning(
            "%s published another master key: no longer verified (%d devices untrusted)",
            user_id,
            len(trusted),
        )
        for device_id in trusted:
            self._devices.unmark(user_id, device_id)
        del self._users[user_id]
        if self._store is not None:
            async with self._store.transaction() as db:
                await db.execute("DELETE FROM verified_users WHERE user_id = ?", (user_id,))
        self._m_changes.inc()
        self._emit(UserIdentityChanged(user_id, old, new))

    async def _save(self, user_id: str) -> None:
        if self._store is None:
            return
        master, trusted = self._users[user_id]
        async with self._store.transaction() as db:
            await db.execute(
                "INSERT OR REPLACE INTO verified_users (user_id, master_key, devices) "
                "VALUES (?, ?, ?)",
                (user_id, master, json.dumps(sorted(trusted))),
            )


def _section(body: Mapping[str, Any], name: str, user_id: str) -> Any:
    part = body.get(name)
    return part.get(user_id) if isinstance(part, Mapping) else None


def _only_key(key_json: Any) -> str | None:
    keys = key_json.get("keys") if isinstance(key_json, Mapping) else None
    if not isinstance(keys, Mapping) or len(keys) != 1:
        return None
    ((key_id, public),) = keys.items()
    return public if isinstance(public, str) and key_id == f"ed25519:{public}" else None


def _self_signing_key(body: Mapping[str, Any], user_id: str, master: str) -> str | None:
    """The user's self-signing key when it is validly signed by ``master``."""
    ssk_json = _section(body, "self_signing_keys", user_id)
    ssk = _only_key(ssk_json)
    if ssk is None or not _signed_by(ssk_json, user_id, master):
        return None
    return ssk


def _signed_by(obj: Mapping[str, Any], user_id: str, key: str) -> bool:
    try:
        verify_signature(obj, user_id, f"ed25519:{key}", key)
    except SignatureError:
        return False
    return True
