"""MxSmtpRelay against a real DNS server and real sinks on loopback addresses (127.0.0.x share
one port, as mail exchangers share port 25)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from smtpq import Envelope, Reply
from smtpq.relay import MxRelayConfig, MxSmtpRelay, Route, SmtpRelayConfig
from smtpq.relay.base import RecipientResult
from tests.integration.smtp.conftest import SinkFactory, free_port
from tests.integration.smtp.dnsserver import DnsServer
from tests.integration.smtp.sink import RawServer, Sink

MESSAGE = b"From: a@example.org\r\nSubject: mx\r\n\r\nbody\r\n"

MxFactory = Callable[..., MxSmtpRelay]


@pytest.fixture
async def mx_factory(dns_server: DnsServer) -> AsyncIterator[MxFactory]:
    """``make(port, **MxRelayConfig fields)``: a relay asking the test DNS server."""
    relays: list[MxSmtpRelay] = []

    def make(port: int, rng: random.Random | None = None, **config: Any) -> MxSmtpRelay:
        config.setdefault("nameservers", (f"127.0.0.1:{dns_server.port}",))
        config.setdefault("dns_timeout", 5.0)
        smtp = SmtpRelayConfig(helo_name="relay.smtpq.test", connect_timeout=5.0)
        relay = MxSmtpRelay(MxRelayConfig(port=port, **config), smtp, rng=rng)
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        await relay.close()


@pytest.fixture
async def sinks(sink_factory: SinkFactory) -> tuple[Sink, Sink, int]:
    """Sinks on 127.0.0.2 and 127.0.0.4, same port; 127.0.0.3 on that port is down."""
    first = await sink_factory("127.0.0.2")
    second = await sink_factory("127.0.0.4", first.port)
    return first, second, first.port


def envelope(*recipients: str) -> Envelope:
    env = Envelope("a@example.org", list(recipients))
    env.parse(MESSAGE)
    return env


def reply(result: RecipientResult) -> Reply:
    assert isinstance(result, Reply)
    return result


async def test_mx_by_preference(
    dns_server: DnsServer, sinks: tuple[Sink, Sink, int], mx_factory: MxFactory
) -> None:
    first, second, port = sinks
    zone = dns_server.zone
    zone.add("pref.test", "MX", "20 backup.pref.test.", "10 primary.pref.test.")
    zone.add("primary.pref.test", "A", "127.0.0.2")
    zone.add("backup.pref.test", "A", "127.0.0.4")
    result = await mx_factory(port).attempt(envelope("a@pref.test", "b@PREF.test"), 0)
    assert {r: reply(v).code for r, v in result.items()} == {
        "a@pref.test": "250",
        "b@PREF.test": "250",
    }
    assert reply(result["a@pref.test"]).remote_host == "primary.pref.test"
    [got] = first.received  # one transaction for the domain
    assert got.recipients == ["a@pref.test", "b@PREF.test"]
    assert got.data == MESSAGE
    assert second.received == []


async def test_next_mx_when_the_first_is_down(
    dns_server: DnsServer, sinks: tuple[Sink, Sink, int], mx_factory: MxFactory
) -> None:
    _, second, port = sinks
    zone = dns_server.zone
    zone.add("down.test", "MX", "10 dead.down.test.", "20 live.down.test.")
    zone.add("dead.down.test", "A", "127.0.0.3")  # nothing listens there
    zone.add("live.down.test", "A", "127.0.0.4")
    result = await mx_factory(port).attempt(envelope("a@down.test"), 0)
    r = reply(result["a@down.test"])
    assert (r.code, r.remote_host) == ("250", "live.down.test")
    assert len(second.received) == 1


async def test_next_mx_after_a_421_greeting(
    dns_server: DnsServer, sinks: tuple[Sink, Sink, int], mx_factory: MxFactory
) -> None:
    _, second, port = sinks
    busy = await RawServer(b"421 4.3.2 Too busy\r\n", "127.0.0.3", port).start()
    try:
        zone = dns_server.zone
        zone.add("busy.test", "MX", "10 busy.busy.test.", "15 alias.busy.test.")
        zone.add("busy.test", "MX", "20 live.busy.test.")
        zone.add("busy.busy.test", "A", "127.0.0.3")
        zone.add("alias.busy.test", "A", "127.0.0.3")  # the same host again
        zone.add("live.busy.test", "A", "127.0.0.4")
        result = await mx_factory(port).attempt(envelope("a@busy.test"), 0)
    finally:
        await busy.stop()
    assert reply(result["a@busy.test"]).code == "250"
    assert len(second.received) == 1
    assert busy.connections == 1


async def test_all_mx_down_is_transient(dns_server: DnsServer, mx_factory: MxFactory) -> None:
    zone = dns_server.zone
    zone.add("gone.test", "MX", "10 a.gone.test.", "20 b.gone.test.")
    zone.add("a.gone.test", "A", "127.0.0.3")
    zone.add("b.gone.test", "A", "127.0.0.5")
    r = reply((await mx_factory(free_port()).attempt(envelope("x@gone.test"), 0))["x@gone.test"])
    assert (r.code, r.enhanced_status_code, r.remote_host) == ("451", "4.4.1", "b.gone.test")


async def test_rcpt_refusal_is_final_no_next_mx(
    dns_server: DnsServer, sinks: tuple[Sink, Sink, int], mx_factory: MxFactory
) -> None:
    first, second, port = sinks
    first.behaviour.rcpt = {"nobody": "550 5.1.1 No such user", "later": "450 4.2.1 Busy"}
    zone = dns_server.zone
    zone.add("final.test", "MX", "10 a.final.test.", "20 b.final.test.")
    zone.add("a.final.test", "A", "127.0.0.2")
    zone.add("b.final.test", "A", "127.0.0.4")
    result = await mx_factory(port).attempt(envelope("nobody@final.test", "later@final.test"), 0)
    assert reply(result["nobody@final.test"]).code == "550"
    assert reply(result["later@final.test"]).code == "450"
    assert second.connections == 0


async def test_implicit_mx(
    dns_server: DnsServer, sinks: tuple[Sink, Sink, int], mx_factory: MxFactory
) -> None:
    first, _, port = sinks
    dns_server.zone.add("implicit.test", "A", "127.0.0.2")
    result = await mx_factory(port).attempt(envelope("a@implicit.test"), 0)
    assert reply(result["a@implicit.test"]).remote_host == "implicit.test"
    assert len(first.received) == 1


async def test_implicit_mx_over_ipv6(
    dns_server: DnsServer, sink_factory: SinkFactory, mx_factory: MxFactory
) -> None:
    sink = await sink_factory("::1")
    dns_server.zone.add("six.test", "AAAA", "::1")
    result = await mx_factory(sink.port).attempt(envelope("a@six.test"), 0)
    assert reply(result["a@six.test"]).code == "250"
    assert len(sink.received) == 1


@pytest.mark.parametrize(
    ("domain", "records", "code", "esc"),
    [
        ("nullmx.test", [("nullmx.test", "MX", "0 .")], "556", "5.1.10"),
        ("nxdomain.test", [], "550", "5.1.2"),
        ("servfail.test", None, "451", "4.4.3"),
        ("noaddr.test", [("noaddr.test", "TXT", '"v=spf1 -all"')], "550", "5.4.4"),
        ("lame.test", [("lame.test", "MX", "10 nowhere.lame.test.")], "550", "5.4.4"),
    ],
)
async def test_dns_outcomes(
    dns_server: DnsServer,
    mx_factory: MxFactory,
    domain: str,
    records: list[tuple[str, str, str]] | None,
    code: str,
    esc: str,
) -> None:
    if records is None:
        dns_server.zone.servfail.add(domain)
    for name, kind, rdata in records or []:
        dns_server.zone.add(name, kind, rdata)
    rcpt = f"user@{domain}"
    r = reply((await mx_factory(free_port()).attempt(envelope(rcpt), 0))[rcpt])
    assert (r.code, r.enhanced_status_code) == (code, esc)
    assert r.address == rcpt


async def test_dns_timeout_is_transient(dns_server: DnsServer, mx_factory: MxFactory) -> None:
    dns_server.zone.silent.add("slow.test")
    relay = mx_factory(free_port(), dns_timeout=0.3)
    r = reply((await relay.attempt(envelope("a@slow.test"), 0))["a@slow.test"])
    assert (r.code, r.enhanced_status_code) == ("451", "4.4.3")


async def test_truncated_answer_retried_over_tcp(
    dns_server: DnsServer, sinks: tuple[Sink, Sink, int], mx_factory: MxFactory
) -> None:
    port = sinks[2]
    zone = dns_server.zone
    zone.add("big.test", "MX", "10 mx.big.test.")
    zone.add("mx.big.test", "A", "127.0.0.2")
    zone.truncate.add("big.test")
    result = await mx_factory(port).attempt(envelope("a@big.test"), 0)
    assert reply(result["a@big.test"]).code == "250"
    assert dns_server.queries[("big.test", "MX", "tcp")] == 1


async def test_domains_grouped_and_merged(
    dns_server: DnsServer, sinks: tuple[Sink, Sink, int], mx_factory: MxFactory
) -> None:
    first, second, port = sinks
    zone = dns_server.zone
    zone.add("one.test", "MX", "10 mx.one.test.")
    zone.add("mx.one.test", "A", "127.0.0.2")
    zone.add("two.test", "MX", "10 mx.two.test.")
    zone.add("mx.two.test", "A", "127.0.0.4")
    env = envelope("a@one.test", "b@two.test", "c@one.test", "d@nxdomain.test", "no-domain")
    result = await mx_factory(port).attempt(env, 0)
    assert {r: reply(v).code for r, v in result.items()} == {
        "a@one.test": "250",
        "b@two.test": "250",
        "c@one.test": "250",
        "d@nxdomain.test": "550",
        "no-domain": "550",
    }
    assert [r.recipients for r in first.received] == [["a@one.test", "c@one.test"]]
    assert [r.recipients for r in second.received] == [["b@two.test"]]


async def test_static_route_skips_dns(
    dns_server: DnsServer, sink: Sink, mx_factory: MxFactory
) -> None:
    relay = mx_factory(free_port(), routes={"Routed.test": Route("127.0.0.1", sink.port)})
    result = await relay.attempt(envelope("a@routed.test"), 0)
    assert reply(result["a@routed.test"]).code == "250"
    assert len(sink.received) == 1
    assert not dns_server.queries  # no look-up at all


async def test_address_literal(sink: Sink, mx_factory: MxFactory) -> None:
    result = await mx_factory(sink.port).attempt(envelope("a@[127.0.0.1]"), 0)
    assert reply(result["a@[127.0.0.1]"]).code == "250"
    assert sink.received[0].recipients == ["a@[127.0.0.1]"]


async def test_tls_required_per_destination(
    dns_server: DnsServer, sinks: tuple[Sink, Sink, int], mx_factory: MxFactory
) -> None:
    first, _, port = sinks
    zone = dns_server.zone
    for domain in ("strict.test", "lax.test"):
        zone.add(domain, "MX", f"10 mx.{domain}.")
        zone.add(f"mx.{domain}", "A", "127.0.0.2")
    relay = mx_factory(port, tls_required_domains=("strict.test",))
    result = await relay.attempt(envelope("a@strict.test", "b@lax.test"), 0)
    strict, lax = reply(result["a@strict.test"]), reply(result["b@lax.test"])
    assert (strict.code, strict.enhanced_status_code) == ("451", "4.7.4")
    assert lax.code == "250"
    assert [r.recipients for r in first.received] == [["b@lax.test"]]


async def test_connections_reused_per_host(
    dns_server: DnsServer, sinks: tuple[Sink, Sink, int], mx_factory: MxFactory
) -> None:
    first, _, port = sinks
    zone = dns_server.zone
    for domain in ("r1.test", "r2.test"):
        zone.add(domain, "MX", "10 shared.mx.test.")
    zone.add("shared.mx.test", "A", "127.0.0.2")
    relay = mx_factory(port)
    for rcpt in ("a@r1.test", "b@r2.test", "c@r1.test"):
        assert reply((await relay.attempt(envelope(rcpt), 0))[rcpt]).code == "250"
    assert len(first.received) == 3
    assert first.connections == 1
