"""Helpers for the verification manager tests.

Unit side (no network): :class:`FakeKeys` (a :class:`KeySource`),
:class:`FakeOutbox` (records every send and can deliver it to another side's dispatcher) and
:func:`make_side` / :func:`wire` to run two managers back to back.

Integration side: :func:`running_bot` builds the real bot through :class:`bot_toolkit.BotToolkit`
(an encrypted nio client, the nio plugin with nio's own SAS off, a Dispatcher, an Outbox over
HTTP and a VerificationManager); it syncs in the background for the length of an ``async with``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot_toolkit import BotToolkit, Settings
from bot_toolkit._types import DeviceId, UserId
from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.events import decode
from bot_toolkit.metrics import Metrics
from bot_toolkit.outbox import Outbox, OutboxClosed
from bot_toolkit.store import Store
from bot_toolkit.verification import (
    SasPrompt,
    SasReady,
    VerificationCancelled,
    VerificationDone,
    VerificationManager,
    VerificationPolicy,
    VerificationRequested,
)
from bot_toolkit.verification.rooms import RoomSender
from bot_toolkit.withheld import SharingPolicy
from tests.fakes import FakeClock

# --------------------------------------------------------------------------------- unit fakes


@dataclass
class FakeKeys:
    """Device keys and trust store in memory. ``later``: keys a query makes known."""

    user_id: str
    device_id: str
    ed25519: str
    known: dict[tuple[str, str], str] = field(default_factory=dict)
    later: dict[tuple[str, str], str] = field(default_factory=dict)
    query_delay: float = 0.0
    query_hangs: bool = False
    masters: dict[str, str] = field(default_factory=dict)
    verified: set[tuple[str, str]] = field(default_factory=set)
    queries: list[str] = field(default_factory=list)

    def own(self) -> tuple[UserId, DeviceId, str]:
        return UserId(self.user_id), DeviceId(self.device_id), self.ed25519

    def device_ed25519(self, user_id: str, device_id: str) -> str | None:
        return self.known.get((user_id, device_id))

    def device_for_curve(self, user_id: str, curve25519: str) -> DeviceId | None:
        return None

    async def query(self, user_id: str) -> None:
        self.queries.append(user_id)
        if self.query_hangs:
            await asyncio.Event().wait()
        await asyncio.sleep(self.query_delay)
        for key, ed in list(self.later.items()):
            if key[0] == user_id:
                self.known[key] = ed
                del self.later[key]

    async def master_key(self, user_id: str) -> str | None:
        return self.masters.get(user_id)

    async def mark_verified(self, user_id: str, device_id: str) -> bool:
        if (user_id, device_id) not in self.known:
            return False
        self.verified.add((user_id, device_id))
        return True


Sent = tuple[str, str, str, dict[str, Any]]  # event type, user, device, content


class FakeOutbox:
    """Records sends; ``deliver(event_type, user, device, content)`` routes them onward."""

    def __init__(self, sender: str) -> None:
        self.sender = sender
        self.sent: list[Sent] = []
        self.deliver: Callable[[str, str, str, dict[str, Any]], None] | None = None
        self.fail_types: set[str] = set()
        """Event types whose sends raise ``OutboxClosed`` (nothing recorded)."""
        self.hang_types: set[str] = set()
        """Event types whose sends never return (nothing recorded)."""

    async def send(self, event_type: str, messages: Any) -> list[str]:
        if event_type in self.fail_types:
            raise OutboxClosed("outbox closed (test)")
        if event_type in self.hang_types:
            await asyncio.Event().wait()
        for user, devices in messages.items():
            for device, content in devices.items():
                self.sent.append((event_type, user, device, dict(content)))
                if self.deliver is not None:
                    self.deliver(event_type, user, device, dict(content))
        return ["txn"]

    def of_type(self, event_type: str, txn: str | None = None) -> list[Sent]:
        short = event_type if event_type.startswith("m.") else f"m.key.verification.{event_type}"
        return [
            s
            for s in self.sent
            if s[0] == short and (txn is None or s[3].get("transaction_id") == txn)
        ]

    def cancels(self, txn: str | None = None) -> list[str]:
        return [s[3]["code"] for s in self.of_type("cancel", txn)]


@dataclass
class Side:
    """One manager with its fakes and the lifecycle events it raised."""

    name: str
    keys: FakeKeys
    outbox: FakeOutbox
    dispatcher: Dispatcher
    manager: VerificationManager
    metrics: Metrics
    lifecycle: list[object] = field(default_factory=list)

    @property
    def user_id(self) -> str:
        return self.keys.user_id

    @property
    def device_id(self) -> str:
        return self.keys.device_id

    def put_raw(self, sender: str, event_type: str, content: dict[str, Any]) -> None:
        self.dispatcher.put_nowait(
            decode({"type": event_type, "sender": sender, "content": content})
        )

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.lifecycle if isinstance(e, cls)]


def auto_confirm(answer: bool = True) -> Callable[[SasPrompt], Awaitable[bool]]:
    async def confirm(prompt: SasPrompt) -> bool:
        assert len(prompt.emoji) == 7 and prompt.decimals is not None
        return answer

    return confirm


async def make_side(
    name: str,
    clock: FakeClock,
    *,
    policy: VerificationPolicy | None = None,
    store: Store | None = None,
    user_id: str | None = None,
    device_id: str | None = None,
    start: bool = True,
    rooms: RoomSender | None = None,
) -> Side:
    """One side: a verification manager over fake keys and a :class:`FakeOutbox` (``rooms``:
    its in-room sender), with its dispatcher started and every lifecycle event recorded."""
    metrics = Metrics()
    dispatcher = Dispatcher(metrics, handler_timeout=30.0)
    keys = FakeKeys(
        user_id or f"@{name}:test", device_id or f"{name.upper()}DEV", f"ed25519-of-{name}"
    )
    outbox = FakeOutbox(keys.user_id)
    policy = policy or VerificationPolicy(allowed_users=["@*:test"], confirm=auto_confirm())
    manager = VerificationManager(
        None,
        dispatcher,
        outbox,
        policy,
        metrics,
        clock,
        store=store,
        key_source=keys,
        tick=0,
        rooms=rooms,
    )
    side = Side(name, keys, outbox, dispatcher, manager, metrics)

    async def record(event: object) -> None:
        side.lifecycle.append(event)

    for cls in (VerificationRequested, SasReady, VerificationDone, VerificationCancelled):
        dispatcher.register(cls, record)
    await dispatcher.start()
    if start:
        await manager.start()
    return side


def wire(a: Side, b: Side) -> None:
    """Deliver each side's sends addressed to the other's device (or ``*``) to the other."""
    a.keys.known[(b.user_id, b.device_id)] = b.keys.ed25519
    b.keys.known[(a.user_id, a.device_id)] = a.keys.ed25519
    for src, dst in ((a, b), (b, a)):

        def deliver(  # noqa: PLR0917
            event_type: str,
            user: str,
            device: str,
            content: dict[str, Any],
            src: Side = src,
            dst: Side = dst,
        ) -> None:
            if user == dst.user_id and device in (dst.device_id, "*"):
                dst.put_raw(src.user_id, event_type, content)

        src.outbox.deliver = deliver


async def close_sides(*sides: Side) -> None:
    for side in sides:
        await side.manager.close()
        await side.dispatcher.close(5.0)


@contextlib.asynccontextmanager
async def wired_sides(
    clock: FakeClock,
    alice: VerificationPolicy | None = None,
    bob: VerificationPolicy | None = None,
) -> AsyncIterator[tuple[Side, Side]]:
    """Alice and Bob's managers, wired back to back (see :func:`wire`), closed on exit."""
    a = await make_side("alice", clock, policy=alice)
    b = await make_side("bob", clock, policy=bob)
    wire(a, b)
    try:
        yield a, b
    finally:
        await close_sides(a, b)


async def eventually(
    predicate: Callable[[], bool], *, within: float = 10.0, what: str = ""
) -> None:
    """Poll ``predicate`` (bounded)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polling a plain predicate
            await asyncio.sleep(0.01)
    assert predicate(), what


async def settle(*sides: Side, within: float = 10.0) -> None:
    """Wait (bounded) until nothing is left to run on ``sides``: every dispatcher idle and no
    manager background task (a confirmation, a trust refresh) running, all at one moment.

    Work moves between parts (a handler's send is an event of another side, a finished task
    feeds a dispatcher), so this waits for each part in turn and repeats until one pass finds
    every part idle. What a check after it looks at ("nothing was sent") is then final, however
    slow the machine. A part that never goes idle fails the test after ``within`` seconds.
    """

    def idle(side: Side) -> bool:
        return side.dispatcher.idle and side.manager.idle

    try:
        async with asyncio.timeout(within):
            while not all(idle(side) for side in sides):
                for side in sides:
                    await side.dispatcher.join()
                    await side.manager.join()
    except TimeoutError:
        busy = [s.name for s in sides if not idle(s)]
        raise AssertionError(f"still busy after {within}s: {busy}") from None


async def bot_took(bot: Bot, counts: dict[str, int], *, within: float = 30.0) -> None:
    """Wait (bounded) until the running bot's dispatcher has taken at least ``counts[kind]``
    ``m.key.verification.<kind>`` events in all, then until it is settled (:func:`settle_bot`).

    A peer that then syncs sees everything the bot will send about those events, so a check
    that the bot sent nothing is final (a quiet period of the peer's sync would only guess)."""

    def taken(kind: str) -> float:
        counter = bot.metrics.get("events_dispatched_total")
        return 0.0 if counter is None else counter.get(f"m.key.verification.{kind}")

    await eventually(
        lambda: all(taken(kind) >= n for kind, n in counts.items()),
        within=within,
        what=f"the bot takes {counts}",
    )
    await settle_bot(bot, within=within)


async def settle_bot(bot: Bot, *, within: float = 30.0) -> None:
    """Wait (bounded) until the running bot is idle (:meth:`BotToolkit.join`): its dispatcher,
    verification and key sharing have nothing left to run and its outbox has delivered
    everything, all at one moment (each can make work for another)."""
    if not await bot.toolkit.join(within):
        raise AssertionError(f"the bot was still busy after {within}s")


# --------------------------------------------------------------------------------- real bot


@dataclass
class Bot:
    """The bot under test against the real Synapse."""

    client: Any
    dispatcher: Dispatcher
    outbox: Outbox
    store: Store
    manager: VerificationManager
    metrics: Metrics
    lifecycle: list[object]
    toolkit: BotToolkit

    @property
    def user_id(self) -> str:
        return str(self.client.user_id)

    @property
    def device_id(self) -> str:
        return str(self.client.device_id)

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.lifecycle if isinstance(e, cls)]


@contextlib.asynccontextmanager
async def running_bot(
    synapse: Any,
    tmp_path: Path,
    *,
    policy: VerificationPolicy | None = None,
    user: Any = None,
    poll_ms: int = 300,
    key_sharing: SharingPolicy | None = None,
) -> AsyncIterator[Bot]:
    """A syncing bot with verification (and key sharing when a policy is given); everything is
    stopped on exit."""
    from tests.nio_helpers import make_client, syncing  # noqa: PLC0415

    client = await make_client(synapse, tmp_path, user)
    policy = policy or VerificationPolicy(allowed_users=["@*:*"], confirm=auto_confirm())
    toolkit = BotToolkit(
        client,
        tmp_path / f"bot-{client.device_id}",
        verification=policy,
        key_sharing=key_sharing,
        settings=Settings(handler_timeout=60.0, drain_timeout=5.0, flush_deadline=5.0),
    )
    lifecycle: list[object] = []

    async def record(event: object) -> None:
        lifecycle.append(event)

    for cls in (VerificationRequested, SasReady, VerificationDone, VerificationCancelled):
        toolkit.on(cls)(record)
    async with toolkit:
        bot = Bot(
            client,
            toolkit.dispatcher,
            toolkit.outbox,
            toolkit.store,
            toolkit.verification,
            toolkit.metrics,
            lifecycle,
            toolkit,
        )
        async with syncing(client, poll_ms=poll_ms):
            yield bot
