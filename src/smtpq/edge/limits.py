"""The edge's limits on clients, as Postfix's anvil keeps them, and the minimum DATA rate. Pure:
the caller says what time it is (the event loop's monotonic clock, or a test's numbers).

:class:`ClientTable` counts the connections open per client address and the connections each
address opened in the current minute, refuses what is over a limit, and says when a refusal is
worth a log line (once per client per minute, not once per refusal).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

__all__ = ["ClientTable", "ConnectionLimits", "ConnectionRefusal", "content_deadline"]

#: Postfix's ``anvil_rate_time_unit``: rates are per minute, refusals logged once a minute.
RATE_WINDOW: Final = 60.0


class ConnectionRefusal(Enum):
    """Why a connection was refused; the values are the metric's labels."""

    #: ``max_connections``: the edge has as many connections as it takes.
    CONNECTIONS = "connection_limit"
    #: ``max_client_connections``: this address has as many open as it may.
    CLIENT_CONNECTIONS = "client_connection_limit"
    #: ``max_client_connection_rate``: this address opened as many this minute as it may.
    CLIENT_RATE = "client_rate_limit"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The connection limits (0: no limit).

    :ivar total: connections open at once, from everyone.
    :ivar per_client: connections open at once from one address.
    :ivar rate: connections one address may open per minute.
    """

    total: int = 1000
    per_client: int = 50
    rate: int = 0


class _Client:
    __slots__ = ("open", "opened", "started")

    def __init__(self, now: float) -> None:
        self.open = 0
        self.started = now  # the start of the current rate window
        self.opened = 0  # connections attempted in it


class ClientTable:
    """Connections per client address: counted on :meth:`admit`, uncounted on :meth:`release`.

    An address is kept while it has a connection open, a rate window running or a refusal
    logged within the minute; then it is forgotten, so the table stays as small as the set of
    recent clients.
    """

    def __init__(self) -> None:
        self._clients: dict[str, _Client] = {}
        self._logged: dict[str, float] = {}
        self._swept = 0.0
        #: Connections open (admitted and not released), from every address.
        self.total = 0

    def __len__(self) -> int:
        """Addresses remembered."""
        return len(self._clients)

    def admit(
        self, ip: str, now: float, limits: ConnectionLimits, *, exempt: bool = False
    ) -> ConnectionRefusal | None:
        """Count a new connection from ``ip``, or say why it is refused (then it is not
        counted as open; it counts towards the rate all the same, as in Postfix, so that a
        client hammering the door stays refused until it slows down). ``exempt`` clients
        (trusted networks) are held to the total only."""
        if now - self._swept >= RATE_WINDOW:
            self._sweep(now)
        client = self._clients.get(ip)
        if client is None:
            client = self._clients[ip] = _Client(now)
        if now - client.started >= RATE_WINDOW:
            client.started, client.opened = now, 0
        client.opened += 1
        if limits.total and self.total >= limits.total:
            refusal: ConnectionRefusal | None = ConnectionRefusal.CONNECTIONS
        elif exempt:
            refusal = None
        elif limits.per_client and client.open >= limits.per_client:
            refusal = ConnectionRefusal.CLIENT_CONNECTIONS
        elif limits.rate and client.opened > limits.rate:
            refusal = ConnectionRefusal.CLIENT_RATE
        else:
            refusal = None
        if refusal is None:
            client.open += 1
            self.total += 1
        return refusal

    def release(self, ip: str) -> None:
        """A connection :meth:`admit` counted has closed."""
        client = self._clients.get(ip)
        if client is None or client.open <= 0:
            return
        client.open -= 1
        self.total -= 1

    def open(self, ip: str) -> int:
        """Connections open from ``ip``."""
        client = self._clients.get(ip)
        return client.open if client is not None else 0

    def should_log(self, key: str, now: float) -> bool:
        """Whether a refusal (of the client ``key``, or ``''`` for the total) deserves a log
        line now: the first in a minute does."""
        last = self._logged.get(key)
        if last is not None and now - last < RATE_WINDOW:
            return False
        self._logged[key] = now
        return True

    def _sweep(self, now: float) -> None:
        self._swept = now
        stale = [
            ip for ip, c in self._clients.items() if not c.open and now - c.started >= RATE_WINDOW
        ]
        for ip in stale:
            del self._clients[ip]
        for key in [k for k, t in self._logged.items() if now - t >= RATE_WINDOW]:
            del self._logged[key]


def content_deadline(
    deadline: float, now: float, received: int, timeout: float, min_rate: float
) -> float:
    """When the rest of a message must have arrived by, after ``received`` more octets of it.

    Postfix's ``smtpd_min_data_rate``: each octet buys ``1 / min_rate`` seconds, and the time
    left is never more than ``timeout``. So a client that keeps up the rate (a large message
    on a slow link) is never cut off, while one that trickles a byte now and then runs out of
    time; a client silent for ``timeout`` is cut off either way. ``min_rate`` 0: only the
    per-read timeout.
    """
    limit = now + timeout
    if not min_rate:
        return limit
    return min(limit, deadline + received / min_rate)
