"""DSNs end to end, through the daemon's own wiring (its config, disk storage, MX relay and
queue, from smtpq.daemon) with a manual clock: a real client submits to the edge, the relay
delivers by MX (a DNS server on loopback) to real SMTP sinks that answer per recipient, and the
DSNs travel back through the same queue to the sender's sink, where they are parsed with
Python's ``email`` package and held to RFC 3464's grammar (tests/dsn_grammar.py).

Sinks: aiosmtpd (no DSN support) for dest.example and the senders' origin.example; Postfix's
smtp-sink (which advertises DSN) for postfix.example.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import aiosmtplib
import pytest

from smtpq.clock import ManualClock
from smtpq.daemon.config import build_config
from smtpq.daemon.server import Shard, build_queue, build_relay, build_storage
from smtpq.dsn import xtext_encode
from smtpq.edge.server import SmtpEdge
from smtpq.queue import Queue, QueueEvent
from smtpq.queue.event import EventKind
from smtpq.relay.base import Relay
from smtpq.storage.base import QueueStorage
from tests.dsn_grammar import Dsn, check_dsn, typed
from tests.integration.smtp.dnsserver import DnsServer, Zone
from tests.integration.smtp.sink import PostfixSink, Sink

T0 = 1_800_000_000.0
HOUR = 3600.0
SENDER = "alice@origin.example"
MESSAGE = (
    b"From: Alice <alice@origin.example>\r\n"
    b"To: several\r\n"
    b"Subject: Quarterly figures\r\n"
    b"Message-ID: <dsn-1@origin.example>\r\n"
    b"\r\n"
    b"The figures.\r\n"
)
#: How aiosmtpd records the null reverse-path.
NULL_SENDER = ("", "<>")
HOSTS = {"dest": "127.0.0.1", "origin": "127.0.0.2", "two": "127.0.0.3", "postfix": "127.0.0.4"}


def date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def words(text: str) -> str:
    return " ".join(text.split())


def common_port() -> int:
    """A port free on every loopback address the sinks use (MX delivery has one port)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((HOSTS["dest"], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in HOSTS.values():
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on all sink addresses")


@dataclass
class Mta:
    """smtpq as the daemon wires it, on a manual clock, and what it did."""

    queue: Queue
    edge: SmtpEdge
    storage: QueueStorage
    relay: Relay
    clock: ManualClock
    sinks: dict[str, Sink]
    events: list[QueueEvent] = field(default_factory=list)

    def log(self, kind: EventKind) -> list[QueueEvent]:
        return [e for e in self.events if e.kind is kind]

    async def settle(self) -> None:
        """Until no attempt runs and nothing is due now."""
        async with asyncio.timeout(60):
            while True:
                if self.queue.inflight == 0:
                    due = await self.storage.next_due()
                    if due is None or due > self.clock.time():
                        for _ in range(3):  # let what just finished log its last lines
                            await asyncio.sleep(0)
                        if self.queue.inflight == 0:
                            return
                await asyncio.sleep(0.002)

    async def submit(
        self,
        rcpts: list[tuple[str, list[str]]],
        *,
        mail_options: list[str] | None = None,
        data: bytes = MESSAGE,
        utf8: bool = False,
    ) -> None:
        """Send one message through the edge (RCPT options per recipient), then settle."""
        encoding = "utf-8" if utf8 else "ascii"
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=self.edge.port,
            start_tls=False,
            local_hostname="client.origin.example",
        )
        async with client:
            await client.mail(SENDER, options=mail_options or [], encoding=encoding)
            for rcpt, options in rcpts:
                await client.rcpt(rcpt, options=options, encoding=encoding)
            await client.data(data)
        await self.settle()

    def dsns(self) -> list[Dsn]:
        """Every DSN the sender's sink received, checked."""
        origin = self.sinks["origin"]
        return [check_dsn(r.data) for r in origin.received if r.sender in NULL_SENDER]

    def attempts_to(self, rcpt: str) -> int:
        return sum(1 for address, _ in self.sinks["dest"].rcpt_log if address == rcpt)


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    zone = Zone()
    for name in ("dest", "origin", "two", "postfix"):
        zone.add(f"{name}.example", "MX", f"10 mx.{name}.example.")
        zone.add(f"mx.{name}.example", "A", HOSTS[name])
    zone.add("nullmx.example", "MX", "0 .")
    server = await DnsServer(zone).start()
    yield server
    await server.stop()


@pytest.fixture
async def mta(tmp_path: Path, dns: DnsServer) -> AsyncIterator[Mta]:
    port = common_port()
    sinks = {name: await Sink(HOSTS[name], port).start() for name in ("dest", "origin", "two")}
    postfix = await PostfixSink(HOSTS["postfix"], port).start()
    config = build_config(
        {
            "hostname": "mta.test.example",
            "storage": {"type": "disk", "path": str(tmp_path / "queue")},
            "mx": {"nameservers": [f"127.0.0.1:{dns.port}"], "port": port, "ipv6": False},
            "retry": {"delay_warnings": [4 * HOUR]},  # the rest as the daemon's defaults
        }
    )
    clock = ManualClock(T0)
    shard = Shard(0, tmp_path / "queue" / "shard-0", tmp_path / "admin.sock")
    storage = build_storage(config, shard)
    relay = build_relay(config)
    queue = build_queue(config, storage, relay, clock)
    edge = SmtpEdge(queue, replace(config.edge, port=0, reverse_lookup=False), clock=clock)
    await storage.get_info()  # loaded, as the daemon does before delivering
    await queue.start()
    await edge.start()
    mta = Mta(queue, edge, storage, relay, clock, sinks)
    mta.sinks["postfix"] = postfix  # type: ignore[assignment]  # kept for its transactions
    queue.observers.append(mta.events.append)
    yield mta
    await edge.stop(grace_period=1)
    await queue.stop(grace_period=1)
    await relay.close()
    await storage.close()
    for sink in sinks.values():
        await sink.stop()
    await postfix.stop()


def postfix(mta: Mta) -> PostfixSink:
    sink = mta.sinks["postfix"]
    assert isinstance(sink, PostfixSink)
    return sink


async def test_default_backoff_warns_once_at_the_first_attempt_after_four_hours(mta: Mta) -> None:
    dest = mta.sinks["dest"]
    dest.behaviour.rcpt["a"] = "452 4.2.2 <a@dest.example>: Mailbox full"
    dest.behaviour.rcpt["b"] = "451 4.7.1 <b@dest.example>: Greylisted, try again later"
    await mta.submit([("a@dest.example", []), ("b@dest.example", ["NOTIFY=FAILURE"])])
    rng = random.Random(1414)
    attempt_times: list[float] = [mta.clock.time()]
    dsn_times: list[float] = []
    while mta.clock.time() < T0 + 5 * 86400 + HOUR:
        # Time passes in uneven steps of 1 to 15 minutes: never exactly onto a threshold.
        await mta.clock.advance(rng.uniform(60, 900))
        attempts, dsns = mta.attempts_to("a@dest.example"), len(mta.sinks["origin"].received)
        await mta.settle()
        if mta.attempts_to("a@dest.example") > attempts:
            attempt_times.append(mta.clock.time())
        dsn_times += [mta.clock.time()] * (len(mta.sinks["origin"].received) - dsns)
    assert len(attempt_times) == mta.attempts_to("a@dest.example")
    warning, failure = mta.dsns()
    assert [r["Action"] for r in warning.recipients] == ["delayed"]
    # One warning, sent by the first attempt at or after 4 hours (a wake-up at the threshold).
    first_after = min(t for t in attempt_times if t >= T0 + 4 * HOUR)
    assert T0 + 4 * HOUR < first_after < T0 + 4 * HOUR + 900
    assert dsn_times[0] == first_after
    [fields] = warning.recipients
    assert fields["Final-Recipient"] == "rfc822; a@dest.example"  # b asked for no warning
    assert fields["Status"] == "4.2.2"
    assert fields["Diagnostic-Code"] == "smtp; 452 4.2.2 <a@dest.example>: Mailbox full"
    assert fields["Remote-MTA"] == "dns; mx.dest.example"
    assert fields["Will-Retry-Until"] == date(T0 + 5 * 86400)
    assert (
        "<a@dest.example>: host mx.dest.example[127.0.0.1] said: 452 4.2.2 <a@dest.example>: "
        "Mailbox full (in reply to RCPT TO command)" in words(warning.human)
    )
    [warned] = mta.log(EventKind.DELAY_WARNED)
    assert warned.recipients == ("a@dest.example",)
    # Given up when the lifetime ran out: 4.4.7, each last reply exactly as the host gave it.
    assert dsn_times[1] >= T0 + 5 * 86400
    assert [typed(r["Final-Recipient"])[1] for r in failure.recipients] == [
        "a@dest.example",
        "b@dest.example",
    ]
    a, b = failure.recipients
    assert a["Action"] == b["Action"] == "failed"
    assert a["Status"] == b["Status"] == "4.4.7"
    assert a["Diagnostic-Code"] == "smtp; 452 4.2.2 <a@dest.example>: Mailbox full"
    assert b["Diagnostic-Code"] == "smtp; 451 4.7.1 <b@dest.example>: Greylisted, try again later"
    attempts = len(attempt_times)
    gave_up = rf"given up after 5 days( \d+ minutes?)? and {attempts} attempts: the message expired"
    assert re.search(gave_up, words(failure.human))
    assert failure.returned is not None
    assert failure.returned.get_content_type() == "message/rfc822"
    assert 30 <= attempts <= 45
    assert (await mta.storage.get_info())["size"] == 0


async def test_four_recipients_four_reply_texts_one_dsn(mta: Mta) -> None:
    replies = {
        "a": "550 5.1.1 <a@dest.example>: Recipient address rejected: User unknown",
        "b": "552 5.2.2 <b@dest.example>: Mailbox full",
        "c": "554 5.7.1 <c@dest.example>: Relay access denied",
        "d": "553 5.1.3 <d@dest.example>: Bad recipient address syntax",
    }
    mta.sinks["dest"].behaviour.rcpt.update(replies)
    await mta.submit([(f"{x}@dest.example", []) for x in replies])
    [dsn] = mta.dsns()
    assert len(dsn.recipients) == 4
    for x, reply in replies.items():
        fields = dsn.recipient(f"{x}@dest.example")
        assert fields["Status"] == reply.split()[1]
        assert fields["Diagnostic-Code"] == f"smtp; {reply}"
        assert fields["Remote-MTA"] == "dns; mx.dest.example"
        assert fields["Original-Recipient"] == f"rfc822; {x}@dest.example"
        assert f"<{x}@dest.example>: host mx.dest.example[127.0.0.1] said: {reply}" in words(
            dsn.human
        )
    assert "Subject: Quarterly figures" in dsn.human
    assert "postmaster@mta.test.example" in dsn.human
    assert dsn.message["From"] == "Mail Delivery System <MAILER-DAEMON@mta.test.example>"
    # The log names every recipient once, each line with its own reply, all with this DSN.
    bounced = mta.log(EventKind.BOUNCED)
    assert sorted(r for e in bounced for r in e.recipients) == [f"{x}@dest.example" for x in "abcd"]
    assert len({e.detail["dsn"] for e in bounced}) == 1


async def test_envid_and_orcpt_xtext_round_trip(mta: Mta) -> None:
    mta.sinks["dest"].behaviour.rcpt["a"] = "550 5.1.1 no such user"
    envid, orcpt_a, orcpt_b = "batch+7=1 of 2", "Orig+bad3@dest.example", "B+list=x@postfix.example"
    await mta.submit(
        [
            ("a@dest.example", [f"ORCPT=rfc822;{xtext_encode(orcpt_a)}"]),
            ("b@postfix.example", [f"ORCPT=rfc822;{xtext_encode(orcpt_b)}", "NOTIFY=FAILURE"]),
        ],
        mail_options=[f"ENVID={xtext_encode(envid)}", "RET=HDRS"],
    )
    # Decoded in the DSN...
    [dsn] = mta.dsns()
    assert dsn.per_message["Original-Envelope-Id"] == envid
    assert dsn.recipient("a@dest.example")["Original-Recipient"] == f"rfc822; {orcpt_a}"
    assert dsn.returned is not None
    assert dsn.returned.get_content_type() == "text/rfc822-headers"  # RET=HDRS
    # ...and passed on as the client encoded them to a next hop that supports DSN.
    [transaction] = postfix(mta).transactions()
    assert f"X-Mail-Args: <{SENDER}> " in transaction
    assert f"ENVID={xtext_encode(envid)}" in transaction
    assert "RET=HDRS" in transaction
    assert (
        f"X-Rcpt-Args: <b@postfix.example> NOTIFY=FAILURE ORCPT=rfc822;{xtext_encode(orcpt_b)}"
        in transaction
    )


async def test_notify_success_with_and_without_dsn_at_the_next_hop(mta: Mta) -> None:
    await mta.submit(
        [
            ("a@dest.example", ["NOTIFY=SUCCESS"]),  # aiosmtpd: no DSN there
            ("b@postfix.example", ["NOTIFY=SUCCESS"]),  # smtp-sink: DSN advertised
            ("c@two.example", []),
        ]
    )
    # Without DSN at the next hop: smtpq reports "relayed"; with it, the next hop was asked to.
    [dsn] = mta.dsns()
    [fields] = dsn.recipients
    assert fields["Final-Recipient"] == "rfc822; a@dest.example"
    assert (fields["Action"], fields["Status"]) == ("relayed", "2.0.0")
    assert fields["Remote-MTA"] == "dns; mx.dest.example"
    assert fields["Diagnostic-Code"].startswith("smtp; 250 ")
    assert dsn.message["Subject"] == "Successful Mail Delivery Report"
    [transaction] = postfix(mta).transactions()
    assert "X-Rcpt-Args: <b@postfix.example> NOTIFY=SUCCESS" in transaction
    [notified] = mta.log(EventKind.SUCCESS_NOTIFIED)
    assert notified.recipients == ("a@dest.example",)
    # One delivered line per destination, each naming its own relay and recipients.
    delivered = {
        e.recipients: str(e) for e in mta.log(EventKind.DELIVERED) if e.id != notified.detail["dsn"]
    }
    assert "relay=mx.dest.example[127.0.0.1]" in delivered[("a@dest.example",)]
    assert "relay=mx.postfix.example[127.0.0.4]" in delivered[("b@postfix.example",)]
    assert "relay=mx.two.example[127.0.0.3]" in delivered[("c@two.example",)]


async def test_smtputf8_message_gets_a_global_dsn(mta: Mta) -> None:
    mta.sinks["dest"].behaviour.rcpt["jürgen"] = "550 5.1.1 Unbekannter Empfänger"
    data = MESSAGE.replace(b"Quarterly figures", "Quartalszahlen für Jürgen".encode())
    await mta.submit([("jürgen@dest.example", [])], mail_options=["SMTPUTF8"], data=data, utf8=True)
    [dsn] = mta.dsns()
    assert dsn.report_type == "global-delivery-status"
    [fields] = dsn.recipients
    assert fields["Final-Recipient"] == "utf-8; jürgen@dest.example"
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 Unbekannter Empfänger"
    assert dsn.returned is not None
    assert dsn.returned.get_content_type() == "message/global"
    assert "Subject: Quartalszahlen für Jürgen" in dsn.human
    # The sender's server offers SMTPUTF8: the DSN went to it as an SMTPUTF8 message.
    [received] = [r for r in mta.sinks["origin"].received if r.sender in NULL_SENDER]
    assert "SMTPUTF8" in received.mail_options


async def test_locally_generated_failures_are_not_smtp_diagnostics(mta: Mta) -> None:
    await mta.submit([("e@nullmx.example", []), ("f@nowhere.example", [])])
    [dsn] = mta.dsns()
    e, f = dsn.recipient("e@nullmx.example"), dsn.recipient("f@nowhere.example")
    assert e["Status"] == "5.1.10"
    assert (
        e["Diagnostic-Code"]
        == "x-local; 556 5.1.10 Domain nullmx.example accepts no mail (null MX)"
    )
    assert f["Diagnostic-Code"] == "x-local; 550 5.1.2 Domain nowhere.example does not exist"
    assert "Remote-MTA" not in e
    assert "Remote-MTA" not in f
    assert "<f@nowhere.example>: 550 5.1.2 Domain nowhere.example does not exist" in words(
        dsn.human
    )
