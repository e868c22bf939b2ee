"""Helpers for testing bots built on bot_toolkit: a throwaway local Synapse homeserver."""

from __future__ import annotations

from .synapse import LocalSynapse, RegisteredUser, SynapseError

__all__ = ["LocalSynapse", "RegisteredUser", "SynapseError"]
