"""Child process for the room-key crash test (``tests/test_room_keys.py``).

Runs the bot (:class:`tests.bot_process.BotProcess`) on ``--data-dir`` against ``--homeserver``
(a fault proxy that holds every room-key request), sends one message to ``--room``, prints
``SENT {event_id} {session_id}`` once ``room_send`` returned (the message is on the homeserver,
its room keys only in the outbox), then waits to be killed (at most ``--linger`` seconds).

The access token comes from the environment (``BOT_TOOLKIT_TEST_TOKEN``), not the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from nio import RoomSendResponse

from tests.bot_process import BotProcess
from tests.synapse import RegisteredUser


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> int:
    user = RegisteredUser(args.user, os.environ["BOT_TOOLKIT_TEST_TOKEN"], args.device, "")
    synapse: Any = None  # only the homeserver URL is needed, and it is given
    bot = await BotProcess(synapse, user, Path(args.data_dir), homeserver=args.homeserver).start()
    res = await bot.client.room_send(
        args.room, "m.room.message", {"msgtype": "m.text", "body": args.text}
    )
    if not isinstance(res, RoomSendResponse):
        _say(f"FAILED {res}")
        return 1
    session = bot.client.olm.outbound_group_sessions[args.room]
    _say(f"SENT {res.event_id} {session.id}")
    await asyncio.sleep(args.linger)  # the test kills the process during this wait
    return 2


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--homeserver", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--linger", type=float, default=120.0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(asyncio.run(main(parser.parse_args())))
