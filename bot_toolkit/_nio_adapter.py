"""The one module that knows matrix-nio's internals.

bot_toolkit hooks one ``nio.AsyncClient`` (and its Olm machine) by replacing attributes of those
instances, and reads a few private fields. Every such name is listed once, in :data:`CONTRACT`,
with its kind (coroutine function, function, generator function, instance attribute), its
parameters and why we need it; where we work around a nio defect, the entry names the upstream
matrix-nio issue (or says that none is filed). The rest of the library goes through this module:

* :func:`ensure_supported` checks the installed nio version against the tested range
  (:data:`TESTED_NIO`) and every class-level name of the contract, and raises
  :class:`NioUnsupported` with one clear message listing what is wrong. It runs when a plugin
  attaches, so an upgrade of nio fails at start-up, never silently later.
* :class:`NioHooks` installs instance patches; a name that is not in the contract, or whose
  current value is not of the expected kind (a renamed or changed nio method), raises
  :class:`NioHookError` at once. :meth:`NioHooks.undo` restores nio exactly.
* :func:`inbound_group_sessions`, :func:`drop_empty_entries` and :func:`olm_encrypt` are the
  private reads and calls.
* :func:`share_room_key` replaces nio's ``AsyncClient.share_group_session``: the room keys go to
  a store callback (the outbox) instead of nio's ``_send``, and devices count as shared only
  after it returned. :func:`contain_soft_logout` keeps nio from clearing the access token on a
  mis-parsed error response.

The contract test (``tests/test_nio_contract.py``) lists the same names on its own and checks them
against the installed nio, so a nio upgrade that moves one fails CI with the name.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Final, Literal, Protocol

from nio import AsyncClient, ErrorResponse, LocalProtocolError, ShareGroupSessionResponse
from nio.crypto import DeviceStore, GroupSessionStore, Olm, SessionStore
from nio.store import MatrixStore

from bot_toolkit._patching import HookSet

__all__ = [
    "CONTRACT",
    "TESTED_NIO",
    "NioHookError",
    "NioHooks",
    "NioName",
    "NioUnsupported",
    "RoomKeyStore",
    "contain_soft_logout",
    "contract_problems",
    "drop_empty_entries",
    "ensure_supported",
    "inbound_group_sessions",
    "olm_encrypt",
    "send_sender_device_keys",
    "share_room_key",
]

TESTED_NIO: Final = ((0, 26), (0, 27))
"""The matrix-nio versions bot_toolkit is tested with: at least 0.26, below 0.27."""

Kind = Literal["coroutine", "function", "generator", "instance attribute"]
Use = Literal["patch", "call", "read"]

OWNERS: Final[Mapping[str, type]] = {
    "AsyncClient": AsyncClient,
    "Olm": Olm,
    "GroupSessionStore": GroupSessionStore,
    "DeviceStore": DeviceStore,
    "SessionStore": SessionStore,
    "MatrixStore": MatrixStore,
}
"""The nio classes whose names the contract lists, by the name the contract uses."""


class NioUnsupported(RuntimeError):
    """The installed matrix-nio is outside the tested range or lacks what bot_toolkit hooks."""


class NioHookError(NioUnsupported):
    """A nio hook cannot be installed (renamed, removed or changed method)."""


@dataclass(frozen=True, slots=True)
class NioName:
    """One nio name bot_toolkit patches, calls or reads, and why."""

    owner: str
    name: str
    kind: Kind
    params: tuple[str, ...] | None
    """The parameter names after ``self`` (``None`` for an instance attribute)."""
    use: Use
    why: str
    """Why we need it; for a workaround of a nio defect, the upstream matrix-nio issue (or that
    none is filed yet)."""
    defect: bool = False
    """Whether this works around a nio defect (rather than using nio as designed)."""

    @property
    def qualname(self) -> str:
        return f"{self.owner}.{self.name}"


_NO_ISSUE: Final = "no upstream matrix-nio issue filed yet"

CONTRACT: Final[tuple[NioName, ...]] = (
    # ---- the to-device stream (bot_toolkit.nio_plugin)
    NioName(
        "AsyncClient",
        "_handle_to_device",
        "coroutine",
        ("response",),
        "patch",
        "batch boundary of one sync's to-device events (hand-off with backpressure)",
    ),
    NioName(
        "AsyncClient",
        "_handle_decrypt_to_device",
        "function",
        ("to_device_event",),
        "patch",
        "every wire to-device event: nio parses request/ready/done/withheld as unknown "
        "(matrix-nio#430: no event class for m.key.verification.request/ready) and lets "
        "vodozemac's DecodeException for a malformed Olm body end sync_forever "
        f"({_NO_ISSUE})",
        defect=True,
    ),
    NioName(
        "MatrixStore",
        "save_sync_token",
        "function",
        ("token",),
        "patch",
        "nio 0.26 saves the sync token before its handlers ran, so a crash between the two loses "
        "that batch's to-device events: with the durable inbound queue the save waits until the "
        f"batch is committed to bot_toolkit's store ({_NO_ISSUE})",
        defect=True,
    ),
    NioName(
        "AsyncClient",
        "keys_query",
        "coroutine",
        (),
        "patch",
        "sync_forever schedules keys_query(); if another task queried first it raises "
        f"LocalProtocolError and sync_forever ends ({_NO_ISSUE})",
        defect=True,
    ),
    NioName(
        "Olm",
        "_verify_olm_payload",
        "function",
        ("sender", "payload"),
        "patch",
        "the spec's checks on a decrypted Olm payload that nio 0.26 skips (sender_device_keys, "
        f"keys.ed25519 against the device store; {_NO_ISSUE})",
        defect=True,
    ),
    NioName(
        "Olm",
        "_handle_olm_event",
        "function",
        ("sender", "sender_key", "payload"),
        "patch",
        "decrypted payloads other than room keys and m.dummy are dropped by nio 0.26, so an "
        "Olm-encrypted verification request never reaches a callback (the symptom of "
        "matrix-nio#567: m.key.verification.request not delivered in 0.26.0)",
        defect=True,
    ),
    NioName(
        "Olm",
        "handle_key_verification",
        "function",
        ("event",),
        "patch",
        "nio's built-in legacy SAS answers start/key events itself (matrix-nio#570: commitment "
        "sent as hex, not unpadded base64; PR matrix-nio#573: v2 MAC under the legacy name); "
        "switched off when bot_toolkit verifies",
        defect=True,
    ),
    NioName(
        "Olm",
        "_handle_key_query",
        "function",
        ("response",),
        "patch",
        "devices whose keys in a /keys/query answer are malformed are left out before nio "
        f"stores them ({_NO_ISSUE})",
        defect=True,
    ),
    NioName(
        "DeviceStore",
        "_entries",
        "instance attribute",
        None,
        "read",
        "nio indexes its device store by any sender (a defaultdict): the empty entry a peer's "
        f"event leaves is removed again ({_NO_ISSUE})",
        defect=True,
    ),
    NioName(
        "SessionStore",
        "_entries",
        "instance attribute",
        None,
        "read",
        "nio indexes its Olm session store by any sender key (a defaultdict): the empty entry is "
        f"removed again ({_NO_ISSUE})",
        defect=True,
    ),
    NioName(
        "Olm",
        "key_requests_waiting_for_session",
        "instance attribute",
        None,
        "read",
        "nio keeps a key request's (sender, device) in a defaultdict for good: the empty entry "
        f"is removed again ({_NO_ISSUE})",
        defect=True,
    ),
    # ---- room-key sharing (bot_toolkit.key_sharing)
    NioName(
        "AsyncClient",
        "share_group_session",
        "coroutine",
        ("room_id", "ignore_unverified_devices"),
        "patch",
        "replaced by share_room_key: nio sends the room keys itself, ignores failed answers "
        "(a 429 raises TypeError in its gather, a non-JSON 502 reads as success: the HTTP "
        "status goes unchecked, matrix-nio#470) and marks the session shared anyway; withheld "
        f"notices after each round, which nio never sends ({_NO_ISSUE})",
        defect=True,
    ),
    NioName(
        "AsyncClient",
        "keys_claim",
        "coroutine",
        ("user_set",),
        "patch",
        "claim backoff: nio claims again for every message when a device has no one-time key "
        f"({_NO_ISSUE})",
        defect=True,
    ),
    NioName(
        "AsyncClient",
        "to_device",
        "coroutine",
        ("message", "tx_id"),
        "patch",
        "nio's own to-device messages (forwarded keys, key requests, m.dummy) are stored in the "
        "outbox: retried under the same transaction id and kept across a restart",
    ),
    NioName(
        "AsyncClient",
        "send_to_device_messages",
        "coroutine",
        (),
        "patch",
        "nio's queued to-device messages are handed to the outbox instead",
    ),
    NioName(
        "AsyncClient",
        "receive_response",
        "coroutine",
        ("response",),
        "patch",
        "ShareGroupSessionError.from_dict passes arguments positionally into soft_logout, so any "
        f"error answer to a room-key request clears the access token ({_NO_ISSUE})",
        defect=True,
    ),
    NioName(
        "Olm",
        "should_share_group_session",
        "function",
        ("room_id",),
        "patch",
        "re-share a current Megolm session with devices nio marked shared without an Olm "
        f"session ({_NO_ISSUE})",
        defect=True,
    ),
    NioName(
        "Olm",
        "get_missing_sessions",
        "function",
        ("users",),
        "patch",
        "which devices need a claim (skipping those in backoff)",
    ),
    NioName(
        "Olm",
        "share_group_session_parallel",
        "generator",
        ("room_id", "users", "ignore_unverified_devices"),
        "patch",
        "which devices got no key and why (m.no_olm, m.unverified, m.blacklisted)",
    ),
    NioName(
        "Olm",
        "is_device_blacklisted",
        "function",
        ("device",),
        "patch",
        "the sharing policy's share_with=verified (m.unverified instead of the key)",
    ),
    NioName(
        "Olm",
        "save_session",
        "function",
        ("curve_key", "session"),
        "patch",
        "an Olm session with a device re-arms its m.no_olm notice",
    ),
    NioName(
        "Olm",
        "_olm_encrypt",
        "function",
        ("session", "recipient_device", "message_type", "content"),
        "patch",
        "encrypt an m.dummy / forwarded key for the outbox (nio only sends to-device messages "
        "itself); patched to add sender_device_keys (MSC4147) to every Olm payload, which nio "
        f"0.26 does not send ({_NO_ISSUE})",
        defect=True,
    ),
    NioName(
        "GroupSessionStore",
        "_entries",
        "instance attribute",
        None,
        "read",
        "GroupSessionStore.get() inserts an empty entry for every unknown room and sender key "
        f"(nested defaultdicts), memory any key request can make us spend ({_NO_ISSUE})",
        defect=True,
    ),
)

_BY_NAME: Final = {(entry.owner, entry.name): entry for entry in CONTRACT}


# ----------------------------------------------------------------------------- checking


def _parse(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _tested() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = TESTED_NIO
    return f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def version_problem(version: str | None = None) -> str | None:
    """Why the installed (or given) matrix-nio version is not supported, or ``None``."""
    if version is None:
        try:
            version = metadata.version("matrix-nio")
        except metadata.PackageNotFoundError:
            return "matrix-nio is not installed (pip install 'matrix-nio[e2e]')"
    low, high = TESTED_NIO
    if not low <= _parse(version) < high:
        return (
            f"bot_toolkit is tested with matrix-nio {_tested()} but {version} is installed: "
            f"install a tested version (pip install 'matrix-nio[e2e]{_tested()}')"
        )
    return None


def _kind_of(value: Any) -> Kind:
    if inspect.iscoroutinefunction(value):
        return "coroutine"
    if inspect.isgeneratorfunction(value):
        return "generator"
    if callable(value):
        return "function"
    return "instance attribute"


def _params(value: Any) -> tuple[str, ...] | None:
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return None
    names = tuple(signature.parameters)
    return names[1:] if names[:1] == ("self",) else names


def entry_problem(entry: NioName, value: Any) -> str | None:
    """Why ``value`` (a class attribute or a bound method) does not fit ``entry``, or ``None``."""
    kind = _kind_of(value)
    if kind != entry.kind:
        return f"{entry.qualname} is a {kind}, expected a {entry.kind}"
    if entry.params is not None and _params(value) != entry.params:
        return f"{entry.qualname} takes {_params(value)}, expected {entry.params}"
    return None


def contract_problems() -> list[str]:
    """Every contract name that the installed nio's classes do not provide as expected.

    Instance attributes cannot be seen on the class; they are checked when read.
    """
    problems = []
    for entry in CONTRACT:
        if entry.kind == "instance attribute":
            continue
        value = getattr(OWNERS[entry.owner], entry.name, None)
        if value is None:
            problems.append(f"{entry.qualname} is missing")
            continue
        problem = entry_problem(entry, value)
        if problem is not None:
            problems.append(problem)
    return problems


_checked = False


def ensure_supported() -> None:
    """Check the nio version and the contract (once per process when they pass).

    Raises:
        NioUnsupported: the version is outside :data:`TESTED_NIO` or a contract name is missing
            or changed; the message names every problem.
    """
    global _checked  # noqa: PLW0603 - a process-wide "already checked" flag
    if _checked:
        return
    problems = [p for p in (version_problem(),) if p is not None] + contract_problems()
    if problems:
        raise NioUnsupported("matrix-nio does not fit bot_toolkit: " + "; ".join(problems))
    _checked = True


# ----------------------------------------------------------------------------- hooking


def _hookable_problem(entry: NioName, current: Any) -> str | None:
    """Why the current value of a patched name cannot be wrapped, or ``None``.

    Looser than :func:`entry_problem`: the value may already be someone's wrapper (or a test's
    stand-in), so only the call shape counts: a coroutine function stays one, and it takes as
    many positional parameters (or ``*args``).
    """
    if not callable(current):
        return f"{entry.qualname} is not callable"
    if (entry.kind == "coroutine") != inspect.iscoroutinefunction(current):
        return f"{entry.qualname} is a {_kind_of(current)}, expected a {entry.kind}"
    try:
        parameters = inspect.signature(current).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    expected = len(entry.params or ())
    if len(parameters) != expected:
        return f"{entry.qualname} takes {len(parameters)} parameters, expected {expected}"
    return None


def _owner_of(obj: object) -> str:
    for name, cls in OWNERS.items():
        if isinstance(obj, cls):
            return name
    raise NioHookError(f"bot_toolkit does not hook {type(obj).__name__} objects")


class NioHooks:
    """Patches of nio instances, checked against :data:`CONTRACT` as they are installed.

    The set is *attached* from its creation until :meth:`undo`: a wrapper that may still be
    called after (nio kept a reference to it, or another wrapper above it) checks
    :attr:`attached` and passes the call through. :meth:`follow_olm` tells when nio made a new
    Olm machine whose methods need hooking too.
    """

    __slots__ = ("_attached", "_hooks", "_olm")

    def __init__(self) -> None:
        self._hooks = HookSet()
        self._attached = True
        self._olm: object | None = None

    @property
    def attached(self) -> bool:
        """``True`` until :meth:`undo`."""
        return self._attached

    def install(self, obj: object, name: str, make: Callable[[Any], Any]) -> None:
        """Replace ``obj.name`` (an instance of a contract owner) by ``make(current)``.

        Raises:
            NioHookError: ``name`` is not a patched contract name of ``obj``'s class, is missing,
                or its current value is not of the expected kind or signature.
        """
        owner = _owner_of(obj)
        entry = _BY_NAME.get((owner, name))
        if entry is None or entry.use != "patch":
            raise NioHookError(f"{owner}.{name} is not in bot_toolkit's nio contract")
        current = getattr(obj, name, None)
        if current is None:
            raise NioHookError(
                f"cannot hook {entry.qualname}: the installed matrix-nio has no such method "
                f"(bot_toolkit is tested with matrix-nio {_tested()})"
            )
        problem = _hookable_problem(entry, current)
        if problem is not None:
            raise NioHookError(
                f"cannot hook {problem} (bot_toolkit is tested with matrix-nio {_tested()})"
            )
        self._hooks.patch(obj, name, make)

    def follow_olm(self, olm: object | None) -> bool:
        """Whether ``olm`` (the client's ``olm`` now) is an Olm machine to hook: ``True`` once
        per machine while attached. nio makes a new machine when it loads its store (login,
        ``restore_login``), so a hook of the old one would no longer be called."""
        if olm is None or olm is self._olm or not self._attached:
            return False
        self._olm = olm
        return True

    def undo(self) -> None:
        """Remove every hook, last installed first, and forget the Olm machine (idempotent)."""
        self._attached = False
        self._hooks.undo()
        self._olm = None

    def __len__(self) -> int:
        return len(self._hooks)


# ----------------------------------------------------------------------------- private reads


class InboundSessions(Protocol):
    """What :func:`inbound_group_sessions` needs: nio's ``GroupSessionStore``."""

    _entries: Any


def inbound_group_sessions(store: InboundSessions, room_id: str) -> Mapping[str, Mapping[str, Any]]:
    """The inbound Megolm sessions of ``room_id`` (sender key -> session id -> session), read
    without writing (see the contract entry ``GroupSessionStore._entries``)."""
    entries = getattr(store, "_entries", None)
    if not isinstance(entries, Mapping):
        raise NioHookError(
            "GroupSessionStore._entries is not a mapping "
            f"(bot_toolkit is tested with matrix-nio {_tested()})"
        )
    found = entries.get(room_id)
    return found if isinstance(found, Mapping) else {}


def drop_empty_entries(
    olm: Any, sender: object, sender_key: str | None, requesting_device: object
) -> None:
    """Remove the empty entries nio's ``defaultdict`` look-ups left for one event's keys.

    nio 0.26 indexes its device store by sender, its Olm session store by sender key and its
    waiting key requests by (sender, device) while handling an event, which inserts an empty
    entry for every new key a peer chooses. Empty entries carry no state, so removing them
    changes nothing but memory. (Contract entries ``DeviceStore._entries``,
    ``SessionStore._entries``, ``Olm.key_requests_waiting_for_session``.)
    """
    devices: dict[Any, Any] = olm.device_store._entries
    if isinstance(sender, str) and sender in devices and not devices[sender]:
        del devices[sender]
    sessions: dict[Any, Any] = olm.session_store._entries
    if sender_key is not None and sender_key in sessions and not sessions[sender_key]:
        del sessions[sender_key]
    waiting: dict[Any, Any] = olm.key_requests_waiting_for_session
    pair = (sender, requesting_device)
    if requesting_device is not None and pair in waiting and not waiting[pair]:
        del waiting[pair]


def olm_encrypt(
    olm: Any, session: Any, device: Any, event_type: str, content: Mapping[str, Any]
) -> dict[str, Any]:
    """An Olm ``m.room.encrypted`` content for ``device`` over ``session`` (nio's
    ``Olm._olm_encrypt``), to be sent by the outbox."""
    encrypted: dict[str, Any] = olm._olm_encrypt(session, device, event_type, dict(content))
    return encrypted


class _WithSenderDeviceKeys:
    """An Olm session whose ``encrypt`` adds ``sender_device_keys`` to the JSON payload nio
    built; everything else (pickling when nio saves the session) goes to the real session."""

    __slots__ = ("_keys", "_session")

    def __init__(self, session: Any, keys: Mapping[str, Any]) -> None:
        self._session = session
        self._keys = keys

    def encrypt(self, plaintext: str) -> Any:
        payload = json.loads(plaintext)
        if isinstance(payload, dict) and "sender_device_keys" not in payload:
            payload["sender_device_keys"] = dict(self._keys)
            plaintext = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        return self._session.encrypt(plaintext)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def send_sender_device_keys(
    hooks: NioHooks, olm: Any, device_keys: Callable[[], Mapping[str, Any] | None]
) -> None:
    """Add ``sender_device_keys`` (MSC4147: our device keys as ``/keys/query`` returns them,
    with their signatures) to every Olm payload ``olm`` encrypts, as Element does: a receiver
    that has not fetched our keys yet can still tell which (cross-signed) device sent it.
    ``device_keys()`` is read at each encryption; ``None`` sends nio's payload unchanged."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def _olm_encrypt(
            session: Any, recipient_device: Any, message_type: str, content: Any
        ) -> Any:
            keys = device_keys()
            if keys is not None:
                session = _WithSenderDeviceKeys(session, keys)
            return original(session, recipient_device, message_type, content)

        return _olm_encrypt

    hooks.install(olm, "_olm_encrypt", make)


# ----------------------------------------------------------------------------- room keys

RoomKeyStore = Callable[[Any, set[tuple[str, str]], dict[str, dict[str, Any]]], Awaitable[None]]
"""``store(session, devices, messages)``: durably queue the Olm-encrypted room keys of the
outbound Megolm ``session`` (``messages`` is ``{user: {device: m.room.encrypted content}}`` for
``devices``); raise when they are not stored."""


async def share_room_key(
    client: AsyncClient, room_id: str, ignore_unverified_devices: bool, store: RoomKeyStore
) -> ShareGroupSessionResponse:
    """nio's ``share_group_session`` with the keys handed to ``store`` instead of sent by nio.

    nio 0.26 sends the keys itself through ``_send``, ignores failed answers and marks the
    session as shared anyway (a 429 raises ``TypeError`` inside its ``gather``, a non-JSON 502
    validates as success; contract entry ``AsyncClient.share_group_session``). Here the devices
    are picked and the keys encrypted by nio's own ``Olm.share_group_session_parallel`` (with
    every hook on it), all batches go to one ``store`` call, and only after it returned are the
    devices added to the session's ``users_shared_with`` and the session marked shared: if
    ``store`` raises, nothing counts as shared and ``room_send`` encrypts nothing with it.

    Raises:
        LocalProtocolError: as nio's (no such room, not encrypted, already sharing).
        Exception: what ``store`` raised.
    """
    olm = client.olm
    if olm is None:
        raise LocalProtocolError("the client has no Olm machine (store not loaded)")
    room = client.rooms.get(room_id)
    if room is None:
        raise LocalProtocolError(f"No such room with id {room_id}")
    if not room.encrypted:
        raise LocalProtocolError(f"Room with id {room_id} is not encrypted")
    if room_id in client.sharing_session:
        raise LocalProtocolError(f"Already sharing a group session for {room_id}")
    # room_send waits on this event while another task shares the room's session.
    client.sharing_session[room_id] = asyncio.Event()
    shared: set[tuple[str, str]] = set()
    try:
        missing = client.get_missing_sessions(room_id)
        if missing:
            await client.keys_claim(missing)
        messages: dict[str, dict[str, Any]] = {}
        for sharing_with, to_device in olm.share_group_session_parallel(
            room_id, list(room.users), ignore_unverified_devices=ignore_unverified_devices
        ):
            shared |= sharing_with
            for user_id, devices in to_device["messages"].items():
                messages.setdefault(user_id, {}).update(devices)
        session = olm.outbound_group_sessions[room_id]
        if shared:
            await store(session, shared, messages)
        session.users_shared_with.update(shared)
        session.shared = True
    finally:
        client.sharing_session.pop(room_id).set()
    return ShareGroupSessionResponse(room_id, shared)


def contain_soft_logout(response: ErrorResponse) -> bool:
    """Clear a ``soft_logout`` flag that is not a real soft logout; True when it did.

    nio 0.26 sets ``client.access_token = ""`` for any error response whose ``soft_logout`` is
    truthy. ``ShareGroupSessionError.from_dict`` passes ``room_id`` and the device set
    positionally into ``retry_after_ms`` and ``soft_logout`` (contract entry
    ``AsyncClient.receive_response``), so any JSON error answer to a room-key request logs the bot
    out. Only ``soft_logout: true`` with ``M_UNKNOWN_TOKEN`` is what the spec calls one.
    """
    flag = response.soft_logout
    if flag is False or (flag is True and response.status_code == "M_UNKNOWN_TOKEN"):
        return False
    response.soft_logout = False
    return True
