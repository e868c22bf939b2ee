"""Which devices get a room key: the sharing policy inside nio's own group-session sharing.

Part of :class:`~bot_toolkit.key_sharing.KeySharing` (see its module docs, "Sending"). nio picks
the devices, claims one-time keys and encrypts the Megolm key; the hooks here make those steps
follow the :class:`~bot_toolkit.withheld.SharingPolicy` and record what one share found in a
:class:`ShareRound`:

* ``Olm.is_device_blacklisted``: while nio picks the devices for a room key, devices the policy
  withholds the key from (unverified ones with ``share_with = "verified"``, own devices the
  operator did not name) look blacklisted to nio, so it skips them;
* ``Olm.share_group_session_parallel``: after nio built its batches, every device left out is
  classified: refused by the policy (:attr:`ShareRound.refused`, told why afterwards) or
  unreachable for lack of an Olm session (:attr:`ShareRound.no_olm`, remembered for a re-share);
* ``Olm.get_missing_sessions`` and ``AsyncClient.keys_claim``: no one-time-key claim for
  devices that will not get the key anyway or whose claim backoff has not passed; a claim that
  returned no key for a device starts (or lengthens) its backoff;
* ``Olm.should_share_group_session``: the current session is shared again (same session, no
  rotation) once a device it missed has an Olm session or its backoff has passed, and it is
  replaced when the homeserver refused some of its keys (:meth:`KeyRecipients.rotate_later`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from nio import KeysClaimResponse

from bot_toolkit._rate_rules import ClaimBackoff
from bot_toolkit._sharing_context import SharingContext
from bot_toolkit._sharing_policy import CrossSigningView, DeviceTrust, ShareWith
from bot_toolkit._withheld_wire import PeerDevice, WithheldError

__all__ = ["KeyRecipients", "ShareRound"]

log = logging.getLogger("bot_toolkit.key_sharing")

_ROTATIONS_REMEMBERED: Final = 10_000
"""Megolm sessions waiting to be replaced after a refused room key; beyond this, one is
forgotten (it is then shared on, not replaced)."""


@dataclass(slots=True)
class ShareRound:
    """What one ``share_group_session`` call found, filled by the hooks while it runs."""

    room_id: str
    session_id: str | None = None
    no_olm: list[PeerDevice] = field(default_factory=list)
    refused: list[tuple[PeerDevice, WithheldError]] = field(default_factory=list)
    claim_failed: bool = False

    @contextlib.contextmanager
    def running(self) -> Iterator[ShareRound]:
        """The hooks fill this round while the ``with`` block runs (in this task)."""
        token = _ROUND.set(self)
        try:
            yield self
        finally:
            _ROUND.reset(token)


_ROUND: contextvars.ContextVar[ShareRound | None] = contextvars.ContextVar(
    "bot_toolkit_key_sharing_round", default=None
)


class KeyRecipients:
    """The device-selection hooks of one :class:`~bot_toolkit.key_sharing.KeySharing`.

    ``cross_signing()`` reads the key sharing's current cross-signing view. The hooks run inside
    nio's calls: an unexpected error in them is counted (``ctx.on_error``), never raised into nio.
    """

    def __init__(
        self,
        ctx: SharingContext,
        *,
        backoff: ClaimBackoff,
        cross_signing: Callable[[], CrossSigningView | None],
    ) -> None:
        self.client = ctx.client
        self.backoff = backoff
        self._ctx = ctx
        self._cross_signing = cross_signing
        # room -> (Megolm session id, devices that got no key for lack of an Olm session)
        self._unreached: dict[str, tuple[str, set[PeerDevice]]] = {}
        self._reshare: set[str] = set()
        self._rotate: set[str] = set()  # Megolm session ids to replace before the next message
        self._withholding = False  # inside share_group_session_parallel

    def rotate_later(self, session_id: str) -> None:
        """Replace the Megolm session ``session_id`` before the room's next message (not now:
        a refusal of its keys may arrive while it is still being shared)."""
        self._rotate.add(session_id)
        while len(self._rotate) > _ROTATIONS_REMEMBERED:
            self._rotate.pop()

    def trust(self, olm: Any, device: Any, *, blacklisted: bool | None = None) -> DeviceTrust:
        """nio's trust state of ``device`` plus its cross-signing (outside nio's device
        selection, where our ``is_device_blacklisted`` hook answers as nio's own; inside it,
        pass ``blacklisted``)."""
        view = self._cross_signing()
        policy = self._ctx.policy()
        cross_signed = owner_verified = False
        if view is not None and policy.share_with is not ShareWith.ALL:
            cross_signed = view.cross_signed(device.user_id, device.device_id, device.ed25519)
            owner_verified = cross_signed and view.owner_verified(device.user_id)
        return DeviceTrust(
            verified=bool(olm.is_device_verified(device)),
            blacklisted=(
                bool(olm.is_device_blacklisted(device)) if blacklisted is None else blacklisted
            ),
            unlisted_own=device.user_id == olm.user_id
            and device.device_id not in policy.own_devices,
            cross_signed=cross_signed,
            owner_verified=owner_verified,
        )

    async def refresh_cross_signing(self, room_id: str) -> None:
        """Bring the cross-signing view up to date for the room's members' devices."""
        view, olm = self._cross_signing(), self.client.olm
        if view is None or olm is None or self._ctx.policy().share_with is ShareWith.ALL:
            return
        room = self.client.rooms.get(room_id)
        if room is None:
            return
        devices: dict[str, dict[str, str]] = {}
        for user_id in room.users:
            for device in olm.device_store.active_user_devices(user_id):
                devices.setdefault(user_id, {})[device.device_id] = device.ed25519
        try:
            await view.refresh(devices)
        except Exception:
            self._ctx.on_error("cross_signing_refresh")

    # ----------------------------------------------------------------- olm hooks

    def wrap_should_share(self, olm: Any, original: Callable[[str], bool]) -> Callable[[str], bool]:
        """The replacement for ``olm.should_share_group_session``: rotation and re-sharing."""

        def should_share_group_session(room_id: str) -> bool:
            current = olm.outbound_group_sessions.get(room_id)
            if self._ctx.attached() and current is not None and current.id in self._rotate:
                # Some devices' keys for it were refused (they were told m.unavailable): the
                # next message starts a new session, offered to every device.
                self._rotate.discard(current.id)
                del olm.outbound_group_sessions[room_id]
                log.info("rotating the Megolm session of %s after a refused room key", room_id)
                return True
            if original(room_id):
                return True
            if not self._ctx.attached():
                return False
            try:
                if self._reshare_due(olm, room_id):
                    self._reshare.add(room_id)
                    return True
            except Exception:
                self._ctx.on_error("should_share")
            return False

        return should_share_group_session

    def _reshare_due(self, olm: Any, room_id: str) -> bool:
        entry = self._unreached.get(room_id)
        session = olm.outbound_group_sessions.get(room_id)
        if entry is None or session is None or session.expired or entry[0] != session.id:
            return False
        for peer in entry[1]:
            device = olm.device_store[peer.user_id].get(peer.device_id)
            if device is None or device.deleted or device.curve25519 != peer.curve25519:
                continue
            if olm.session_store.get(peer.curve25519) is not None or self.backoff.due(peer):
                return True
        return False

    def wrap_missing(
        self, olm: Any, original: Callable[[list[str]], dict[str, list[str]]]
    ) -> Callable[[list[str]], dict[str, list[str]]]:
        """The replacement for ``olm.get_missing_sessions``: only devices worth a claim."""

        def get_missing_sessions(users: list[str]) -> dict[str, list[str]]:
            missing = original(users)
            if not self._ctx.attached():
                return missing
            try:
                return self._claimable(olm, missing)
            except Exception:
                self._ctx.on_error("get_missing_sessions")
                return missing

        return get_missing_sessions

    def _claimable(self, olm: Any, missing: dict[str, list[str]]) -> dict[str, list[str]]:
        """Leave out devices that will not get the key anyway, and devices in claim backoff."""
        wanted: dict[str, list[str]] = {}
        policy = self._ctx.policy()
        for user_id, device_ids in missing.items():
            for device_id in device_ids:
                device = olm.device_store[user_id].get(device_id)
                if device is None:
                    continue
                if policy.withholds(self.trust(olm, device)):
                    continue
                if not self.backoff.due(_peer(device)):
                    log.debug("claim for %s %s skipped: backoff", user_id, device_id)
                    continue
                wanted.setdefault(user_id, []).append(device_id)
        return wanted

    def wrap_blacklisted(self, olm: Any, original: Callable[[Any], bool]) -> Callable[[Any], bool]:
        """The replacement for ``olm.is_device_blacklisted``: the policy, during selection."""

        def is_device_blacklisted(device: Any) -> bool:
            if original(device):
                return True
            # Only while nio picks the devices for a room key: the policy withholds the key from
            # unverified devices, and from own devices the operator did not name, by making nio
            # skip them like blacklisted ones.
            if not (self._ctx.attached() and self._withholding):
                return False
            policy = self._ctx.policy()
            if device.user_id == olm.user_id and device.device_id not in policy.own_devices:
                return True
            if policy.share_with is ShareWith.ALL:
                return False
            return not self.trust(olm, device, blacklisted=False).meets(policy.share_with)

        return is_device_blacklisted

    def wrap_parallel(self, olm: Any, original: Callable[..., Any]) -> Callable[..., Any]:
        """The replacement for ``olm.share_group_session_parallel``: re-share, then classify."""

        def share_group_session_parallel(
            room_id: str, users: list[str], ignore_unverified_devices: bool = False
        ) -> Any:
            if not self._ctx.attached():
                yield from original(room_id, users, ignore_unverified_devices)
                return
            if room_id in self._reshare:
                self._reshare.discard(room_id)
                session = olm.outbound_group_sessions.get(room_id)
                if session is not None and session.shared and not session.expired:
                    # Extend the current session to the devices it missed, instead of letting
                    # nio rotate it: they get it from the current message index on.
                    session.shared = False
                    log.info("re-sharing the Megolm session of %s with devices it missed", room_id)
            self._withholding = True
            try:
                # nio builds every batch before the first request is sent: materialise them so
                # that the refused devices are known, then hand them over unchanged.
                batches = list(original(room_id, users, ignore_unverified_devices))
            finally:
                self._withholding = False
            try:
                self._classify(olm, room_id, users)
            except Exception:
                self._ctx.on_error("classify")
            yield from batches

        return share_group_session_parallel

    def _classify(self, olm: Any, room_id: str, users: list[str]) -> None:
        session = olm.outbound_group_sessions.get(room_id)
        if session is None:
            return
        current = _ROUND.get()
        found = (
            current if current is not None and current.room_id == room_id else ShareRound(room_id)
        )
        found.session_id = session.id
        policy = self._ctx.policy()
        unreached: set[PeerDevice] = set()
        for user_id in users:
            for device in olm.device_store.active_user_devices(user_id):
                if user_id == olm.user_id and device.device_id == olm.device_id:
                    continue
                if (user_id, device.device_id) in session.users_shared_with:
                    continue
                peer = _peer(device)
                try:
                    share = policy.check_share(self.trust(olm, device))
                except WithheldError as refusal:
                    found.refused.append((peer, refusal))
                    continue
                if not share:
                    continue
                if olm.session_store.get(device.curve25519) is None:
                    unreached.add(peer)
                    found.no_olm.append(peer)
        if unreached:
            self._unreached[room_id] = (session.id, unreached)
        else:
            self._unreached.pop(room_id, None)

    # ----------------------------------------------------------------- client hook

    def wrap_keys_claim(
        self, original: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        """The replacement for ``client.keys_claim``: each claimed device's backoff updated."""

        async def keys_claim(user_set: Mapping[str, Any]) -> Any:
            olm = self.client.olm
            if not self._ctx.attached() or olm is None:
                return await original(user_set)
            claimed: list[Any] = []
            with contextlib.suppress(Exception):
                for user_id, device_ids in user_set.items():
                    for device_id in device_ids:
                        device = olm.device_store[user_id].get(device_id)
                        if device is not None:
                            claimed.append(device)
            response = await original(user_set)
            try:
                self._account_claim(olm, claimed, response)
            except Exception:
                self._ctx.on_error("keys_claim")
            return response

        return keys_claim

    def _account_claim(self, olm: Any, claimed: list[Any], response: Any) -> None:
        if not isinstance(response, KeysClaimResponse):
            current = _ROUND.get()
            if current is not None:
                current.claim_failed = True
            log.warning("one-time key claim failed: %s", response)
            return
        for device in claimed:
            peer = _peer(device)
            if olm.session_store.get(device.curve25519) is not None:
                self.backoff.succeeded(peer)
            else:
                delay = self.backoff.failed(peer)
                log.info(
                    "no one-time key for %s %s; next claim in %.0fs",
                    device.user_id,
                    device.device_id,
                    delay,
                )


def _peer(device: Any) -> PeerDevice:
    return PeerDevice(device.user_id, device.device_id, device.curve25519)
