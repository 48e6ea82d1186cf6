"""The server state machine, command by command and state by state: no loop, no socket."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from smtpq.reply import Replies, Reply
from smtpq.smtp import (
    AuthCredentials,
    BdatChunk,
    ConnectionClosed,
    DataChunk,
    DataStart,
    Event,
    Hello,
    LocalProtocolError,
    MailFrom,
    MessageComplete,
    Quit,
    RcptTo,
    ServerConfig,
    ServerConnection,
    ServerState,
    StartTls,
)
from tests.unit.server_script import ENVELOPE, PASSWORD, Script, content, session

TLS = ServerConfig(starttls=True, auth_mechanisms=("LOGIN", "PLAIN"))


def last_reply(script: Script) -> str:
    return script.replies()[-1]


def state(script: Script) -> ServerState:
    return script.conn.state


# -- greeting, EHLO, replies on the wire -----------------------------------------------------


def test_greeting_and_ehlo_carry_no_enhanced_code() -> None:
    script = Script(ServerConfig(max_message_size=1000))
    script.feed(b"EHLO client.test\r\n")
    assert script.replies() == [
        "220 mx.test ESMTP smtpq",
        "250-mx.test",
        "250-PIPELINING",
        "250-SIZE 1000",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-DSN",
        "250-ENHANCEDSTATUSCODES",
        "250 CHUNKING",
    ]
    assert script.steps == [Hello("client.test", True)]
    assert script.conn.extended


def test_helo_is_not_extended() -> None:
    script = Script()
    script.feed(b"HELO old.test\r\n")
    assert last_reply(script) == "250 mx.test"
    assert script.steps == [Hello("old.test", False)]
    assert not script.conn.extended


def test_every_other_reply_carries_an_enhanced_code() -> None:
    script = Script()
    script.feed(ENVELOPE + session(b"NOOP", b"VRFY x", b"HELP", b"RSET", b"FOO", b"QUIT"))
    codes = [line.split(" ")[1] for line in script.replies()[2 + 8 :]]
    assert all(code[0] in "245" and code.count(".") == 2 for code in codes), codes


def test_starttls_and_auth_advertised_by_state() -> None:
    script = Script(TLS)
    script.feed(b"EHLO c\r\n")
    assert "250-STARTTLS" in script.replies()
    assert not any("AUTH" in line for line in script.replies())
    over_tls = Script(TLS, tls=True)
    over_tls.feed(b"EHLO c\r\n")
    assert "250-AUTH LOGIN PLAIN" in over_tls.replies()
    assert "250-STARTTLS" not in over_tls.replies()
    plain_auth = Script(ServerConfig(auth_mechanisms=("PLAIN",), auth_requires_tls=False))
    plain_auth.feed(b"EHLO c\r\n")
    assert "250-AUTH PLAIN" in plain_auth.replies()


def test_ehlo_needs_a_name() -> None:
    script = Script()
    script.feed(b"EHLO\r\n", b"HELO   \r\n")
    assert script.replies()[1:] == [
        "501 5.5.4 Syntax: EHLO hostname",
        "501 5.5.4 Syntax: HELO hostname",
    ]


def test_multi_line_reply_has_the_code_on_every_line() -> None:
    script = Script(answers={MailFrom: lambda e: Reply("550", "5.7.1 one\ntwo\rthree")})
    script.feed(session(b"EHLO c", b"MAIL FROM:<a@b>"))
    assert script.replies()[-2:] == ["550-5.7.1 one", "550 5.7.1 twothree"]


def test_pipelined_replies_leave_in_one_write_in_order() -> None:
    script = Script()
    written = script.feed(ENVELOPE + session(b"RCPT TO:<c@d>", b"DATA"))
    assert written.count(b"\r\n") == 8 + 4  # EHLO (8 lines), MAIL, RCPT, RCPT, DATA
    assert [line[:3] for line in written.decode().split("\r\n")[8:-1]] == [
        "250",
        "250",
        "250",
        "354",
    ]


def test_refused_greeting_closes() -> None:
    conn = ServerConnection()
    conn.send(Reply("421", "4.3.2 busy"))
    assert conn.closed
    assert conn.data_to_send() == b"421 busy\r\n"  # a greeting: no enhanced code


# -- sequence: 503 5.5.1 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("commands", "reply"),
    [
        ([b"MAIL FROM:<a@b>"], "503 5.5.1 Error: send HELO/EHLO first"),
        ([b"EHLO c", b"RCPT TO:<a@b>"], "503 5.5.1 Error: need MAIL command"),
        ([b"EHLO c", b"DATA"], "503 5.5.1 Error: need MAIL command"),
        ([b"EHLO c", b"MAIL FROM:<a@b>", b"DATA"], "503 5.5.1 Error: need RCPT command"),
        (
            [b"EHLO c", b"MAIL FROM:<a@b>", b"MAIL FROM:<a@b>"],
            "503 5.5.1 Error: nested MAIL command",
        ),
        (
            [b"EHLO c", b"MAIL FROM:<a@b>", b"RSET", b"RCPT TO:<a@b>"],
            "503 5.5.1 Error: need MAIL command",
        ),
        (
            [b"EHLO c", b"MAIL FROM:<a@b>", b"EHLO c", b"RCPT TO:<a@b>"],
            "503 5.5.1 Error: need MAIL command",
        ),
    ],
)
def test_bad_sequence(commands: list[bytes], reply: str) -> None:
    script = Script()
    script.feed(session(*commands))
    assert last_reply(script) == reply
    assert script.conn.errors == 1


def test_rset_before_helo_stays_before_helo() -> None:
    script = Script()
    script.feed(session(b"RSET", b"MAIL FROM:<a@b>"))
    assert script.codes() == ["250", "503"]
    assert state(script) is ServerState.INIT


# -- syntax and unknown commands --------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"FOO bar", "500 5.5.1 Error: command not recognized"),
        (b"", "500 5.5.2 Error: bad syntax"),
        (b"EXPN list", "502 5.5.1 Error: command not implemented"),
        (b"QUIT now", "501 5.5.4 Syntax: QUIT"),
        (b"RSET x", "501 5.5.4 Syntax: RSET"),
        (b"VRFY", "501 5.5.4 Syntax: VRFY address"),
        (b"STARTTLS", "454 4.7.0 TLS not available"),
        (b"AUTH PLAIN", "503 5.5.1 Error: authentication not enabled"),
        (b"noop anything", "250 2.0.0 OK"),
        (
            b"vrfy someone",
            "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
        ),
    ],
)
def test_simple_commands(line: bytes, reply: str) -> None:
    script = Script()
    script.feed(session(b"EHLO c", line))
    assert last_reply(script) == reply


def test_command_line_limits() -> None:
    script = Script()
    script.feed(session(b"EHLO c", b"NOOP " + b"x" * 505))  # 512 with CRLF
    assert script.codes() == ["250", "250"]
    script.feed(session(b"NOOP " + b"x" * 506))
    assert last_reply(script) == "500 5.5.6 Line too long"
    # MAIL and RCPT have room for their parameters (RFC 1870, 3461, 4954, 6531).
    envid = b"ENVID=" + b"e" * 100
    mail = b"MAIL FROM:<" + b"a" * 400 + b"@example.org> SIZE=10 RET=HDRS " + envid
    assert 512 < len(mail) + 2 <= 1168
    script.feed(session(mail, b"RCPT TO:<b@c> ORCPT=rfc822;" + b"o" * 480))
    assert script.codes()[-2:] == ["250", "250"]


def test_a_line_without_end_is_not_kept() -> None:
    script = Script()
    script.feed(b"EHLO c\r\n")
    for _ in range(100):
        script.feed(b"x" * 10_000)
        assert len(script.conn._buf) <= 20_000
    script.feed(b"tail\r\nNOOP\r\n")
    assert script.codes()[-2:] == ["500", "250"]
    assert script.replies()[-2] == "500 5.5.6 Line too long"


def test_line_ends_may_be_bare_lf_for_commands() -> None:
    script = Script()
    script.feed(b"EHLO c\nMAIL FROM:<a@b>\n")
    assert script.codes()[-1] == "250"


# -- MAIL and RCPT ----------------------------------------------------------------------------


def mail_reply(*params: bytes, config: ServerConfig | None = None, helo: bytes = b"EHLO c") -> str:
    script = Script(config or ServerConfig(max_message_size=1000))
    script.feed(session(helo, b" ".join([b"MAIL FROM:<a@example.org>", *params])))
    return last_reply(script)


def test_mail_parameters_parsed() -> None:
    script = Script(ServerConfig(max_message_size=1000))
    script.feed(
        session(
            b"EHLO c",
            b"mail from: <a@example.org> size=900 body=8bitmime smtputf8 ret=hdrs ENVID=x+2B1 "
            b"AUTH=<>",
        )
    )
    assert script.steps[-1] == MailFrom("a@example.org", 900, "8BITMIME", True, "HDRS", "x+2B1")


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        ([b"SIZE=1001"], "552 5.3.4 Message size exceeds fixed maximum message size"),
        ([b"SIZE=big"], "501 5.5.4 SIZE must be a number"),
        ([b"SIZE"], "501 5.5.4 SIZE must be a number"),
        ([b"SIZE=1", b"SIZE=2"], "501 5.5.4 Duplicate SIZE parameter"),
        ([b"BODY=BINARYMIME"], "501 5.5.4 BODY must be 7BIT or 8BITMIME"),
        ([b"SMTPUTF8=yes"], "501 5.5.4 SMTPUTF8 takes no value"),
        ([b"RET=ALL"], "501 5.5.4 RET must be FULL or HDRS"),
        ([b"XFOO=1"], "555 5.5.4 Unsupported option: XFOO"),
        ([b"AUTH"], "501 5.5.4 AUTH requires a value"),
    ],
)
def test_mail_parameters_refused(params: list[bytes], reply: str) -> None:
    assert mail_reply(*params) == reply


def test_mail_parameters_need_ehlo_and_smtputf8_needs_offering() -> None:
    assert mail_reply(b"SIZE=10", helo=b"HELO c") == "555 5.5.4 Unsupported option: SIZE"
    no_utf8 = ServerConfig(smtputf8=False)
    assert mail_reply(b"SMTPUTF8", config=no_utf8) == "555 5.5.4 Unsupported option: SMTPUTF8"


@pytest.mark.parametrize(
    ("path", "address"),
    [
        (b"<>", ""),
        (b"<a@b.c>", "a@b.c"),
        (b" <a@b.c>", "a@b.c"),
        (b"a@b.c", "a@b.c"),
        (b"<@relay.example:a@b.c>", "a@b.c"),
        (b'<"q x"@b.c>', '"q x"@b.c'),
        (b"<a..b@c>", "a..b@c"),
        (b"<a@[192.0.2.1]>", "a@[192.0.2.1]"),
        (b"<local>", "local"),
    ],
)
def test_sender_paths(path: bytes, address: str) -> None:
    script = Script()
    script.feed(session(b"EHLO c", b"MAIL FROM:" + path))
    assert script.steps[-1] == MailFrom(address)


@pytest.mark.parametrize(
    "path", [b"<a@b", b"<a b@c>", b"<a@b@c>", b"<a@b..c>", b"<x(comment)@y>", b"", b"a@b>"]
)
def test_bad_sender_paths(path: bytes) -> None:
    script = Script()
    script.feed(session(b"EHLO c", b"MAIL FROM:" + path, b"MAIL " + path))
    assert script.replies()[-2:] == ["501 5.1.7 Bad sender address syntax"] * 2


def test_address_encoding() -> None:
    script = Script()
    script.feed(session(b"EHLO c", "MAIL FROM:<jürgen@bücher.example>".encode()))
    assert last_reply(script) == "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    script.feed(session(b"MAIL FROM:<\xff@x> SMTPUTF8"))
    assert last_reply(script) == "553 5.6.7 Address is not valid UTF-8"
    script.feed(session("MAIL FROM:<jürgen@bücher.example> SMTPUTF8".encode()))
    assert script.steps[-1] == MailFrom("jürgen@bücher.example", smtputf8=True)
    # The transaction's SMTPUTF8 covers its recipients.
    script.feed(session("RCPT TO:<zoë@例え.example>".encode()))
    assert script.steps[-1] == RcptTo("zoë@例え.example")


def test_rcpt_parameters() -> None:
    script = Script()
    script.feed(
        session(
            b"EHLO c",
            b"MAIL FROM:<a@b>",
            b"RCPT TO:<b@c> NOTIFY=success,delay ORCPT=rfc822;B+2Bx@c",
            b"RCPT TO:<d@c> NOTIFY=NEVER,SUCCESS",
            b"RCPT TO:<e@c> XFOO",
            b"RCPT TO:<>",
            b"RCPT TO:<postmaster>",
        )
    )
    rcpt = script.steps[2]
    assert rcpt == RcptTo("b@c", "SUCCESS,DELAY", "rfc822;B+2Bx@c")
    assert isinstance(rcpt, RcptTo)
    assert rcpt.dsn_params() == {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;B+2Bx@c"}
    assert script.replies()[-4:-1] == [
        "501 5.5.4 NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY",
        "555 5.5.4 Unsupported option: XFOO",
        "501 5.1.3 Bad recipient address syntax",
    ]
    assert script.steps[-1] == RcptTo("postmaster")


def test_a_refused_mail_or_rcpt_changes_no_state() -> None:
    refuse: dict[type[Event], Callable[[Event], Reply]] = {
        MailFrom: lambda e: Reply("550", "5.7.1 no"),
        RcptTo: lambda e: Reply("554", "no"),
    }
    script = Script(answers=refuse)
    script.feed(session(b"EHLO c", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>"))
    assert script.codes() == ["250", "550", "503"]
    assert state(script) is ServerState.READY


# -- DATA -------------------------------------------------------------------------------------


def data_session(body: bytes, config: ServerConfig | None = None) -> Script:
    script = Script(config or ServerConfig())
    script.feed(ENVELOPE + b"DATA\r\n" + body)
    return script


def test_data_content_unstuffed_and_complete() -> None:
    body = b"Subject: x\r\n\r\n..one\r\n.two\r\n...\r\nlast\r\n"
    script = data_session(body + b".\r\n")
    assert content(script.steps) == b"Subject: x\r\n\r\n.one\r\ntwo\r\n..\r\nlast\r\n"
    assert isinstance(script.steps[-1], MessageComplete)
    assert last_reply(script).startswith("250 2.6.0")
    assert state(script) is ServerState.READY


def test_data_first_line_dot_unstuffed_and_empty_message() -> None:
    assert content(data_session(b"..x\r\n.\r\n").steps) == b".x\r\n"
    script = data_session(b".\r\n")
    assert content(script.steps) == b""
    assert isinstance(script.steps[-1], MessageComplete)


@pytest.mark.parametrize(
    "fake_end", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r\r\n", b"\r\n .\r\n"]
)
def test_only_crlf_dot_crlf_ends_data(fake_end: bytes) -> None:
    body = b"a" + fake_end + b"MAIL FROM:<evil@x>\r\n"
    script = data_session(body)
    assert not any(isinstance(s, (MessageComplete, MailFrom)) for s in script.steps[4:])
    script.feed(b".\r\n")
    assert isinstance(script.steps[-1], MessageComplete)
    # Bare CR and LF are kept as sent (the documented policy); only a dot after CRLF is stuffing.
    assert content(script.steps) == body.replace(b"\r\n.", b"\r\n")


def test_end_of_data_split_anywhere() -> None:
    script = Script()
    script.feed(ENVELOPE + b"DATA\r\n", b"x\r", b"\n", b".", b"\r", b"\nQUIT\r\n")
    assert content(script.steps) == b"x\r\n"
    assert isinstance(script.steps[-2], MessageComplete)
    assert isinstance(script.steps[-1], Quit)


def test_command_after_the_final_dot_in_the_same_read() -> None:
    script = data_session(b"one\r\n.\r\nMAIL FROM:<c@d>\r\n")
    assert isinstance(script.steps[-2], MessageComplete)
    assert script.steps[-1] == MailFrom("c@d")


def test_refused_data_reads_no_content() -> None:
    script = Script(answers={DataStart: lambda e: Reply("451", "4.3.0 later")})
    script.feed(ENVELOPE + b"DATA\r\n")
    assert state(script) is ServerState.RCPT
    script.feed(b"NOOP\r\n")
    assert script.codes()[-1] == "250"


def test_oversized_message_read_to_its_end_then_552() -> None:
    config = ServerConfig(max_message_size=100)
    script = data_session(b"x" * 60 + b"\r\n", config)
    script.feed(b"y" * 60 + b"\r\n", b"z" * 1000 + b"\r\n")
    # Nothing handed on past the limit: the driver keeps at most that much.
    assert content(script.steps) == (b"x" * 60 + b"\r\n" + b"y" * 60)[:100]
    assert state(script) is ServerState.DATA
    script.feed(b".\r\nNOOP\r\n")
    assert script.replies()[-2:] == [
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "250 2.0.0 OK",
    ]
    assert not any(isinstance(s, MessageComplete) for s in script.steps)
    assert state(script) is ServerState.READY


def test_size_limit_counts_content_as_sent() -> None:
    config = ServerConfig(max_message_size=100)
    at_limit = data_session(b"x" * 98 + b"\r\n.\r\n", config)
    assert isinstance(at_limit.steps[-1], MessageComplete)
    over = data_session(b".." + b"x" * 97 + b"\r\n.\r\n", config)  # 101 as sent
    assert last_reply(over).startswith("552 5.3.4")


def test_text_line_over_1000_octets_refused_after_the_end() -> None:
    script = data_session(b"ok\r\n" + b"x" * 999 + b"\r\n.\r\n")
    assert last_reply(script) == "500 5.5.6 Line too long"
    fine = data_session(b"ok\r\n" + b"x" * 998 + b"\r\nend\r\n.\r\n")
    assert isinstance(fine.steps[-1], MessageComplete)
    # Across pieces too.
    split = Script()
    split.feed(ENVELOPE + b"DATA\r\n", b"x" * 500, b"x" * 499, b"\r\n.\r\n")
    assert last_reply(split) == "500 5.5.6 Line too long"


def test_eof_in_the_middle_of_data() -> None:
    script = data_session(b"half a mess")
    script.feed(b"")
    assert isinstance(script.steps[-1], ConnectionClosed)
    assert script.conn.closed


def test_eof_between_commands() -> None:
    script = Script()
    script.feed(b"EHLO c\r\nNOOP")  # a partial line then the end: the line is dropped
    script.feed(b"")
    assert isinstance(script.steps[-1], ConnectionClosed)


# -- BDAT (RFC 3030) --------------------------------------------------------------------------


def test_bdat_chunks() -> None:
    script = Script()
    script.feed(ENVELOPE + b"BDAT 5\r\nhel", b"lo", b"BDAT 3\r\n\r\n.BDAT 0 LAST\r\nQUIT\r\n")
    assert content(script.steps) == b"hello\r\n."  # as sent: no dot processing
    kinds = [type(s) for s in script.steps[3:]]
    assert kinds == [DataChunk, DataChunk, BdatChunk, DataChunk, BdatChunk, MessageComplete, Quit]
    assert script.replies()[-4:] == [
        "250 2.0.0 Ok: 5 bytes",
        "250 2.0.0 Ok: 3 bytes",
        "250 2.6.0 Message accepted for delivery; queued as ID1",
        "221 2.0.0 Bye",
    ]


def test_bdat_last_in_one_chunk_and_sequence_rules() -> None:
    script = Script()
    script.feed(ENVELOPE + b"BDAT 4 LAST\r\nbody" + b"DATA\r\n")
    assert isinstance(script.steps[-2], MessageComplete)
    assert last_reply(script) == "503 5.5.1 Error: need MAIL command"
    script.feed(session(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"BDAT 1") + b"x" + b"DATA\r\n")
    assert last_reply(script) == "503 5.5.1 Error: DATA after BDAT"


def test_out_of_sequence_bdat_still_consumes_its_octets() -> None:
    script = Script()
    script.feed(session(b"EHLO c", b"BDAT 12") + b"RSET\r\nRSET\r\nNOOP\r\n")
    # The twelve octets "RSET\r\nRSET\r\n" are the chunk, not commands.
    assert script.replies()[-2:] == ["503 5.5.1 Error: need MAIL command", "250 2.0.0 OK"]
    assert script.conn.errors == 1


def test_malformed_bdat_ends_the_session() -> None:
    script = Script()
    script.feed(ENVELOPE + b"BDAT ten\r\nNOOP\r\n")
    assert last_reply(script) == "501 5.5.4 Syntax: BDAT size [LAST]"
    assert script.conn.closed


def test_bdat_over_the_size_limit() -> None:
    script = Script(ServerConfig(max_message_size=10))
    script.feed(ENVELOPE + b"BDAT 6\r\n123456BDAT 6\r\n789012BDAT 1 LAST\r\nx")
    assert script.replies()[-3:] == [
        "250 2.0.0 Ok: 6 bytes",
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "503 5.5.1 Error: need MAIL command",
    ]
    assert content(script.steps) == b"123456"


def test_a_refused_chunk_ends_the_transaction() -> None:
    script = Script(answers={BdatChunk: lambda e: Reply("452", "4.3.1 full")})
    script.feed(ENVELOPE + b"BDAT 1\r\nxBDAT 1 LAST\r\ny")
    assert script.codes()[-2:] == ["452", "503"]


# -- STARTTLS ---------------------------------------------------------------------------------


def test_starttls_discards_what_was_pipelined_after_it() -> None:
    script = Script(TLS)
    script.feed(session(b"EHLO c", b"STARTTLS", b"MAIL FROM:<evil@x>", b"RCPT TO:<e@x>"))
    assert isinstance(script.steps[-1], StartTls)
    assert state(script) is ServerState.TLS
    script.feed(b"RCPT TO:<more@x>\r\n")  # before the handshake: discarded too
    assert last_reply(script) == "220 2.0.0 Ready to start TLS"
    script.conn.tls_established()
    script.feed(session(b"MAIL FROM:<a@b>", b"EHLO c"))
    # The client must greet again; nothing from before TLS was acted on.
    assert script.codes()[-2:] == ["503", "250"]
    assert "503 5.5.1 Error: send HELO/EHLO first" in script.replies()
    assert not any(isinstance(s, (MailFrom, RcptTo)) for s in script.steps)
    assert "250-AUTH LOGIN PLAIN" in script.replies()
    script.feed(b"STARTTLS\r\n")
    assert last_reply(script) == "503 5.5.1 Error: TLS already active"


def test_starttls_refused_keeps_the_session() -> None:
    script = Script(TLS, answers={StartTls: lambda e: Reply("454", "4.7.0 later")})
    script.feed(session(b"EHLO c", b"STARTTLS", b"NOOP"))
    assert script.codes() == ["250", "454", "250"]
    assert not script.conn.tls


def test_starttls_in_a_transaction_and_with_an_argument() -> None:
    script = Script(TLS)
    script.feed(session(b"EHLO c", b"STARTTLS now", b"MAIL FROM:<a@b>", b"STARTTLS"))
    assert script.replies()[-3] == "501 5.5.4 Syntax: STARTTLS"
    assert last_reply(script) == "503 5.5.1 Error: MAIL transaction in progress"


def test_require_tls() -> None:
    script = Script(ServerConfig(starttls=True, require_tls=True))
    script.feed(session(b"EHLO c", b"NOOP", b"MAIL FROM:<a@b>", b"HELO c", b"STARTTLS"))
    assert script.codes() == ["250", "250", "530", "530", "220"]
    assert "530 5.7.0 Must issue a STARTTLS command first" in script.replies()
    script.conn.tls_established()
    script.feed(session(b"EHLO c", b"MAIL FROM:<a@b>"))
    assert script.codes()[-1] == "250"


# -- AUTH -------------------------------------------------------------------------------------


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def auth_script(**config: object) -> Script:
    script = Script(ServerConfig(auth_mechanisms=("LOGIN", "PLAIN"), **config), tls=True)  # type: ignore[arg-type]
    script.feed(b"EHLO c\r\n")
    return script


def test_auth_plain_initial_response() -> None:
    script = auth_script()
    script.feed(b"AUTH PLAIN " + b64(b"\0alice\0" + PASSWORD) + b"\r\n")
    assert script.steps[-1] == AuthCredentials("PLAIN", b"", b"alice", PASSWORD)
    assert "secret" not in repr(script.steps[-1])
    assert last_reply(script) == "235 2.7.0 Authentication successful"
    assert script.conn.authenticated
    script.feed(b"AUTH PLAIN " + b64(b"\0alice\0" + PASSWORD) + b"\r\n")
    assert last_reply(script) == "503 5.5.1 Error: already authenticated"


def test_auth_plain_with_a_challenge() -> None:
    script = auth_script()
    written = script.feed(b"AUTH plain\r\n")
    assert written == b"334 \r\n"
    script.feed(b64(b"admin\0bob\0wrong") + b"\r\n")
    assert script.steps[-1] == AuthCredentials("PLAIN", b"admin", b"bob", b"wrong")
    assert last_reply(script) == "535 5.7.8 Authentication credentials invalid"
    assert not script.conn.authenticated


def test_auth_login() -> None:
    script = auth_script()
    assert script.feed(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert script.feed(b64(b"bob") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    script.feed(b64(PASSWORD) + b"\r\n")
    assert script.steps[-1] == AuthCredentials("LOGIN", b"", b"bob", PASSWORD)
    assert script.conn.authenticated
    pipelined = auth_script()
    pipelined.feed(b"AUTH LOGIN " + b64(b"bob") + b"\r\n" + b64(PASSWORD) + b"\r\nNOOP\r\n")
    assert pipelined.codes()[-2:] == ["235", "250"]


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        ([b"AUTH PLAIN", b"*"], "501 5.7.0 Auth aborted"),
        ([b"AUTH LOGIN", b"!!!"], "501 5.5.2 Can't decode base64"),
        ([b"AUTH PLAIN " + base64.b64encode(b"no nul")], "501 5.5.2 Can't split auth value"),
        ([b"AUTH PLAIN ="], "501 5.5.2 Can't split auth value"),
        ([b"AUTH CRAM-MD5"], "504 5.5.4 Unrecognized authentication type"),
        ([b"AUTH"], "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        ([b"MAIL FROM:<a@b>", b"AUTH PLAIN"], "503 5.5.1 Error: MAIL transaction in progress"),
    ],
)
def test_auth_refusals(lines: list[bytes], reply: str) -> None:
    script = auth_script()
    script.feed(session(*lines, b"NOOP"))
    assert script.replies()[-2:] == [reply, "250 2.0.0 OK"]
    assert not script.conn.authenticated


def test_auth_needs_tls_and_ehlo() -> None:
    script = Script(TLS)
    script.feed(session(b"EHLO c", b"AUTH PLAIN " + b64(b"\0a\0b")))
    assert last_reply(script) == (
        "538 5.7.11 Encryption required for requested authentication mechanism"
    )
    helo = Script(TLS, tls=True)
    helo.feed(session(b"HELO c", b"AUTH PLAIN"))
    assert last_reply(helo) == "503 5.5.1 Error: send EHLO first"


def test_auth_required() -> None:
    script = auth_script(auth_required=True)
    script.feed(session(b"MAIL FROM:<a@b>", b"AUTH PLAIN " + b64(b"\0a\0" + PASSWORD)))
    script.feed(session(b"MAIL FROM:<a@b>"))
    assert script.codes()[-3:] == ["530", "235", "250"]
    assert "530 5.7.0 Authentication required" in script.replies()


def test_auth_line_limit() -> None:
    script = auth_script()
    script.feed(b"AUTH PLAIN\r\n" + b"A" * 12_300 + b"\r\n")
    assert last_reply(script) == "500 5.5.6 Line too long"
    assert state(script) is ServerState.READY


# -- EOF, misuse (the limits: test_smtp_server_limits.py) --------------------------------


def test_driver_misuse_is_a_local_error() -> None:
    conn = ServerConnection()
    with pytest.raises(LocalProtocolError, match="greeting"):
        conn.next_event()
    conn.send(Reply("220", "hi"))
    with pytest.raises(LocalProtocolError):
        conn.send(Replies.OK)  # nothing to answer
    with pytest.raises(LocalProtocolError):
        conn.tls_established()
    conn.receive_data(b"EHLO c\r\n")
    assert isinstance(conn.next_event(), Hello)
    with pytest.raises(LocalProtocolError):
        conn.next_event()  # the EHLO is not answered
    with pytest.raises(LocalProtocolError):
        conn.send(Reply("354", "go"))  # 354 answers DATA only
    conn.send(conn.hello_reply("mx"))
    with pytest.raises(LocalProtocolError):
        conn.hello_reply("mx")
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")
    with pytest.raises(LocalProtocolError):
        ServerConnection().send(Reply("99", "bad"))
    with pytest.raises(ValueError, match="CRAM"):
        ServerConfig(auth_mechanisms=("CRAM-MD5",))
