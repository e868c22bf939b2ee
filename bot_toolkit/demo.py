"""``bot-toolkit demo``: the whole story on a laptop with no homeserver at hand.

1. starts a throwaway Synapse on 127.0.0.1 (the ``demo`` extra: ``pip install
   'bot_toolkit[demo]'``);
2. registers the bot and two peers;
3. runs the bot in this process (the same :class:`~bot_toolkit.bot.Bot` as ``bot-toolkit run``,
   with a temporary data directory, confirming the SAS automatically for the peer);
4. a scripted peer, Alice (a nio client with bot_toolkit's own
   :class:`~bot_toolkit.verification.VerificationManager` on the requesting side), asks the bot's
   device to verify by SAS; both sides show the emoji and decimals, compare and confirm, and each
   ends up trusting the other's device;
5. the bot runs the example plugin (``bot_toolkit.plugins.ping``): Alice says ``!ping demo`` in
   an encrypted room and decrypts the bot's encrypted answer;
6. Carol, a device with identity keys but no one-time keys (nobody can open an Olm session with
   it), shares an encrypted room with the bot; the bot says hello and Carol receives the
   ``m.room_key.withheld`` notice with code ``m.no_olm`` instead of the room key;
7. everything is stopped and removed.

Every step prints a numbered line and is bounded by a timeout. Exit code 0 when the whole flow
worked, 2 when Synapse is not installed, 1 otherwise (with one line naming the problem).
Nothing here needs Node or the test suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
from nio import (
    AsyncClient,
    RoomCreateResponse,
    RoomMessageNotice,
    RoomSendResponse,
)

from bot_toolkit.bot import Bot
from bot_toolkit.config import (
    BotConfig,
    HttpConfig,
    KeysConfig,
    LoggingConfig,
    MatrixConfig,
    OutboxConfig,
    PluginsConfig,
    Secret,
    StorageConfig,
    VerificationConfig,
)
from bot_toolkit.logging_setup import active_redactor
from bot_toolkit.nio_client import restore_client
from bot_toolkit.toolkit import BotToolkit, Settings
from bot_toolkit.verification import (
    SasPrompt,
    VerificationDone,
    VerificationManager,
    VerificationPolicy,
)
from bot_toolkit.verification.lifecycle import format_sas

__all__ = ["DEMO_EXTRA_HINT", "main"]

log = logging.getLogger("bot_toolkit.demo")

DEMO_EXTRA_HINT: Final = "pip install 'bot_toolkit[demo]'"
STEP_TIMEOUT: Final = 90.0
T = TypeVar("T")


class DemoError(RuntimeError):
    """A step of the demo did not work."""


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _step(what: str, aw: Awaitable[T], timeout: float = STEP_TIMEOUT) -> T:  # noqa: ASYNC109
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        raise DemoError(f"{what}: no result within {timeout:.0f}s") from None


async def _until(what: str, predicate: Any, timeout: float = 60.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise DemoError(f"{what}: not the case after {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def _send_text_once_joined(
    client: AsyncClient, room_id: str, member: str, body: str, who: str
) -> str:
    """Wait until ``member`` is in ``client``'s encrypted room ``room_id``, then send ``body``
    there as ``who``; the event id."""

    def joined() -> bool:
        room = client.rooms.get(room_id)
        return bool(room and room.encrypted and member in room.users)

    await _until(f"{member} joins {who}'s room", joined, 60)
    content = {"msgtype": "m.text", "body": body}
    sent = await _step(
        f"{who}'s message",
        client.room_send(room_id, "m.room.message", content, ignore_unverified_devices=True),
    )
    if not isinstance(sent, RoomSendResponse):
        raise DemoError(f"{who} could not send: {sent}")
    return str(sent.event_id)


# ----------------------------------------------------------------------------- Alice


class ScriptedPeer:
    """Alice: a nio client whose SAS side is bot_toolkit's own VerificationManager."""

    def __init__(self, homeserver: str, user: Any, workdir: Path, shown: dict[str, Any]) -> None:
        self.homeserver = homeserver
        self.user = user
        self.workdir = workdir
        self.shown = shown  # what the bot showed, by transaction id
        self.client: AsyncClient | None = None
        self.manager: VerificationManager | None = None
        self._stack = contextlib.AsyncExitStack()

    async def _confirm(self, prompt: SasPrompt) -> bool:
        _say(f"    Alice sees:  {format_sas(prompt.emoji, ())}")
        if prompt.decimals:
            _say(f"    Alice sees the decimals: {' '.join(map(str, prompt.decimals))}")
        theirs = self.shown.get(prompt.transaction_id)
        same = theirs is not None and (theirs.emoji, theirs.decimals) == (
            prompt.emoji,
            prompt.decimals,
        )
        answer = "yes" if same else "no"
        _say(f"    Same on both screens: {answer}; Alice confirms: {answer}")
        return same

    async def start(self, bot_user: str) -> None:
        store_dir = self.workdir / "alice-nio"
        store_dir.mkdir(parents=True)
        client = restore_client(
            self.homeserver,
            self.user.user_id,
            self.user.device_id,
            self.user.access_token,
            self.workdir / "alice",
            store_dir=store_dir,
        )
        active_redactor().add(self.user.access_token)
        policy = VerificationPolicy(allowed_users=[bot_user], confirm=self._confirm)
        toolkit = BotToolkit(
            client,
            self.workdir / "alice",
            verification=policy,
            key_sharing=None,
            settings=Settings(drain_timeout=5.0, flush_deadline=5.0),
        )
        self._stack.push_async_callback(toolkit.close)  # closes the client too
        await toolkit.start()  # uploads the device keys
        await client.sync(timeout=0)
        self.client = client
        self.manager = toolkit.verification
        sync = asyncio.create_task(self._sync_loop(client), name="alice-sync")
        self._stack.push_async_callback(_cancel, sync)

    @staticmethod
    async def _sync_loop(client: AsyncClient) -> None:
        while True:
            try:
                await client.sync(timeout=500)
                if client.should_query_keys:
                    await client.keys_query()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("alice: sync failed")
                await asyncio.sleep(1)

    async def ping(self, bot_user: str) -> RoomMessageNotice:
        """Make an encrypted room with the bot, say ``!ping demo``, return the bot's answer."""
        client = self.client
        assert client is not None
        answers: dict[str, RoomMessageNotice] = {}

        async def on_notice(room: Any, event: RoomMessageNotice) -> None:
            relates = event.source.get("content", {}).get("m.relates_to", {})
            target = relates.get("m.in_reply_to", {}).get("event_id")
            if event.sender == bot_user and isinstance(target, str):
                answers[target] = event

        client.add_event_callback(on_notice, RoomMessageNotice)
        encryption = {
            "type": "m.room.encryption",
            "state_key": "",
            "content": {"algorithm": "m.megolm.v1.aes-sha2"},
        }
        created = await client.room_create(invite=[bot_user], initial_state=[encryption])
        if not isinstance(created, RoomCreateResponse):
            raise DemoError(f"Alice could not create a room: {created}")
        event_id = await _send_text_once_joined(
            client, created.room_id, bot_user, "!ping demo", "Alice"
        )
        await _until("the bot's answer", lambda: event_id in answers, 60)
        return answers[event_id]

    async def close(self) -> None:
        await self._stack.aclose()


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


# ----------------------------------------------------------------------------- Carol


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class KeylessDevice:
    """Carol: device keys (signed) but no one-time keys and no fallback key, over raw HTTP.

    Nobody can open an Olm session with such a device, so the bot cannot give it a room key; it
    tells the device why with ``m.room_key.withheld`` (``m.no_olm``).
    """

    def __init__(self, homeserver: str, user: Any) -> None:
        import vodozemac  # noqa: PLC0415 - nio's own crypto dependency

        self.homeserver = homeserver
        self.user = user
        self._account = vodozemac.Account()
        self._http = aiohttp.ClientSession()
        self._since: str | None = None
        self.to_device: list[dict[str, Any]] = []

    async def close(self) -> None:
        await self._http.close()

    async def _call(self, method: str, path: str, body: Any = None, wait: float = 0) -> Any:
        headers = {"Authorization": f"Bearer {self.user.access_token}"}
        async with self._http.request(
            method,
            self.homeserver + path,
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=wait + 30),
        ) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 300:
                raise DemoError(
                    f"carol: {method} {path.split('?', maxsplit=1)[0]} answered {resp.status}"
                )
            return data

    async def upload_device_keys(self) -> None:
        user, device = self.user.user_id, self.user.device_id
        keys = {
            "user_id": user,
            "device_id": device,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                f"curve25519:{device}": self._account.curve25519_key.to_base64(),
                f"ed25519:{device}": self._account.ed25519_key.to_base64(),
            },
        }
        signature = self._account.sign(_canonical(keys)).to_base64()
        keys["signatures"] = {user: {f"ed25519:{device}": signature}}
        await self._call("POST", "/_matrix/client/v3/keys/upload", {"device_keys": keys})

    async def create_encrypted_room(self, invite: str) -> str:
        body = {
            "preset": "private_chat",
            "invite": [invite],
            "initial_state": [
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            ],
        }
        data = await self._call("POST", "/_matrix/client/v3/createRoom", body)
        room_id: str = data["room_id"]
        return room_id

    async def sync(self, timeout_ms: int = 1000) -> None:
        path = f"/_matrix/client/v3/sync?timeout={timeout_ms}"
        if self._since:
            path += f"&since={self._since}"
        data = await self._call("GET", path, wait=timeout_ms / 1000)
        self._since = data["next_batch"]
        self.to_device.extend(data.get("to_device", {}).get("events", []))

    def withheld(self) -> list[dict[str, Any]]:
        return [e for e in self.to_device if e.get("type") == "m.room_key.withheld"]


# ----------------------------------------------------------------------------- the script


def _bot_config(homeserver: str, bot: Any, data_dir: Path, port: int, admin: str) -> BotConfig:
    return BotConfig(
        matrix=MatrixConfig(
            homeserver=homeserver,
            user_id=bot.user_id,
            device_name="bot_toolkit demo",
            password=Secret(bot.password),
            sync_timeout=1.0,
            retry_max_delay=2.0,
        ),
        storage=StorageConfig(data_dir=data_dir),
        verification=VerificationConfig(allowed_users=("@*:localhost",), confirm="auto"),
        keys=KeysConfig(share_with="all"),  # the only reason to withhold: no Olm
        outbox=OutboxConfig(flush_deadline=5.0),
        http=HttpConfig(host="127.0.0.1", port=port, admin_token=Secret(admin)),
        logging=LoggingConfig(level="WARNING"),
        plugins=PluginsConfig(modules=("bot_toolkit.plugins.ping",)),
    )


@contextlib.asynccontextmanager
async def _synapse() -> AsyncIterator[Any]:
    from bot_toolkit.testing.synapse import LocalSynapse  # noqa: PLC0415

    server = LocalSynapse()
    try:
        await asyncio.to_thread(server.start, STEP_TIMEOUT)
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def _demo(workdir: Path) -> None:
    from bot_toolkit.testing.synapse import free_port  # noqa: PLC0415

    _say("[1] Starting a throwaway Synapse homeserver on 127.0.0.1 ...")
    async with _synapse() as synapse:
        _say(f"    Synapse is up at {synapse.url}")
        bot_user = await asyncio.to_thread(synapse.register, "demobot")
        alice_user = await asyncio.to_thread(synapse.register, "alice")
        carol_user = await asyncio.to_thread(synapse.register, "carol")
        for u in (bot_user, alice_user, carol_user):
            active_redactor().add(u.access_token)
            active_redactor().add(u.password)
        _say(
            f"[2] Registered the bot {bot_user.user_id}, the peer {alice_user.user_id} and "
            f"{carol_user.user_id} (a device without one-time keys)"
        )

        shown: dict[str, Any] = {}

        async def bot_confirms(prompt: SasPrompt) -> bool:
            shown[prompt.transaction_id] = prompt
            _say(f"    Bot shows:   {format_sas(prompt.emoji, ())}")
            if prompt.decimals:
                _say(f"    Bot shows the decimals:  {' '.join(map(str, prompt.decimals))}")
            _say("    The bot confirms automatically (verification.confirm = auto)")
            await asyncio.sleep(0.5)  # let Alice print her side first
            return True

        port = free_port()
        config = _bot_config(
            synapse.url, bot_user, workdir / "bot-data", port, secrets.token_hex(16)
        )
        bot = Bot(config, confirm=bot_confirms, install_signal_handlers=False)
        bot_task = asyncio.create_task(bot.run(), name="demo-bot")
        alice = ScriptedPeer(synapse.url, alice_user, workdir, shown)
        carol = KeylessDevice(synapse.url, carol_user)
        try:
            ready = asyncio.create_task(bot.ready.wait())
            await _step(
                "the bot's first sync",
                asyncio.wait({ready, bot_task}, return_when=asyncio.FIRST_COMPLETED),
            )
            if bot_task.done():
                bot_task.result()
                raise DemoError("the bot stopped before it was ready")
            assert bot.client is not None
            bot_device = str(bot.client.device_id)
            _say(
                f"[3] The bot runs as {bot_user.user_id}, device {bot_device}; "
                f"http://127.0.0.1:{port}/readyz answers 200"
            )

            # ---- verification
            await _step("Alice's start", alice.start(bot_user.user_id))
            assert alice.manager is not None and alice.client is not None
            _say(
                f"[4] Alice (device {alice_user.device_id}) asks the bot's device {bot_device} "
                "to verify by SAS ..."
            )
            txn = await _step(
                "the verification request",
                alice.manager.request_verification(bot_user.user_id, bot_device),
            )
            result = await _step("the verification", alice.manager.wait_finished(txn))
            if not isinstance(result, VerificationDone):
                raise DemoError(f"verification cancelled: {result.code} {result.reason}")
            client = bot.client

            def bot_trusts_alice() -> bool:
                d = client.device_store[alice_user.user_id].get(alice_user.device_id)
                return bool(d is not None and d.verified)

            await _until("the bot trusts Alice's device", bot_trusts_alice, 30)
            alice_dev = alice.client.device_store[bot_user.user_id][bot_device]
            _say(
                f"[5] Verification done: Alice trusts the bot's device: "
                f"{'yes' if alice_dev.verified else 'no'}; the bot trusts Alice's device: yes"
            )

            # ---- a plugin answers in an encrypted room
            _say(
                "[6] The bot runs the example plugin bot_toolkit.plugins.ping. Alice asks "
                "'!ping demo' in an encrypted room ..."
            )
            answer = await _step("the plugin's answer", alice.ping(bot_user.user_id))
            _say(
                f"    Alice decrypted the bot's answer: {answer.body!r} "
                f"(encrypted: {'yes' if answer.decrypted else 'no'})"
            )

            # ---- withheld
            _say(
                "[7] Carol's device has no one-time keys, so nobody can open an Olm session "
                "with it. She shares an encrypted room with the bot (keys.share_with = all); "
                "the bot says hello ..."
            )
            await carol.upload_device_keys()
            await carol.sync(0)
            room_id = await carol.create_encrypted_room(bot_user.user_id)
            await _send_text_once_joined(
                client, room_id, carol_user.user_id, "Hello Carol!", "the bot"
            )

            async def carol_gets_notice() -> None:
                while not carol.withheld():
                    await carol.sync(1000)

            await _step("the withheld notice", carol_gets_notice(), 60)
            notice = carol.withheld()[0]
            content = notice.get("content", {})
            _say(
                f"    Carol received m.room_key.withheld from {notice.get('sender')} device "
                f"{content.get('from_device')}: code={content.get('code')} "
                f'reason="{content.get("reason")}"'
            )
            if content.get("code") != "m.no_olm":
                raise DemoError(f"unexpected withheld code {content.get('code')}")
        finally:
            await carol.close()
            await alice.close()
            bot.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(bot_task), 30)
            if not bot_task.done():
                await _cancel(bot_task)
        _say("[8] Cleaning up: the bot stopped cleanly, Synapse stops, temporary files go")


async def _run() -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupted: list[int] = []

    def interrupt(signum: int) -> None:
        interrupted.append(signum)
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, interrupt, sig)
    workdir = Path(tempfile.mkdtemp(prefix="bot-toolkit-demo-"))
    started = time.monotonic()
    try:
        await _demo(workdir)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        print("bot-toolkit: demo interrupted; cleaned up", file=sys.stderr)
        return 0
    except DemoError as e:
        print(f"bot-toolkit: demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    _say(
        f"Demo finished in {time.monotonic() - started:.0f}s: the bot was verified by SAS and "
        "sent an m.no_olm withheld notice; its plugin answered !ping."
    )
    return 0


def main() -> int:
    """Run the demo; see the module docs. Returns the exit code."""
    try:
        have_synapse = importlib.util.find_spec("synapse") is not None
    except ImportError:
        have_synapse = False
    if not have_synapse:
        print(
            f"bot-toolkit: demo needs Synapse, which is not installed: {DEMO_EXTRA_HINT}",
            file=sys.stderr,
        )
        return 2
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    # Keep the terminal for the story; warnings and errors still show.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("nio").setLevel(logging.ERROR)  # "missing Olm session" is the point here
    _say("bot_toolkit demo: a throwaway homeserver, the bot, and a scripted peer")
    return asyncio.run(_run())
