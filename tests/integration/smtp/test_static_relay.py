"""StaticSmtpRelay against real aiosmtpd sinks (and misbehaving servers) on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from smtpq import DictStorage, Envelope, ManualClock, Queue, QueueEvent, Reply
from smtpq.edge import EdgeConfig, SmtpEdge
from smtpq.policy import AddReceivedHeader
from smtpq.relay import SmtpRelayConfig, StaticSmtpRelay, TlsMode
from smtpq.relay.base import RecipientResult
from tests.helpers import until
from tests.integration.smtp.conftest import SinkFactory, TlsFiles, free_port
from tests.integration.smtp.sink import RawServer, Sink

MESSAGE = (
    b"From: a@example.org\r\nSubject: relay\r\nDKIM-Signature: v=1;\r\n\t b=x\r\n\r\n"
    b".leading dot\r\n..two\r\n8bit \xc3\xa9\r\n.\r\nend\r\n"
)

RelayFactory = Callable[..., StaticSmtpRelay]


@pytest.fixture
async def relay_factory() -> AsyncIterator[RelayFactory]:
    """``make(host, port, **SmtpRelayConfig fields)``; closed after the test."""
    relays: list[StaticSmtpRelay] = []

    def make(host: str, port: int, pool_size: int | None = None, **config: Any) -> StaticSmtpRelay:
        config.setdefault("helo_name", "relay.smtpq.test")
        config.setdefault("connect_timeout", 10.0)
        config.setdefault("command_timeout", 10.0)
        config.setdefault("data_timeout", 10.0)
        relay = StaticSmtpRelay(host, port, pool_size, config=SmtpRelayConfig(**config))
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        await relay.close()


def envelope(*recipients: str, sender: str = "a@example.org", data: bytes = MESSAGE) -> Envelope:
    env = Envelope(sender, list(recipients))
    env.parse(data)
    return env


def reply(result: RecipientResult) -> Reply:
    assert isinstance(result, Reply)
    return result


async def test_per_recipient_results(sink: Sink, relay_factory: RelayFactory) -> None:
    sink.behaviour.rcpt = {"later": "451 4.2.0 Mailbox busy", "nobody": "550 5.1.1 No such user"}
    relay = relay_factory("127.0.0.1", sink.port)
    result = await relay.attempt(
        envelope("ok@dest.example", "later@dest.example", "nobody@dest.example", "ok2@x.example"),
        0,
    )
    ok = reply(result["ok@dest.example"])
    later = reply(result["later@dest.example"])
    nobody = reply(result["nobody@dest.example"])
    assert (ok.code, ok.message, ok.command) == ("250", "2.0.0 Ok: queued as SINK1", "DATA")
    assert (later.code, later.enhanced_status_code, later.command) == ("451", "4.2.0", "RCPT TO")
    assert (nobody.code, nobody.enhanced_status_code, nobody.command) == ("550", "5.1.1", "RCPT TO")
    assert reply(result["ok2@x.example"]).code == "250"
    assert {r.remote_host for r in map(reply, result.values())} == {"127.0.0.1"}
    assert nobody.address == "nobody@dest.example"
    [got] = sink.received
    assert got.recipients == ["ok@dest.example", "ok2@x.example"]
    assert got.sender == "a@example.org"
    assert got.data == MESSAGE  # byte for byte, dot-stuffing undone by the sink


@pytest.mark.parametrize(("code", "kind"), [("451 4.3.0 Try later", "4"), ("554 5.6.0 No", "5")])
async def test_data_reply_applies_to_every_accepted_recipient(
    sink: Sink, relay_factory: RelayFactory, code: str, kind: str
) -> None:
    sink.behaviour.data = code
    sink.behaviour.rcpt = {"nobody": "550 5.1.1 No such user"}
    result = await relay_factory("127.0.0.1", sink.port).attempt(
        envelope("a@x.example", "b@x.example", "nobody@x.example"), 0
    )
    assert {r: (str(reply(v).code)[0], reply(v).command) for r, v in result.items()} == {
        "a@x.example": (kind, "DATA"),
        "b@x.example": (kind, "DATA"),
        "nobody@x.example": ("5", "RCPT TO"),
    }


async def test_sender_refused_applies_to_all(sink: Sink, relay_factory: RelayFactory) -> None:
    sink.behaviour.mail = "553 5.7.1 Sender rejected"
    result = await relay_factory("127.0.0.1", sink.port).attempt(
        envelope("a@x.example", "b@x.example"), 0
    )
    assert {(reply(r).code, reply(r).command) for r in result.values()} == {("553", "MAIL FROM")}
    assert sink.received == []


async def test_no_recipient_accepted_sends_no_data(sink: Sink, relay_factory: RelayFactory) -> None:
    sink.behaviour.rcpt = {"nobody": "550 5.1.1 No such user"}
    relay = relay_factory("127.0.0.1", sink.port)
    result = await relay.attempt(envelope("nobody@x.example"), 0)
    assert reply(result["nobody@x.example"]).code == "550"
    # The connection is still good for the next message (RSET, then a new transaction).
    result = await relay.attempt(envelope("ok@x.example"), 0)
    assert reply(result["ok@x.example"]).code == "250"
    assert sink.connections == 1
    assert sink.resets == 1


async def test_connection_reuse(sink: Sink, relay_factory: RelayFactory) -> None:
    relay = relay_factory("127.0.0.1", sink.port)
    for i in range(3):
        result = await relay.attempt(envelope(f"r{i}@x.example"), 0)
        assert reply(result[f"r{i}@x.example"]).code == "250"
    assert len(sink.received) == 3
    assert sink.connections == 1
    assert sink.resets == 0  # each transaction ended cleanly: the next needs no RSET


async def test_idle_connection_closed_by_host_is_replaced_at_mail(
    sink: Sink, relay_factory: RelayFactory
) -> None:
    relay = relay_factory("127.0.0.1", sink.port)
    await relay.attempt(envelope("one@x.example"), 0)
    # The host drops the idle connection as our MAIL FROM arrives, before any reply.
    sink.behaviour.close_at_mail = 1
    result = await relay.attempt(envelope("two@x.example"), 0)
    assert reply(result["two@x.example"]).code == "250"
    assert [r.recipients for r in sink.received] == [["one@x.example"], ["two@x.example"]]
    assert sink.connections == 2


async def test_new_connection_closed_at_mail_is_transient(
    sink: Sink, relay_factory: RelayFactory
) -> None:
    sink.behaviour.close_at_mail = 1
    result = await relay_factory("127.0.0.1", sink.port).attempt(envelope("a@x.example"), 0)
    r = reply(result["a@x.example"])
    assert (r.code, r.command) == ("451", "MAIL FROM")
    assert sink.received == []


async def test_pool_size_bounds_concurrent_connections(
    sink: Sink, relay_factory: RelayFactory
) -> None:
    relay = relay_factory("127.0.0.1", sink.port, pool_size=2)
    results = await asyncio.gather(
        *(relay.attempt(envelope(f"r{i}@x.example"), 0) for i in range(8))
    )
    assert all(reply(v).code == "250" for r in results for v in r.values())
    assert len(sink.received) == 8
    assert sink.connections <= 2


async def test_no_reuse_without_idle_time(sink: Sink, relay_factory: RelayFactory) -> None:
    relay = relay_factory("127.0.0.1", sink.port, idle_timeout=0)
    for i in range(2):
        await relay.attempt(envelope(f"r{i}@x.example"), 0)
    assert sink.connections == 2


async def test_idle_connections_close_after_idle_timeout(
    sink: Sink, relay_factory: RelayFactory
) -> None:
    relay = relay_factory("127.0.0.1", sink.port, idle_timeout=0.05)
    await asyncio.gather(*(relay.attempt(envelope(f"r{i}@x.example"), 0) for i in range(3)))
    assert not relay.pool.empty  # kept idle for the next message...
    await until(lambda: relay.pool.empty)  # ...until idle_timeout passed: QUIT, closed
    assert (
        reply((await relay.attempt(envelope("late@x.example"), 0))["late@x.example"]).code == "250"
    )
    assert sink.connections == 4


async def test_broken_idle_connection_is_replaced(sink: Sink, relay_factory: RelayFactory) -> None:
    relay = relay_factory("127.0.0.1", sink.port)
    await relay.attempt(envelope("one@x.example"), 0)
    sink.drop_connections()  # the server closed our idle connection behind our back
    result = await relay.attempt(envelope("two@x.example"), 0)
    assert reply(result["two@x.example"]).code == "250"
    assert [r.recipients for r in sink.received] == [["one@x.example"], ["two@x.example"]]
    assert sink.connections == 2


async def test_connection_refused_is_transient(relay_factory: RelayFactory) -> None:
    result = await relay_factory("127.0.0.1", free_port()).attempt(envelope("a@x.example"), 0)
    r = reply(result["a@x.example"])
    assert (r.code, r.enhanced_status_code, r.command) == ("451", "4.4.1", "CONNECT")
    assert (r.remote_host, r.remote_ip, r.address) == ("127.0.0.1", "127.0.0.1", "a@x.example")


async def test_silent_server_times_out_transient(relay_factory: RelayFactory) -> None:
    server = await RawServer(greeting=None).start()
    try:
        relay = relay_factory("127.0.0.1", server.port, connect_timeout=0.2)
        r = reply((await relay.attempt(envelope("a@x.example"), 0))["a@x.example"])
    finally:
        await server.stop()
    assert (r.code, r.enhanced_status_code) == ("451", "4.4.1")


async def test_data_timeout_is_transient_4_4_2(sink: Sink, relay_factory: RelayFactory) -> None:
    sink.behaviour.hang_data = asyncio.Event()
    relay = relay_factory("127.0.0.1", sink.port, data_timeout=0.2)
    r = reply((await relay.attempt(envelope("a@x.example"), 0))["a@x.example"])
    assert (r.code, r.enhanced_status_code, r.command) == ("451", "4.4.2", "DATA")


@pytest.mark.parametrize(
    ("greeting", "code", "esc"),
    [(b"554 5.3.2 No service\r\n", "451", "4.4.1"), (b"421 4.3.2 Busy\r\n", "421", "4.3.2")],
)
async def test_bad_greeting_is_transient(
    relay_factory: RelayFactory, greeting: bytes, code: str, esc: str
) -> None:
    server = await RawServer(greeting).start()
    try:
        relay = relay_factory("127.0.0.1", server.port)
        r = reply((await relay.attempt(envelope("a@x.example"), 0))["a@x.example"])
    finally:
        await server.stop()
    assert (r.code, r.enhanced_status_code, r.command) == (code, esc, "CONNECT")


# -- TLS and AUTH ----------------------------------------------------------------------------


async def test_starttls_required_but_not_offered(sink: Sink, relay_factory: RelayFactory) -> None:
    relay = relay_factory("127.0.0.1", sink.port, tls=TlsMode.REQUIRED)
    r = reply((await relay.attempt(envelope("a@x.example"), 0))["a@x.example"])
    assert (r.code, r.enhanced_status_code, r.command) == ("451", "4.7.4", "STARTTLS")
    assert sink.received == []


async def test_opportunistic_tls(
    sink_factory: SinkFactory, tls_files: TlsFiles, relay_factory: RelayFactory
) -> None:
    with_tls = await sink_factory(tls=tls_files.server_context())
    without = await sink_factory()
    for sink in (with_tls, without):
        relay = relay_factory("127.0.0.1", sink.port)
        assert reply((await relay.attempt(envelope("a@x.example"), 0))["a@x.example"]).code == "250"
    assert [with_tls.received[0].tls, without.received[0].tls] == [True, False]


async def test_opportunistic_tls_falls_back_to_plain_after_a_failed_handshake(
    sink_factory: SinkFactory, tls_files: TlsFiles, relay_factory: RelayFactory
) -> None:
    sink = await sink_factory(tls=tls_files.server_context())
    # Verification against the system CAs fails; opportunistic TLS still delivers, in plain text.
    relay = relay_factory("127.0.0.1", sink.port, tls_verify=True)
    assert reply((await relay.attempt(envelope("a@x.example"), 0))["a@x.example"]).code == "250"
    assert [r.tls for r in sink.received] == [False]
    assert sink.connections == 2


async def test_refused_starttls(
    sink_factory: SinkFactory, tls_files: TlsFiles, relay_factory: RelayFactory
) -> None:
    sink = await sink_factory(tls=tls_files.server_context(), refuse_starttls=True)
    lax = relay_factory("127.0.0.1", sink.port)
    assert reply((await lax.attempt(envelope("a@x.example"), 0))["a@x.example"]).code == "250"
    strict = relay_factory("127.0.0.1", sink.port, tls=TlsMode.REQUIRED)
    r = reply((await strict.attempt(envelope("b@x.example"), 0))["b@x.example"])
    assert (r.code, r.enhanced_status_code, r.command) == ("454", "4.7.0", "STARTTLS")
    assert [(r.recipients, r.tls) for r in sink.received] == [(["a@x.example"], False)]


async def test_tls_verification(
    sink_factory: SinkFactory, tls_files: TlsFiles, relay_factory: RelayFactory
) -> None:
    sink = await sink_factory(tls=tls_files.server_context())
    trusted = relay_factory(
        "localhost", sink.port, tls=TlsMode.REQUIRED, tls_verify=True, ca_file=str(tls_files.cert)
    )
    assert reply((await trusted.attempt(envelope("a@x.example"), 0))["a@x.example"]).code == "250"
    # The system CAs do not know the self-signed certificate: required TLS fails, transiently.
    untrusted = relay_factory("127.0.0.1", sink.port, tls=TlsMode.REQUIRED, tls_verify=True)
    r = reply((await untrusted.attempt(envelope("b@x.example"), 0))["b@x.example"])
    assert (r.code, r.enhanced_status_code, r.command) == ("451", "4.7.5", "STARTTLS")
    assert (r.remote_host, r.remote_ip) == ("127.0.0.1", "127.0.0.1")
    assert len(sink.received) == 1


async def test_implicit_tls(
    sink_factory: SinkFactory, tls_files: TlsFiles, relay_factory: RelayFactory
) -> None:
    sink = await sink_factory(tls=tls_files.server_context(), implicit=True)
    relay = relay_factory("127.0.0.1", sink.port, tls=TlsMode.IMPLICIT)
    assert reply((await relay.attempt(envelope("a@x.example"), 0))["a@x.example"]).code == "250"
    assert sink.received[0].tls


async def test_auth(
    sink_factory: SinkFactory, tls_files: TlsFiles, relay_factory: RelayFactory
) -> None:
    sink = await sink_factory(tls=tls_files.server_context(), users={"relay": "s3cret"})
    good = relay_factory("127.0.0.1", sink.port, username="relay", password="s3cret")
    assert reply((await good.attempt(envelope("a@x.example"), 0))["a@x.example"]).code == "250"
    assert sink.received[0].login == "relay"
    # A refused password is our configuration's fault: transient, the message waits.
    bad = relay_factory("127.0.0.1", sink.port, username="relay", password="wrong")
    r = reply((await bad.attempt(envelope("b@x.example"), 0))["b@x.example"])
    assert (r.code, r.enhanced_status_code, r.command) == ("451", "4.7.8", "AUTH")
    # Without TLS the sink does not offer AUTH at all.
    plain = relay_factory("localhost", sink.port, tls=TlsMode.NONE, username="relay", password="x")
    r = reply((await plain.attempt(envelope("c@x.example"), 0))["c@x.example"])
    assert (r.code, r.enhanced_status_code, r.command) == ("451", "4.7.4", "AUTH")
    assert (r.remote_host, r.remote_ip, r.address) == ("localhost", "127.0.0.1", "c@x.example")
    assert len(sink.received) == 1


# -- SMTPUTF8, 8BITMIME, DSN: passed on to a server that has them (our own edge) ---------------


@pytest.fixture
async def edge_sink() -> AsyncIterator[tuple[SmtpEdge, DictStorage]]:
    """smtpq's own edge as the receiving server: it supports DSN and SMTPUTF8."""
    store = DictStorage()
    async with Queue(store) as queue, SmtpEdge(queue, EdgeConfig(port=0)) as edge:
        yield edge, store


async def test_extensions_passed_on(
    edge_sink: tuple[SmtpEdge, DictStorage], relay_factory: RelayFactory
) -> None:
    edge, store = edge_sink
    data = "Subject: grüße\r\n\r\nbody \xe9\r\n".encode()
    env = envelope("zoë@例え.example", "b@x.example", sender="jürgen@bücher.example", data=data)
    env.smtputf8, env.body_type = True, "8BITMIME"
    env.dsn_ret, env.dsn_envid = "HDRS", "ID+2B1"
    env.rcpt_params = {"b@x.example": {"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;B@x.example"}}
    result = await relay_factory("127.0.0.1", edge.port).attempt(env, 0)
    assert {reply(r).code for r in result.values()} == {"250"}
    [(_, id)] = await store.load()
    got, _ = await store.get(id)
    assert (got.sender, got.recipients) == (env.sender, env.recipients)
    assert (got.smtputf8, got.body_type, got.dsn_ret, got.dsn_envid) == (
        True,
        "8BITMIME",
        "HDRS",
        "ID+2B1",
    )
    assert got.rcpt_params == env.rcpt_params
    assert b"".join(got.flatten()) == data


async def test_smtputf8_needed_but_not_offered_is_permanent(
    sink_factory: SinkFactory, relay_factory: RelayFactory
) -> None:
    sink = await sink_factory(smtputf8=False)
    env = envelope("zoë@例え.example")
    env.smtputf8 = True
    r = reply((await relay_factory("127.0.0.1", sink.port).attempt(env, 0))["zoë@例え.example"])
    assert (r.code, r.enhanced_status_code) == ("554", "5.6.7")
    assert sink.received == []


async def test_bare_lf_is_sent_as_crlf(sink: Sink, relay_factory: RelayFactory) -> None:
    data = b"Subject: lf\n\nline\n.dot\nend\n"
    await relay_factory("127.0.0.1", sink.port).attempt(envelope("a@x.example", data=data), 0)
    assert sink.received[0].data == data.replace(b"\n", b"\r\n")


# -- the whole way: client -> edge -> queue -> relay -> sink -------------------------------


async def test_edge_queue_relay_sink(sink: Sink) -> None:
    store = DictStorage()
    relay = StaticSmtpRelay("127.0.0.1", sink.port, config=SmtpRelayConfig(helo_name="q.test"))
    clock = ManualClock(1_800_000_000.0)
    policies = [AddReceivedHeader("mx.smtpq.test")]
    removed = asyncio.Event()
    async with (
        Queue(store, relay, clock=clock, policies=policies) as queue,
        SmtpEdge(queue, EdgeConfig(port=0, hostname="mx.smtpq.test"), clock=clock) as edge,
    ):

        def observe(event: QueueEvent) -> None:
            if event.kind == "removed":
                removed.set()

        queue.observers.append(observe)
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        commands = [b"EHLO c.example", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@x.example>"]
        writer.write(b"".join(c + b"\r\n" for c in [*commands, b"DATA"]))
        writer.write(MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\nQUIT\r\n")
        replies = (await reader.read()).decode()
        writer.close()
        assert "250 2.6.0 Message accepted for delivery" in replies
        await asyncio.wait_for(removed.wait(), 10)  # delivered, then removed from the store
        assert (await store.get_info())["size"] == 0
    await relay.close()
    [got] = sink.received
    assert got.data.startswith(b"Received: from c.example (")
    assert got.data.endswith(b"\r\n" + MESSAGE)
