"""Test-side access to the local Synapse launcher (see ``bot_toolkit.testing.synapse``)."""

from bot_toolkit.testing.synapse import LocalSynapse, RegisteredUser, SynapseError, free_port

__all__ = ["LocalSynapse", "RegisteredUser", "SynapseError", "free_port"]
