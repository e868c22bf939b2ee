"""Why a device does not get a room key: the ``m.no_olm`` ledger and the sharing policy.

Everything here decides; nothing here talks to the network. :mod:`bot_toolkit.key_sharing`
wires it into nio and sends what is decided through the outbox.

``m.no_olm`` (spec, ``m.room_key.withheld``): when no Olm session can be set up with a device, send
it ONE notice without ``room_id``/``session_id``; after that send no further ``m.no_olm`` to it
"unless another olm session was previously established successfully". :class:`NoOlmLedger`
keeps that memory per :class:`PeerDevice` (user id, device id *and* curve25519 identity key,
so a device that changes its identity key counts as new) in the bot's
:class:`~bot_toolkit.store.Store`:

* :meth:`NoOlmLedger.decide` records the decision and a fresh transaction id in one committed
  transaction *before* anything is sent, and returns the transaction id (``None``: stay silent);
* :meth:`NoOlmLedger.mark_sent` records that the outbox has the notice;
* :meth:`NoOlmLedger.pending` lists decisions whose send never got recorded (the process died in
  between): the caller sends them again with the *same* transaction id, so the homeserver (and
  the outbox) de-duplicate and the device sees exactly one notice;
* :meth:`NoOlmLedger.session_established` re-arms the device for one more notice.

The other codes: :class:`SharingPolicy` raises :class:`WithheldError` carrying the wire code
(``m.blacklisted``/``m.unverified`` when sharing, ``m.unauthorised``/``m.unavailable`` for key
requests); :func:`withheld_content` is the one place that turns such an error into the outbound
``m.room_key.withheld`` content. :class:`WithheldDeduper` sends ``m.blacklisted``/``m.unverified``
once per device and Megolm session. :class:`ClaimBackoff` spaces failed one-time-key claims
(15 s x 2^n, at most 15 min) and :class:`DummyThrottle` allows one ``m.dummy`` per peer device
per hour. Clocks are injected everywhere, so tests never sleep.

Metrics (in the bot's :class:`~bot_toolkit.metrics.Metrics`): ``withheld_sent_total{code}`` and
``withheld_suppressed_total{code}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

from bot_toolkit._bounded import BoundedMap
from bot_toolkit.events import WithheldCode
from bot_toolkit.metrics import Counter, Metrics
from bot_toolkit.store import Store

__all__ = [
    "CLAIM_BACKOFF_BASE",
    "CLAIM_BACKOFF_CAP",
    "DUMMY_INTERVAL",
    "MEGOLM_ALGORITHM",
    "SENDER_BURST",
    "SENDER_REFILL",
    "SENDER_TRACKED",
    "ClaimBackoff",
    "Clock",
    "CrossSigningView",
    "DeviceTrust",
    "DummyThrottle",
    "LedgerEntry",
    "NoOlmLedger",
    "PeerDevice",
    "SenderRateLimit",
    "ShareWith",
    "SharingPolicy",
    "WithheldDeduper",
    "WithheldError",
    "WithheldMetrics",
    "withheld_content",
]

log = logging.getLogger("bot_toolkit.withheld")

Clock = Callable[[], float]
"""A clock in seconds (``time.time`` for persisted times, ``time.monotonic`` for in-memory ones)."""

MEGOLM_ALGORITHM: Final = "m.megolm.v1.aes-sha2"
CLAIM_BACKOFF_BASE: Final = 15.0
"""Seconds to wait after the first failed one-time-key claim for a device."""
CLAIM_BACKOFF_CAP: Final = 15 * 60.0
"""The longest wait between claims for one device."""
DUMMY_INTERVAL: Final = 60 * 60.0
"""At most one new Olm session (and ``m.dummy``) per peer device in this many seconds (spec)."""

SENDER_BURST: Final = 10
"""Answers (withheld replies, device-list queries) one sender user may cause at once."""
SENDER_REFILL: Final = 30.0
"""Seconds after which a sender user may cause one more answer, up to :data:`SENDER_BURST`."""
SENDER_TRACKED: Final = 10_000
"""Sender users whose budget is remembered; the least recently seen is forgotten first."""

_COMPONENT: Final = "withheld"
_MIGRATIONS: Final[dict[int, list[str]]] = {
    1: [
        """
        CREATE TABLE withheld_no_olm (
            user_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            curve25519 TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'sent')),
            txn_id TEXT NOT NULL,
            session_since_notice INTEGER NOT NULL DEFAULT 0,
            notices INTEGER NOT NULL DEFAULT 1,
            suppressed INTEGER NOT NULL DEFAULT 0,
            last_notice_at REAL NOT NULL,
            session_at REAL,
            PRIMARY KEY (user_id, device_id, curve25519)
        )
        """,
        "CREATE INDEX withheld_no_olm_curve ON withheld_no_olm (curve25519)",
        """
        CREATE TABLE withheld_dummy (
            user_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            curve25519 TEXT NOT NULL,
            sent_at REAL NOT NULL,
            PRIMARY KEY (user_id, device_id, curve25519)
        )
        """,
    ],
}


# ---------------------------------------------------------------------------------------------
# Identities, errors and the wire content


@dataclass(frozen=True, slots=True)
class PeerDevice:
    """One peer device as the ledger knows it. A new ``curve25519`` key is a new device."""

    user_id: str
    device_id: str
    curve25519: str


_DEFAULT_REASONS: Final[dict[str, str]] = {
    WithheldCode.BLACKLISTED: "The sender has blocked this device.",
    WithheldCode.UNVERIFIED: "The sender shares keys only with verified devices.",
    WithheldCode.UNAUTHORISED: "This device is not allowed to have this key.",
    WithheldCode.UNAVAILABLE: "The requested key is not available on this device.",
    WithheldCode.NO_OLM: "Unable to establish a secure channel (no Olm session).",
}


class WithheldError(Exception):
    """A refusal to give a device a room key, carrying the ``m.room_key.withheld`` code.

    Raised by :class:`SharingPolicy`; turned into the outbound content by
    :func:`withheld_content` and nowhere else. ``code`` is a :class:`WithheldCode` value or a
    custom (Java-package-named) code; ``reason`` is the human-readable text (a default per known
    code when not given).
    """

    def __init__(self, code: str, reason: str | None = None) -> None:
        if not code:
            raise ValueError("a withheld code is required")
        if code == WithheldCode.HISTORY_NOT_SHARED:
            raise ValueError("m.history_not_shared must not be sent in m.room_key.withheld")
        self.code = str(code)
        self.reason = reason or _DEFAULT_REASONS.get(code, "The sender withheld the key.")
        super().__init__(f"{self.code}: {self.reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.reason))


def withheld_content(
    error: WithheldError,
    *,
    sender_key: str,
    from_device: str | None,
    room_id: str | None = None,
    session_id: str | None = None,
    algorithm: str = MEGOLM_ALGORITHM,
) -> dict[str, Any]:
    """The ``content`` of the ``m.room_key.withheld`` to-device event for ``error``.

    ``sender_key`` is the curve25519 key of the device that created the Megolm session (our own
    key for our sessions and for ``m.no_olm``). ``m.no_olm`` carries no ``room_id`` and no
    ``session_id`` whatever is passed; every other code requires both. ``from_device`` (MSC3735,
    sent by matrix-rust-sdk) names our device so that the receiver can answer with an ``m.dummy``.

    Raises:
        ValueError: a code other than ``m.no_olm`` without ``room_id``/``session_id``.
    """
    content: dict[str, Any] = {
        "algorithm": algorithm,
        "sender_key": sender_key,
        "code": error.code,
        "reason": error.reason,
    }
    if error.code != WithheldCode.NO_OLM:
        if not room_id or not session_id:
            raise ValueError(f"{error.code} needs room_id and session_id")
        content["room_id"] = room_id
        content["session_id"] = session_id
    if from_device:
        content["from_device"] = from_device
    return content


class WithheldMetrics:
    """The two withheld counters, registered once in the bot's metrics."""

    def __init__(self, metrics: Metrics | None) -> None:
        registry = metrics if metrics is not None else Metrics()
        self.sent: Counter = registry.counter(
            "withheld_sent_total", "m.room_key.withheld notices handed to the outbox", ["code"]
        )
        self.suppressed: Counter = registry.counter(
            "withheld_suppressed_total",
            "m.room_key.withheld notices not sent because the device was already told",
            ["code"],
        )


# ---------------------------------------------------------------------------------------------
# Policy


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


# ---------------------------------------------------------------------------------------------
# In-memory rate rules


class ClaimBackoff:
    """Spacing of one-time-key claims for devices whose last claim returned no key.

    After the n-th failure in a row the next claim waits ``base * 2**(n-1)`` seconds, at most
    ``cap``: 15 s, 30 s, 1 min, ... 15 min. A success forgets the device. In memory only: after
    a restart the first claim is tried again (and the ledger keeps the notice silent).
    """

    def __init__(
        self,
        clock: Clock = time.monotonic,
        *,
        base: float = CLAIM_BACKOFF_BASE,
        cap: float = CLAIM_BACKOFF_CAP,
        max_entries: int = 100_000,
    ) -> None:
        self._clock = clock
        self.base = base
        self.cap = cap
        # device -> (failures in a row, time the next claim is allowed)
        self._state: BoundedMap[PeerDevice, tuple[int, float]] = BoundedMap(max_entries)

    def due(self, device: PeerDevice) -> bool:
        """Whether a claim for ``device`` may be made now."""
        state = self._state.get(device)
        return state is None or self._clock() >= state[1]

    def failures(self, device: PeerDevice) -> int:
        """Failed claims in a row for ``device``."""
        state = self._state.get(device)
        return 0 if state is None else state[0]

    def failed(self, device: PeerDevice) -> float:
        """Record a failed claim; returns the wait before the next one."""
        failures = self.failures(device) + 1
        delay = min(self.base * float(2 ** (failures - 1)), self.cap)
        self._state[device] = (failures, self._clock() + delay)
        return delay

    def succeeded(self, device: PeerDevice) -> None:
        """Forget ``device``: its next failure starts again at ``base``."""
        self._state.pop(device, None)


class SenderRateLimit:
    """A token bucket per sender user for work that any Matrix user can make the bot do.

    Each sender starts with ``burst`` tokens and gets one more every ``refill`` seconds, up to
    ``burst``; :meth:`allow` takes one. In memory, for at most ``max_senders`` senders (least
    recently seen forgotten first; a forgotten sender starts with a full bucket again).
    """

    def __init__(
        self,
        clock: Clock = time.monotonic,
        *,
        burst: int = SENDER_BURST,
        refill: float = SENDER_REFILL,
        max_senders: int = SENDER_TRACKED,
    ) -> None:
        if burst < 1 or refill <= 0 or max_senders < 1:
            raise ValueError("burst and max_senders must be >= 1, refill > 0")
        self._clock = clock
        self.burst = burst
        self.refill = refill
        # sender -> (tokens, time they were counted)
        self._buckets: BoundedMap[str, tuple[float, float]] = BoundedMap(max_senders)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, sender: str) -> bool:
        """Take one token of ``sender``; False (nothing taken) when its bucket is empty."""
        now = self._clock()
        state = self._buckets.pop(sender, None)
        if state is None:
            tokens = float(self.burst)
        else:
            tokens, since = state
            tokens = min(float(self.burst), tokens + max(0.0, now - since) / self.refill)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[sender] = (tokens, now)
        return allowed


class WithheldDeduper:
    """Send ``m.blacklisted`` / ``m.unverified`` once per device and Megolm session.

    In memory, bounded (least recently used out). nio 0.26 keeps outbound Megolm sessions in
    memory only, so after a restart every session id is new and nothing here needs to survive.
    """

    def __init__(self, metrics: WithheldMetrics | None = None, *, max_entries: int = 100_000):
        self._metrics = metrics or WithheldMetrics(None)
        self._seen: BoundedMap[tuple[PeerDevice, str, str], None] = BoundedMap(max_entries)

    def first(self, device: PeerDevice, session_id: str, code: str) -> bool:
        """True the first time for (device, session, code); later calls count a suppression."""
        key = (device, session_id, code)
        if key in self._seen:
            self._seen.touch(key)
            self._metrics.suppressed.inc(code)
            return False
        self._seen[key] = None
        return True

    def forget(self, device: PeerDevice, session_id: str, code: str) -> None:
        """Undo :meth:`first` (the send failed before the outbox took it)."""
        self._seen.pop((device, session_id, code), None)


# ---------------------------------------------------------------------------------------------
# The persistent m.no_olm ledger


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One device's row in the ledger."""

    device: PeerDevice
    state: str
    """``pending`` (decided, the outbox may not have it yet) or ``sent`` (the outbox has it)."""
    txn_id: str
    """The transaction id of the latest notice."""
    session_since_notice: bool
    """An Olm session with the device has existed since the latest notice: one more is allowed."""
    notices: int
    """Notices decided for this device so far."""
    suppressed: int
    """Failures that stayed silent."""
    last_notice_at: float
    session_at: float | None


_ENTRY_COLUMNS = (
    "user_id, device_id, curve25519, state, txn_id, session_since_notice, notices, suppressed, "
    "last_notice_at, session_at"
)


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    return LedgerEntry(
        device=PeerDevice(row[0], row[1], row[2]),
        state=row[3],
        txn_id=row[4],
        session_since_notice=bool(row[5]),
        notices=int(row[6]),
        suppressed=int(row[7]),
        last_notice_at=float(row[8]),
        session_at=None if row[9] is None else float(row[9]),
    )


class NoOlmLedger:
    """Which devices were told ``m.no_olm``, and whether they may be told again.

    Rules (per :class:`PeerDevice`): the first failure to set up an Olm session gives a notice;
    later failures stay silent; once an Olm session with the device has existed (we opened one
    after a successful claim, or it opened one to us), the next failure gives one more notice.

    Create with ``await NoOlmLedger.open(store, ...)``. Every change is one committed
    transaction; decisions for the same device are serialised.
    """

    def __init__(
        self,
        store: Store,
        metrics: WithheldMetrics | None = None,
        *,
        clock: Clock = time.time,
        new_txn_id: Callable[[], str] | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics or WithheldMetrics(None)
        self._clock = clock
        self._new_txn_id = new_txn_id or (lambda: f"bt-noolm-{uuid.uuid4().hex}")
        self._lock = asyncio.Lock()
        # curve25519 keys of devices told m.no_olm and not re-armed since: the only ones for which
        # a new Olm session changes anything (a cheap filter for the hot decrypt path).
        self._armed: set[str] = set()

    @classmethod
    async def open(
        cls,
        store: Store,
        metrics: WithheldMetrics | None = None,
        *,
        clock: Clock = time.time,
        new_txn_id: Callable[[], str] | None = None,
    ) -> NoOlmLedger:
        """Migrate the ledger's tables and load the in-memory filter."""
        await store.migrate(_COMPONENT, _MIGRATIONS)
        ledger = cls(store, metrics, clock=clock, new_txn_id=new_txn_id)
        rows = await store.fetchall(
            "SELECT curve25519 FROM withheld_no_olm WHERE session_since_notice = 0"
        )
        ledger._armed = {row[0] for row in rows}
        return ledger

    async def entry(self, device: PeerDevice) -> LedgerEntry | None:
        """The ledger row for ``device``, if any."""
        rows = await self._store.fetchall(
            f"SELECT {_ENTRY_COLUMNS} FROM withheld_no_olm "
            "WHERE user_id = ? AND device_id = ? AND curve25519 = ?",
            (device.user_id, device.device_id, device.curve25519),
        )
        return _entry(rows[0]) if rows else None

    async def entries(self) -> list[LedgerEntry]:
        """Every row (for diagnostics)."""
        rows = await self._store.fetchall(
            f"SELECT {_ENTRY_COLUMNS} FROM withheld_no_olm ORDER BY user_id, device_id"
        )
        return [_entry(r) for r in rows]

    async def decide(self, device: PeerDevice) -> str | None:
        """A failure to set up an Olm session with ``device``: notify or stay silent?

        Returns the transaction id to send the notice with (already committed as ``pending``), or
        ``None`` when the device was told before and no session has existed since (the
        suppression is counted in ``withheld_suppressed_total{code="m.no_olm"}``).
        """
        async with self._lock:
            now = self._clock()
            async with self._store.transaction() as conn:
                cursor = await conn.execute(
                    "SELECT session_since_notice FROM withheld_no_olm "
                    "WHERE user_id = ? AND device_id = ? AND curve25519 = ?",
                    (device.user_id, device.device_id, device.curve25519),
                )
                row = await cursor.fetchone()
                await cursor.close()
                if row is not None and not row[0]:
                    await conn.execute(
                        "UPDATE withheld_no_olm SET suppressed = suppressed + 1 "
                        "WHERE user_id = ? AND device_id = ? AND curve25519 = ?",
                        (device.user_id, device.device_id, device.curve25519),
                    )
                    txn_id = None
                else:
                    txn_id = self._new_txn_id()
                    await conn.execute(
                        "INSERT INTO withheld_no_olm (user_id, device_id, curve25519, state, "
                        "txn_id, session_since_notice, notices, suppressed, last_notice_at) "
                        "VALUES (?, ?, ?, 'pending', ?, 0, 1, 0, ?) "
                        "ON CONFLICT (user_id, device_id, curve25519) DO UPDATE SET "
                        "state = 'pending', txn_id = excluded.txn_id, session_since_notice = 0, "
                        "notices = notices + 1, last_notice_at = excluded.last_notice_at",
                        (device.user_id, device.device_id, device.curve25519, txn_id, now),
                    )
        if txn_id is None:
            self._metrics.suppressed.inc(WithheldCode.NO_OLM)
            log.debug("m.no_olm to %s %s suppressed", device.user_id, device.device_id)
        else:
            self._armed.add(device.curve25519)
            log.info("m.no_olm to %s %s decided (%s)", device.user_id, device.device_id, txn_id)
        return txn_id

    async def mark_sent(self, device: PeerDevice, txn_id: str) -> None:
        """The outbox holds the notice sent with ``txn_id``."""
        async with self._lock, self._store.transaction() as conn:
            await conn.execute(
                "UPDATE withheld_no_olm SET state = 'sent' "
                "WHERE user_id = ? AND device_id = ? AND curve25519 = ? AND txn_id = ?",
                (device.user_id, device.device_id, device.curve25519, txn_id),
            )

    async def pending(self) -> list[tuple[PeerDevice, str]]:
        """Decided notices whose hand-over to the outbox was not recorded: send them again with
        the same transaction id, then :meth:`mark_sent`."""
        rows = await self._store.fetchall(
            "SELECT user_id, device_id, curve25519, txn_id FROM withheld_no_olm "
            "WHERE state = 'pending' ORDER BY last_notice_at"
        )
        return [(PeerDevice(r[0], r[1], r[2]), r[3]) for r in rows]

    def armed(self, curve25519: str) -> bool:
        """Whether a new session with the device of this key would change the ledger."""
        return curve25519 in self._armed

    async def session_established(
        self, curve25519: str, *, user_id: str | None = None, device_id: str | None = None
    ) -> int:
        """An Olm session with the device of ``curve25519`` exists: allow it one more notice.

        ``user_id``/``device_id`` narrow the match when known. Returns how many rows changed.
        """
        if curve25519 not in self._armed:
            return 0
        sql = (
            "UPDATE withheld_no_olm SET session_since_notice = 1, session_at = ? "
            "WHERE curve25519 = ? AND session_since_notice = 0"
        )
        params: list[Any] = [self._clock(), curve25519]
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(device_id)
        async with self._lock, self._store.transaction() as conn:
            cursor = await conn.execute(sql, params)
            changed = cursor.rowcount
            await cursor.close()
            cursor = await conn.execute(
                "SELECT 1 FROM withheld_no_olm "
                "WHERE curve25519 = ? AND session_since_notice = 0 LIMIT 1",
                (curve25519,),
            )
            still_armed = await cursor.fetchone() is not None
            await cursor.close()
        if not still_armed:
            self._armed.discard(curve25519)
        if changed:
            log.info("Olm session with %s exists: one more m.no_olm allowed", curve25519)
        return int(changed)


class DummyThrottle:
    """At most one new Olm session plus ``m.dummy`` per peer device per hour (persisted)."""

    def __init__(
        self, store: Store, *, clock: Clock = time.time, interval: float = DUMMY_INTERVAL
    ) -> None:
        self._store = store
        self._clock = clock
        self.interval = interval
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, store: Store, *, clock: Clock = time.time, interval: float = DUMMY_INTERVAL
    ) -> DummyThrottle:
        """Migrate the (shared) withheld tables and return the throttle."""
        await store.migrate(_COMPONENT, _MIGRATIONS)
        return cls(store, clock=clock, interval=interval)

    async def acquire(self, device: PeerDevice) -> bool:
        """True (and recorded) when a new session may be opened with ``device`` now."""
        async with self._lock:
            now = self._clock()
            async with self._store.transaction() as conn:
                cursor = await conn.execute(
                    "SELECT sent_at FROM withheld_dummy "
                    "WHERE user_id = ? AND device_id = ? AND curve25519 = ?",
                    (device.user_id, device.device_id, device.curve25519),
                )
                row = await cursor.fetchone()
                await cursor.close()
                if row is not None and now - float(row[0]) < self.interval:
                    return False
                await conn.execute(
                    "INSERT INTO withheld_dummy (user_id, device_id, curve25519, sent_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (user_id, device_id, curve25519) "
                    "DO UPDATE SET sent_at = excluded.sent_at",
                    (device.user_id, device.device_id, device.curve25519, now),
                )
            return True

    async def release(self, device: PeerDevice) -> None:
        """Forget the last acquisition (nothing was sent after all)."""
        async with self._lock, self._store.transaction() as conn:
            await conn.execute(
                "DELETE FROM withheld_dummy WHERE user_id = ? AND device_id = ? AND curve25519 = ?",
                (device.user_id, device.device_id, device.curve25519),
            )
