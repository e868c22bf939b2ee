"""What the parts of one :class:`~bot_toolkit.key_sharing.KeySharing` share.

:class:`~bot_toolkit.key_sharing.KeySharing` makes one :class:`SharingContext` and hands it to
each part (:mod:`bot_toolkit._key_recipients`, :mod:`bot_toolkit._room_key_delivery`,
:mod:`bot_toolkit._share_notices`, :mod:`bot_toolkit._key_request_answers`,
:mod:`bot_toolkit._no_olm_answers`, :mod:`bot_toolkit._nio_sends`); its callables read the key
sharing's current state, so a part never holds the key sharing itself.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from nio import AsyncClient

    from bot_toolkit.metrics import Counter, Metrics
    from bot_toolkit.withheld import Clock, SharingPolicy, WithheldMetrics

__all__ = ["NoticeOutbox", "SharingContext"]


class NoticeOutbox(Protocol):
    """What key sharing needs from the :class:`~bot_toolkit.outbox.Outbox`."""

    async def send(
        self,
        event_type: str,
        messages: Mapping[str, Mapping[str, Mapping[str, Any]]],
        *,
        txn_id: str | None = None,
    ) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class SharingContext:
    """The client, the outbox, the counters and the state every key-sharing part uses."""

    client: AsyncClient
    outbox: NoticeOutbox
    """Every room key, notice and ``m.dummy`` goes through it."""
    metrics: Metrics
    """Where a part registers its own counters."""
    counters: WithheldMetrics
    """``withheld_sent_total`` / ``withheld_suppressed_total``."""
    limited: Counter
    """``key_sharing_rate_limited_total{what}``: received events left unanswered."""
    clock: Clock
    """Monotonic clock (claim backoff, sender budgets)."""
    policy: Callable[[], SharingPolicy]
    """The key sharing's current policy."""
    attached: Callable[[], bool]
    """Whether the key sharing's hooks are active (a part does nothing once they are not)."""
    own: Callable[[], tuple[str, str, str]]
    """Our user id, device id and curve25519 key."""
    spawn: Callable[[Coroutine[Any, Any, None]], None]
    """Run a coroutine in the key sharing's background task set."""
    on_error: Callable[[str], None]
    """Log and count an unexpected error (``key_sharing_errors_total{where}``)."""
