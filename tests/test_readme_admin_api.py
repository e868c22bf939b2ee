"""The README's admin API example is what the server answers, field for field.

Scripts are written from the README: the documented ``GET /admin/verifications`` document is
parsed from the README and compared with the real server's answer for the same verification.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from bot_toolkit.http_api import BotState, make_app
from bot_toolkit.metrics import Metrics
from bot_toolkit.verification.info import VerificationInfo

README = Path(__file__).resolve().parent.parent / "README.md"
TOKEN = "readme-admin-token-0123456789"


def documented_answer() -> dict[str, object]:
    """The first ```json block of the README section on verification for an operator."""
    text = README.read_text(encoding="utf-8")
    head = text.index("### How verification behaves for an operator")
    match = re.search(r"^\s*```json\n(.*?)^\s*```$", text[head:], re.DOTALL | re.MULTILINE)
    assert match, "no ```json block in the README's operator section"
    value = json.loads(match.group(1))
    assert isinstance(value, dict)
    return value


class OneVerification:
    def __init__(self, info: VerificationInfo) -> None:
        self.info = info

    def list_in_progress(self) -> Sequence[VerificationInfo]:
        return [self.info]

    async def confirm(self, verification_id: str) -> bool:
        raise AssertionError("not called")

    async def cancel(self, verification_id: str) -> bool:
        raise AssertionError("not called")


async def test_the_documented_list_is_what_the_server_answers() -> None:
    documented = documented_answer()
    [item] = documented["verifications"]  # type: ignore[misc]
    deadline = datetime.fromisoformat(item["deadline"].replace("Z", "+00:00")).timestamp()
    info = VerificationInfo(
        id=item["id"],
        user_id=item["user_id"],
        device_id=item["device_id"],
        state=item["state"],
        emoji=tuple((e["emoji"], e["description"]) for e in item["emoji"]),
        decimals=tuple(item["decimals"]),  # type: ignore[arg-type]
        deadline=deadline,
    )
    app = make_app(
        BotState(),
        Metrics(),
        controller=OneVerification(info),
        admin_token=TOKEN,
        wall_clock=lambda: deadline - item["expires_in"],
    )
    client: TestClient = TestClient(TestServer(app))  # type: ignore[type-arg]
    await client.start_server()
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        resp = await client.get("/admin/verifications", headers=auth)
        assert resp.status == 200
        assert await resp.json() == documented
        one = await client.get(f"/admin/verifications/{item['id']}", headers=auth)
        assert one.status == 200
        assert await one.json() == item
    finally:
        await client.close()
