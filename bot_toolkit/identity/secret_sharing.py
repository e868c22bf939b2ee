"""Self-verification: after the operator verified the bot's device from another session of the
bot's account, ask that session for the private cross-signing keys (spec: "Sharing", secrets
module; ``m.secret.request`` / ``m.secret.send``).

:class:`SecretRequests` asks only devices of our own user that nio marks verified, and takes an
``m.secret.send`` only when it

* arrived Olm-encrypted (``decrypted_from`` set) from our own user,
* answers a request id we sent, and came from the device we asked (its curve25519 key),
* holds a valid Ed25519 seed;

once the three keys are in, they are checked against the published keys
(:meth:`Identity.adopt`) before anything is stored or signed. Everything else is dropped, logged
(without the secret) and counted in ``identity_secrets_rejected_total{reason}``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from bot_toolkit.events import SecretSend
from bot_toolkit.identity.api import HomeserverError
from bot_toolkit.identity.errors import IdentityError
from bot_toolkit.identity.keys import (
    MASTER,
    SECRET_NAMES,
    SELF_SIGNING,
    USER_SIGNING,
    CrossSigningKeys,
)
from bot_toolkit.identity.service import Identity, IdentityState, KeySource
from bot_toolkit.identity.signing import SigningKey
from bot_toolkit.metrics import Metrics
from bot_toolkit.verification.lifecycle import VerificationDone

__all__ = ["SecretRequests"]

log = logging.getLogger("bot_toolkit.identity.secrets")

REQUEST_TTL: Final = 600.0  # seconds an unanswered request stays valid
_MAX_PENDING: Final = 30

Send = Callable[[str, Mapping[str, Mapping[str, Mapping[str, Any]]]], Awaitable[Any]]
"""``(event_type, {user: {device: content}})``: queue a to-device message (the outbox)."""


@dataclass(frozen=True, slots=True)
class _Pending:
    usage: str
    device_id: str
    deadline: float


class SecretRequests:
    """Ask our own verified devices for the cross-signing keys; take only valid answers."""

    def __init__(
        self,
        identity: Identity,
        send: Send,
        *,
        device_verified: Callable[[str], bool],
        device_curve25519: Callable[[str], str | None],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self._send = send
        self._verified = device_verified
        self._curve = device_curve25519
        self._clock = clock
        self._pending: dict[str, _Pending] = {}
        self._received: dict[str, SigningKey] = {}
        self._m_rejected = metrics.counter(
            "identity_secrets_rejected_total",
            "m.secret.send events not taken (reason: unencrypted, other_user, unknown_request, "
            "wrong_device, unverified_device, malformed, mismatch)",
            ["reason"],
        )
        self._m_requests = metrics.counter(
            "identity_secret_requests_total", "m.secret.request messages sent"
        )

    def _needed(self) -> bool:
        return self.identity.keys is None or self.identity.state is not (IdentityState.CROSS_SIGNED)

    async def on_verification_done(self, event: VerificationDone) -> None:
        """A SAS with one of our own devices finished: ask it for the keys when we lack them."""
        if event.user_id != self.identity.user_id or not self._needed():
            return
        await self.request_from(event.device_id)

    async def request_from(self, device_id: str) -> None:
        """Send ``m.secret.request`` for the three keys to our own (verified) ``device_id``."""
        if not self._verified(device_id):
            log.warning("not asking device %s for secrets: it is not verified", device_id[:64])
            return
        now = self._clock()
        self._pending = {k: p for k, p in self._pending.items() if p.deadline > now}
        if len(self._pending) + len(SECRET_NAMES) > _MAX_PENDING:
            log.warning("too many unanswered secret requests; not asking %s", device_id[:64])
            return
        messages: dict[str, dict[str, dict[str, Any]]] = {self.identity.user_id: {}}
        batch = []
        for usage, name in SECRET_NAMES.items():
            request_id = f"bt{secrets.token_hex(12)}"
            self._pending[request_id] = _Pending(usage, device_id, now + REQUEST_TTL)
            batch.append(
                {
                    "name": name,
                    "action": "request",
                    "requesting_device_id": self.identity.device.device_id,
                    "request_id": request_id,
                }
            )
        for content in batch:  # one message per secret: a device gets one content per request
            messages[self.identity.user_id][device_id] = content
            await self._send("m.secret.request", messages)
            self._m_requests.inc()
        log.info("asked our device %s for the cross-signing keys", device_id[:64])

    def _reject(self, reason: str, event: SecretSend) -> None:
        self._m_rejected.inc(reason)
        log.warning(
            "ignored m.secret.send from %s (request %s): %s",
            event.sender[:100],
            event.request_id[:64],
            reason,
        )

    async def on_secret_send(self, event: SecretSend) -> None:
        """Take one answer (see the module docs for what is refused)."""
        if event.decrypted_from is None:
            self._reject("unencrypted", event)
            return
        if event.sender != self.identity.user_id:
            self._reject("other_user", event)
            return
        pending = self._pending.get(event.request_id)
        if pending is None or pending.deadline <= self._clock():
            self._reject("unknown_request", event)
            return
        if self._curve(pending.device_id) != event.decrypted_from:
            self._reject("wrong_device", event)
            return
        if not self._verified(pending.device_id):
            self._reject("unverified_device", event)
            return
        del self._pending[event.request_id]
        try:
            key = SigningKey.from_b64(event.secret)
        except ValueError:
            self._reject("malformed", event)
            return
        self._received[pending.usage] = key
        if len(self._received) < len(SECRET_NAMES):
            return
        got, self._received = self._received, {}
        keys = CrossSigningKeys(
            self.identity.user_id, got[MASTER], got[SELF_SIGNING], got[USER_SIGNING]
        )
        try:
            await self.identity.adopt(keys, KeySource.SECRET_SHARING)
        except IdentityError as e:
            self._reject("mismatch", event)
            log.warning("the shared cross-signing keys were not used: %s", e)
            return
        except HomeserverError as e:
            log.warning("could not finish with the shared keys (will need a new request): %s", e)
            return
        self._pending.clear()
        log.info("received the cross-signing keys from device %s", pending.device_id[:64])
