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

This module is the public face; the code lives in four private modules, one job each:
``_withheld_wire`` (the error and its wire content), ``_sharing_policy`` (the policy),
``_rate_rules`` (in-memory backoff, budgets, de-duplication) and ``_no_olm_ledger`` (the persisted
ledger and ``m.dummy`` throttle).
"""

from __future__ import annotations

from bot_toolkit._no_olm_ledger import (
    DUMMY_INTERVAL,
    DummyThrottle,
    LedgerEntry,
    NoOlmLedger,
)
from bot_toolkit._rate_rules import (
    CLAIM_BACKOFF_BASE,
    CLAIM_BACKOFF_CAP,
    SENDER_BURST,
    SENDER_REFILL,
    SENDER_TRACKED,
    ClaimBackoff,
    SenderRateLimit,
    WithheldDeduper,
)
from bot_toolkit._sharing_policy import (
    CrossSigningView,
    DeviceTrust,
    ShareWith,
    SharingPolicy,
)
from bot_toolkit._withheld_wire import (
    MEGOLM_ALGORITHM,
    Clock,
    PeerDevice,
    WithheldError,
    WithheldMetrics,
    withheld_content,
)

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
