"""The one place where network, session and DNS failures become replies: pure."""

from __future__ import annotations

import random
import ssl

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest

from smtpq.relay.mx import MxSmtpRelay, _NoRoute, parse_nameserver, reply_for_dns_error
from smtpq.relay.session import ConnectionLost, ReplyError, SessionTimeout
from smtpq.relay.smtp import reply_for_error
from smtpq.reply import Reply
from smtpq.smtp.client import Auth, ClientConnection, Hello, StartTls
from smtpq.smtp.errors import LocalProtocolError, ProtocolError, RemoteProtocolError


def refusal_of(*commands: Hello | StartTls | Auth) -> ProtocolError:
    """What the client core raises for the last command, on a session offering nothing."""
    conn = ClientConnection(remote_host="mx.example")
    conn.receive_data(b"220 mx\r\n250 mx\r\n")
    conn.next_event()
    try:
        for command in commands:
            conn.send(command)
            conn.next_event()
    except ProtocolError as exc:
        return exc
    raise AssertionError("no refusal")


@pytest.mark.parametrize(
    ("exc", "command", "code", "esc", "words"),
    [
        (ConnectionRefusedError(111, "Connect"), "CONNECT", "451", "4.4.1", "connection refused"),
        (TimeoutError(), "CONNECT", "451", "4.4.1", "timed out"),
        (SessionTimeout("CONNECT"), "CONNECT", "451", "4.4.1", "timed out"),
        (ConnectionLost("CONNECT"), "CONNECT", "451", "4.4.1", "connection closed"),
        (
            ReplyError(Reply("554", "5.3.2 go away")),
            "CONNECT",
            "451",
            "4.4.1",
            "554 5.3.2 go away",
        ),
        (ReplyError(Reply("421", "4.3.2 busy")), "CONNECT", "421", "4.3.2", "busy"),
        (SessionTimeout("DATA"), "DATA", "451", "4.4.2", "reply to DATA"),
        (ConnectionLost("RCPT TO"), "RCPT TO", "451", "4.4.2", "lost"),
        (ConnectionResetError(104, "reset"), "MAIL FROM", "451", "4.4.2", "lost"),
        (ssl.SSLCertVerificationError("bad cert"), "STARTTLS", "451", "4.7.5", "TLS"),
        (
            refusal_of(Hello("c.example"), StartTls()),
            "STARTTLS",
            "451",
            "4.7.4",
            "STARTTLS is required",
        ),
        (
            refusal_of(Hello("c.example"), Auth("u", "p")),
            "AUTH",
            "451",
            "4.7.4",
            "AUTH is required",
        ),
        (
            ReplyError(Reply("535", "5.7.8 Bad credentials")),
            "AUTH",
            "451",
            "4.7.8",
            "Bad credentials",
        ),
        (ReplyError(Reply("550", "5.7.1 Go away")), "EHLO", "451", "4.7.1", "Go away"),
        (ReplyError(Reply("554", "5.6.0 Bad content")), "DATA", "554", "5.6.0", "content"),
        (
            RemoteProtocolError("garbage", Reply("451", "4.4.2 Bad connection: malformed")),
            "RCPT TO",
            "451",
            "4.4.2",
            "malformed",
        ),
        (RuntimeError("bug"), "DATA", "450", "4.0.0", "Unexpected"),
        (
            LocalProtocolError("misuse", Reply("450", "4.0.0 Unexpected error")),
            "MAIL FROM",
            "450",
            "4.0.0",
            "Unexpected",
        ),
    ],
)
def test_reply_for_error(exc: BaseException, command: str, code: str, esc: str, words: str) -> None:
    reply = reply_for_error(exc, host="mx.example", command=command, ip="192.0.2.7")
    assert reply.code == code
    assert reply.enhanced_status_code == esc
    assert words in (reply.message or "")
    assert reply.command == command
    assert reply.remote_host == "mx.example"
    assert reply.remote_ip == "192.0.2.7"


@pytest.mark.parametrize(
    ("kind", "code", "esc"),
    [
        (dns.resolver.NXDOMAIN, "550", "5.1.2"),
        (dns.resolver.NoAnswer, "550", "5.4.4"),
        (None, "550", "5.4.4"),
        (dns.resolver.NoNameservers, "451", "4.4.3"),
        (dns.exception.Timeout, "451", "4.4.3"),
        (UnicodeError, "550", "5.1.2"),
    ],
)
def test_reply_for_dns_error(kind: type[BaseException] | None, code: str, esc: str) -> None:
    reply = reply_for_dns_error(kind() if kind else None, "example.test")
    assert (reply.code, reply.enhanced_status_code) == (code, esc)
    assert "example.test" in (reply.message or "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", ("192.0.2.1", 53)),
        ("192.0.2.1:5353", ("192.0.2.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[2001:db8::1]", ("2001:db8::1", 53)),
    ],
)
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


def test_nameserver_must_be_an_address() -> None:
    with pytest.raises(ValueError, match="does not appear to be"):
        parse_nameserver("ns.example")


def mx(*texts: str) -> list[dns.rdata.Rdata]:
    return [dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, t) for t in texts]


def test_mx_by_preference_random_among_equals() -> None:
    relay = MxSmtpRelay(rng=random.Random(7))
    records = mx("20 c.example.", "10 a.example.", "10 b.example.", "30 d.example.")
    orders = {tuple(h.to_text() for h in relay._mx_hosts(records, "x")) for _ in range(40)}
    assert orders == {
        ("a.example.", "b.example.", "c.example.", "d.example."),
        ("b.example.", "a.example.", "c.example.", "d.example."),
    }


def test_null_mx() -> None:
    with pytest.raises(_NoRoute) as caught:
        MxSmtpRelay()._mx_hosts(mx("0 ."), "nomail.example")
    reply = caught.value.reply
    assert reply == Reply("556", "5.1.10 Domain nomail.example accepts no mail (null MX)")
    # A null MX beside real ones (a misconfiguration RFC 7505 forbids) is ignored.
    hosts = MxSmtpRelay()._mx_hosts(mx("0 .", "10 a.example."), "x")
    assert [h.to_text() for h in hosts] == ["a.example."]
    assert dns.name.root not in hosts
