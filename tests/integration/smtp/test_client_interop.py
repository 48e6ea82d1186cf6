"""smtpq's SMTP client (through SmtpPool and the relays) into real servers over loopback:
aiosmtpd (with PIPELINING and CHUNKING switched on or off, STARTTLS, AUTH) and Postfix's
smtp-sink (pipelining or not, AUTH, DSN, refusals, a 421)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from smtpq import DictStorage, Envelope, Queue, Reply
from smtpq.edge import EdgeConfig, SmtpEdge
from smtpq.relay import SmtpRelayConfig
from smtpq.relay.smtp import SmtpPool
from tests.helpers import until
from tests.integration.smtp.conftest import SinkFactory, TlsFiles, free_port
from tests.integration.smtp.sink import SMTP_SINK, PostfixSink, Sink

MESSAGE = (
    b"From: a@example.org\r\nSubject: interop\r\n\r\n"
    b".leading dot\r\n..two\r\n.\r\n8bit \xc3\xa9\r\nend\r\n"
)

PoolFactory = Callable[..., SmtpPool]


@pytest.fixture
async def pool_factory() -> AsyncIterator[PoolFactory]:
    """``make(port, **SmtpRelayConfig fields)``: a pool to 127.0.0.1, closed after the test."""
    pools: list[SmtpPool] = []

    def make(port: int, **config: Any) -> SmtpPool:
        config.setdefault("helo_name", "relay.smtpq.test")
        for timeout in ("connect_timeout", "command_timeout", "data_timeout"):
            config.setdefault(timeout, 10.0)
        pool = SmtpPool("127.0.0.1", port, SmtpRelayConfig(**config))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


def envelope(*recipients: str, data: bytes = MESSAGE) -> Envelope:
    env = Envelope("a@example.org", list(recipients))
    env.parse(data)
    return env


def outcome(replies: dict[str, Reply]) -> dict[str, tuple[str | None, str | None]]:
    return {rcpt: (r.code, r.command) for rcpt, r in replies.items()}


# -- aiosmtpd ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_into_aiosmtpd(
    sink_factory: SinkFactory, pool_factory: PoolFactory, pipelining: bool, chunking: bool
) -> None:
    sink = await sink_factory(pipelining=pipelining, chunking=chunking)
    sink.behaviour.rcpt = {"nobody": "550 5.1.1 No such user"}
    pool = pool_factory(sink.port)
    content = "BDAT" if chunking else "DATA"
    for i in range(2):  # the second on the same connection
        delivery = await pool.deliver(envelope(), [f"a{i}@x.example", "nobody@x.example"])
        assert outcome(delivery.replies) == {
            f"a{i}@x.example": ("250", content),
            "nobody@x.example": ("550", "RCPT TO"),
        }
        assert not delivery.host_failed
    ok = delivery.replies["a1@x.example"]
    assert (ok.remote_host, ok.remote_ip, ok.address, ok.remote_dsn) == (
        "127.0.0.1",
        "127.0.0.1",
        "a1@x.example",
        False,  # aiosmtpd has no DSN
    )
    assert [r.recipients for r in sink.received] == [["a0@x.example"], ["a1@x.example"]]
    assert all(r.data == MESSAGE for r in sink.received)  # byte for byte
    assert {(r.chunked, r.pipelined) for r in sink.received} == {(chunking, pipelining)}
    assert sink.received[0].mail_options == ["BODY=8BITMIME", f"SIZE={len(MESSAGE)}"]
    assert sink.connections == 1


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
async def test_into_aiosmtpd_no_recipient_accepted(
    sink_factory: SinkFactory, pool_factory: PoolFactory, chunking: bool
) -> None:
    sink = await sink_factory(pipelining=True, chunking=chunking)
    sink.behaviour.rcpt = {"nobody": "550 5.1.1 No such user"}
    pool = pool_factory(sink.port)
    delivery = await pool.deliver(envelope(), ["nobody@x.example"])
    # DATA's (or BDAT's) 503 counts for nobody; the transaction is reset before the next.
    assert outcome(delivery.replies) == {"nobody@x.example": ("550", "RCPT TO")}
    delivery = await pool.deliver(envelope(), ["ok@x.example"])
    assert delivery.replies["ok@x.example"].code == "250"
    assert (sink.connections, sink.resets, len(sink.received)) == (1, 1, 1)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_into_aiosmtpd_with_starttls_and_auth(
    sink_factory: SinkFactory, tls_files: TlsFiles, pool_factory: PoolFactory, pipelining: bool
) -> None:
    sink = await sink_factory(
        tls=tls_files.server_context(), users={"relay": "s3cret"}, pipelining=pipelining
    )
    pool = pool_factory(sink.port, username="relay", password="s3cret")
    delivery = await pool.deliver(envelope(), ["a@x.example"])
    assert delivery.replies["a@x.example"].code == "250"
    [got] = sink.received
    assert (got.tls, got.login, got.data, got.pipelined) == (True, "relay", MESSAGE, pipelining)


# -- smtpq's own edge (its sans-IO server core: PIPELINING, CHUNKING, DSN) ---------------------


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
async def test_into_smtpq_edge(pool_factory: PoolFactory, chunking: bool) -> None:
    store = DictStorage()
    async with Queue(store) as queue, SmtpEdge(queue, EdgeConfig(port=0)) as edge:
        pool = pool_factory(edge.port, chunking=chunking)
        env = envelope(data=MESSAGE.replace(b"\r\n", b"\n"))  # bare LFs: made CRLF on the wire
        env.rcpt_params = {"a@x.example": {"NOTIFY": "SUCCESS"}}
        delivery = await pool.deliver(env, ["a@x.example", "b@x.example"])
        assert {r.command for r in delivery.replies.values()} == {"BDAT" if chunking else "DATA"}
        assert {(r.code, r.remote_dsn) for r in delivery.replies.values()} == {("250", True)}
        [(_, id)] = await store.load()
        got, _ = await store.get(id)
    assert b"".join(got.flatten()) == MESSAGE  # byte for byte, in canonical form
    assert got.rcpt_params == {"a@x.example": {"NOTIFY": "SUCCESS"}}


# -- a server that misbehaves -----------------------------------------------------------------


class ScriptedServer:
    """Greets, answers EHLO, then answers each later command (the content after a 354 counts
    as one) with the next of ``replies``: bytes, sent line by line, or None to close the
    connection; the default is ``354`` to DATA, ``250`` to the rest; a 421 closes it too.
    Counts connections."""

    def __init__(self, *replies: bytes | None) -> None:
        self.replies = list(replies)
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 scripted ESMTP\r\n")
        content = False  # after a 354, the next unit is the content, up to its lone dot
        with contextlib.suppress(asyncio.IncompleteReadError):
            while unit := await (reader.readuntil(b"\r\n.\r\n") if content else reader.readline()):
                if unit.upper().startswith(b"EHLO") and not content:
                    writer.write(b"250 scripted\r\n")
                    continue
                default = b"354 Go\r\n" if unit.upper() == b"DATA\r\n" else b"250 2.0.0 Ok\r\n"
                reply = self.replies.pop(0) if self.replies else default
                if reply is None:
                    break
                for reply_line in reply.splitlines(keepends=True):
                    writer.write(reply_line)
                    await writer.drain()
                if b"\n421 " in b"\n" + reply:
                    break  # a server that says 421 closes the connection
                content = reply.startswith(b"354")
        writer.close()

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


async def test_garbage_reply_is_a_transient_bad_connection(pool_factory: PoolFactory) -> None:
    async with ScriptedServer(b"250 Ok\r\n", b"2x0 what?\r\n") as server:
        delivery = await pool_factory(server.port).deliver(envelope(), ["a@x.example"])
    reply = delivery.replies["a@x.example"]
    assert (reply.code, reply.enhanced_status_code, reply.command) == ("451", "4.4.2", "RCPT TO")
    assert "malformed reply" in reply.text
    assert delivery.host_failed


async def test_a_421_while_idle_retires_the_connection(pool_factory: PoolFactory) -> None:
    # MAIL, RCPT, DATA, the content; then, unasked, a 421 and the end of the connection.
    ok, go = b"250 Ok\r\n", b"354 Go\r\n"
    async with ScriptedServer(ok, ok, go, ok + b"421 4.4.2 Idle too long\r\n") as server:
        pool = pool_factory(server.port)
        first = await pool.deliver(envelope(), ["a@x.example"])
        second = await pool.deliver(envelope(), ["b@x.example"])
    assert [first.replies["a@x.example"].code, second.replies["b@x.example"].code] == ["250"] * 2
    assert server.connections == 2


# -- Postfix's smtp-sink -----------------------------------------------------------------------

SinkStarter = Callable[..., Awaitable[PostfixSink]]


@pytest.fixture
async def smtp_sink() -> AsyncIterator[SinkStarter]:
    """``start(*flags)``: smtp-sink with those flags; stopped (by pid) after the test."""
    if not os.access(SMTP_SINK, os.X_OK):
        pytest.skip("Postfix's smtp-sink is not installed")
    sinks: list[PostfixSink] = []

    async def start(*flags: str) -> PostfixSink:
        sink = PostfixSink("127.0.0.1", free_port(), *flags)
        sinks.append(sink)
        return await sink.start()

    yield start
    for sink in sinks:
        await sink.stop()


@pytest.mark.parametrize("flags", [(), ("-p",)], ids=["pipelined", "one-by-one"])
async def test_into_smtp_sink(
    smtp_sink: SinkStarter, pool_factory: PoolFactory, flags: tuple[str, ...]
) -> None:
    sink = await smtp_sink(*flags)
    pool = pool_factory(sink.port)
    env = envelope()
    env.dsn_ret, env.dsn_envid = "HDRS", "ID+2B1"
    env.rcpt_params = {"b@x.example": {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;b@x.example"}}
    first = await pool.deliver(env, ["a@x.example", "b@x.example"])
    second = await pool.deliver(envelope(data=b"Subject: 2\r\n\r\nsecond\r\n"), ["c@x.example"])
    assert {r.code for r in [*first.replies.values(), *second.replies.values()]} == {"250"}
    # smtp-sink advertises DSN: the parameters went on, and the replies say so.
    assert {r.remote_dsn for r in first.replies.values()} == {True}
    await until(lambda: len(sink.dumps()) == 2)
    dumps = {d.message: d for d in sink.dumps()}
    one = dumps[MESSAGE.replace(b"\r\n", b"\n")]
    assert one.mail_args == "<a@example.org> BODY=8BITMIME ENVID=ID+2B1 RET=HDRS"
    assert one.rcpt_args == [
        "<a@x.example>",
        "<b@x.example> NOTIFY=SUCCESS ORCPT=rfc822;b@x.example",
    ]
    assert dumps[b"Subject: 2\n\nsecond\n"].mail_args == "<a@example.org>"


async def test_into_smtp_sink_without_dsn_or_8bitmime(
    smtp_sink: SinkStarter, pool_factory: PoolFactory
) -> None:
    sink = await smtp_sink("-N", "-8")
    env = envelope()
    env.dsn_ret = "FULL"
    env.rcpt_params = {"a@x.example": {"NOTIFY": "SUCCESS"}}
    delivery = await pool_factory(sink.port).deliver(env, ["a@x.example"])
    reply = delivery.replies["a@x.example"]
    assert (reply.code, reply.remote_dsn) == ("250", False)
    await until(lambda: len(sink.dumps()) == 1)
    [dump] = sink.dumps()
    # Nothing declared that the host did not offer; the 8-bit content went unchanged.
    assert (dump.mail_args, dump.rcpt_args) == ("<a@example.org>", ["<a@x.example>"])
    assert dump.message == MESSAGE.replace(b"\r\n", b"\n")


async def test_into_smtp_sink_with_auth(smtp_sink: SinkStarter, pool_factory: PoolFactory) -> None:
    sink = await smtp_sink()
    delivery = await pool_factory(sink.port, username="u", password="p").deliver(
        envelope(), ["a@x.example"]
    )
    assert delivery.replies["a@x.example"].code == "250"
    no_auth = await smtp_sink("-a")
    delivery = await pool_factory(no_auth.port, username="u", password="p").deliver(
        envelope(), ["a@x.example"]
    )
    reply = delivery.replies["a@x.example"]
    assert (reply.code, reply.enhanced_status_code, reply.command) == ("451", "4.7.4", "AUTH")
    assert delivery.host_failed


async def test_into_smtp_sink_refusing_recipients(
    smtp_sink: SinkStarter, pool_factory: PoolFactory
) -> None:
    sink = await smtp_sink("-f", "RCPT")
    delivery = await pool_factory(sink.port).deliver(envelope(), ["a@x.example", "b@x.example"])
    assert outcome(delivery.replies) == {
        "a@x.example": ("500", "RCPT TO"),
        "b@x.example": ("500", "RCPT TO"),
    }
    assert not delivery.host_failed
    assert sink.dumps() == []


async def test_into_smtp_sink_closing_with_421(
    smtp_sink: SinkStarter, pool_factory: PoolFactory
) -> None:
    sink = await smtp_sink("-Q", "RCPT")
    delivery = await pool_factory(sink.port).deliver(envelope(), ["a@x.example", "b@x.example"])
    reply = delivery.replies["a@x.example"]
    assert (reply.code, reply.command, reply.remote_ip) == ("421", "RCPT TO", "127.0.0.1")
    assert delivery.host_failed  # another host may do better
    assert sink.dumps() == []


# -- on uvloop, the daemon's loop ----------------------------------------------------------------


def test_on_uvloop_with_starttls(tls_files: TlsFiles) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def deliver() -> tuple[str | None, bool]:
        sink = await Sink(tls=tls_files.server_context(), pipelining=True).start()
        pool = SmtpPool("127.0.0.1", sink.port, SmtpRelayConfig(helo_name="relay.smtpq.test"))
        try:
            delivery = await pool.deliver(envelope(), ["a@x.example"])
        finally:
            await pool.close()
            await sink.stop()
        return delivery.replies["a@x.example"].code, sink.received[0].tls

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(deliver()) == ("250", True)
