"""The sans-IO SMTP client, exchange by exchange: bytes in, events out, no loop. Pure."""

from __future__ import annotations

import gc

import pytest

from smtpq.reply import Reply
from smtpq.smtp.client import (
    Auth,
    AuthDone,
    ClientConnection,
    ClientEvent,
    ClientState,
    Closed,
    Greeting,
    Hello,
    HelloDone,
    Quit,
    QuitDone,
    Reset,
    ResetDone,
    StartTls,
    StartTlsDone,
    Transaction,
    TransactionDone,
)
from smtpq.smtp.errors import LocalProtocolError, RemoteProtocolError

PIPELINING = b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
ONE_BY_ONE = b"250-mx.example\r\n250 8BITMIME\r\n"
MESSAGE = b"Subject: t\r\n\r\n.dot\r\nbody\r\n"


def session(ehlo: bytes = PIPELINING, chunking: bool = True) -> ClientConnection:
    """A connection greeted and past EHLO with ``ehlo`` as the server's reply."""
    conn = ClientConnection(remote_host="mx.example", remote_ip="192.0.2.1", chunking=chunking)
    conn.receive_data(b"220 mx.example ESMTP\r\n")
    assert isinstance(conn.next_event(), Greeting)
    conn.send(Hello("client.example"))
    assert conn.data_to_send() == b"EHLO client.example\r\n"
    conn.receive_data(ehlo)
    event = conn.next_event()
    assert isinstance(event, HelloDone)
    assert event.reply.is_success()
    return conn


def state(conn: ClientConnection) -> ClientState:
    """The state now (a call, so that the type checker does not narrow it across sends)."""
    return conn.state


def feed(conn: ClientConnection, data: bytes) -> ClientEvent | None:
    conn.receive_data(data)
    return conn.next_event()


def done(event: ClientEvent | None) -> TransactionDone:
    assert isinstance(event, TransactionDone)
    return event


def codes(event: ClientEvent | None) -> dict[str, tuple[str | None, str | None]]:
    return {rcpt: (r.code, r.command) for rcpt, r in done(event).replies.items()}


def tx(
    *recipients: str, content: bytes | tuple[bytes, ...] = MESSAGE, **kwargs: object
) -> Transaction:
    return Transaction("a@example.org", recipients, content, **kwargs)  # type: ignore[arg-type]


# -- greeting and hello ------------------------------------------------------------------------


def test_greeting_multiline_and_refused() -> None:
    conn = ClientConnection()
    assert conn.awaiting == "CONNECT"
    assert feed(conn, b"220-mx.example ESMTP\r\n220 ") is None  # half a reply
    event = feed(conn, b"welcome\r\n")
    assert isinstance(event, Greeting)
    assert (event.reply.code, event.reply.text) == ("220", "mx.example ESMTP welcome")
    refused = ClientConnection()
    event = feed(refused, b"554 5.3.2 No service\r\n")
    assert isinstance(event, Greeting)
    assert event.reply.code == "554"
    assert state(refused) is ClientState.CLOSED


def test_ehlo_extensions() -> None:
    conn = session(
        b"250-mx.example hello\r\n250-pipelining\r\n250-SIZE 1000\r\n250-AUTH=LOGIN\r\n"
        b"250-AUTH PLAIN login\r\n250-DSN\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250-STARTTLS\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-BINARYMIME\r\n250-X-ODD with params\r\n250 \r\n"
    )
    ext = conn.extensions
    assert (ext.pipelining, ext.size, ext.dsn, ext.smtputf8, ext.chunking) == (
        True,
        1000,
        True,
        True,
        True,
    )
    assert (ext.starttls, ext.enhancedstatuscodes, ext.binarymime, ext.eightbitmime) == (
        True,
        True,
        True,
        False,
    )
    assert ext.auth == {"LOGIN", "PLAIN"}
    assert ext.keywords["X-ODD"] == "with params"
    assert state(conn) is ClientState.READY
    assert session(b"250-mx\r\n250 SIZE\r\n").extensions.size == 0  # SIZE without a limit


def test_ehlo_refused_falls_back_to_helo() -> None:
    conn = ClientConnection()
    feed(conn, b"220 old.example\r\n")
    conn.send(Hello("client.example"))
    conn.data_to_send()
    assert feed(conn, b"502 5.5.1 Command not implemented\r\n") is None
    assert conn.data_to_send() == b"HELO client.example\r\n"
    assert conn.awaiting == "HELO"
    event = feed(conn, b"250 old.example\r\n")
    assert isinstance(event, HelloDone)
    assert (event.reply.code, event.reply.command) == ("250", "HELO")
    assert not event.extensions.pipelining
    assert state(conn) is ClientState.READY


@pytest.mark.parametrize(
    ("reply", "state"), [(b"421 4.3.2 Busy\r\n", "closed"), (b"451 4.3.0 Later\r\n", "greeted")]
)
def test_ehlo_failures_without_fallback(reply: bytes, state: str) -> None:
    conn = ClientConnection()
    feed(conn, b"220 mx\r\n")
    conn.send(Hello("c.example"))
    event = feed(conn, reply)
    assert isinstance(event, HelloDone)
    assert event.reply.code == reply[:3].decode()
    assert conn.data_to_send() == b"EHLO c.example\r\n"  # no HELO
    assert conn.state.value == state


# -- STARTTLS and AUTH -------------------------------------------------------------------------


def test_starttls() -> None:
    conn = session(b"250-mx\r\n250 STARTTLS\r\n")
    conn.send(StartTls())
    assert conn.data_to_send() == b"STARTTLS\r\n"
    # Bytes after the 220 were sent before the handshake: never taken as said under TLS.
    event = feed(conn, b"220 2.0.0 Ready\r\n250 injected\r\n")
    assert isinstance(event, StartTlsDone)
    assert event.reply.code == "220"
    assert state(conn) is ClientState.TLS
    assert conn.next_event() is None
    conn.tls_started()
    assert state(conn) is ClientState.GREETED
    assert not conn.extensions.starttls
    conn.send(Hello("c.example"))
    assert conn.data_to_send() == b"EHLO c.example\r\n"
    assert isinstance(feed(conn, b"250 mx\r\n"), HelloDone)


def test_starttls_refused_and_not_offered() -> None:
    conn = session(b"250-mx\r\n250 STARTTLS\r\n")
    conn.send(StartTls())
    event = feed(conn, b"454 4.7.0 TLS not available\r\n")
    assert isinstance(event, StartTlsDone)
    assert state(conn) is ClientState.READY  # the session goes on in plain text
    with pytest.raises(LocalProtocolError) as caught:
        session().send(StartTls())
    reply = caught.value.reply
    assert (reply.code, reply.enhanced_status_code, reply.command) == ("451", "4.7.4", "STARTTLS")
    assert reply.remote_host == "mx.example"


def test_auth_plain() -> None:
    conn = session(b"250-mx\r\n250 AUTH LOGIN PLAIN\r\n")
    conn.send(Auth("user", "pass"))
    assert conn.data_to_send() == b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n"
    event = feed(conn, b"235 2.7.0 Authentication successful\r\n")
    assert isinstance(event, AuthDone)
    assert event.reply.code == "235"
    assert state(conn) is ClientState.READY
    assert "pass" not in repr(Auth("user", "pass"))


def test_auth_login_and_refusal() -> None:
    conn = session(b"250-mx\r\n250 AUTH LOGIN\r\n")
    conn.send(Auth("user", "pass"))
    assert conn.data_to_send() == b"AUTH LOGIN\r\n"
    assert feed(conn, b"334 VXNlcm5hbWU6\r\n") is None
    assert conn.data_to_send() == b"dXNlcg==\r\n"
    assert feed(conn, b"334 UGFzc3dvcmQ6\r\n") is None
    assert conn.data_to_send() == b"cGFzcw==\r\n"
    event = feed(conn, b"535 5.7.8 Bad credentials\r\n")
    assert isinstance(event, AuthDone)
    assert (event.reply.code, event.reply.command) == ("535", "AUTH")
    assert state(conn) is ClientState.READY


def test_auth_extra_challenge_is_cancelled() -> None:
    conn = session(b"250-mx\r\n250 AUTH LOGIN\r\n")
    conn.send(Auth("u", "p"))
    conn.data_to_send()
    for _ in range(2):
        feed(conn, b"334 more\r\n")
        conn.data_to_send()
    assert feed(conn, b"334 and more?\r\n") is None
    assert conn.data_to_send() == b"*\r\n"  # RFC 4954 §4: cancel
    assert isinstance(feed(conn, b"501 5.7.0 Cancelled\r\n"), AuthDone)


@pytest.mark.parametrize(
    ("ehlo", "words"),
    [(PIPELINING, "AUTH is required"), (b"250-mx\r\n250 AUTH CRAM-MD5\r\n", "offers CRAM-MD5")],
)
def test_auth_not_possible(ehlo: bytes, words: str) -> None:
    with pytest.raises(LocalProtocolError) as caught:
        session(ehlo).send(Auth("u", "p"))
    reply = caught.value.reply
    assert (reply.code, reply.enhanced_status_code, reply.command) == ("451", "4.7.4", "AUTH")
    assert words in reply.text


# -- transactions ------------------------------------------------------------------------------


def test_pipelined_transaction_is_one_write() -> None:
    conn = session()
    conn.send(tx("ok@x.example", "busy@x.example", "gone@x.example"))
    assert conn.data_to_send() == (
        b"MAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<ok@x.example>\r\nRCPT TO:<busy@x.example>\r\nRCPT TO:<gone@x.example>\r\n"
        b"DATA\r\n"
    )
    assert conn.awaiting == "MAIL FROM"
    assert feed(conn, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n451 4.2.0 Busy\r\n") is None
    assert conn.awaiting == "RCPT TO"
    assert feed(conn, b"550 5.1.1 No such user\r\n354 Go ahead\r\n") is None
    assert conn.data_to_send() == b"Subject: t\r\n\r\n..dot\r\nbody\r\n.\r\n"
    assert conn.awaiting == "DATA"
    event = feed(conn, b"250 2.0.0 Ok: queued as X\r\n")
    assert codes(event) == {
        "ok@x.example": ("250", "DATA"),
        "busy@x.example": ("451", "RCPT TO"),
        "gone@x.example": ("550", "RCPT TO"),
    }
    ok = done(event).replies["ok@x.example"]
    assert (ok.address, ok.remote_host, ok.remote_ip, ok.remote_dsn) == (
        "ok@x.example",
        "mx.example",
        "192.0.2.1",
        False,
    )
    assert ok.message == "2.0.0 Ok: queued as X"
    assert done(event).replies["gone@x.example"].remote_dsn is None  # only successes say
    assert not done(event).closing
    assert state(conn) is ClientState.READY


def test_pipelined_no_recipient_accepted() -> None:
    # RFC 2920 §3.1: DATA's refusal is nobody's outcome, and the transaction is left open.
    conn = session()
    conn.send(tx("a@x.example", "b@x.example"))
    conn.data_to_send()
    event = feed(conn, b"250 Ok\r\n550 No\r\n450 Later\r\n554 5.5.1 No valid recipients\r\n")
    assert codes(event) == {"a@x.example": ("550", "RCPT TO"), "b@x.example": ("450", "RCPT TO")}
    assert conn.data_to_send() == b""
    assert state(conn) is ClientState.DIRTY
    conn.send(Reset())
    assert conn.data_to_send() == b"RSET\r\n"
    event2 = feed(conn, b"250 2.0.0 Ok\r\n")
    assert isinstance(event2, ResetDone)
    assert state(conn) is ClientState.READY


def test_pipelined_no_recipient_accepted_but_354() -> None:
    conn = session()
    conn.send(tx("a@x.example"))
    conn.data_to_send()
    assert feed(conn, b"250 Ok\r\n550 No\r\n354 Go ahead anyway\r\n") is None
    assert conn.data_to_send() == b".\r\n"  # a lone dot: nothing of the message
    event = feed(conn, b"554 5.5.1 No recipients\r\n")
    assert codes(event) == {"a@x.example": ("550", "RCPT TO")}
    assert state(conn) is ClientState.READY


def test_pipelined_mail_refused() -> None:
    conn = session()
    conn.send(tx("a@x.example", "b@x.example"))
    conn.data_to_send()
    event = feed(conn, b"553 5.7.1 Sender rejected\r\n503 5.5.1 No MAIL\r\n503 No MAIL\r\n")
    assert event is None
    event = feed(conn, b"503 5.5.1 No MAIL\r\n")
    assert codes(event) == {
        "a@x.example": ("553", "MAIL FROM"),
        "b@x.example": ("553", "MAIL FROM"),
    }
    assert state(conn) is ClientState.READY  # no transaction began


def test_one_by_one_without_pipelining() -> None:
    conn = session(ONE_BY_ONE)
    conn.send(tx("a@x.example", "b@x.example"))
    assert conn.data_to_send() == b"MAIL FROM:<a@example.org>\r\n"
    assert feed(conn, b"250 Ok\r\n") is None
    assert conn.data_to_send() == b"RCPT TO:<a@x.example>\r\n"
    assert feed(conn, b"550 No\r\n") is None
    assert conn.data_to_send() == b"RCPT TO:<b@x.example>\r\n"
    assert feed(conn, b"250 Ok\r\n") is None
    assert conn.data_to_send() == b"DATA\r\n"
    assert feed(conn, b"354 Go\r\n") is None
    assert conn.data_to_send().endswith(b"\r\n.\r\n")
    event = feed(conn, b"250 Queued\r\n")
    assert codes(event) == {"a@x.example": ("550", "RCPT TO"), "b@x.example": ("250", "DATA")}


def test_one_by_one_no_recipient_accepted_sends_no_data() -> None:
    conn = session(ONE_BY_ONE)
    conn.send(tx("a@x.example"))
    conn.data_to_send()
    feed(conn, b"250 Ok\r\n")
    assert conn.data_to_send() == b"RCPT TO:<a@x.example>\r\n"
    event = feed(conn, b"550 No\r\n")
    assert codes(event) == {"a@x.example": ("550", "RCPT TO")}
    assert conn.data_to_send() == b""
    assert state(conn) is ClientState.DIRTY


def test_data_refused_and_content_refused() -> None:
    conn = session()
    conn.send(tx("a@x.example"))
    conn.data_to_send()
    event = feed(conn, b"250 Ok\r\n250 Ok\r\n451 4.3.0 Not now\r\n")
    assert codes(event) == {"a@x.example": ("451", "DATA")}
    assert state(conn) is ClientState.DIRTY  # MAIL accepted, no content: RSET first
    conn = session()
    conn.send(tx("a@x.example"))
    conn.data_to_send()
    feed(conn, b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
    event = feed(conn, b"554 5.6.0 Content rejected\r\n")
    assert codes(event) == {"a@x.example": ("554", "DATA")}
    assert state(conn) is ClientState.READY  # the content's reply ends the transaction


def test_421_mid_pipeline() -> None:
    conn = session()
    conn.send(tx("a@x.example", "b@x.example", "c@x.example"))
    conn.data_to_send()
    event = feed(conn, b"250 Ok\r\n550 No\r\n250 Ok\r\n421 4.3.2 Shutting down\r\n")
    outcome = done(event)
    assert outcome.closing
    assert codes(event) == {
        "a@x.example": ("550", "RCPT TO"),
        "b@x.example": ("421", "RCPT TO"),
        "c@x.example": ("421", "RCPT TO"),
    }
    assert state(conn) is ClientState.CLOSED
    assert feed(conn, b"503 more\r\n") is None  # whatever follows is ignored


def test_chunking_pipelined_is_one_round_trip() -> None:
    conn = session(b"250-mx\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SIZE 100000\r\n")
    conn.send(tx("a@x.example", content=b".dot\nline\n"))
    content = b".dot\r\nline\r\n"  # canonical line endings, no dot-stuffing
    assert conn.data_to_send() == (
        b"MAIL FROM:<a@example.org> SIZE=12\r\nRCPT TO:<a@x.example>\r\nBDAT 12 LAST\r\n" + content
    )
    event = feed(conn, b"250 Ok\r\n250 Ok\r\n250 2.0.0 Queued\r\n")
    assert codes(event) == {"a@x.example": ("250", "BDAT")}
    assert state(conn) is ClientState.READY


def test_chunking_refusals_leave_the_transaction_to_reset() -> None:
    conn = session(b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
    conn.send(tx("a@x.example"))
    conn.data_to_send()
    event = feed(conn, b"250 Ok\r\n250 Ok\r\n452 4.3.1 Out of space\r\n")
    assert codes(event) == {"a@x.example": ("452", "BDAT")}
    assert state(conn) is ClientState.DIRTY  # RFC 3030 §4.2: undetermined, RSET
    conn = session(b"250-mx\r\n250 CHUNKING\r\n")  # no pipelining
    conn.send(tx("a@x.example"))
    conn.data_to_send()
    feed(conn, b"250 Ok\r\n")
    assert conn.data_to_send() == b"RCPT TO:<a@x.example>\r\n"
    feed(conn, b"250 Ok\r\n")
    assert conn.data_to_send() == b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE


@pytest.mark.parametrize("chunking", [False, True])
def test_a_message_in_parts_is_sent_without_a_copy_of_its_body(chunking: bool) -> None:
    ehlo = b"250-mx\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SIZE 100000\r\n"
    conn = session(ehlo, chunking=chunking)
    header, body = b"Subject: t\r\n\r\n", b"line\r\n" * 1000
    conn.send(tx("a@x.example", content=(header, body)))
    sent = conn.chunks_to_send()
    if not chunking:
        assert feed(conn, b"250 Ok\r\n250 Ok\r\n354 Go\r\n") is None
        sent = conn.chunks_to_send()
    assert any(chunk is body for chunk in sent)  # the very object: not joined, not copied
    assert conn.chunks_to_send() == []


def test_a_part_that_needs_its_dots_doubled_or_its_line_endings_made() -> None:
    conn = session(ONE_BY_ONE)
    conn.send(tx("a@x.example", content=(b"Subject: t\n\n", b".dot\r\nend")))
    for reply in (b"250 Ok\r\n", b"250 Ok\r\n", b"354 Go\r\n"):
        conn.data_to_send()
        assert feed(conn, reply) is None
    assert conn.data_to_send() == b"Subject: t\r\n\r\n..dot\r\nend\r\n.\r\n"


def test_chunking_can_be_turned_off() -> None:
    conn = session(b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n", chunking=False)
    conn.send(tx("a@x.example"))
    assert conn.data_to_send().endswith(b"\r\nDATA\r\n")


def test_binarymime() -> None:
    binary = b"\x00\x01\n\r raw"
    conn = session(b"250-mx\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 BINARYMIME\r\n")
    conn.send(tx("a@x.example", content=binary, body="BINARYMIME"))
    assert conn.data_to_send().endswith(
        b"BODY=BINARYMIME\r\nRCPT TO:<a@x.example>\r\nBDAT 8 LAST\r\n" + binary
    )
    conn = session()  # no CHUNKING: refused here, nothing sent
    conn.send(tx("a@x.example", content=binary, body="BINARYMIME"))
    assert conn.data_to_send() == b""
    reply = done(conn.next_event()).replies["a@x.example"]
    assert (reply.code, reply.enhanced_status_code) == ("554", "5.6.3")
    assert state(conn) is ClientState.READY


def test_size_declared_and_enforced() -> None:
    conn = session(b"250-mx\r\n250-PIPELINING\r\n250 SIZE 20\r\n")
    conn.send(tx("a@x.example", content=b"x" * 30))
    assert conn.data_to_send() == b""
    reply = done(conn.next_event()).replies["a@x.example"]
    assert (reply.code, reply.enhanced_status_code, reply.remote_host) == (
        "552",
        "5.3.4",
        "mx.example",
    )
    conn.send(tx("a@x.example", content=b"small"))
    assert conn.data_to_send().startswith(b"MAIL FROM:<a@example.org> SIZE=7\r\n")


def test_8bitmime_declared_when_offered() -> None:
    eight = b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n"
    conn = session()
    conn.send(tx("a@x.example", content=eight))  # 8-bit content, not declared: declared here
    assert conn.data_to_send().startswith(b"MAIL FROM:<a@example.org> BODY=8BITMIME\r\n")
    conn = session(b"250-mx\r\n250 PIPELINING\r\n")  # a 7-bit host: sent as it is, undeclared
    conn.send(tx("a@x.example", content=eight, body="8BITMIME"))
    feed(conn, b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
    sent = conn.data_to_send()
    assert sent.startswith(b"MAIL FROM:<a@example.org>\r\n")
    assert sent.endswith(eight + b".\r\n")


def test_smtputf8() -> None:
    utf8 = Transaction("jürgen@bücher.example", ("zoë@例え.example",), b"x\r\n", smtputf8=True)
    conn = session(b"250-mx\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")
    conn.send(utf8)
    assert conn.data_to_send().startswith(
        "MAIL FROM:<jürgen@bücher.example> SMTPUTF8\r\nRCPT TO:<zoë@例え.example>\r\n".encode()
    )
    conn = session()
    conn.send(utf8)
    assert conn.data_to_send() == b""
    reply = done(conn.next_event()).replies["zoë@例え.example"]
    assert (reply.code, reply.enhanced_status_code, reply.command) == ("554", "5.6.7", "MAIL FROM")


def test_dsn_parameters_only_where_offered() -> None:
    dsn = tx(
        "a@x.example",
        ret="HDRS",
        envid="ID+2B1",
        rcpt_params={"a@x.example": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a@x.example"}},
    )
    conn = session(b"250-mx\r\n250-PIPELINING\r\n250 DSN\r\n")
    conn.send(dsn)
    assert conn.data_to_send().startswith(
        b"MAIL FROM:<a@example.org> ENVID=ID+2B1 RET=HDRS\r\n"
        b"RCPT TO:<a@x.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@x.example\r\n"
    )
    event = feed(conn, b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
    assert event is None
    assert done(feed(conn, b"250 Ok\r\n")).replies["a@x.example"].remote_dsn is True
    conn = session()
    conn.send(dsn)
    assert b"NOTIFY" not in conn.data_to_send()


def test_unsendable_addresses() -> None:
    conn = session()
    conn.send(Transaction("bad sender@x", ("a@x.example",), MESSAGE))
    reply = done(conn.next_event()).replies["a@x.example"]
    assert (reply.code, reply.enhanced_status_code, reply.remote_host) == ("553", "5.1.7", None)
    conn.send(tx("<evil>@x.example", "ok@x.example", '"quoted local"@x.example'))
    sent = conn.data_to_send()
    assert b"evil" not in sent
    assert b'RCPT TO:<"quoted local"@x.example>' in sent
    event = feed(conn, b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 Go\r\n250 Done\r\n")
    assert codes(event) == {
        "<evil>@x.example": ("553", "RCPT TO"),
        "ok@x.example": ("250", "DATA"),
        '"quoted local"@x.example': ("250", "DATA"),
    }


# -- errors, the end of the connection ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"hello there\r\n", "malformed"),
        (b"25 short\r\n", "malformed"),
        (b"650 bad class\r\n", "malformed"),
        (b"250-one\r\n251 two\r\n", "differing codes"),
        (b"250 " + b"x" * 600 + b"\r\n", "over 512"),
        (b"250 " + b"x" * 600, "over 512"),  # no line end yet: refused before buffering more
        (b"354 Go\r\n", "unexpected reply 354 to MAIL FROM"),
    ],
)
def test_bad_replies_are_remote_protocol_errors(data: bytes, words: str) -> None:
    conn = session()
    conn.send(tx("a@x.example"))
    with pytest.raises(RemoteProtocolError, match=words) as caught:
        feed(conn, data)
    reply = caught.value.reply
    assert (reply.code, reply.enhanced_status_code, reply.command) == ("451", "4.4.2", "MAIL FROM")
    assert (reply.remote_host, reply.remote_ip) == ("mx.example", "192.0.2.1")
    assert state(conn) is ClientState.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_a_250_to_data_is_never_a_delivery() -> None:
    conn = session()
    conn.send(tx("a@x.example"))
    conn.data_to_send()
    with pytest.raises(RemoteProtocolError, match="unexpected reply 250 to DATA"):
        feed(conn, b"250 Ok\r\n250 Ok\r\n250 Sure\r\n")


def test_reply_line_limit_is_512_with_crlf() -> None:
    assert isinstance(feed(ClientConnection(), b"220 " + b"x" * 506 + b"\r\n"), Greeting)
    with pytest.raises(RemoteProtocolError):
        feed(ClientConnection(), b"220 " + b"x" * 507 + b"\r\n")


def test_bare_lf_ends_a_reply_line() -> None:
    event = feed(ClientConnection(), b"220-a\n220 b\n")
    assert isinstance(event, Greeting)
    assert event.reply.text == "a b"


def test_connection_closed() -> None:
    conn = session()
    conn.send(tx("a@x.example"))
    conn.data_to_send()
    conn.receive_data(b"250 Ok\r\n250 O")  # then the server goes away mid-reply
    conn.receive_data(b"")
    assert conn.next_event() == Closed("RCPT TO")
    assert state(conn) is ClientState.CLOSED
    assert conn.next_event() is None


def test_replies_so_far_keep_refusals() -> None:
    conn = session()
    mail = tx("a@x.example", "b@x.example")
    conn.send(mail)
    conn.data_to_send()
    feed(conn, b"250 Ok\r\n550 No\r\n")
    conn.receive_data(b"")
    assert conn.next_event() == Closed("RCPT TO")
    assert {r: v.code for r, v in conn.replies_so_far(mail).items()} == {"a@x.example": "550"}
    assert conn.replies_so_far(tx("a@x.example")) == {}  # another transaction: nothing known


def test_unsolicited_replies_while_idle() -> None:
    conn = session()
    event = feed(conn, b"421 4.4.2 Idle timeout\r\n")
    assert isinstance(event, Closed)
    assert event.awaiting is None
    assert event.reply is not None
    assert event.reply.code == "421"
    assert state(conn) is ClientState.CLOSED
    with pytest.raises(RemoteProtocolError, match="while idle"):
        feed(session(), b"250 Surprise\r\n")


def test_rset_and_quit() -> None:
    conn = session()
    conn.send(Reset())
    assert conn.data_to_send() == b"RSET\r\n"
    assert isinstance(feed(conn, b"250 Ok\r\n"), ResetDone)
    conn.send(Quit())
    assert conn.data_to_send() == b"QUIT\r\n"
    event = feed(conn, b"221 2.0.0 Bye\r\n")
    assert isinstance(event, QuitDone)
    assert state(conn) is ClientState.CLOSED


def test_commands_the_state_does_not_allow() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError, match="cannot send Transaction"):
        conn.send(tx("a@x.example"))
    conn = session()
    conn.send(tx("a@x.example"))
    with pytest.raises(LocalProtocolError) as caught:
        conn.send(Reset())
    assert caught.value.reply == Reply("450", "4.0.0 Unexpected error during delivery attempt")
    greeted = ClientConnection()
    feed(greeted, b"220 mx\r\n")
    with pytest.raises(LocalProtocolError, match="Hello name"):
        greeted.send(Hello("bad name\r\nRSET"))


def _reachable(root: object, target: object) -> bool:
    """Whether ``target`` can be reached from ``root`` through references (gc's view)."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if obj is target:
            return True
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        todo.extend(gc.get_referents(obj))
    return False


@pytest.mark.parametrize("chunking", [True, False])
def test_an_answered_transaction_keeps_no_message(chunking: bool) -> None:
    # A pooled connection waits idle between messages: it must not hold the last one.
    ehlo = b"250-mx.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n" if chunking else PIPELINING
    conn = session(ehlo)
    content = b"Subject: big\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    transaction = tx("ok@x.example", content=content)
    conn.send(transaction)
    conn.data_to_send()
    assert _reachable(conn, content)
    feed(conn, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" + (b"" if chunking else b"354 Go\r\n"))
    conn.data_to_send()
    done(feed(conn, b"250 2.0.0 Ok\r\n"))
    assert not _reachable(conn, content)
    assert conn.replies_so_far(transaction) == {}
