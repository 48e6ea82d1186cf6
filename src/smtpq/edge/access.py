"""Who may relay through the edge: the rule that keeps smtpq from being an open relay. Pure."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from enum import Enum

__all__ = ["RelayDecision", "RelayPolicy"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Characters that route on from a local part: user%host@relay (the "percent hack"),
# host!user@relay (UUCP bang paths), "user@host"@relay (a quoted address).
_ROUTING = frozenset("%!@")
#: Client addresses whose answer RelayPolicy keeps.
_KNOWN_CLIENTS = 4096


class RelayDecision(Enum):
    """Whether mail for a recipient is accepted from a client; the values name the refusals in
    the edge's metrics."""

    ALLOWED = "allowed"
    #: Neither a domain we accept mail for, nor a client that may relay.
    DENIED = "relay_denied"
    #: A domain we accept mail for, but a local part that routes on elsewhere.
    ROUTED = "untrusted_routing"


class RelayPolicy:
    """Mail is accepted for a recipient when its domain is one we accept mail for, when the
    client is in a trusted network, or when the client has authenticated; never otherwise.

    :param domains: domains we accept mail for from anyone (local or relayed ones); an entry
        starting with a dot (``.example.org``) also matches every subdomain.
    :param networks: trusted client networks, CIDR notation.
    :param allow_untrusted_routing: accept, from any client, recipients of those domains whose
        local part routes on (``user%elsewhere@``, ``elsewhere!user@``, ``"user@elsewhere"@``);
        by default only trusted or authenticated clients may send to them, as with Postfix's
        ``allow_untrusted_routing = no``: the next hop might deliver them anywhere.
    """

    def __init__(
        self,
        domains: Iterable[str] = (),
        networks: Iterable[str] = (),
        *,
        allow_untrusted_routing: bool = False,
    ) -> None:
        names = {d.strip().lower().rstrip(".") for d in domains if d.strip()}
        self._exact = frozenset(n for n in names if not n.startswith("."))
        self._suffixes = tuple(sorted(n for n in names if n.startswith(".")))
        self._networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(n.strip(), strict=False) for n in networks
        )
        self._routing = allow_untrusted_routing
        # Answers per client address: each connection asks, and each of its RCPTs.
        self._trusted: dict[str, bool] = {}

    def domain_accepted(self, domain: str) -> bool:
        """Whether mail to ``domain`` is accepted from any client."""
        name = domain.lower().rstrip(".")
        return name in self._exact or name.endswith(self._suffixes)

    def network_trusted(self, ip: str | None) -> bool:
        """Whether a client at ``ip`` may relay anywhere."""
        if not ip:
            return False
        known = self._trusted.get(ip)
        if known is not None:
            return known
        addr = _address(ip)
        trusted = addr is not None and any(
            addr.version == net.version and addr in net for net in self._networks
        )
        if len(self._trusted) >= _KNOWN_CLIENTS:
            self._trusted.clear()  # many clients: start over rather than grow
        self._trusted[ip] = trusted
        return trusted

    def decide(self, recipient: str, ip: str | None, authenticated: bool) -> RelayDecision:
        """Whether a client (at ``ip``, authenticated or not) may send to ``recipient``."""
        if authenticated or self.network_trusted(ip):
            return RelayDecision.ALLOWED
        local, at, domain = recipient.rpartition("@")
        if not at or not self.domain_accepted(domain):
            return RelayDecision.DENIED
        if not self._routing and not _ROUTING.isdisjoint(local):
            return RelayDecision.ROUTED
        return RelayDecision.ALLOWED

    def allows(self, recipient: str, ip: str | None, authenticated: bool) -> bool:
        """Whether :meth:`decide` allows it."""
        return self.decide(recipient, ip, authenticated) is RelayDecision.ALLOWED


@functools.lru_cache(maxsize=4096)
def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``ip`` parsed (once per recent client: each RCPT asks), or None if it is not one."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    # An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
