"""The spec's checks on a decrypted Olm payload ("Validation of incoming decrypted events").

Used by :mod:`bot_toolkit._olm_payloads` inside nio's ``_verify_olm_payload`` hook: a payload that
fails is discarded before nio or the dispatcher sees it. Each check returns the name of the
failed rule (a metric label and a log line) or ``None``; nothing here raises for bad input.

* ``sender`` equals the to-device sender; ``recipient`` is our user id;
  ``recipient_keys.ed25519`` is our device's ed25519 key; ``keys.ed25519`` is present;
* when the sending device (found by the envelope's curve25519 ``sender_key``) is in nio's device
  store, ``keys.ed25519`` is its ed25519 key;
* ``sender_device_keys``, when present, names the sender, agrees with the envelope's curve25519
  key and the claimed ed25519 key, and is signed by that ed25519 key.

``olm`` is nio's ``Olm`` machine (``client.olm``): its user id, account keys, device store and
``verify_json`` are used.

Key checks on peer-chosen public keys, before nio sees them (nio 0.26 lets vodozemac's
``KeyException`` for an ed25519 key that is not a curve point escape from a whole key query):
:func:`curve25519_problem`, :func:`ed25519_problem` and :func:`device_keys_problem`.
"""

from __future__ import annotations

import base64
import binascii
import copy
from typing import Any

import vodozemac

__all__ = [
    "curve25519_problem",
    "device_keys_problem",
    "ed25519_problem",
    "payload_problem",
    "sender_device_keys_problem",
]

_KEY_BYTES = 32


def _key_bytes(key: object) -> bytes | None:
    """The 32 bytes of an unpadded-base64 public key, or ``None``."""
    if not isinstance(key, str) or len(key) != 43:
        return None
    try:
        raw = base64.b64decode(key + "=", validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == _KEY_BYTES else None


def curve25519_problem(key: object) -> str | None:
    """Why ``key`` is not a Curve25519 public key (every 32-byte string is one), or ``None``."""
    return None if _key_bytes(key) is not None else "invalid curve25519 key"


def ed25519_problem(key: object) -> str | None:
    """Why ``key`` is not an Ed25519 public key (32 bytes that decompress to a curve point)."""
    if _key_bytes(key) is None:
        return "invalid ed25519 key"
    try:
        vodozemac.Ed25519PublicKey.from_base64(key)  # type: ignore[arg-type]
    except Exception:  # vodozemac.KeyException: not a point on the curve
        return "invalid ed25519 key"
    return None


def device_keys_problem(device_id: str, payload: object) -> str | None:
    """Why a device's ``/keys/query`` entry must be skipped (a metric label), or ``None``.

    Only the key material is checked here; nio checks the self-signature afterwards.
    """
    if not isinstance(payload, dict):
        return "malformed device keys"
    keys = payload.get("keys")
    if not isinstance(keys, dict):
        return "malformed device keys"
    return ed25519_problem(keys.get(f"ed25519:{device_id}")) or curve25519_problem(
        keys.get(f"curve25519:{device_id}")
    )


def payload_problem(olm: Any, sender: str, sender_key: str | None, payload: Any) -> str | None:
    """The spec checks on a decrypted Olm payload; the failed one, or ``None``."""
    if not isinstance(payload, dict):
        return "payload is not an object"
    if payload.get("sender") != sender:
        return "sender mismatch"
    if payload.get("recipient") != olm.user_id:
        return "recipient mismatch"
    recipient_keys = payload.get("recipient_keys")
    ours = olm.account.identity_keys["ed25519"]
    if not isinstance(recipient_keys, dict) or recipient_keys.get("ed25519") != ours:
        return "recipient_keys.ed25519 mismatch"
    keys = payload.get("keys")
    claimed = keys.get("ed25519") if isinstance(keys, dict) else None
    if not isinstance(claimed, str):
        return "keys.ed25519 missing"
    if sender_key is None:
        return None
    store = olm.device_store
    device = None
    if sender in store.users:  # device_from_sender_key would insert an empty entry
        device = store.device_from_sender_key(sender, sender_key)
    if device is not None and device.keys.get("ed25519") != claimed:
        return "keys.ed25519 mismatch"
    sender_device_keys = payload.get("sender_device_keys")
    if sender_device_keys is not None:
        return sender_device_keys_problem(olm, sender, sender_key, claimed, sender_device_keys)
    return None


def sender_device_keys_problem(
    olm: Any, sender: str, sender_key: str, claimed: str, sdk: object
) -> str | None:
    if not isinstance(sdk, dict) or sdk.get("user_id") != sender:
        return "sender_device_keys.user_id mismatch"
    device_id, keys = sdk.get("device_id"), sdk.get("keys")
    if not isinstance(device_id, str) or not isinstance(keys, dict):
        return "sender_device_keys malformed"
    if keys.get(f"curve25519:{device_id}") != sender_key:
        return "sender_device_keys curve25519 mismatch"
    if keys.get(f"ed25519:{device_id}") != claimed:
        return "sender_device_keys ed25519 mismatch"
    try:
        signed = bool(olm.verify_json(copy.deepcopy(sdk), claimed, sender, device_id))
    except Exception:  # malformed key or signature encoding
        signed = False
    return None if signed else "sender_device_keys signature invalid"
