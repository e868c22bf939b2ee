"""Other users' cross-signing, as key sharing and handlers need it: is a device signed by its
owner, and did we verify the owner (their master key signed by our user-signing key)?

:class:`CrossSigningTrust` keeps one ``/keys/query`` answer per user, checked with
:class:`~bot_toolkit.identity.keys.PublishedKeys` (the self-signing key must carry the master
key's signature, the device the self-signing key's). An answer is asked again when nio knows a
device the answer did not show, when :meth:`CrossSigningTrust.invalidate` names the user (the
sync's ``device_lists.changed``), after ``unsigned_ttl`` seconds for a device that was not
signed yet (its owner may sign it any time), or after ``ttl`` seconds. A failed query keeps the
old answers (unknown users stay "not cross-signed", so keys are withheld rather than leaked).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from bot_toolkit.identity.api import HomeserverError, IdentityApi
from bot_toolkit.identity.keys import PublishedKeys
from bot_toolkit.identity.signing import SignatureError, verify_signature
from bot_toolkit.room_messages import SenderTrust

__all__ = ["CrossSigningTrust", "SenderTrustResolver"]

log = logging.getLogger("bot_toolkit.identity.trust")

_MAX_USERS: Final = 10_000


@dataclass(slots=True)
class _Entry:
    published: PublishedKeys | None
    signed: dict[str, str]  # device id -> ed25519 of devices signed by the self-signing key
    seen: set[str]  # every device id the answer listed
    owner_verified: bool
    at: float
    stale: bool = field(default=False)


class CrossSigningTrust:
    """Cross-signing answers for other users (and our own), kept fresh enough to share keys.

    Implements :class:`bot_toolkit.withheld.CrossSigningView`.
    """

    def __init__(
        self,
        api: IdentityApi,
        *,
        ttl: float = 300.0,
        unsigned_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.ttl = ttl
        self.unsigned_ttl = unsigned_ttl
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def invalidate(self, user_ids: Iterable[str]) -> None:
        """Ask again for these users next time (their devices or keys changed)."""
        for user_id in user_ids:
            entry = self._entries.get(user_id)
            if entry is not None:
                entry.stale = True

    def _due(self, user_id: str, device_ids: Iterable[str], now: float) -> bool:
        entry = self._entries.get(user_id)
        if entry is None or entry.stale or now - entry.at > self.ttl:
            return True
        age = now - entry.at
        return any(
            d not in entry.seen or (d not in entry.signed and age > self.unsigned_ttl)
            for d in device_ids
        )

    async def refresh(self, devices: Mapping[str, Mapping[str, str]]) -> None:
        """Query the users whose answer is missing or out of date (one request)."""
        now = self._clock()
        due = [u for u, ds in devices.items() if self._due(u, ds, now)]
        if not due:
            return
        own = self.api.user_id
        try:
            body = await self.api.query_keys(sorted({*due, own}))
        except HomeserverError as e:
            log.warning("cross-signing: keys query for %d users failed: %s", len(due), e)
            return
        our_usk = self._our_user_signing_key(body)
        for user_id in {*due, own}:
            self._entries[user_id] = self._entry(user_id, body, our_usk, now)
        if len(self._entries) > _MAX_USERS:
            for user_id in sorted(self._entries, key=lambda u: self._entries[u].at)[
                : len(self._entries) - _MAX_USERS
            ]:
                del self._entries[user_id]

    def _our_user_signing_key(self, body: Mapping[str, Any]) -> str | None:
        try:
            own = PublishedKeys.from_query(self.api.user_id, body)
        except ValueError:
            return None
        return None if own is None else own.user_signing

    def _entry(
        self, user_id: str, body: Mapping[str, Any], our_usk: str | None, now: float
    ) -> _Entry:
        try:
            published = PublishedKeys.from_query(user_id, body)
        except ValueError as e:
            log.warning("cross-signing keys of %s are unusable: %s", user_id[:100], e)
            published = None
        section = body.get("device_keys")
        listed = section.get(user_id) if isinstance(section, Mapping) else None
        listed = listed if isinstance(listed, Mapping) else {}
        signed: dict[str, str] = {}
        for device_id, device_json in listed.items():
            if not isinstance(device_json, Mapping) or published is None:
                continue
            ed25519 = device_json.get("keys", {}).get(f"ed25519:{device_id}")
            if isinstance(ed25519, str) and published.device_signed(device_json):
                signed[device_id] = ed25519
        owner_verified = False
        if published is not None and our_usk is not None:
            if user_id == self.api.user_id:
                owner_verified = True  # our own identity
            else:
                try:
                    verify_signature(
                        published.master_json, self.api.user_id, f"ed25519:{our_usk}", our_usk
                    )
                    owner_verified = True
                except SignatureError:
                    pass
        return _Entry(published, signed, set(listed), owner_verified, now)

    def cross_signed(self, user_id: str, device_id: str, ed25519: str) -> bool:
        """Whether the device with this key is signed by its owner's self-signing key."""
        entry = self._entries.get(user_id)
        return entry is not None and entry.signed.get(device_id) == ed25519

    def owner_verified(self, user_id: str) -> bool:
        """Whether the user's master key carries our user-signing key's signature."""
        entry = self._entries.get(user_id)
        return entry is not None and entry.owner_verified

    def master_key(self, user_id: str) -> str | None:
        """The user's master key as last seen (unpadded base64), None when unknown."""
        entry = self._entries.get(user_id)
        return None if entry is None or entry.published is None else entry.published.master

    def sender_trust(
        self, user_id: str, device_id: str | None, ed25519: str | None, *, verified: bool
    ) -> SenderTrust:
        """The trust of a sending device (``verified``: the bot verified that device)."""
        if device_id is None or ed25519 is None:
            return SenderTrust.UNKNOWN
        if verified:
            return SenderTrust.VERIFIED
        if self.cross_signed(user_id, device_id, ed25519):
            return (
                SenderTrust.VERIFIED if self.owner_verified(user_id) else SenderTrust.CROSS_SIGNED
            )
        return SenderTrust.NOT_CROSS_SIGNED


class SenderTrustResolver:
    """:class:`bot_toolkit.room_messages.SenderTrustSource` over nio's device store and a
    :class:`CrossSigningTrust`: which device sent (by its curve25519 key), and is it signed."""

    def __init__(
        self,
        cross_signing: CrossSigningTrust,
        device_by_curve: Callable[[str, str], tuple[str, str] | None],
    ) -> None:
        self.cross_signing = cross_signing
        self._device_by_curve = device_by_curve

    async def sender_trust(self, user_id: str, sender_key: str, *, verified: bool) -> SenderTrust:
        """The trust of ``user_id``'s device with curve25519 ``sender_key``."""
        found = self._device_by_curve(user_id, sender_key)
        if found is None:
            return SenderTrust.UNKNOWN
        device_id, ed25519 = found
        await self.cross_signing.refresh({user_id: {device_id: ed25519}})
        return self.cross_signing.sender_trust(user_id, device_id, ed25519, verified=verified)
