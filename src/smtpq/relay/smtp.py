"""Outbound SMTP: :class:`StaticSmtpRelay` (a smarthost), on smtpq's own protocol core.

The pieces, each in its module: the sans-IO client (:mod:`smtpq.smtp.client`: every protocol
rule — pipelining, BDAT, dot-stuffing, the extensions declared); one connection's asyncio
driver and its set-up, TLS and timeouts (:mod:`smtpq.relay.session`); the connection pool
shared with :class:`~smtpq.relay.mx.MxSmtpRelay`, and the table of how failures become replies
(:mod:`smtpq.relay.pool`, :func:`reply_for_error`). This module re-exports their public names.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping

from smtpq.envelope import Envelope
from smtpq.relay.base import RecipientResult, Relay, next_hop_name
from smtpq.relay.pool import Delivery, SmtpPool, addressed, reply_for_error
from smtpq.relay.session import SmtpRelayConfig, TlsMode

__all__ = [
    "Delivery",
    "SmtpPool",
    "SmtpRelayConfig",
    "StaticSmtpRelay",
    "TlsMode",
    "addressed",
    "reply_for_error",
]


class StaticSmtpRelay(Relay):
    """Delivers every message to one host (a smarthost), reusing connections.

    :param host: the smarthost's name or address.
    :param port: its port (587 with ``TlsMode.REQUIRED`` and AUTH, 465 with IMPLICIT, ...).
    :param pool_size: most connections at once (overrides ``config.pool_size``).
    :param config: TLS, AUTH, timeouts and reuse (:class:`SmtpRelayConfig`).

    ``attempt`` returns a Reply per recipient: RCPT refusals, the reply to the content for the
    others. Every recipient has one destination, the smarthost (``host:port``), so all mail
    through it shares its limits and state in the queue's scheduler.
    """

    def __init__(
        self,
        host: str,
        port: int = 25,
        pool_size: int | None = None,
        *,
        config: SmtpRelayConfig | None = None,
    ) -> None:
        config = config or SmtpRelayConfig()
        if pool_size is not None:
            config = dataclasses.replace(config, pool_size=pool_size)
        self.config = config
        self.pool = SmtpPool(host, port, config)
        self.destination = next_hop_name(host, port)

    def destinations(self, envelope: Envelope) -> Mapping[str, list[str]]:
        """One destination, the smarthost; see :meth:`smtpq.relay.base.Relay.destinations`."""
        return {self.destination: list(envelope.recipients)}

    async def attempt(self, envelope: Envelope, attempts: int) -> dict[str, RecipientResult]:
        """Deliver to the smarthost; see :meth:`smtpq.relay.base.Relay.attempt`."""
        delivery = await self.pool.deliver(envelope, list(dict.fromkeys(envelope.recipients)))
        return dict(delivery.replies)

    async def close(self) -> None:
        """QUIT the idle connections."""
        with contextlib.suppress(Exception):
            await self.pool.close()
