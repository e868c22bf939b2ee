"""The standalone bot's sync loop: ``/sync`` forever, with what nio's ``sync_forever`` does
between syncs (key upload, to-device flush, key query and claim), joining rooms that allowed
users invite the bot to, and backoff while the homeserver is unreachable.

The first sync is a quick one (``timeout=1``); later ones long-poll ``matrix.sync_timeout``.
A homeserver that no longer accepts the token is fatal (:class:`BotError`); any other failure
is retried with the bot's :class:`~bot_toolkit._bot_homeserver.Backoff` and counted in
``sync_errors_total`` (``sync``: unreachable or refused, ``error``: an unexpected error).

Part of the standalone bot (:mod:`bot_toolkit.bot`); library code never imports it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from nio import AsyncClient, JoinResponse, KeysUploadResponse, LocalProtocolError, SyncResponse

from bot_toolkit._bot_homeserver import TRANSIENT, Backoff, BotError, Transient
from bot_toolkit.http_api import BotState
from bot_toolkit.metrics import Counter

__all__ = ["SyncLoop"]

# The bot's log lines keep one logger name, whichever of its modules writes them.
log = logging.getLogger("bot_toolkit.bot")


class SyncLoop:
    """Syncs ``client`` until cancelled (see the module docs).

    ``first_sync`` runs once, after the first successful sync; ``allows`` says whose invites
    the bot accepts; ``device_lists_changed`` (optional) gets the users whose device lists
    changed in a sync.
    """

    def __init__(
        self,
        client: AsyncClient,
        *,
        sync_timeout: float,
        backoff: Backoff,
        state: BotState,
        syncs: Counter,
        errors: Counter,
        allows: Callable[[str], bool],
        first_sync: Callable[[], None],
        device_lists_changed: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self.client = client
        self.sync_timeout = sync_timeout
        self.backoff = backoff
        self.state = state
        self._m_syncs = syncs
        self._m_sync_errors = errors
        self._allows = allows
        self._first_sync = first_sync
        self._device_lists_changed = device_lists_changed

    async def run(self) -> None:
        """Sync until cancelled; raises :class:`BotError` when the token is refused."""
        client = self.client
        first = True
        while True:
            try:
                if client.should_upload_keys:
                    upload = await client.keys_upload()
                    if not isinstance(upload, KeysUploadResponse):
                        raise Transient(f"keys upload failed: {upload}")
                timeout_ms = 0 if first else int(self.sync_timeout * 1000)
                resp = await client.sync(timeout=timeout_ms or 1)
                if not isinstance(resp, SyncResponse):
                    errcode = getattr(resp, "status_code", None)
                    if errcode == "M_UNKNOWN_TOKEN":
                        raise BotError(
                            "the homeserver no longer accepts the access token (M_UNKNOWN_TOKEN)"
                        )
                    raise Transient(f"sync answered {errcode or resp}")
                self._m_syncs.inc()
                if self.backoff.attempt:
                    log.info(
                        "homeserver reachable again after %d failed attempts", self.backoff.attempt
                    )
                self.backoff.attempt = 0
                self.state.synced()
                if first:
                    first = False
                    log.info("first sync done; ready")
                    self._first_sync()
                await self._after_sync(resp)
            except BotError:
                raise
            except TRANSIENT as e:
                self._m_sync_errors.inc("sync")
                await self.backoff.wait("homeserver", e)
            except Exception as e:
                log.exception("sync loop error")
                self._m_sync_errors.inc("error")
                await self.backoff.wait("sync", e)

    async def _after_sync(self, resp: SyncResponse) -> None:
        """What ``sync_forever`` does between syncs, plus joining invites."""
        client = self.client
        if client.outgoing_to_device_messages:
            await client.send_to_device_messages()
        # LocalProtocolError: another task (room_send, the verification manager) took the
        # query or the claim first.
        if client.should_query_keys:
            with contextlib.suppress(LocalProtocolError):
                await client.keys_query()
        if client.should_claim_keys:
            with contextlib.suppress(LocalProtocolError):
                await client.keys_claim(client.get_users_for_key_claiming())
        for room_id, info in resp.rooms.invite.items():
            await self._maybe_join(room_id, info)
        changed = resp.device_list.changed
        if changed and self._device_lists_changed is not None:
            self._device_lists_changed(changed)

    async def _maybe_join(self, room_id: str, info: Any) -> None:
        client = self.client
        inviter = None
        for event in getattr(info, "invite_state", []):
            if (
                getattr(event, "state_key", None) == client.user_id
                and getattr(event, "membership", None) == "invite"
            ):
                inviter = getattr(event, "sender", None)
        if not isinstance(inviter, str) or not self._allows(inviter):
            log.info("not joining %s: invited by %s, who is not allowed", room_id, inviter)
            return
        resp = await client.join(room_id)
        if isinstance(resp, JoinResponse):
            log.info("joined %s (invited by %s)", room_id, inviter)
        else:
            log.warning("could not join %s: %s", room_id, resp)
