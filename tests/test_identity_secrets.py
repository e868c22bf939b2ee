"""Unit tests of self-verification's answer checks (SecretRequests): every m.secret.send that is
not an Olm-encrypted answer, from our own verified device, to our request, with keys matching
the published identity, is refused, counted and logged without the secret.

The homeserver is a recorded-answer fake (unit test); the accepted path runs end to end against
Synapse and matrix-js-sdk in tests/test_identity_interop.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from bot_toolkit.events import SecretSend
from bot_toolkit.identity.api import IdentityApi
from bot_toolkit.identity.keys import SECRET_NAMES, CrossSigningKeys
from bot_toolkit.identity.secret_sharing import SecretRequests
from bot_toolkit.identity.service import Identity, IdentityState
from bot_toolkit.identity.store import IdentityStore
from bot_toolkit.metrics import Metrics
from bot_toolkit.verification.lifecycle import VerificationDone

ME = "@bot:localhost"
PEER_DEVICE = "OWNSESSION"
PEER_CURVE = "curve-of-own-session"


class Device:
    device_id = "BOTDEVICE"
    ed25519 = "unused"

    def sign(self, message: bytes) -> str:
        raise AssertionError("nothing may be signed in these cases")


class Server:
    def __init__(self, published: CrossSigningKeys) -> None:
        up = published.upload_body()
        self.body = {
            "device_keys": {ME: {}},
            "master_keys": {ME: up["master_key"]},
            "self_signing_keys": {ME: up["self_signing_key"]},
            "user_signing_keys": {ME: up["user_signing_key"]},
        }

    async def __call__(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        assert path.endswith("/keys/query"), path
        return 200, self.body


@pytest.fixture
def setup(tmp_path: Path) -> tuple[SecretRequests, list[dict[str, Any]], Metrics, CrossSigningKeys]:
    published = CrossSigningKeys.generate(ME)
    identity = Identity(IdentityApi(Server(published), ME), IdentityStore(tmp_path), Device())
    identity.state = IdentityState.NOT_CROSS_SIGNED
    sent: list[dict[str, Any]] = []

    async def send(event_type: str, messages: Any) -> None:
        assert event_type == "m.secret.request"
        sent.append(dict(messages[ME][PEER_DEVICE]))

    metrics = Metrics()
    requests = SecretRequests(
        identity,
        send,
        device_verified=lambda d: d == PEER_DEVICE,
        device_curve25519=lambda d: PEER_CURVE if d == PEER_DEVICE else None,
        metrics=metrics,
    )
    return requests, sent, metrics, published


def _answer(sent: list[dict[str, Any]], name: str, secret: str, **over: Any) -> SecretSend:
    request_id = next(r["request_id"] for r in sent if r["name"] == name)
    fields: dict[str, Any] = {
        "sender": ME,
        "decrypted_from": PEER_CURVE,
        "request_id": request_id,
        "secret": secret,
    }
    fields.update(over)
    return SecretSend(**fields)


def _rejected(metrics: Metrics, reason: str) -> float:
    counter = metrics.get("identity_secrets_rejected_total")
    return 0.0 if counter is None else counter.get(reason)


async def test_requests_only_own_verified_devices(setup: Any) -> None:
    requests, sent, _, _ = setup
    await requests.on_verification_done(
        VerificationDone("t", "@someone:localhost", PEER_DEVICE, ())
    )
    await requests.request_from("UNVERIFIED")
    assert sent == []
    await requests.on_verification_done(VerificationDone("t", ME, PEER_DEVICE, ()))
    assert sorted(r["name"] for r in sent) == sorted(SECRET_NAMES.values())
    assert {r["requesting_device_id"] for r in sent} == {"BOTDEVICE"}
    assert len({r["request_id"] for r in sent}) == 3


async def test_refused_answers(setup: Any, caplog: pytest.LogCaptureFixture) -> None:
    requests, sent, metrics, published = setup
    caplog.set_level(logging.DEBUG)
    await requests.request_from(PEER_DEVICE)
    name = SECRET_NAMES["master"]
    seed = published.master.seed_b64()
    cases = [
        ("unencrypted", {"decrypted_from": None}),
        ("other_user", {"sender": "@mallory:localhost"}),
        ("unknown_request", {"request_id": "not-ours"}),
        ("wrong_device", {"decrypted_from": "curve-of-another-device"}),
    ]
    for reason, over in cases:
        await requests.on_secret_send(_answer(sent, name, seed, **over))
        assert _rejected(metrics, reason) == 1, reason
    await requests.on_secret_send(_answer(sent, name, "not a seed"))
    assert _rejected(metrics, "malformed") == 1
    # the request was used up by the malformed answer: a repeat is unknown
    await requests.on_secret_send(_answer(sent, name, seed))
    assert _rejected(metrics, "unknown_request") == 2
    assert requests.identity.keys is None
    assert seed not in caplog.text


async def test_keys_that_do_not_match_the_published_ones(setup: Any, tmp_path: Path) -> None:
    requests, sent, metrics, _ = setup
    await requests.request_from(PEER_DEVICE)
    impostor = CrossSigningKeys.generate(ME)
    for usage, key in impostor.by_usage().items():
        await requests.on_secret_send(_answer(sent, SECRET_NAMES[usage], key.seed_b64()))
    assert _rejected(metrics, "mismatch") == 1
    assert requests.identity.keys is None
    assert not (tmp_path / "identity.json").exists()
