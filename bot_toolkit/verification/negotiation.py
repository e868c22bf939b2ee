"""Choosing what an ``m.sas.v1`` verification uses: methods, key agreement, hash, MAC, SAS.

Specification: the key verification framework (``methods`` of request and ready) and the SAS
module (the lists a start offers and the choices an accept makes). Pure functions, no crypto:
:class:`~bot_toolkit.verification.sas.SasSession` and the manager call them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from .errors import InvalidSasMessageError, UnknownMethodError

__all__ = [
    "HASH_SHA256",
    "KEY_AGREEMENT_V2",
    "MAC_LEGACY",
    "MAC_V2",
    "METHOD_SAS",
    "OUR_SAS_OFFER",
    "SAS_DECIMAL",
    "SAS_EMOJI",
    "SUPPORTED_METHODS",
    "SasAgreement",
    "SasOffer",
    "agreement_from_accept",
    "check_accept",
    "common_verification_methods",
    "negotiate_start",
    "offer_from_start",
    "str_field",
]

METHOD_SAS: Final = "m.sas.v1"
KEY_AGREEMENT_V2: Final = "curve25519-hkdf-sha256"
HASH_SHA256: Final = "sha256"
MAC_V2: Final = "hkdf-hmac-sha256.v2"
MAC_LEGACY: Final = "hkdf-hmac-sha256"
SAS_DECIMAL: Final = "decimal"
SAS_EMOJI: Final = "emoji"

SUPPORTED_METHODS: Final = (METHOD_SAS,)
"""Verification methods we advertise in request/ready (no QR code support)."""


@dataclass(frozen=True, slots=True)
class SasOffer:
    """The lists an ``m.sas.v1`` start offers."""

    key_agreement_protocols: tuple[str, ...]
    hashes: tuple[str, ...]
    message_authentication_codes: tuple[str, ...]
    short_authentication_string: tuple[str, ...]


OUR_SAS_OFFER: Final = SasOffer(
    key_agreement_protocols=(KEY_AGREEMENT_V2,),
    hashes=(HASH_SHA256,),
    # "Must include at least hkdf-hmac-sha256.v2. Should also include hkdf-hmac-sha256".
    message_authentication_codes=(MAC_V2, MAC_LEGACY),
    # "Must include at least decimal. Optionally can include emoji."
    short_authentication_string=(SAS_DECIMAL, SAS_EMOJI),
)
"""What our start offers."""


@dataclass(frozen=True, slots=True)
class SasAgreement:
    """What an accept settles on."""

    key_agreement_protocol: str
    hash: str
    message_authentication_code: str
    short_authentication_string: tuple[str, ...]


def common_verification_methods(theirs: Iterable[str]) -> tuple[str, ...]:
    """The methods for our ready: those of their request that we support, in our order."""
    offered = set(theirs)
    return tuple(m for m in SUPPORTED_METHODS if m in offered)


def negotiate_start(offer: SasOffer) -> SasAgreement | None:
    """Choose what to accept from their start, or ``None`` (cancel with ``m.unknown_method``).

    Key agreement ``curve25519-hkdf-sha256`` only (the deprecated ``curve25519`` is not
    implemented, as the spec advises); hash ``sha256``; MAC ``hkdf-hmac-sha256.v2`` when offered,
    else the deprecated ``hkdf-hmac-sha256`` (the spec forbids it only when both sides support
    v2); SAS methods: those of ``decimal`` and ``emoji`` that they offer, in that order.

    The start schema says the offer "must include" ``decimal`` (and MAC v2): that binds the
    *sender*. The receiver cancels with ``m.unknown_method`` when the devices "are unable to agree"
    on a method, so an emoji-only start is accepted (matrix-rust-sdk does the same).
    """
    if KEY_AGREEMENT_V2 not in offer.key_agreement_protocols:
        return None
    if HASH_SHA256 not in offer.hashes:
        return None
    mac = next((m for m in (MAC_V2, MAC_LEGACY) if m in offer.message_authentication_codes), None)
    if mac is None:
        return None
    theirs = set(offer.short_authentication_string)
    sas = tuple(m for m in OUR_SAS_OFFER.short_authentication_string if m in theirs)
    if not sas:
        return None
    return SasAgreement(KEY_AGREEMENT_V2, HASH_SHA256, mac, sas)


def check_accept(agreement: SasAgreement, offer: SasOffer = OUR_SAS_OFFER) -> bool:
    """Whether an accept of our start chose only what we offered (else ``m.unknown_method``).

    Its SAS list must be a non-empty subset of ours ("must be a subset of the options in the
    start"). Choosing the legacy MAC is allowed: a peer that does so does not support v2.
    """
    return (
        agreement.key_agreement_protocol in offer.key_agreement_protocols
        and agreement.hash in offer.hashes
        and agreement.message_authentication_code in offer.message_authentication_codes
        and bool(agreement.short_authentication_string)
        and set(agreement.short_authentication_string) <= set(offer.short_authentication_string)
    )


# --------------------------------------------------------------------------------------------
# Reading peer content (defensively: the manager may pass raw wire dicts).


def str_field(content: Mapping[str, Any], name: str) -> str:
    value = content.get(name)
    if not isinstance(value, str):
        raise InvalidSasMessageError(f"{name} must be a string")
    return value


def _str_list(content: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = content.get(name)
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidSasMessageError(f"{name} must be a list of strings")
    return tuple(value)


def offer_from_start(content: Mapping[str, Any]) -> SasOffer:
    """The offer of an ``m.sas.v1`` start content; another method raises UnknownMethodError."""
    if content.get("method") != METHOD_SAS:
        raise UnknownMethodError("start method is not m.sas.v1")
    return SasOffer(
        key_agreement_protocols=_str_list(content, "key_agreement_protocols"),
        hashes=_str_list(content, "hashes"),
        message_authentication_codes=_str_list(content, "message_authentication_codes"),
        short_authentication_string=_str_list(content, "short_authentication_string"),
    )


def agreement_from_accept(content: Mapping[str, Any]) -> SasAgreement:
    """The choices of an accept content (not yet checked against our offer)."""
    return SasAgreement(
        key_agreement_protocol=str_field(content, "key_agreement_protocol"),
        hash=str_field(content, "hash"),
        message_authentication_code=str_field(content, "message_authentication_code"),
        short_authentication_string=_str_list(content, "short_authentication_string"),
    )
