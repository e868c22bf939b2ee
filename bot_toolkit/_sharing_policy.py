"""The room-key sharing policy: who gets a key, who is told why not (decides, sends nothing).

Public through :mod:`bot_toolkit.withheld` and the front door.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from bot_toolkit._withheld_wire import WithheldError
from bot_toolkit.events import WithheldCode


class ShareWith(StrEnum):
    """Which devices get room keys."""

    ALL = "all"
    """Every device that is not blacklisted (unverified ones too)."""
    VERIFIED = "verified"
    """Devices the bot verified, or cross-signed by a user whose identity the bot verified
    (signed with its user-signing key); the others get ``m.unverified``."""
    CROSS_SIGNED = "cross_signed"
    """Devices cross-signed by their owner (spec v1.18 "Recommended client behaviour",
    MSC4153, Element's "exclude insecure devices"); the others get ``m.unverified``. Local
    verification does not count, as in matrix-rust-sdk's identity-based strategy."""


class CrossSigningView(Protocol):
    """What key sharing asks about other users' cross-signing (implemented by
    :class:`bot_toolkit.identity.trust.CrossSigningTrust`)."""

    async def refresh(self, devices: Mapping[str, Mapping[str, str]]) -> None:
        """Make the answers current for ``{user_id: {device_id: ed25519}}`` (nio's view)."""
        ...

    def cross_signed(self, user_id: str, device_id: str, ed25519: str) -> bool:
        """Whether the device (with this key) is signed by its owner's self-signing key."""
        ...

    def owner_verified(self, user_id: str) -> bool:
        """Whether we signed the user's master key with our user-signing key."""
        ...


@dataclass(frozen=True, slots=True)
class DeviceTrust:
    """What the bot knows about a device's trust (from nio's device store)."""

    verified: bool = False
    blacklisted: bool = False
    unlisted_own: bool = False
    """A device of the bot's own user that is not in :attr:`SharingPolicy.own_devices`."""
    cross_signed: bool = False
    """Signed by its owner's self-signing key (and the owner has a cross-signing identity)."""
    owner_verified: bool = False
    """The owner's master key carries our user-signing key's signature."""

    def meets(self, share_with: ShareWith) -> bool:
        """Whether the device passes ``share_with`` (blacklisting aside)."""
        if share_with is ShareWith.CROSS_SIGNED:
            return self.cross_signed
        if share_with is ShareWith.VERIFIED:
            return self.verified or (self.cross_signed and self.owner_verified)
        return True


@dataclass(frozen=True, slots=True)
class SharingPolicy:
    """The configurable room-key sharing policy (mirrors the bot's ``[keys]`` section).

    Sharing a Megolm session with a device (:meth:`check_share`):

    * blacklisted devices never get it; they are told ``m.blacklisted`` when
      ``notify_blacklisted`` (and ``send_withheld``) is set;
    * with ``share_with = "cross_signed"`` a device its owner has not cross-signed gets
      ``m.unverified``; with ``"verified"`` so does a device that is neither verified by the bot
      nor cross-signed by a user whose identity the bot verified; with ``"all"`` it gets the
      key (nio then marks it "ignored", as ``room_send(...,
      ignore_unverified_devices=True)`` does);
    * a device with no Olm session and no claimable one-time key gets one ``m.no_olm`` (ledger
      rules) when ``no_olm_notices`` is set.

    Answering an ``m.room_key_request`` (:meth:`check_key_request`), when ``answer_key_requests``:
    only verified devices of the bot's own user may have keys (spec: "clients should only send
    keys requested by the verified devices of the same user"); any other requester gets
    ``m.unauthorised``. An authorised request for a session the bot does not hold gets
    ``m.unavailable``. An authorised request for a session it holds is left to nio, which
    forwards the key itself: the two never both answer.

    Devices of the bot's own user get keys (shared or forwarded) only when the operator named
    them in ``own_devices``; any other device of the bot's account is refused with
    ``m.unauthorised``, verified or not (someone holding the bot's password can add a device
    and would otherwise get every Megolm session the bot holds).

    ``send_withheld`` switches every notice except ``m.no_olm`` off.
    """

    share_with: ShareWith = ShareWith.VERIFIED
    send_withheld: bool = True
    no_olm_notices: bool = True
    notify_blacklisted: bool = True
    answer_key_requests: bool = True
    dummy_on_no_olm: bool = True
    """Answer a received ``m.no_olm`` by opening an Olm session and sending ``m.dummy``."""
    own_devices: frozenset[str] = frozenset()
    """Device ids of the bot's own user that may get room keys (the operator's opt-in)."""

    def __post_init__(self) -> None:
        if isinstance(self.own_devices, str) or not all(
            isinstance(d, str) and d for d in self.own_devices
        ):
            raise ValueError(f"own_devices: expected device ids, got {self.own_devices!r}")
        object.__setattr__(self, "own_devices", frozenset(self.own_devices))
        try:
            object.__setattr__(self, "share_with", ShareWith(self.share_with))
        except ValueError:
            allowed = ", ".join(repr(s.value) for s in ShareWith)
            raise ValueError(
                f"share_with: expected one of {allowed}, got {self.share_with!r}"
            ) from None
        for name in (
            "send_withheld",
            "no_olm_notices",
            "notify_blacklisted",
            "answer_key_requests",
            "dummy_on_no_olm",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a boolean, got {getattr(self, name)!r}")

    def check_share(self, trust: DeviceTrust) -> bool:
        """Whether a device with an Olm session gets the room key.

        Returns True to share, False to skip silently; raises :class:`WithheldError` to skip and
        tell the device why.
        """
        if trust.unlisted_own:
            if self.send_withheld:
                raise WithheldError(WithheldCode.UNAUTHORISED)
            return False
        if trust.blacklisted:
            if self.send_withheld and self.notify_blacklisted:
                raise WithheldError(WithheldCode.BLACKLISTED)
            return False
        if not trust.meets(self.share_with):
            if self.send_withheld:
                raise WithheldError(WithheldCode.UNVERIFIED)
            return False
        return True

    def withholds(self, trust: DeviceTrust) -> bool:
        """Whether :meth:`check_share` keeps the key from this device (told or not)."""
        try:
            return not self.check_share(trust)
        except WithheldError:
            return True

    def check_key_request(
        self,
        *,
        own_user_id: str,
        requester_user_id: str,
        requester: DeviceTrust | None,
        have_session: bool | Callable[[], bool],
        requester_device_id: str | None = None,
    ) -> None:
        """Decide an incoming ``m.room_key_request``.

        ``requester`` is ``None`` when the requesting device is unknown. Returns when the request
        may be served (nio serves it); raises :class:`WithheldError` with ``m.unauthorised`` or
        ``m.unavailable`` otherwise. Authorisation is checked first, so an unauthorised requester
        never learns whether the bot holds the key. ``have_session`` may be a callable: it is
        called only for an authorised requester (the look-up costs nothing for anyone else).
        Only a device in :attr:`own_devices` can be authorised.
        """
        if (
            requester_user_id != own_user_id
            or requester_device_id not in self.own_devices
            or requester is None
            or requester.unlisted_own
            or requester.blacklisted
            or not requester.verified
        ):
            raise WithheldError(WithheldCode.UNAUTHORISED)
        held = have_session() if callable(have_session) else have_session
        if not held:
            raise WithheldError(WithheldCode.UNAVAILABLE)
