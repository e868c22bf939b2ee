"""A refusal and its wire form: :class:`WithheldError`, :func:`withheld_content`, the counters.

:func:`withheld_content` is the one place that turns a :class:`WithheldError` into the outbound
``m.room_key.withheld`` content. :class:`PeerDevice` names a peer device by user id, device id and
curve25519 key (the identity every withheld rule keys on). Public through
:mod:`bot_toolkit.withheld`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from bot_toolkit.events import WithheldCode
from bot_toolkit.metrics import Counter, Metrics

Clock = Callable[[], float]
"""A clock in seconds (``time.time`` for persisted times, ``time.monotonic`` for in-memory ones)."""

MEGOLM_ALGORITHM: Final = "m.megolm.v1.aes-sha2"
WITHHELD_EVENT: Final = "m.room_key.withheld"
"""The to-device event type of a withheld notice."""


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
