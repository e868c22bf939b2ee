"""The wire codes of ``m.key.verification.cancel`` and ``m.room_key.withheld``.

Both are open enums: the ``code`` fields of events are plain ``str``, so a code from a newer peer
is kept, and these ``StrEnum`` members compare equal to the wire strings. This module imports
nothing from bot_toolkit, so the pure verification table can use it too.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["CancelCode", "WithheldCode"]


class CancelCode(StrEnum):
    """Known ``m.key.verification.cancel`` codes. The ``code`` field itself is a plain ``str``.

    https://spec.matrix.org/latest/client-server-api/#mkeyverificationcancel
    """

    USER = "m.user"
    TIMEOUT = "m.timeout"
    UNKNOWN_TRANSACTION = "m.unknown_transaction"
    UNKNOWN_METHOD = "m.unknown_method"
    UNEXPECTED_MESSAGE = "m.unexpected_message"
    KEY_MISMATCH = "m.key_mismatch"
    USER_MISMATCH = "m.user_mismatch"
    INVALID_MESSAGE = "m.invalid_message"
    ACCEPTED = "m.accepted"
    MISMATCHED_COMMITMENT = "m.mismatched_commitment"
    MISMATCHED_SAS = "m.mismatched_sas"


class WithheldCode(StrEnum):
    """Known ``m.room_key.withheld`` codes. The ``code`` field itself is a plain ``str``.

    ``m.history_not_shared`` belongs to room key bundles and should not be sent in
    ``m.room_key.withheld``; it is listed so that a received one is recognised.
    https://spec.matrix.org/latest/client-server-api/#mroom_keywithheld
    """

    BLACKLISTED = "m.blacklisted"
    UNVERIFIED = "m.unverified"
    UNAUTHORISED = "m.unauthorised"
    UNAVAILABLE = "m.unavailable"
    NO_OLM = "m.no_olm"
    HISTORY_NOT_SHARED = "m.history_not_shared"
