"""Element-compatible to-device key verification (SAS).

Pure parts (no I/O):

* :mod:`.table`: the state machine as one transition table (states, inputs, actions).
* :mod:`.policy`: :class:`VerificationPolicy` and the cross-transaction rules (request age,
  timers, error-reply cap, concurrent attempts, ``m.accepted`` targets).
* :mod:`.negotiation`: method names; what a start offers and an accept chooses.
* :mod:`.sas`: SAS maths on vodozemac (commitment, SAS emoji/decimals, MACs), one
  :class:`SasSession` per transaction; :mod:`.errors`: the peer errors with their cancel codes.

The I/O around them:

* :mod:`.manager`: :class:`VerificationManager` (dispatcher handlers -> table -> actions: outbox,
  nio trust store, admin controller); :meth:`VerificationManager.watch` connects the nio plugin.
* :mod:`.transactions`: the per-transaction records, their timers and locks.
* :mod:`.peer_keys`: peer device/master keys (:class:`NioKeySource`) and held requests.
* :mod:`.persistence`: the restart-cancel table in the store.
* :mod:`.lifecycle`: the lifecycle events the manager puts into the dispatcher.
* :mod:`.rooms`: the in-room transport (room events in, ``room_send`` out; DMs).
* :mod:`.user_trust`: verified users (master key signed, cross-signed devices trusted,
  identity changes noticed).

What a bot calls is exported here (loaded on first use, so importing a pure module such as
``bot_toolkit.verification.table`` loads neither nio nor aiohttp); the rest is internal and
imported from its module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot_toolkit._lazy import lazy_exports

_LAZY: dict[str, str] = {
    "VerificationManager": "bot_toolkit.verification.manager",
    "OutboxLike": "bot_toolkit.verification.engine",
    "KeySource": "bot_toolkit.verification.peer_keys",
    "VerificationPolicy": "bot_toolkit.verification.policy",
    "VerificationInfo": "bot_toolkit.verification.info",
    "State": "bot_toolkit.verification.table",
    "CancelCode": "bot_toolkit.codes",
    "SasPrompt": "bot_toolkit.verification.lifecycle",
    "SasReady": "bot_toolkit.verification.lifecycle",
    "VerificationCancelled": "bot_toolkit.verification.lifecycle",
    "VerificationDone": "bot_toolkit.verification.lifecycle",
    "VerificationRequested": "bot_toolkit.verification.lifecycle",
    "UserVerified": "bot_toolkit.verification.user_trust",
    "UserIdentityChanged": "bot_toolkit.verification.user_trust",
}

if TYPE_CHECKING:
    from bot_toolkit.codes import CancelCode
    from bot_toolkit.verification.engine import OutboxLike
    from bot_toolkit.verification.info import VerificationInfo
    from bot_toolkit.verification.lifecycle import (
        SasPrompt,
        SasReady,
        VerificationCancelled,
        VerificationDone,
        VerificationRequested,
    )
    from bot_toolkit.verification.manager import VerificationManager
    from bot_toolkit.verification.peer_keys import KeySource
    from bot_toolkit.verification.policy import VerificationPolicy
    from bot_toolkit.verification.table import State
    from bot_toolkit.verification.user_trust import UserIdentityChanged, UserVerified


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


__all__ = [
    "CancelCode",
    "KeySource",
    "OutboxLike",
    "SasPrompt",
    "SasReady",
    "State",
    "UserIdentityChanged",
    "UserVerified",
    "VerificationCancelled",
    "VerificationDone",
    "VerificationInfo",
    "VerificationManager",
    "VerificationPolicy",
    "VerificationRequested",
]
