"""How the bot shows a SAS to a person: as one line of text, and as the ``m.notice`` posted in a
room (plain text plus HTML, every peer-chosen value escaped)."""

from __future__ import annotations

from html import escape

from bot_toolkit.verification.lifecycle import SasReady

__all__ = ["sas_notice"]


def sas_notice(event: SasReady) -> dict[str, str]:
    """The ``m.notice`` content that shows a SAS to the person verifying the bot.

    Plain text plus HTML; every value that goes into the HTML is escaped (the device id is the
    peer's choice).
    """
    text = (
        f"Verification {event.transaction_id} with your device {event.device_id}: "
        f"compare with your screen: {event.text}"
    )
    content = {"msgtype": "m.notice", "body": text}
    html_emoji = "<br>".join(f"{escape(e)} {escape(name)}" for e, name in event.emoji)
    if html_emoji:
        numbers = " ".join(str(d) for d in event.decimals or ())
        content["format"] = "org.matrix.custom.html"
        content["formatted_body"] = (
            f"Verification with your device {escape(event.device_id)}:<br>{html_emoji}"
            + (f"<br>{numbers}" if numbers else "")
        )
    return content
