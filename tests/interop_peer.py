"""Python driver for the matrix-js-sdk test peer (``tests/interop/peer.mjs``).

The peer is matrix-js-sdk 43 with its Rust crypto (the engine inside Element), run under Node
and spoken to in JSON lines: one command per line on stdin, one reply per command on stdout,
plus asynchronous notifications. :class:`JsPeer` spawns it, matches replies to commands by id,
queues notifications for :meth:`JsPeer.wait_event`, copies the peer's stderr to a log file and
always kills the process on exit::

    async with JsPeer("alice") as peer:
        await peer.login(synapse.url, user.user_id, user.access_token, user.device_id)
        await peer.start()
        ...

Every wait has a timeout. Install the peer with ``npm ci --prefix tests/interop``; tests call
:func:`require_node_peer` so that a missing install fails loudly instead of skipping.
"""

# The `timeout` parameters below are protocol arguments that the peer enforces itself (and
# call() bounds the reply wait by them), hence no asyncio.timeout() at the call sites:
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "INSTALL_HINT",
    "INTEROP_DIR",
    "JsPeer",
    "JsPeerError",
    "JsPeerTimeout",
    "node_available",
    "peer_installed",
    "require_node_peer",
    "started_peer",
]

log = logging.getLogger("bot_toolkit.tests.interop_peer")

INTEROP_DIR = Path(__file__).resolve().parent / "interop"
PEER_SCRIPT = INTEROP_DIR / "peer.mjs"
INSTALL_HINT = "npm ci --prefix tests/interop   (Node >= 20 needed)"

Event = dict[str, Any]
Predicate = Callable[[Event], bool]


class JsPeerError(RuntimeError):
    """The peer answered ``ok: false``, died, or could not be started."""


class JsPeerTimeout(JsPeerError, TimeoutError):
    """A reply or an event did not arrive in time."""


def node_available() -> str | None:
    """The path of ``node`` when it is on PATH, else None."""
    return shutil.which("node")


def peer_installed() -> bool:
    """Whether ``tests/interop/node_modules`` holds matrix-js-sdk and the Rust crypto wasm."""
    mods = INTEROP_DIR / "node_modules"
    return (mods / "matrix-js-sdk" / "package.json").is_file() and (
        mods / "@matrix-org" / "matrix-sdk-crypto-wasm" / "package.json"
    ).is_file()


def require_node_peer() -> None:
    """Fail the calling test (never skip) when Node or the peer's npm install is missing."""
    if node_available() is None:
        pytest.fail(f"interop test needs `node` on PATH; then run: {INSTALL_HINT}", pytrace=False)
    if not peer_installed():
        pytest.fail(
            f"interop peer not installed ({INTEROP_DIR / 'node_modules'} missing); run: "
            f"{INSTALL_HINT}",
            pytrace=False,
        )


async def started_peer(
    synapse: Any, name: str, *, user: Any = None, timeout: float = 60.0
) -> JsPeer:
    """A js peer logged in as ``user`` (default: a newly registered user of ``synapse``) and
    syncing. Pass ``user`` (a :class:`tests.synapse.RegisteredUser`) when the test needs its
    identity or token before the peer exists.

    The caller closes it (``await peer.close()``); on any failure here it is closed already.
    """
    if user is None:
        user = await asyncio.to_thread(synapse.register)
    peer = JsPeer(name)
    await peer.spawn()
    try:
        await peer.login(synapse.url, user.user_id, user.access_token, user.device_id)
        started = await peer.start(timeout=timeout)
        if started.get("device_id") != user.device_id or not started.get("ed25519"):
            raise JsPeerError(f"[{name}] started with unexpected identity: {started}")
    except BaseException:
        await peer.close()
        raise
    return peer


_session_log_dir: Path | None = None


def _log_dir() -> Path:
    """``BOT_TOOLKIT_INTEROP_LOG_DIR`` (kept), else a temporary directory of this test process,
    removed by :func:`remove_session_logs` when the session passed."""
    global _session_log_dir  # noqa: PLW0603 - one directory per test process
    d = os.environ.get("BOT_TOOLKIT_INTEROP_LOG_DIR")
    if d:
        path = Path(d)
        path.mkdir(parents=True, exist_ok=True)
        return path
    if _session_log_dir is None:
        _session_log_dir = Path(tempfile.mkdtemp(prefix="bot-toolkit-interop-logs-"))
    return _session_log_dir


def remove_session_logs(*, keep: bool) -> Path | None:
    """At the end of a test session: delete this process's peer logs, or (``keep``, e.g. after a
    failure) leave them and return their directory. ``BOT_TOOLKIT_INTEROP_LOG_DIR`` is never
    touched."""
    global _session_log_dir
    path, _session_log_dir = _session_log_dir, None
    if path is None or keep:
        return path
    shutil.rmtree(path, ignore_errors=True)
    return None


class JsPeer:
    """One matrix-js-sdk peer process. Use as ``async with JsPeer(name) as peer``.

    :meth:`call` sends any command of the protocol documented in ``peer.mjs``; the named
    methods below are thin wrappers. Notifications (``{"event": ...}``) are kept in arrival
    order; :meth:`wait_event` consumes the first one that matches, :attr:`events` keeps them all.
    """

    def __init__(
        self,
        name: str = "peer",
        *,
        log_path: Path | None = None,
        log_level: str | None = None,
        default_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.default_timeout = default_timeout
        self.log_path = log_path or _log_dir() / f"{name}-{os.getpid()}-{time.time_ns()}.log"
        self.log_level = log_level or os.environ.get("BOT_TOOLKIT_INTEROP_LOG_LEVEL", "debug")
        self.events: list[Event] = []  # every notification, for post-mortems
        self.user_id: str | None = None
        self.device_id: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Event]] = {}
        self._queue: list[Event] = []  # notifications not yet consumed by wait_event
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._log_file: Any = None
        self._dead: str | None = None
        self._ready: asyncio.Future[Event] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> JsPeer:
        await self.spawn()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def spawn(self, timeout: float = 30.0) -> None:
        """Start ``node peer.mjs`` and wait for its ``ready`` notification."""
        node = node_available()
        if node is None:
            raise JsPeerError(f"`node` not found on PATH; then run: {INSTALL_HINT}")
        if not peer_installed():
            raise JsPeerError(f"interop peer not installed; run: {INSTALL_HINT}")
        self._log_file = open(self.log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115, ASYNC230 - local log
        env = {**os.environ, "PEER_LOG_LEVEL": self.log_level}
        self._ready = asyncio.get_running_loop().create_future()
        self._proc = await asyncio.create_subprocess_exec(
            node,
            str(PEER_SCRIPT),
            cwd=str(INTEROP_DIR),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            limit=16 * 1024 * 1024,
        )
        log.info("[%s] started node peer pid %s, log %s", self.name, self._proc.pid, self.log_path)
        self._tasks = [
            asyncio.create_task(self._read_stdout(), name=f"jspeer-{self.name}-stdout"),
            asyncio.create_task(self._read_stderr(), name=f"jspeer-{self.name}-stderr"),
        ]
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            await self.close()
            raise JsPeerTimeout(
                f"[{self.name}] peer not ready after {timeout}s; see {self.log_path}"
            ) from None

    async def close(self, timeout: float = 5.0) -> None:
        """Close stdin (the peer exits on EOF); kill it if it is still alive after ``timeout``."""
        proc = self._proc
        if proc is not None:
            if proc.returncode is None and proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("[%s] peer did not exit; killing pid %s", self.name, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout)
            finally:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
        for task in self._tasks:
            if not task.done():
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        self._fail_pending("peer closed")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def returncode(self) -> int | None:
        """The peer's exit code once it has exited."""
        return None if self._proc is None else self._proc.returncode

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the peer's stderr log, for failure messages."""
        if self._log_file is not None:
            self._log_file.flush()
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- reading -------------------------------------------------------------------------

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            while True:
                line = await self._proc.stdout.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    self._write_log(f"[non-JSON stdout] {line!r}\n")
                    continue
                self._dispatch(msg)
        finally:
            rc = await self._proc.wait()
            self._dead = f"peer exited with code {rc}"
            self._fail_pending(self._dead)
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(JsPeerError(f"[{self.name}] {self._dead} before ready"))
            self._changed.set()

    def _dispatch(self, msg: Event) -> None:
        if "id" in msg and "event" not in msg:
            fut = self._pending.pop(msg["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        if msg.get("event") == "ready" and self._ready is not None and not self._ready.done():
            self._ready.set_result(msg)
        self._write_log(f"[event] {json.dumps(msg)[:2000]}\n")
        self.events.append(msg)
        self._queue.append(msg)
        self._changed.set()

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while True:
            line = await self._proc.stderr.readline()
            if not line:
                return
            self._write_log(line.decode(errors="replace"))

    def _write_log(self, text: str) -> None:
        if self._log_file is not None:
            self._log_file.write(text)

    def _fail_pending(self, reason: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(JsPeerError(f"[{self.name}] {reason}"))
        self._pending.clear()

    # -- protocol ------------------------------------------------------------------------

    async def call(self, cmd: str, *, reply_timeout: float | None = None, **args: Any) -> Event:
        """Send one command and return its reply; raise :class:`JsPeerError` on ``ok: false``.

        ``reply_timeout`` bounds the wait for the reply; by default it is the command's own
        ``timeout`` argument plus 10 s (the peer enforces ``timeout`` itself), else
        :attr:`default_timeout`.
        """
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise JsPeerError(f"[{self.name}] peer not started")
        if self._dead:
            raise JsPeerError(f"[{self.name}] {self._dead}; log tail:\n{self.log_tail()}")
        if reply_timeout is None:
            t = args.get("timeout")
            reply_timeout = float(t) + 10.0 if t is not None else self.default_timeout
        msg_id = next(self._ids)
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        line = json.dumps({"id": msg_id, "cmd": cmd, **args}) + "\n"
        self._write_log(f"[cmd {msg_id}] {cmd} {_redact(args)}\n")
        try:
            proc.stdin.write(line.encode())
            await proc.stdin.drain()
            reply = await asyncio.wait_for(fut, reply_timeout)
        except TimeoutError:
            raise JsPeerTimeout(
                f"[{self.name}] no reply to {cmd} within {reply_timeout}s; see {self.log_path}"
            ) from None
        except (BrokenPipeError, ConnectionResetError) as e:
            raise JsPeerError(f"[{self.name}] peer pipe closed: {e}") from None
        finally:
            self._pending.pop(msg_id, None)
        if not reply.get("ok"):
            raise JsPeerError(f"[{self.name}] {cmd} failed: {reply.get('error')}")
        reply.pop("id", None)
        reply.pop("ok", None)
        return reply

    async def wait_event(
        self,
        name: str,
        predicate: Predicate | None = None,
        timeout: float | None = None,
        *,
        consume: bool = True,
    ) -> Event:
        """The first queued (or future) notification ``name`` for which ``predicate`` holds.

        Consumed from the queue unless ``consume=False``. Raises :class:`JsPeerTimeout`.
        """
        timeout = self.default_timeout if timeout is None else timeout
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for i, ev in enumerate(self._queue):
                if ev.get("event") == name and (predicate is None or predicate(ev)):
                    if consume:
                        del self._queue[i]
                    return ev
            if self._dead:
                raise JsPeerError(f"[{self.name}] {self._dead} while waiting for event {name}")
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                seen = [e.get("event") for e in self._queue][-20:]
                raise JsPeerTimeout(
                    f"[{self.name}] no {name!r} event within {timeout}s (queued: {seen}); "
                    f"see {self.log_path}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def drain_events(self, name: str | None = None) -> list[Event]:
        """Remove and return queued notifications (all, or only those named ``name``)."""
        taken = [e for e in self._queue if name is None or e.get("event") == name]
        self._queue = [e for e in self._queue if not (name is None or e.get("event") == name)]
        return taken

    # -- convenience wrappers --------------------------------------------------------------

    async def login(
        self, homeserver: str, user_id: str, access_token: str, device_id: str
    ) -> Event:
        self.user_id, self.device_id = user_id, device_id
        return await self.call(
            "login",
            homeserver=homeserver,
            user_id=user_id,
            access_token=access_token,
            device_id=device_id,
        )

    async def start(self, timeout: float = 60.0, **args: Any) -> Event:
        return await self.call("start", timeout=timeout, **args)

    async def create_room(
        self, invite: list[str] | None = None, *, encrypted: bool = True, **args: Any
    ) -> str:
        res = await self.call("create_room", invite=invite or [], encrypted=encrypted, **args)
        return str(res["room_id"])

    async def invite(self, room_id: str, user_id: str) -> None:
        await self.call("invite", room_id=room_id, user_id=user_id)

    async def join(self, room_id: str, timeout: float = 30.0) -> None:
        await self.call("join", room_id=room_id, timeout=timeout)

    async def enable_encryption(self, room_id: str) -> None:
        await self.call("enable_encryption", room_id=room_id)

    async def wait_membership(
        self,
        room_id: str,
        user_id: str | None = None,
        membership: str = "join",
        timeout: float = 30.0,
    ) -> None:
        await self.call(
            "wait_membership",
            room_id=room_id,
            user_id=user_id,
            membership=membership,
            timeout=timeout,
        )

    async def devices(
        self,
        user_id: str,
        device_id: str | None = None,
        *,
        wait: bool = False,
        timeout: float = 30.0,
    ) -> list[Event]:
        res = await self.call(
            "devices", user_id=user_id, device_id=device_id, wait=wait, timeout=timeout
        )
        return list(res["devices"])

    async def download_keys(
        self, user_id: str, device_id: str | None = None, timeout: float = 30.0
    ) -> list[Event]:
        res = await self.call(
            "download_keys", user_id=user_id, device_id=device_id, timeout=timeout
        )
        return list(res["devices"][user_id])

    async def device_status(self, user_id: str, device_id: str) -> Event:
        return await self.call("device_status", user_id=user_id, device_id=device_id)

    async def request_verification(
        self, user_id: str, device_id: str, timeout: float = 30.0
    ) -> Event:
        return await self.call(
            "request_verification", user_id=user_id, device_id=device_id, timeout=timeout
        )

    async def request_verification_dm(
        self, user_id: str, room_id: str, timeout: float = 30.0
    ) -> Event:
        """In-room request (``requestVerificationDM``); ``transaction_id`` is the flow id."""
        return await self.call(
            "request_verification_dm", user_id=user_id, room_id=room_id, timeout=timeout
        )

    async def cross_sign_device(self, device_id: str, timeout: float = 30.0) -> None:
        """Sign our own ``device_id`` with our self-signing key (``crossSignDevice``)."""
        await self.call("cross_sign_device", device_id=device_id, timeout=timeout)

    async def user_verification_status(self, user_id: str) -> Event:
        """``getUserVerificationStatus`` (``cross_signing_verified``, ...)."""
        return await self.call("user_verification_status", user_id=user_id)

    async def send_room_event(
        self, room_id: str, event_type: str, content: dict[str, Any], timeout: float = 30.0
    ) -> str:
        """Send a room event (encrypted by the SDK in an encrypted room); its event id."""
        reply = await self.call(
            "send_room_event", room_id=room_id, type=event_type, content=content, timeout=timeout
        )
        return str(reply["event_id"])

    async def wait_request(
        self, user_id: str | None = None, device_id: str | None = None, timeout: float = 30.0
    ) -> Event:
        return await self.call(
            "wait_request", user_id=user_id, device_id=device_id, timeout=timeout
        )

    async def accept_request(self, transaction_id: str, timeout: float = 30.0) -> Event:
        return await self.call("accept_request", transaction_id=transaction_id, timeout=timeout)

    async def wait_phase(self, transaction_id: str, phase: str, timeout: float = 30.0) -> Event:
        return await self.call(
            "wait_phase", transaction_id=transaction_id, phase=phase, timeout=timeout
        )

    async def start_sas(self, transaction_id: str, timeout: float = 30.0) -> Event:
        return await self.call("start_sas", transaction_id=transaction_id, timeout=timeout)

    async def wait_sas(self, transaction_id: str, timeout: float = 30.0) -> Event:
        return await self.call("wait_sas", transaction_id=transaction_id, timeout=timeout)

    async def confirm_sas(self, transaction_id: str, timeout: float = 30.0) -> Event:
        return await self.call("confirm_sas", transaction_id=transaction_id, timeout=timeout)

    async def mismatch_sas(self, transaction_id: str, timeout: float = 30.0) -> Event:
        return await self.call("mismatch_sas", transaction_id=transaction_id, timeout=timeout)

    async def cancel(
        self, transaction_id: str, code: str | None = None, reason: str | None = None
    ) -> Event:
        return await self.call("cancel", transaction_id=transaction_id, code=code, reason=reason)

    async def auto_accept(self, **args: Any) -> Event:
        return await self.call("auto_accept", **args)

    async def send_to_device(
        self, event_type: str, user_id: str, device_id: str, content: dict[str, Any]
    ) -> str:
        res = await self.call(
            "send_to_device", type=event_type, user_id=user_id, device_id=device_id, content=content
        )
        return str(res["txn_id"])

    async def send_encrypted_to_device(
        self, event_type: str, user_id: str, device_id: str, content: dict[str, Any]
    ) -> Event:
        return await self.call(
            "send_encrypted_to_device",
            type=event_type,
            user_id=user_id,
            device_id=device_id,
            content=content,
            timeout=30,
        )

    # -- identity (cross-signing, secret storage) -------------------------------------------

    async def user_identity(self, user_id: str) -> Event:
        """``{"has_keys": userHasCrossSigningKeys(user, download), "master_key": ...}``."""
        return await self.call("user_identity", user_id=user_id)

    async def cross_signing_status(self) -> Event:
        return await self.call("cross_signing_status")

    async def set_recovery_key(self, recovery_key: str) -> None:
        await self.call("set_recovery_key", recovery_key=recovery_key)

    async def bootstrap_cross_signing(
        self, password: str | None = None, *, reset: bool = False
    ) -> Event:
        return await self.call(
            "bootstrap_cross_signing", password=password, reset=reset, timeout=60
        )

    async def create_secret_storage(self) -> str:
        res = await self.call("create_secret_storage", timeout=60)
        return str(res["recovery_key"])

    async def set_isolation_mode(self, mode: str) -> None:
        await self.call("set_isolation_mode", mode=mode)

    async def encryption_info(self, room_id: str, event_id: str) -> Event:
        return await self.call("encryption_info", room_id=room_id, event_id=event_id)

    async def stop(self) -> None:
        with contextlib.suppress(JsPeerError):
            await self.call("stop", reply_timeout=5)


def _redact(args: dict[str, Any]) -> str:
    """Command arguments for the log, without the access token."""
    hidden = ("access_token", "password", "recovery_key")
    shown = {k: ("<redacted>" if k in hidden else v) for k, v in args.items()}
    return json.dumps(shown)[:1000]
