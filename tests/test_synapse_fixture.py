"""The Synapse fixture itself: it answers, registers users and keeps them apart."""

from __future__ import annotations

import pytest

from tests.synapse import LocalSynapse, SynapseError

pytestmark = pytest.mark.synapse


def test_fixture_registers_distinct_users(synapse: LocalSynapse) -> None:
    a = synapse.register()
    b = synapse.register()
    assert a.user_id != b.user_id
    assert a.user_id.endswith(":" + synapse.server_name)
    who = synapse.request("GET", "/_matrix/client/v3/account/whoami", token=b.access_token)
    assert who["user_id"] == b.user_id
    assert who["device_id"] == b.device_id
    assert "access_token" not in repr(a)


def test_fixture_reports_http_errors(synapse: LocalSynapse) -> None:
    with pytest.raises(SynapseError, match="401"):
        synapse.request("GET", "/_matrix/client/v3/account/whoami", token="nope")


def test_fixture_listens_on_loopback_only(synapse: LocalSynapse) -> None:
    assert synapse.url.startswith("http://127.0.0.1:")
