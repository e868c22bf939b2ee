"""SAS (``m.sas.v1``) verification maths, on vodozemac.

Specification: "Short Authentication String (SAS) verification" in the end-to-end encryption
module. Key agreement ``curve25519-hkdf-sha256`` only; hash ``sha256``; MAC ``hkdf-hmac-sha256.v2``
(or the deprecated ``hkdf-hmac-sha256`` for peers without v2); SAS ``decimal`` and ``emoji``.

One :class:`SasSession` per transaction holds the single ephemeral Curve25519 key of that
transaction: it is created with the session, never replaced, and the Diffie-Hellman step runs at
most once. Nothing secret (the private key, the shared secret) is reachable from Python at all: it
stays inside vodozemac. Nothing here logs keys or MACs.

Errors that a peer causes are :class:`~bot_toolkit.verification.errors.SasError` subclasses;
each carries the cancel code to send and the :class:`~bot_toolkit.verification.table.Input` to feed
the transition table (which makes the final decision). Misuse by the caller raises
:class:`~bot_toolkit.verification.errors.SasStateError`. Which methods a transaction uses is
decided by :mod:`bot_toolkit.verification.negotiation`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from typing import Any, Final, NamedTuple

import vodozemac

from bot_toolkit.encoding import canonical_json, unpadded_b64

from .errors import (
    CommitmentMismatchError,
    InvalidSasMessageError,
    KeyMismatchError,
    SasError,
    SasStateError,
    UnknownMethodError,
)
from .negotiation import (
    MAC_LEGACY,
    MAC_V2,
    METHOD_SAS,
    OUR_SAS_OFFER,
    SasAgreement,
    agreement_from_accept,
    check_accept,
    negotiate_start,
    offer_from_start,
    str_field,
)
from .table import Party

__all__ = [
    "Emoji",
    "SasSession",
    "canonical_json",
    "compute_commitment",
    "decimals_from_bytes",
    "emoji_for",
    "emoji_indices_from_bytes",
    "emoji_table",
    "key_id_list",
    "mac_info",
    "sas_info",
    "unpadded_b64",
    "verify_commitment",
]

log = logging.getLogger("bot_toolkit.verification.sas")

# --------------------------------------------------------------------------------------------
# Encodings, commitment, HKDF info strings.


def compute_commitment(public_key: str, start_content: Mapping[str, Any]) -> str:
    """The accept's ``commitment``: unpadded base64 SHA-256 of key + canonical JSON of the start.

    ``public_key`` is the accepter's ephemeral key in unpadded base64; ``start_content`` is the
    start's ``content`` exactly as sent (all fields, including ones we do not know).
    """
    digest = hashlib.sha256(public_key.encode("utf-8") + canonical_json(start_content)).digest()
    return unpadded_b64(digest)


def verify_commitment(commitment: str, public_key: str, start_content: Mapping[str, Any]) -> None:
    """Raise :class:`CommitmentMismatchError` unless ``commitment`` matches (constant time)."""
    expected = compute_commitment(public_key, start_content)
    if not hmac.compare_digest(expected.encode("utf-8"), commitment.encode("utf-8")):
        raise CommitmentMismatchError("the key does not match the commitment")


def sas_info(
    *,
    starter: Party,
    starter_key: str,
    accepter: Party,
    accepter_key: str,
    transaction_id: str,
) -> str:
    """HKDF info for the SAS bytes with ``curve25519-hkdf-sha256``."""
    return "|".join(
        (
            "MATRIX_KEY_VERIFICATION_SAS",
            starter.user_id,
            starter.device_id,
            starter_key,
            accepter.user_id,
            accepter.device_id,
            accepter_key,
            transaction_id,
        )
    )


def mac_info(*, sender: Party, receiver: Party, transaction_id: str, key_id: str) -> str:
    """HKDF info for one MAC: ``sender`` owns the MACed keys and sends the MAC message.

    ``key_id`` is the id of the MACed key, or ``KEY_IDS`` for the key id list.
    """
    return (
        "MATRIX_KEY_VERIFICATION_MAC"
        f"{sender.user_id}{sender.device_id}{receiver.user_id}{receiver.device_id}"
        f"{transaction_id}{key_id}"
    )


def key_id_list(key_ids: Iterable[str]) -> str:
    """The MACed key id list: sorted, comma-separated, no spaces."""
    return ",".join(sorted(key_ids))


# --------------------------------------------------------------------------------------------
# What the user compares.


class Emoji(NamedTuple):
    """One SAS emoji: the symbol and its English description from the spec table."""

    emoji: str
    description: str


@functools.cache
def emoji_table() -> tuple[Emoji, ...]:
    """The 64 SAS emoji, by index (``bot_toolkit/data/sas-emoji.json``, from the spec)."""
    raw = resources.files("bot_toolkit").joinpath("data/sas-emoji.json").read_text("utf-8")
    entries = json.loads(raw)
    table = tuple(Emoji(str(e["emoji"]), str(e["description"])) for e in entries)
    if len(table) != 64 or [e["number"] for e in entries] != list(range(64)):
        raise RuntimeError("sas-emoji.json must list numbers 0..63 in order")
    return table


def emoji_indices_from_bytes(data: bytes) -> tuple[int, ...]:
    """The 7 emoji indices: the first 42 bits of 6 SAS bytes, in groups of 6 bits.

    The spec's formula, kept for the tests that check vodozemac's output against it:
    :class:`SasSession` itself uses vodozemac's emoji indices, not this function.
    """
    if len(data) != 6:
        raise ValueError("emoji SAS needs exactly 6 bytes")
    bits = int.from_bytes(data, "big") >> 6
    return tuple((bits >> (6 * (6 - i))) & 0x3F for i in range(7))


def decimals_from_bytes(data: bytes) -> tuple[int, int, int]:
    """The 3 SAS numbers (1000..9191): 5 bytes as three 13-bit groups, plus 1000 each.

    The spec's formula, kept for the tests that check vodozemac's output against it:
    :class:`SasSession` itself uses vodozemac's decimals, not this function.
    """
    if len(data) != 5:
        raise ValueError("decimal SAS needs exactly 5 bytes")
    b0, b1, b2, b3, b4 = data
    return (
        ((b0 << 5) | (b1 >> 3)) + 1000,
        (((b1 & 0x7) << 10) | (b2 << 2) | (b3 >> 6)) + 1000,
        (((b3 & 0x3F) << 7) | (b4 >> 1)) + 1000,
    )


def emoji_for(indices: Sequence[int]) -> tuple[Emoji, ...]:
    """Map emoji indices to ``(emoji, description)`` pairs."""
    table = emoji_table()
    return tuple(table[i] for i in indices)


# --------------------------------------------------------------------------------------------
# One transaction.


class SasSession:
    """The SAS side of one verification transaction, for one role.

    Lifecycle (each step at most once; out of order raises :class:`SasStateError`):

    * we send the start: ``start_content()`` -> ``receive_accept(content)`` -> send
      ``our_key_event_content()`` -> ``receive_their_key(key)`` (checks the commitment);
    * they send the start: ``accept(start_content)`` -> ``receive_their_key(key)`` -> send
      ``our_key_event_content()``;
    * then ``emoji()`` / ``decimals()``, ``mac_content(our_keys)`` and
      ``verify_mac(mac, keys, their_keys)``.

    If our start loses a start race, call ``lose_start_race()`` and continue as the accepter; the
    same ephemeral key is used (it was never sent). The ephemeral key is made once, in
    ``__init__``, and after any peer error the session refuses further work.
    """

    __slots__ = (
        "_agreement",
        "_commitment",
        "_established",
        "_failed",
        "_in_room",
        "_info",
        "_public_key",
        "_sas",
        "_start_content",
        "_them",
        "_transaction_id",
        "_us",
        "_verified",
        "_we_started",
    )

    def __init__(
        self,
        *,
        transaction_id: str,
        us: Party,
        them: Party,
        we_started: bool,
        in_room: bool = False,
    ) -> None:
        if us == them:
            raise ValueError("cannot verify a device with itself")
        self._transaction_id = transaction_id
        self._in_room = in_room
        self._us = us
        self._them = them
        self._we_started = we_started
        self._sas = vodozemac.Sas()
        self._public_key: Final[str] = self._sas.public_key.to_base64()
        self._established: vodozemac.EstablishedSas | None = None
        self._agreement: SasAgreement | None = None
        self._start_content: dict[str, Any] | None = None
        self._commitment: str | None = None
        self._info: str | None = None
        self._verified: tuple[str, ...] = ()
        self._failed = False

    def __repr__(self) -> str:
        return (
            f"SasSession(transaction_id={self._transaction_id!r}, us={tuple(self._us)!r}, "
            f"them={tuple(self._them)!r}, we_started={self._we_started}, "
            f"established={self._established is not None}, failed={self._failed})"
        )

    def __reduce__(self) -> Any:
        raise TypeError("SasSession holds key material and cannot be pickled")

    # -- properties

    @property
    def transaction_id(self) -> str:
        """The transaction id."""
        return self._transaction_id

    @property
    def we_started(self) -> bool:
        """Whether our start is the one in effect."""
        return self._we_started

    @property
    def public_key(self) -> str:
        """Our ephemeral Curve25519 public key, unpadded base64. Fixed for the session."""
        return self._public_key

    @property
    def agreement(self) -> SasAgreement | None:
        """The methods settled by the accept, once known."""
        return self._agreement

    @property
    def established(self) -> bool:
        """Whether the key exchange is complete (SAS and MACs available)."""
        return self._established is not None

    @property
    def verified_keys(self) -> tuple[str, ...]:
        """Key ids that ``verify_mac`` verified."""
        return self._verified

    # -- key agreement phase

    def start_content(self) -> dict[str, Any]:
        """Our start content (starter only); the same on every call. In a room (``in_room``) it
        carries ``m.relates_to`` to the request (the flow id) instead of ``transaction_id``.

        Send it unchanged: the peer's commitment covers its canonical JSON.
        """
        self._check_usable()
        if not self._we_started:
            raise SasStateError("only the starting side sends a start")
        if self._start_content is None:
            content: dict[str, Any] = {
                "from_device": self._us.device_id,
                "method": METHOD_SAS,
                "transaction_id": self._transaction_id,
                "key_agreement_protocols": list(OUR_SAS_OFFER.key_agreement_protocols),
                "hashes": list(OUR_SAS_OFFER.hashes),
                "message_authentication_codes": list(OUR_SAS_OFFER.message_authentication_codes),
                "short_authentication_string": list(OUR_SAS_OFFER.short_authentication_string),
            }
            if self._in_room:
                # The in-room form is what the peer receives and commits to: the relation to
                # the request instead of a transaction id.
                del content["transaction_id"]
                content["m.relates_to"] = {
                    "rel_type": "m.reference",
                    "event_id": self._transaction_id,
                }
            self._start_content = content
        return copy.deepcopy(self._start_content)

    def lose_start_race(self) -> None:
        """Their start won the race: drop ours and become the accepting side."""
        self._check_usable()
        if not self._we_started or self._agreement is not None:
            raise SasStateError("only a pending start of ours can lose a start race")
        self._we_started = False
        self._start_content = None

    def accept(self, start_content: Mapping[str, Any]) -> dict[str, Any]:
        """Accept their start (accepter only): negotiate, commit to our key, return the content.

        ``start_content`` must be the start's content exactly as received (every field): the
        commitment covers its canonical JSON. Raises :class:`UnknownMethodError` or
        :class:`InvalidSasMessageError`.
        """
        self._check_usable()
        if self._we_started:
            raise SasStateError("the starting side does not accept")
        if self._agreement is not None:
            raise SasStateError("already accepted")
        try:
            agreement = negotiate_start(offer_from_start(start_content))
            if agreement is None:
                raise UnknownMethodError("no common SAS method")
            commitment = compute_commitment(self._public_key, start_content)
        except (SasError, ValueError, TypeError) as exc:
            self._failed = True
            if isinstance(exc, SasError):
                raise
            raise InvalidSasMessageError("start content is not valid JSON data") from exc
        self._agreement = agreement
        self._start_content = dict(start_content)
        log.debug("accepting SAS start, transaction %s", self._transaction_id)
        return {
            "transaction_id": self._transaction_id,
            "method": METHOD_SAS,
            "key_agreement_protocol": agreement.key_agreement_protocol,
            "hash": agreement.hash,
            "message_authentication_code": agreement.message_authentication_code,
            "short_authentication_string": list(agreement.short_authentication_string),
            "commitment": commitment,
        }

    def receive_accept(self, accept_content: Mapping[str, Any]) -> SasAgreement:
        """Take their accept of our start (starter only): check the choices, keep the commitment.

        Raises :class:`UnknownMethodError` or :class:`InvalidSasMessageError`.
        """
        self._check_usable()
        if not self._we_started or self._start_content is None:
            raise SasStateError("receive_accept needs our start to have been built and sent")
        if self._agreement is not None:
            raise SasStateError("already accepted")
        try:
            if accept_content.get("method", METHOD_SAS) != METHOD_SAS:
                raise UnknownMethodError("accept method is not m.sas.v1")
            agreement = agreement_from_accept(accept_content)
            commitment = str_field(accept_content, "commitment")
            if not check_accept(agreement):
                raise UnknownMethodError("the accept chose something we did not offer")
        except SasError:
            self._failed = True
            raise
        self._agreement = agreement
        self._commitment = commitment
        return agreement

    def our_key_event_content(self) -> dict[str, str]:
        """Content of our ``m.key.verification.key``: always this session's one key."""
        self._check_usable()
        if self._agreement is None:
            raise SasStateError("keys are exchanged only after the accept")
        return {"transaction_id": self._transaction_id, "key": self._public_key}

    def receive_their_key(self, key: str) -> None:
        """Take their ephemeral key and run the Diffie-Hellman step (once, ever).

        As the starter, checks the commitment first (:class:`CommitmentMismatchError`). A key that
        does not decode or is not contributory raises :class:`InvalidSasMessageError`. A second
        call raises :class:`SasStateError`.
        """
        self._check_usable()
        if self._established is not None:
            raise SasStateError("their key was already received: one key exchange per transaction")
        if self._agreement is None:
            raise SasStateError("keys are exchanged only after the accept")
        try:
            if not isinstance(key, str):
                raise InvalidSasMessageError("key must be a string")
            try:
                their_key = vodozemac.Curve25519PublicKey.from_base64(key)
            except ValueError as exc:
                raise InvalidSasMessageError("key is not a Curve25519 public key") from exc
            their_b64 = their_key.to_base64()
            if self._we_started:
                assert self._commitment is not None and self._start_content is not None
                verify_commitment(self._commitment, their_b64, self._start_content)
            try:
                established = self._sas.diffie_hellman(their_key)
            except ValueError as exc:
                raise InvalidSasMessageError("key agreement failed") from exc
        except SasError:
            self._failed = True
            raise
        self._established = established
        if self._we_started:
            starter, starter_key = self._us, self._public_key
            accepter, accepter_key = self._them, their_b64
        else:
            starter, starter_key = self._them, their_b64
            accepter, accepter_key = self._us, self._public_key
        self._info = sas_info(
            starter=starter,
            starter_key=starter_key,
            accepter=accepter,
            accepter_key=accepter_key,
            transaction_id=self._transaction_id,
        )
        log.debug("SAS key exchange complete, transaction %s", self._transaction_id)

    # -- what the users compare

    def emoji_indices(self) -> tuple[int, ...]:
        """The 7 emoji indices (0..63)."""
        established, info = self._require_established()
        return tuple(int(i) for i in established.bytes(info).emoji_indices)

    def emoji(self) -> tuple[Emoji, ...]:
        """The 7 emoji with their English descriptions."""
        return emoji_for(self.emoji_indices())

    def decimals(self) -> tuple[int, int, int]:
        """The 3 numbers (1000..9191)."""
        established, info = self._require_established()
        a, b, c = established.bytes(info).decimals
        return (int(a), int(b), int(c))

    # -- MAC phase

    def mac_content(self, our_keys: Mapping[str, str]) -> dict[str, Any]:
        """Content of our ``m.key.verification.mac``.

        ``our_keys`` maps key ids to unpadded base64 public keys: our device key
        ``ed25519:<device id>`` (required) and, where we have one, our master cross-signing key
        ``ed25519:<master key>``.
        """
        self._require_established()
        if f"ed25519:{self._us.device_id}" not in our_keys:
            raise ValueError("our device's ed25519 key must be among the MACed keys")
        info = self._mac_info(sender=self._us, receiver=self._them)
        mac = {key_id: self._calculate(key, info(key_id)) for key_id, key in our_keys.items()}
        return {
            "transaction_id": self._transaction_id,
            "mac": mac,
            "keys": self._calculate(key_id_list(our_keys), info("KEY_IDS")),
        }

    def verify_mac(
        self, mac: Mapping[str, str], keys: str, their_keys: Mapping[str, str]
    ) -> tuple[str, ...]:
        """Verify their MAC message; return the key ids it verified.

        ``mac`` and ``keys`` are the message's fields; ``their_keys`` maps the key ids we know
        for the peer (from ``/keys/query``) to their public keys. Rules: the ``keys`` MAC must
        match the sorted list of the ids in ``mac`` (so no id was added or removed); every id in
        ``mac`` that we know must match; ids we do not know are skipped (still covered by
        ``keys``); the peer's device key ``ed25519:<device id>`` must be among the verified.
        Raises :class:`KeyMismatchError` otherwise (and the session refuses further work).
        """
        self._require_established()
        info = self._mac_info(sender=self._them, receiver=self._us)

        try:
            if not mac:
                raise KeyMismatchError("the MAC message lists no keys")
            if not self._check(key_id_list(mac), info("KEY_IDS"), keys):
                raise KeyMismatchError("the key id list MAC does not match")
            verified: list[str] = []
            for key_id in sorted(mac):
                known = their_keys.get(key_id)
                if known is None:
                    log.debug("MAC has a key id we do not know, txn %s", self._transaction_id)
                    continue
                if not self._check(known, info(key_id), mac[key_id]):
                    raise KeyMismatchError(f"the MAC of {key_id} does not match")
                verified.append(key_id)
            if f"ed25519:{self._them.device_id}" not in verified:
                raise KeyMismatchError("the peer's device key is not among the verified keys")
        except KeyMismatchError:
            self._failed = True
            raise
        self._verified = tuple(verified)
        return self._verified

    # -- internals

    def _check_usable(self) -> None:
        if self._failed:
            raise SasStateError("this SAS session failed; start a new transaction")

    def _mac_info(self, *, sender: Party, receiver: Party) -> Callable[[str], str]:
        """:func:`mac_info` of this transaction, by key id, for MACs ``sender`` sends."""
        txn = self._transaction_id
        return lambda key_id: mac_info(
            sender=sender, receiver=receiver, transaction_id=txn, key_id=key_id
        )

    def _require_established(self) -> tuple[vodozemac.EstablishedSas, str]:
        self._check_usable()
        if self._established is None or self._info is None:
            raise SasStateError("the key exchange is not complete")
        return self._established, self._info

    def _mac_method(self) -> str:
        assert self._agreement is not None
        return self._agreement.message_authentication_code

    def _calculate(self, message: str, info: str) -> str:
        established, _ = self._require_established()
        method = self._mac_method()
        if method == MAC_V2:
            return str(established.calculate_mac(message, info))
        if method == MAC_LEGACY:
            return str(established.calculate_mac_invalid_base64(message, info))
        raise SasStateError(f"unsupported MAC method {method!r}")

    def _check(self, message: str, info: str, tag: object) -> bool:
        if not isinstance(tag, str):
            return False
        established, _ = self._require_established()
        method = self._mac_method()
        if method == MAC_V2:
            try:
                established.verify_mac(message, info, tag)
            except ValueError:
                return False
            return True
        expected = self._calculate(message, info)
        return hmac.compare_digest(expected.encode("utf-8"), tag.encode("utf-8"))
