"""Pure parts of the standalone bot (the rest runs against a real Synapse in test_bot_e2e.py)."""

from __future__ import annotations

from bot_toolkit.sas_notice import sas_notice
from bot_toolkit.verification import SasReady
from bot_toolkit.verification.lifecycle import format_sas

EMOJI = (
    ("🐶", "Dog"),
    ("🔑", "Key"),
    ("🎩", "Hat"),
    ("🌙", "Moon"),
    ("⏰", "Clock"),
    ("🏁", "Flag"),
    ("🐧", "Penguin"),
)


def test_sas_notice_shows_emoji_names_and_decimals() -> None:
    notice = sas_notice(SasReady("txn1", "@alice:x", "ALICEDEV", EMOJI, (1234, 5678, 9012)))
    assert notice["msgtype"] == "m.notice"
    assert notice["body"].endswith(format_sas(EMOJI, (1234, 5678, 9012)))
    assert "🐧 Penguin" in notice["formatted_body"] and "1234 5678 9012" in notice["formatted_body"]


def test_sas_notice_escapes_the_peer_chosen_device_id() -> None:
    device = '<img src=x onerror="alert(1)">'
    notice = sas_notice(SasReady("txn1", "@mallory:x", device, EMOJI, None))
    assert "<img" not in notice["formatted_body"]
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in notice["formatted_body"]
    assert notice["format"] == "org.matrix.custom.html"


def test_the_sas_as_one_line_of_text() -> None:
    from bot_toolkit import SasPrompt  # noqa: PLC0415 - the front door, as a bot uses it

    line = "🐶 Dog, 🔑 Key, 🎩 Hat, 🌙 Moon, ⏰ Clock, 🏁 Flag, 🐧 Penguin | 1234 5678 9012"
    assert SasPrompt("t", "@a:x", "D", EMOJI, (1234, 5678, 9012)).text == line
    assert SasReady("t", "@a:x", "D", EMOJI, (1234, 5678, 9012)).text == line
    assert SasReady("t", "@a:x", "D", (), (1, 2, 3)).text == "1 2 3"  # decimals only
    assert SasPrompt("t", "@a:x", "D", EMOJI[:1], None).text == "🐶 Dog"  # emoji only
