"""Relays: how queued messages leave."""

from smtpq.relay.base import (
    PermanentRelayError,
    Relay,
    RelayError,
    RelayResult,
    TransientRelayError,
)

__all__ = ["PermanentRelayError", "Relay", "RelayError", "RelayResult", "TransientRelayError"]
