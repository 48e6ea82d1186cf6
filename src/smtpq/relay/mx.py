"""MxSmtpRelay: delivery to each recipient domain's mail exchangers (RFC 5321 §5).

Recipients are grouped by domain, one transaction per domain, all domains at once; the
per-recipient replies are merged. For the queue's scheduler (:meth:`MxSmtpRelay.destinations`)
a recipient's destination is its domain — all the mail exchangers of one domain share its
limits —, or, for a domain with a static route, the route's ``host:port``, which every domain
routed there shares. For each domain the hosts are, in order: a static route when
one is configured; else the MX records by preference (random among equal ones); else the domain
itself (implicit MX, its A/AAAA records). The next host is tried when one fails as a whole
(connection, greeting, session set-up, connection lost, 421).

DNS outcomes, classified in one place (:func:`reply_for_dns_error`):

=====================================================  ====================================
the domain does not exist (NXDOMAIN)                   ``550 5.1.2`` permanent
null MX (RFC 7505)                                     ``556 5.1.10`` permanent
no MX and no address, or MX hosts without addresses    ``550 5.4.4`` permanent
SERVFAIL, timeout, no name server answered             ``451 4.4.3`` transient
=====================================================  ====================================
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import random
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from smtpq.envelope import Envelope
from smtpq.relay.base import RecipientResult, Relay, next_hop_name
from smtpq.relay.smtp import SmtpPool, SmtpRelayConfig, TlsMode, addressed
from smtpq.reply import Reply, unexpected_error_reply

__all__ = ["BAD_ADDRESS", "MxRelayConfig", "MxSmtpRelay", "Route", "reply_for_dns_error"]

log = logging.getLogger("smtpq.relay")

#: The destination of recipients without a domain (refused with 5.1.3, never connected for).
BAD_ADDRESS = "(bad address)"

# Beyond this many pools, the ones with no connection are forgotten.
_MAX_POOLS = 256


@dataclass(frozen=True)
class Route:
    """A static destination for a domain (no MX lookup): a host name or address, and a port."""

    host: str
    port: int = 25


@dataclass(frozen=True)
class MxRelayConfig:
    """How MxSmtpRelay finds destinations.

    :ivar nameservers: name servers to ask, ``"ip"`` or ``"ip:port"`` (``"[::1]:5353"``);
        empty: the system's (``/etc/resolv.conf``).
    :ivar dns_timeout: seconds a look-up may take in all.
    :ivar port: the SMTP port of the destinations (25; tests use others).
    :ivar routes: domain -> :class:`Route`, used instead of DNS (the daemon's "routes").
    :ivar tls_required_domains: destinations where STARTTLS must succeed (else deferred).
    :ivar max_addresses: addresses tried per domain and attempt (Postfix tries 5).
    :ivar ipv6: also connect over IPv6 (AAAA records, tried after the A records).
    """

    nameservers: tuple[str, ...] = ()
    dns_timeout: float = 10.0
    port: int = 25
    routes: Mapping[str, Route] = field(default_factory=dict)
    tls_required_domains: tuple[str, ...] = ()
    max_addresses: int = 5
    ipv6: bool = True

    def __post_init__(self) -> None:
        # From TOML, lists arrive where tuples are meant (and a route may be "host:port").
        object.__setattr__(self, "nameservers", tuple(self.nameservers))
        object.__setattr__(self, "tls_required_domains", tuple(self.tls_required_domains))
        for server in self.nameservers:
            parse_nameserver(server)  # ValueError now rather than at the first delivery


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"192.0.2.1"``, ``"192.0.2.1:5353"``, ``"::1"``, ``"[::1]:5353"`` -> (ip, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host, port = text, 53
    ipaddress.ip_address(host)  # a name server is given by address; ValueError otherwise
    return host, port


def reply_for_dns_error(exc: BaseException | None, name: str) -> Reply:
    """The reply for a failed look-up of ``name`` (see the module docstring's table); ``exc``
    None means that the look-ups succeeded but found no address."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return Reply("550", f"5.1.2 Domain {name} does not exist")
    if exc is None or isinstance(exc, dns.resolver.NoAnswer):
        return Reply("550", f"5.4.4 No mail exchanger or address for {name}")
    if isinstance(exc, dns.name.NameTooLong | dns.name.LabelTooLong | dns.name.EmptyLabel):
        return Reply("550", f"5.1.2 Bad destination domain {name}")
    if isinstance(exc, UnicodeError):  # IDNA encoding refused the name
        return Reply("550", f"5.1.2 Bad destination domain {name}")
    return Reply("451", f"4.4.3 Temporary DNS failure looking up {name}")


@dataclass(frozen=True)
class _Target:
    """One address to try: where to connect and the host's name."""

    address: str
    port: int
    name: str


class _NoRoute(Exception):
    """The domain cannot be delivered to now; :attr:`reply` says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _domain_of(rcpt: str) -> str | None:
    """The recipient's domain as routes and DNS know it (lower case, no final dot), or None
    for an address without a local part or a domain."""
    local, at, domain = rcpt.rpartition("@")
    if not at or not local or not domain:
        return None
    return domain.lower().rstrip(".")


class MxSmtpRelay(Relay):
    """Delivers each recipient domain to its mail exchangers.

    :param config: DNS, ports and routes (:class:`MxRelayConfig`).
    :param smtp: how to talk SMTP to each host (:class:`~smtpq.relay.smtp.SmtpRelayConfig`);
        its ``pool_size`` bounds the connections to each host.
    :param rng: chooses among MX records of equal preference (tests pass a seeded one).
    """

    def __init__(
        self,
        config: MxRelayConfig | None = None,
        smtp: SmtpRelayConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or MxRelayConfig()
        self.smtp = smtp or SmtpRelayConfig()
        self._required = dataclasses.replace(self.smtp, tls=TlsMode.REQUIRED)
        self._tls_domains = frozenset(d.lower() for d in self.config.tls_required_domains)
        self._routes = {d.lower().rstrip("."): r for d, r in self.config.routes.items()}
        self._rng = rng or random.Random()
        self._helo_name = self.smtp.helo_name or socket.getfqdn()
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._pools: dict[tuple[str, int, str, bool], SmtpPool] = {}

    # -- DNS -----------------------------------------------------------------------------------

    @property
    def resolver(self) -> dns.asyncresolver.Resolver:
        """dnspython's async resolver, with a cache, built on first use."""
        if self._resolver is None:
            servers = [parse_nameserver(n) for n in self.config.nameservers]
            resolver = dns.asyncresolver.Resolver(configure=not servers)
            if servers:
                resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
            resolver.lifetime = self.config.dns_timeout
            resolver.timeout = self.config.dns_timeout
            resolver.cache = dns.resolver.LRUCache()
            self._resolver = resolver
        return self._resolver

    async def _query(self, name: dns.name.Name, rdtype: str) -> list[dns.rdata.Rdata]:
        answer = await self.resolver.resolve(name, rdtype, search=False)
        return list(answer)

    async def _addresses(self, host: dns.name.Name) -> list[str]:
        """A then AAAA addresses of ``host``; NoAnswer/NXDOMAIN give none, others raise."""
        kinds = ["A", "AAAA"] if self.config.ipv6 else ["A"]
        results = await asyncio.gather(
            *(self._query(host, kind) for kind in kinds), return_exceptions=True
        )
        addresses: list[str] = []
        for result in results:
            if isinstance(result, dns.resolver.NoAnswer | dns.resolver.NXDOMAIN):
                continue
            if isinstance(result, BaseException):
                raise result
            addresses.extend(r.to_text() for r in result)
        return addresses

    async def _targets(self, domain: str) -> list[_Target]:
        """Where to deliver mail for (lower case) ``domain``, in order; :class:`_NoRoute` if
        nowhere."""
        port = self.config.port
        route = self._routes.get(domain)
        if route is not None:
            return [_Target(route.host, route.port, route.host)]
        if domain.startswith("[") and domain.endswith("]"):  # an address literal
            literal = domain[1:-1]
            literal = literal[5:] if literal.lower().startswith("ipv6:") else literal
            try:
                return [_Target(str(ipaddress.ip_address(literal)), port, literal)]
            except ValueError:
                raise _NoRoute(Reply("550", f"5.1.2 Bad address literal {domain}")) from None
        try:
            qname = dns.name.from_text(domain)
            try:
                records = await self._query(qname, "MX")
                hosts = self._mx_hosts(records, domain)
            except dns.resolver.NoAnswer:
                hosts = [qname]  # implicit MX: the domain itself (RFC 5321 §5.1)
        except (dns.exception.DNSException, UnicodeError) as exc:
            raise _NoRoute(reply_for_dns_error(exc, domain)) from exc
        lookups = await asyncio.gather(*(self._addresses(h) for h in hosts), return_exceptions=True)
        targets: list[_Target] = []
        failure: BaseException | None = None
        seen: set[str] = set()
        for host, found in zip(hosts, lookups, strict=True):
            if isinstance(found, BaseException):
                failure = failure or found
                continue
            name = host.to_text(omit_final_dot=True)
            # Two MX names for one address: trying it twice would not do better.
            fresh = [a for a in found if a not in seen]
            seen.update(fresh)
            targets.extend(_Target(address, port, name) for address in fresh)
        if not targets:
            if failure is not None and not isinstance(failure, Exception):
                raise failure  # cancelled
            raise _NoRoute(reply_for_dns_error(failure, domain))
        return targets[: self.config.max_addresses]

    def _mx_hosts(self, records: Sequence[dns.rdata.Rdata], domain: str) -> list[dns.name.Name]:
        """MX exchanges by preference, shuffled among equals; a null MX is refused."""
        mx = [r for r in records if isinstance(r, MX)]
        real = [(r.preference, r.exchange) for r in mx if r.exchange != dns.name.root]
        if not real:
            raise _NoRoute(Reply("556", f"5.1.10 Domain {domain} accepts no mail (null MX)"))
        self._rng.shuffle(real)
        real.sort(key=lambda pair: pair[0])  # stable: the shuffle orders equal preferences
        return [host for _, host in real]

    # -- destinations --------------------------------------------------------------------------

    def destinations(self, envelope: Envelope) -> Mapping[str, list[str]]:
        """Recipients by domain, or by route for routed domains; see
        :meth:`smtpq.relay.base.Relay.destinations`. No DNS: only names are compared."""
        groups: dict[str, list[str]] = {}
        for rcpt in dict.fromkeys(envelope.recipients):
            domain = _domain_of(rcpt)
            if domain is None:
                name = BAD_ADDRESS
            else:
                route = self._routes.get(domain)
                name = domain if route is None else next_hop_name(route.host, route.port)
            groups.setdefault(name, []).append(rcpt)
        return groups

    # -- delivery ------------------------------------------------------------------------------

    def _pool(self, target: _Target, domain: str) -> SmtpPool:
        required = domain in self._tls_domains
        key = (target.address, target.port, target.name, required)
        pool = self._pools.get(key)
        if pool is None:
            if len(self._pools) >= _MAX_POOLS:
                for old in [k for k, p in self._pools.items() if p.empty]:
                    del self._pools[old]
            config = self._required if required else self.smtp
            pool = SmtpPool(
                target.address, target.port, config, name=target.name, helo_name=self._helo_name
            )
            self._pools[key] = pool
        return pool

    async def _deliver_domain(
        self, envelope: Envelope, domain: str, recipients: list[str]
    ) -> dict[str, Reply]:
        try:
            targets = await self._targets(domain)
        except _NoRoute as no_route:
            log.info("no route to %s: %s", domain, no_route.reply)
            return {rcpt: addressed(no_route.reply, rcpt) for rcpt in recipients}
        replies: dict[str, Reply] = {}
        for target in targets:
            delivery = await self._pool(target, domain).deliver(envelope, recipients)
            replies = delivery.replies
            if not delivery.host_failed:
                break
            log.info("%s [%s] failed as a whole for %s", target.name, target.address, domain)
        return replies

    async def _guarded(
        self, envelope: Envelope, domain: str, recipients: list[str]
    ) -> dict[str, Reply]:
        """One domain's delivery; a bug there defers that domain only."""
        try:
            return await self._deliver_domain(envelope, domain, recipients)
        except Exception:
            log.exception("delivery to %s failed unexpectedly", domain)
            return {rcpt: addressed(unexpected_error_reply(), rcpt) for rcpt in recipients}

    async def attempt(self, envelope: Envelope, attempts: int) -> dict[str, RecipientResult]:
        """Deliver to every recipient domain at once; merged per-recipient replies."""
        results: dict[str, RecipientResult] = {}
        groups: dict[str, list[str]] = {}
        for rcpt in dict.fromkeys(envelope.recipients):
            domain = _domain_of(rcpt)
            if domain is None:
                text = "5.1.3 Bad destination mailbox address syntax"
                results[rcpt] = Reply("550", text, "RCPT TO", rcpt)
                continue
            groups.setdefault(domain, []).append(rcpt)
        outcomes = await asyncio.gather(
            *(self._guarded(envelope, domain, rcpts) for domain, rcpts in groups.items())
        )
        for replies in outcomes:
            results.update(replies)
        return results

    async def close(self) -> None:
        """QUIT every idle connection."""
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            with contextlib.suppress(Exception):
                await pool.close()
