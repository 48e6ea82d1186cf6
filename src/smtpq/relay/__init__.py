"""Relays: how queued messages leave."""

from smtpq.relay.base import (
    PermanentRelayError,
    Relay,
    RelayError,
    RelayResult,
    TransientRelayError,
)
from smtpq.relay.mx import MxRelayConfig, MxSmtpRelay, Route
from smtpq.relay.smtp import SmtpRelayConfig, StaticSmtpRelay, TlsMode

__all__ = [
    "MxRelayConfig",
    "MxSmtpRelay",
    "PermanentRelayError",
    "Relay",
    "RelayError",
    "RelayResult",
    "Route",
    "SmtpRelayConfig",
    "StaticSmtpRelay",
    "TlsMode",
    "TransientRelayError",
]
