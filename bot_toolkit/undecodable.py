"""The local event that stands for a to-device event which failed to decode.

:func:`bot_toolkit.events.decode` raises :class:`~bot_toolkit.events.DecodeError` for an event
that does not match its schema. A consumer that must still react to such an event (the
verification manager cancels a known transaction with ``m.invalid_message``) asks the nio plugin
to dispatch an :class:`UndecodableEvent` in its place (``attach(..., dispatch_undecodable=True)``).
It enters the dispatcher at the position the event would have had and with the same ordering key,
so it is handled in wire order with the other events of its sender and transaction.

This is a local type, never sent: its ``event_type`` is not a Matrix event type.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar, Final

from bot_toolkit._json_depth import exceeds_depth
from bot_toolkit.events import DecodeError, ToDeviceEvent

__all__ = ["TRANSACTION_TYPE_PREFIX", "UndecodableEvent", "undecodable_from"]

TRANSACTION_TYPE_PREFIX: Final = "m.key.verification."
"""Types whose decoded events carry ``transaction_id`` (and so order by it in the dispatcher)."""


class UndecodableEvent(ToDeviceEvent, frozen=True, kw_only=True):
    """A to-device event that failed to decode, with what went wrong and its raw content.

    ``event_type_name`` is the raw ``type`` (``""`` when it is not a string).
    ``transaction_id`` is the raw ``content.transaction_id`` when it is a string and the type is
    one whose typed events carry it (``m.key.verification.*``), else ``None``: the dispatcher then
    orders this event exactly as it would have ordered the decoded one. ``path`` and ``reason``
    are those of the :class:`~bot_toolkit.events.DecodeError` (see :attr:`error`);
    ``raw_content`` is a copy of the raw ``content`` (``None`` when absent).
    """

    event_type: ClassVar[str] = "bot_toolkit.undecodable"

    event_type_name: str
    transaction_id: str | None = None
    path: str = ""
    reason: str = ""
    raw_content: Any = None

    @property
    def error(self) -> DecodeError:
        """The decode error, rebuilt from ``event_type_name``, ``path`` and ``reason``."""
        return DecodeError(self.event_type_name or None, self.path, self.reason)


def undecodable_from(
    raw: Mapping[str, Any], error: DecodeError, decrypted_from: str | None
) -> UndecodableEvent | None:
    """The :class:`UndecodableEvent` for ``raw``; ``None`` when it names no sender."""
    sender = raw.get("sender")
    if not isinstance(sender, str):
        return None
    event_type = raw.get("type")
    name = event_type if isinstance(event_type, str) else ""
    content = raw.get("content")
    txn = content.get("transaction_id") if isinstance(content, Mapping) else None
    if not (isinstance(txn, str) and name.startswith(TRANSACTION_TYPE_PREFIX)):
        txn = None
    # Nested deeper than events may be: keep the error, not the content (a copy would recurse).
    raw_content = None if exceeds_depth(content) else copy.deepcopy(content)
    return UndecodableEvent(
        sender=sender,
        decrypted_from=decrypted_from,
        event_type_name=name,
        transaction_id=txn,
        path=error.path,
        reason=error.reason,
        raw_content=raw_content,
    )
