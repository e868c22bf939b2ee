"""A hand-made Matrix device that speaks raw HTTP to the homeserver, with real crypto.

Tests need peers that no client library produces on purpose: a device with identity keys but
no one-time keys and no fallback key, or a device that comes back under the same device id
with a new identity key. :class:`RawDevice` is such a peer. It uses vodozemac for its keys and
Olm sessions and aiohttp for every request, so each request the tests rely on is visible here:

* device keys signed with the device's ed25519 key over canonical JSON (matrix-js-sdk drops a
  device whose keys are not self-signed, and nio checks the signature too);
* one-time keys and a fallback key only when a test asks for them;
* ``/sync`` that collects to-device events (and keeps them) for assertions;
* creating and joining rooms, claiming a peer's one-time key, opening an Olm session and sending
  an Olm-encrypted ``m.dummy``, decrypting Olm messages sent to it.

Identity change: :meth:`RawDevice.replace_identity_key` gives the device a new curve25519
identity key and re-uploads its device keys under the same device id (Synapse accepts the
re-upload and tells the device's watchers through ``device_lists.changed``). The ed25519
signing key is kept on purpose: matrix-nio 0.26 ignores a known device whose ed25519 key changes
(it logs "Ed25519 key has changed" and keeps the old record), so a full reset would never reach
the code under test through nio.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import vodozemac

if TYPE_CHECKING:
    from tests.synapse import LocalSynapse

__all__ = ["RawDevice", "RawHttpError", "canonical_json"]

log = logging.getLogger("bot_toolkit.tests.raw_device")

OLM = "m.olm.v1.curve25519-aes-sha2"
MEGOLM = "m.megolm.v1.aes-sha2"
Event = dict[str, Any]


def canonical_json(value: Any) -> bytes:
    """Matrix canonical JSON: sorted keys, no insignificant whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _unpadded_b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


class RawHttpError(RuntimeError):
    """A non-2xx answer from the homeserver."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        errcode = body.get("errcode") if isinstance(body, dict) else None
        self.errcode: str | None = errcode if isinstance(errcode, str) else None
        super().__init__(f"{method} {path} -> {status}: {str(body)[:300]}")


class RawDevice:
    """One logged-in device of one user, driven by hand.

    Construct it from an access token (``RawDevice(url, user_id, token, device_id)``), or for
    a new user with :meth:`registered`, and ``await close()`` it (or use ``async with``).
    Nothing is uploaded until a test asks (or :meth:`registered` does).
    """

    def __init__(self, homeserver: str, user_id: str, access_token: str, device_id: str) -> None:
        self.homeserver = homeserver.rstrip("/")
        self.user_id = user_id
        self.device_id = device_id
        self._token = access_token
        self._http: aiohttp.ClientSession | None = None
        # The ed25519 key that signs the device keys; kept for the device's lifetime.
        self.signing_account = vodozemac.Account()
        # The account behind the curve25519 identity key, its one-time keys and Olm sessions.
        self.olm_account = self.signing_account
        self.next_batch: str | None = None
        self.to_device_events: list[Event] = []
        # Olm sessions by the peer's curve25519 key, newest last.
        self.sessions: dict[str, list[vodozemac.Session]] = {}
        self._fallback_counter = 0

    @classmethod
    async def registered(
        cls,
        synapse: LocalSynapse,
        localpart: str | None = None,
        *,
        one_time_keys: int = 0,
        sync: bool = True,
    ) -> RawDevice:
        """The device of a user newly registered on ``synapse``, its device keys uploaded.

        Uploads ``one_time_keys`` one-time keys with them (none by default, and never a
        fallback key), then runs a first :meth:`sync` unless ``sync`` is false. The caller
        closes the device; on any failure here it is closed already.
        """
        user = await asyncio.to_thread(synapse.register, localpart)
        device = cls(synapse.url, user.user_id, user.access_token, user.device_id)
        try:
            await device.upload_keys(one_time_keys=one_time_keys)
            if sync:
                await device.sync()
        except BaseException:
            await device.close()
            raise
        return device

    async def __aenter__(self) -> RawDevice:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    def __repr__(self) -> str:  # never show the token
        return f"RawDevice(user_id={self.user_id!r}, device_id={self.device_id!r})"

    # -- HTTP ----------------------------------------------------------------------------------

    async def request(
        self, method: str, path: str, body: Any = None, *, time_limit: float = 60.0
    ) -> Any:
        """One authenticated JSON request; raises :class:`RawHttpError` on a non-2xx answer."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {self._token}"}
        async with self._http.request(
            method,
            self.homeserver + path,
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=time_limit),
        ) as resp:
            text = await resp.text()
            data: Any = json.loads(text) if text else {}
            if resp.status >= 300:
                raise RawHttpError(method, path, resp.status, data)
            return data

    # -- keys ----------------------------------------------------------------------------------

    @property
    def curve25519(self) -> str:
        """The device's current curve25519 identity key (unpadded base64)."""
        return self.olm_account.curve25519_key.to_base64()

    @property
    def ed25519(self) -> str:
        """The device's ed25519 fingerprint key (unpadded base64)."""
        return self.signing_account.ed25519_key.to_base64()

    def sign(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``obj`` signed with the device's ed25519 key (``signatures``/``unsigned``
        are left out of the signed bytes, as the spec requires)."""
        unsigned = obj.get("unsigned")
        signatures = dict(obj.get("signatures", {}))
        to_sign = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
        signature = self.signing_account.sign(canonical_json(to_sign)).to_base64()
        own = dict(signatures.get(self.user_id, {}))
        own[f"ed25519:{self.device_id}"] = signature
        signatures[self.user_id] = own
        signed = {**to_sign, "signatures": signatures}
        if unsigned is not None:
            signed["unsigned"] = unsigned
        return signed

    def device_keys(self) -> dict[str, Any]:
        """The signed ``device_keys`` object for ``/keys/upload``."""
        return self.sign(
            {
                "user_id": self.user_id,
                "device_id": self.device_id,
                "algorithms": [OLM, MEGOLM],
                "keys": {
                    f"curve25519:{self.device_id}": self.curve25519,
                    f"ed25519:{self.device_id}": self.ed25519,
                },
            }
        )

    def _signed_key(self, key: str, *, fallback: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"key": key}
        if fallback:
            body["fallback"] = True
        return self.sign(body)

    async def upload_keys(
        self, *, device_keys: bool = True, one_time_keys: int = 0, fallback_key: bool = False
    ) -> dict[str, int]:
        """Upload the device keys and, when asked, ``one_time_keys`` fresh one-time keys and a
        fallback key. Returns the server's one-time key counts."""
        body: dict[str, Any] = {}
        if device_keys:
            body["device_keys"] = self.device_keys()
        if one_time_keys:
            self.olm_account.generate_one_time_keys(one_time_keys)
            body["one_time_keys"] = {
                f"signed_curve25519:{key_id}": self._signed_key(key.to_base64())
                for key_id, key in self.olm_account.one_time_keys.items()
            }
            self.olm_account.mark_keys_as_published()
        if fallback_key:
            # vodozemac's Python binding has no fallback-key call; any curve25519 key whose
            # secret we keep works for the tests (we never need to decrypt with it).
            self._fallback_counter += 1
            secret = vodozemac.Curve25519SecretKey()
            body["fallback_keys"] = {
                f"signed_curve25519:FB{self._fallback_counter}": self._signed_key(
                    secret.public_key().to_base64(), fallback=True
                )
            }
        res = await self.request("POST", "/_matrix/client/v3/keys/upload", body)
        counts: dict[str, int] = res.get("one_time_key_counts", {})
        return counts

    async def one_time_key_counts(self) -> dict[str, int]:
        """The server's count of this device's unclaimed one-time keys."""
        return await self.upload_keys(device_keys=False)

    async def replace_identity_key(self) -> str:
        """Give the device a new curve25519 identity key under the same device id and upload
        the new device keys (signed with the unchanged ed25519 key). No one-time keys are
        uploaded. Returns the new curve25519 key."""
        self.olm_account = vodozemac.Account()
        self.sessions.clear()
        await self.upload_keys()
        return self.curve25519

    async def query_keys(self, user_id: str) -> dict[str, dict[str, Any]]:
        """``/keys/query`` for one user: ``{device_id: device_keys}``."""
        res = await self.request(
            "POST", "/_matrix/client/v3/keys/query", {"device_keys": {user_id: []}}
        )
        devices: dict[str, dict[str, Any]] = res.get("device_keys", {}).get(user_id, {})
        return devices

    async def claim_one_time_key(self, user_id: str, device_id: str) -> str | None:
        """Claim one ``signed_curve25519`` key of a device; ``None`` when it has none."""
        res = await self.request(
            "POST",
            "/_matrix/client/v3/keys/claim",
            {"one_time_keys": {user_id: {device_id: "signed_curve25519"}}},
        )
        keys = res.get("one_time_keys", {}).get(user_id, {}).get(device_id, {})
        for key_obj in keys.values():
            key: str = key_obj["key"]
            return key
        return None

    # -- Olm -----------------------------------------------------------------------------------

    async def open_session(self, user_id: str, device_id: str) -> vodozemac.Session:
        """Open a new outbound Olm session with a device (keys query + one-time key claim)."""
        devices = await self.query_keys(user_id)
        keys = devices[device_id]["keys"]
        curve = keys[f"curve25519:{device_id}"]
        otk = await self.claim_one_time_key(user_id, device_id)
        if otk is None:
            raise RuntimeError(f"{user_id} {device_id} has no one-time key to claim")
        session = self.olm_account.create_outbound_session(
            vodozemac.Curve25519PublicKey.from_base64(curve),
            vodozemac.Curve25519PublicKey.from_base64(otk),
        )
        self.sessions.setdefault(curve, []).append(session)
        return session

    async def send_olm(
        self,
        user_id: str,
        device_id: str,
        event_type: str,
        content: dict[str, Any],
        *,
        new_session: bool = False,
    ) -> None:
        """Send one Olm-encrypted to-device event to a device (opening a session if needed)."""
        devices = await self.query_keys(user_id)
        keys = devices[device_id]["keys"]
        curve = keys[f"curve25519:{device_id}"]
        ed = keys[f"ed25519:{device_id}"]
        sessions = self.sessions.get(curve)
        if new_session or not sessions:
            session = await self.open_session(user_id, device_id)
        else:
            session = sessions[-1]
        payload = {
            "type": event_type,
            "content": content,
            "sender": self.user_id,
            "sender_device": self.device_id,
            "keys": {"ed25519": self.ed25519},
            "recipient": user_id,
            "recipient_keys": {"ed25519": ed},
        }
        message_type, ciphertext = session.encrypt(canonical_json(payload)).to_parts()
        encrypted = {
            "algorithm": OLM,
            "sender_key": self.curve25519,
            "ciphertext": {curve: {"type": message_type, "body": _unpadded_b64(ciphertext)}},
        }
        await self.send_to_device("m.room.encrypted", {user_id: {device_id: encrypted}})

    async def send_dummy(self, user_id: str, device_id: str, *, new_session: bool = True) -> None:
        """Open an Olm session with a device and tell it so with an Olm-encrypted ``m.dummy``."""
        await self.send_olm(user_id, device_id, "m.dummy", {}, new_session=new_session)

    def decrypt_olm(self, event: Event) -> dict[str, Any] | None:
        """The decrypted payload of an Olm ``m.room.encrypted`` to-device event for this device,
        creating an inbound session from a pre-key message; ``None`` when it cannot be read."""
        content = event.get("content", {})
        if content.get("algorithm") != OLM:
            return None
        mine = content.get("ciphertext", {}).get(self.curve25519)
        if mine is None:
            return None
        sender_key: str = content["sender_key"]
        message = vodozemac.AnyOlmMessage.from_parts(mine["type"], _b64decode(mine["body"]))
        for session in reversed(self.sessions.get(sender_key, [])):
            try:
                plaintext = session.decrypt(message)
            except (vodozemac.OlmDecryptionException, vodozemac.DecodeException):
                continue
            return dict(json.loads(plaintext))
        pre_key = message.to_pre_key()
        if pre_key is None:
            return None
        try:
            session, plaintext = self.olm_account.create_inbound_session(
                vodozemac.Curve25519PublicKey.from_base64(sender_key), pre_key
            )
        except (vodozemac.SessionCreationException, vodozemac.OlmDecryptionException):
            return None
        self.sessions.setdefault(sender_key, []).append(session)
        return dict(json.loads(plaintext))

    # -- to-device, rooms, sync ----------------------------------------------------------------

    async def send_to_device(
        self, event_type: str, messages: dict[str, dict[str, Any]], txn_id: str | None = None
    ) -> None:
        """``PUT /sendToDevice/{eventType}/{txnId}``."""
        txn = txn_id or uuid.uuid4().hex
        await self.request(
            "PUT",
            f"/_matrix/client/v3/sendToDevice/{event_type}/{txn}",
            {"messages": messages},
        )

    async def create_room(self, *, invite: list[str] | None = None, encrypted: bool = True) -> str:
        """Create a private room (Megolm-encrypted unless told otherwise); returns its id."""
        body: dict[str, Any] = {"preset": "private_chat", "invite": invite or []}
        if encrypted:
            body["initial_state"] = [
                {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}
            ]
        res = await self.request("POST", "/_matrix/client/v3/createRoom", body)
        room_id: str = res["room_id"]
        return room_id

    async def invite(self, room_id: str, user_id: str) -> None:
        """Invite a user into a room."""
        await self.request(
            "POST", f"/_matrix/client/v3/rooms/{room_id}/invite", {"user_id": user_id}
        )

    async def join(self, room_id: str) -> None:
        """Join a room."""
        await self.request("POST", f"/_matrix/client/v3/join/{room_id}", {})

    async def sync(self, timeout_ms: int = 0) -> dict[str, Any]:
        """One ``/sync``; to-device events are appended to :attr:`to_device_events`."""
        path = f"/_matrix/client/v3/sync?timeout={timeout_ms}"
        if self.next_batch:
            path += f"&since={self.next_batch}"
        res: dict[str, Any] = await self.request("GET", path, time_limit=timeout_ms / 1000 + 30)
        self.next_batch = res["next_batch"]
        events = res.get("to_device", {}).get("events", [])
        self.to_device_events.extend(events)
        return res

    async def sync_until(
        self, predicate: Callable[[list[Event]], bool], *, within: float = 20.0
    ) -> list[Event]:
        """Sync until ``predicate(to_device_events)`` holds; raises TimeoutError otherwise."""
        deadline = time.monotonic() + within
        while True:
            if predicate(self.to_device_events):
                return self.to_device_events
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self!r}: condition not met; got {self.to_device_events!r}")
            await self.sync(timeout_ms=int(min(remaining, 2.0) * 1000))

    async def drain(self, *, quiet: float = 1.0, within: float = 60.0) -> list[Event]:
        """Sync until nothing new arrives for ``quiet`` seconds; returns every event so far.

        Bounded: a peer that keeps receiving for ``within`` seconds raises TimeoutError.
        """
        deadline = time.monotonic() + within
        while True:
            before = len(self.to_device_events)
            await self.sync(timeout_ms=int(quiet * 1000))
            if len(self.to_device_events) == before:
                return self.to_device_events
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self!r}: to-device events still arriving after {within}s")

    def withheld(self, code: str | None = None, sender: str | None = None) -> list[Event]:
        """The ``m.room_key.withheld`` events received so far, optionally filtered."""
        return [
            e
            for e in self.to_device_events
            if e.get("type") == "m.room_key.withheld"
            and (code is None or e.get("content", {}).get("code") == code)
            and (sender is None or e.get("sender") == sender)
        ]
