"""MSC4147: the Olm payloads the bot sends carry ``sender_device_keys`` (our device keys as
/keys/query returns them, with the self-signing key's signature once cross-signed), as Element
does. Real Synapse, real nio clients: the receiver decrypts the payload with its own Olm account.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot_toolkit._nio_adapter import NioHooks, send_sender_device_keys
from bot_toolkit.identity import IdentityState, identity_for
from bot_toolkit.identity.signing import verify_signature
from tests.nio_helpers import close_clients, know_each_other, make_client, send_olm, sync_until
from tests.synapse import LocalSynapse

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(120)]


@pytest.mark.parametrize("with_keys", [True, False], ids=["hooked", "plain-nio"])
async def test_olm_payload_carries_sender_device_keys(
    synapse: LocalSynapse, tmp_path: Path, with_keys: bool
) -> None:
    sender = await make_client(synapse, tmp_path)
    receiver = await make_client(synapse, tmp_path)
    hooks = NioHooks()
    try:
        identity = identity_for(sender, tmp_path / "data")
        result = await identity.ensure()
        assert result.state is IdentityState.CROSS_SIGNED
        if with_keys:
            send_sender_device_keys(hooks, sender.olm, lambda: identity.device_keys_json)
        got: list[dict[str, Any]] = []

        def observe(original: Any) -> Any:
            def handle(sender_id: str, sender_key: str, payload: dict[str, Any]) -> Any:
                got.append(payload)
                return original(sender_id, sender_key, payload)

            return handle

        hooks.install(receiver.olm, "_handle_olm_event", observe)
        await know_each_other(sender, receiver)
        await send_olm(sender, receiver.user_id, receiver.device_id, "m.dummy", {})
        await sync_until(receiver, lambda: bool(got), what="the Olm payload")
        payload = got[0]
        assert payload["sender"] == sender.user_id and payload["type"] == "m.dummy"
        if not with_keys:
            assert "sender_device_keys" not in payload  # what stock nio sends
            return
        keys = payload["sender_device_keys"]
        assert keys == identity.device_keys_json
        assert keys["device_id"] == sender.device_id and keys["user_id"] == sender.user_id
        ed25519 = keys["keys"][f"ed25519:{sender.device_id}"]
        assert ed25519 == payload["keys"]["ed25519"]
        verify_signature(keys, sender.user_id, f"ed25519:{sender.device_id}", ed25519)
        published = await identity.published()
        assert published is not None and published.device_signed(keys)  # cross-signed
        assert "unsigned" not in keys
    finally:
        hooks.undo()
        await close_clients(sender, receiver)
