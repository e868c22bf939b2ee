"""bot_toolkit: typed to-device dispatch, verification and withheld notices for matrix-nio bots.

The front door: everything a bot needs is importable from here (``from bot_toolkit import
BotToolkit, VerificationPolicy, VerificationDone``). The event types load at once (they are
plain msgspec structs); the facade, the dispatcher, the policies and the lifecycle events load on
first use, so ``import bot_toolkit.verification.table`` (or ``bot_toolkit.events``) does not pull
in nio or aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot_toolkit._lazy import lazy_exports
from bot_toolkit.events import (
    CancelCode,
    DecodeError,
    Dummy,
    ForwardedRoomKey,
    KeyVerificationAccept,
    KeyVerificationCancel,
    KeyVerificationDone,
    KeyVerificationKey,
    KeyVerificationMac,
    KeyVerificationReady,
    KeyVerificationRequest,
    KeyVerificationStart,
    KeyVerificationStartReciprocate,
    KeyVerificationStartSas,
    MegolmEncrypted,
    OlmCiphertext,
    OlmEncrypted,
    RequestedKeyInfo,
    RoomEncrypted,
    RoomKey,
    RoomKeyRequest,
    RoomKeyRequestCancellation,
    RoomKeyWithheld,
    SecretRequest,
    SecretSend,
    ToDeviceEvent,
    UnknownToDeviceEvent,
    VerificationEvent,
    VerificationRelatesTo,
    WithheldCode,
    decode,
    encode_content,
)

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    # the facade
    "BotToolkit": "bot_toolkit.toolkit",
    "Settings": "bot_toolkit.toolkit",
    "ToolkitError": "bot_toolkit.toolkit",
    # dispatching
    "Dispatcher": "bot_toolkit.dispatcher",
    "DispatcherClosed": "bot_toolkit.dispatcher",
    "HandlerCancelled": "bot_toolkit.dispatcher",
    "HandlerTimeout": "bot_toolkit.dispatcher",
    "UndecodableEvent": "bot_toolkit.undecodable",
    "Metrics": "bot_toolkit.metrics",
    # policies
    "VerificationPolicy": "bot_toolkit.verification.policy",
    "SharingPolicy": "bot_toolkit.withheld",
    "ShareWith": "bot_toolkit.withheld",
    # lifecycle events (put into the dispatcher by the parts)
    "SasPrompt": "bot_toolkit.verification.lifecycle",
    "SasReady": "bot_toolkit.verification.lifecycle",
    "VerificationCancelled": "bot_toolkit.verification.lifecycle",
    "VerificationDone": "bot_toolkit.verification.lifecycle",
    "VerificationRequested": "bot_toolkit.verification.lifecycle",
    "OutboxSendFailed": "bot_toolkit.outbox",
    # plugins and room messages
    "Plugin": "bot_toolkit.plugin_host",
    "PluginError": "bot_toolkit.plugin_host",
    "RoomMessage": "bot_toolkit.room_messages",
    "RoomMessageFeed": "bot_toolkit.room_messages",
    "SenderTrust": "bot_toolkit.room_messages",
    "Command": "bot_toolkit.room_messages",
    "parse_command": "bot_toolkit.room_messages",
    # errors
    "OutboxClosed": "bot_toolkit.outbox",
    "OutboxFull": "bot_toolkit.outbox",
    "StoreError": "bot_toolkit.store",
    # the install's store secret (nio's pickle key, other key stores)
    "STORE_PASSPHRASE_ENV": "bot_toolkit.install_secret",
    "store_secret": "bot_toolkit.install_secret",
    # a nio client set up for the toolkit
    "restore_client": "bot_toolkit.nio_client",
    "client_config": "bot_toolkit.nio_client",
    "adopt_pickle_key": "bot_toolkit.nio_client",
    "WrongStoreSecret": "bot_toolkit.nio_client",
}

if TYPE_CHECKING:
    from bot_toolkit.dispatcher import (
        Dispatcher,
        DispatcherClosed,
        HandlerCancelled,
        HandlerTimeout,
    )
    from bot_toolkit.install_secret import STORE_PASSPHRASE_ENV, store_secret
    from bot_toolkit.metrics import Metrics
    from bot_toolkit.nio_client import (
        WrongStoreSecret,
        adopt_pickle_key,
        client_config,
        restore_client,
    )
    from bot_toolkit.outbox import OutboxClosed, OutboxFull, OutboxSendFailed
    from bot_toolkit.plugin_host import Plugin, PluginError
    from bot_toolkit.room_messages import (
        Command,
        RoomMessage,
        RoomMessageFeed,
        SenderTrust,
        parse_command,
    )
    from bot_toolkit.store import StoreError
    from bot_toolkit.toolkit import BotToolkit, Settings, ToolkitError
    from bot_toolkit.undecodable import UndecodableEvent
    from bot_toolkit.verification.lifecycle import (
        SasPrompt,
        SasReady,
        VerificationCancelled,
        VerificationDone,
        VerificationRequested,
    )
    from bot_toolkit.verification.policy import VerificationPolicy
    from bot_toolkit.withheld import ShareWith, SharingPolicy


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


__all__ = [
    "STORE_PASSPHRASE_ENV",
    "BotToolkit",
    "CancelCode",
    "Command",
    "DecodeError",
    "Dispatcher",
    "DispatcherClosed",
    "Dummy",
    "ForwardedRoomKey",
    "HandlerCancelled",
    "HandlerTimeout",
    "KeyVerificationAccept",
    "KeyVerificationCancel",
    "KeyVerificationDone",
    "KeyVerificationKey",
    "KeyVerificationMac",
    "KeyVerificationReady",
    "KeyVerificationRequest",
    "KeyVerificationStart",
    "KeyVerificationStartReciprocate",
    "KeyVerificationStartSas",
    "MegolmEncrypted",
    "Metrics",
    "OlmCiphertext",
    "OlmEncrypted",
    "OutboxClosed",
    "OutboxFull",
    "OutboxSendFailed",
    "Plugin",
    "PluginError",
    "RequestedKeyInfo",
    "RoomEncrypted",
    "RoomKey",
    "RoomKeyRequest",
    "RoomKeyRequestCancellation",
    "RoomKeyWithheld",
    "RoomMessage",
    "RoomMessageFeed",
    "SasPrompt",
    "SasReady",
    "SecretRequest",
    "SecretSend",
    "SenderTrust",
    "Settings",
    "ShareWith",
    "SharingPolicy",
    "StoreError",
    "ToDeviceEvent",
    "ToolkitError",
    "UndecodableEvent",
    "UnknownToDeviceEvent",
    "VerificationCancelled",
    "VerificationDone",
    "VerificationEvent",
    "VerificationPolicy",
    "VerificationRelatesTo",
    "VerificationRequested",
    "WithheldCode",
    "WrongStoreSecret",
    "__version__",
    "adopt_pickle_key",
    "client_config",
    "decode",
    "encode_content",
    "parse_command",
    "restore_client",
    "store_secret",
]
