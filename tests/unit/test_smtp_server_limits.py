"""The server machine's own limits and strict syntax: errors (soft and hard), failed AUTH, junk
commands, commands per session, NUL bytes, HELO names, control characters. No loop, no socket."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from smtpq.reply import Replies, Reply
from smtpq.smtp import (
    AuthCredentials,
    DataChunk,
    Event,
    Hello,
    MessageComplete,
    RcptTo,
    ServerConfig,
    SessionLimit,
)
from tests.unit.server_script import ENVELOPE, PASSWORD, Script, content, session

UNKNOWN = "500 5.5.1 Error: command not recognized"


def test_defaults_are_postfix_s() -> None:
    config = ServerConfig()
    assert (config.soft_error_limit, config.hard_error_limit) == (10, 20)
    assert config.max_auth_failures == 3
    assert config.junk_command_limit == 100


def test_hard_error_limit_answers_the_error_then_421() -> None:
    script = Script(ServerConfig(hard_error_limit=3))
    script.feed(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert script.replies()[1:] == [UNKNOWN, UNKNOWN, UNKNOWN, "421 4.7.0 Error: too many errors"]
    assert script.conn.closed
    assert script.conn.limit_reached is SessionLimit.ERRORS
    assert script.conn.errors == 3
    assert script.conn.commands == 3  # the NOOP after the limit is never read


def test_refused_recipients_count_as_errors_but_4xx_do_not() -> None:
    refuse: dict[type[Event], Callable[[Event], Reply]] = {
        RcptTo: lambda e: Reply("550", "5.1.1 no such user")
    }
    script = Script(ServerConfig(hard_error_limit=3), answers=refuse)
    script.feed(ENVELOPE)
    assert script.conn.errors == 1
    script.feed(session(b"RCPT TO:<x@example.net>", b"RCPT TO:<y@example.net>", b"NOOP"))
    assert script.codes()[-3:] == ["550", "550", "421"]
    assert script.conn.limit_reached is SessionLimit.ERRORS
    busy = Script(ServerConfig(hard_error_limit=3), answers={RcptTo: lambda e: Replies.QUEUE_ERROR})
    busy.feed(ENVELOPE + session(*[b"RCPT TO:<x@example.net>"] * 5))
    assert busy.conn.errors == 0
    assert not busy.conn.closed


def test_soft_limit_slows_each_further_error() -> None:
    script = Script(ServerConfig(soft_error_limit=2, hard_error_limit=0))
    script.feed(b"FOO\r\nFOO\r\n")
    assert script.conn.errors == 2
    assert not script.conn.slowed
    script.feed(b"FOO\r\n")
    assert script.conn.slowed
    assert ServerConfig(soft_error_limit=0).soft_error_limit == 0
    off = Script(ServerConfig(soft_error_limit=0, hard_error_limit=0))
    off.feed(b"FOO\r\n" * 50)
    assert not off.conn.slowed
    assert not off.conn.closed


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_failed_auth_is_cut_off_at_the_third() -> None:
    script = Script(ServerConfig(auth_mechanisms=("PLAIN",)), tls=True)
    script.feed(b"EHLO c\r\n")
    wrong = b"AUTH PLAIN " + b64(b"\0alice\0guess") + b"\r\n"
    script.feed(wrong, wrong)
    assert script.codes()[-2:] == ["535", "535"]
    assert not script.conn.closed
    script.feed(wrong + b"AUTH PLAIN " + b64(b"\0alice\0" + PASSWORD) + b"\r\n")
    assert script.replies()[-2:] == [
        "535 5.7.8 Authentication credentials invalid",
        "421 4.7.0 Error: too many failed authentications",
    ]
    assert script.conn.limit_reached is SessionLimit.AUTH_FAILURES
    assert script.conn.auth_failures == 3
    assert script.conn.errors == 3  # each failed AUTH is an error too
    assert sum(isinstance(step, AuthCredentials) for step in script.steps) == 3


def test_junk_commands_count_past_their_limit_until_a_message_is_accepted() -> None:
    script = Script(ServerConfig(junk_command_limit=3, hard_error_limit=0))
    script.feed(ENVELOPE + session(b"NOOP", b"RSET", b"VRFY x", b"HELP"))
    assert script.codes()[-4:] == ["250", "250", "252", "214"]  # answered as usual
    assert script.conn.errors == 1
    script.feed(session(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA", b"x", b"."))
    script.feed(session(b"NOOP", b"NOOP", b"NOOP"))
    assert script.conn.errors == 1  # the count started over after the message
    script.feed(session(b"NOOP"))
    assert script.conn.errors == 2


def test_junk_alone_cannot_keep_a_session_alive() -> None:
    script = Script(ServerConfig(junk_command_limit=5, hard_error_limit=3))
    script.feed(session(b"EHLO c", *[b"NOOP"] * 20))
    assert script.codes().count("250") == 1 + 5 + 3  # EHLO, 5 free, 3 counted errors
    assert script.replies()[-1] == "421 4.7.0 Error: too many errors"


def test_commands_per_session() -> None:
    script = Script(ServerConfig(max_commands=3))
    script.feed(session(b"EHLO c", b"NOOP", b"NOOP", b"NOOP", b"NOOP"))
    assert script.replies()[-2:] == ["250 2.0.0 OK", "421 4.7.0 Error: too many commands"]
    assert script.conn.limit_reached is SessionLimit.COMMANDS
    assert script.conn.errors == 0  # not the client's error: no error delay for it


def test_nul_in_a_command_is_refused_whole() -> None:
    script = Script()
    script.feed(session(b"EHLO c", b"MAIL FROM:<a\0@example.org>", b"NO\0OP", b"MAIL FROM:<>"))
    assert script.replies()[-3:] == [
        "500 5.5.2 Error: NUL character in command",
        "500 5.5.2 Error: NUL character in command",
        "250 2.1.0 OK",
    ]


@pytest.mark.parametrize(
    ("line", "smtputf8", "accepted"),
    [
        (b"EHLO caf\xe9.example", True, False),  # Latin-1: not UTF-8
        (b"EHLO caf\xc3\xa9.example", True, True),  # UTF-8 where SMTPUTF8 is offered
        (b"EHLO caf\xc3\xa9.example", False, False),
        (b"HELO caf\xc3\xa9.example", True, False),  # HELO: no SMTPUTF8 ever
        (b"EHLO a\x01b", True, False),
        (b"EHLO a\x7fb", True, False),
        (b"EHLO a\xc2\x85b", True, False),  # a C1 control, in UTF-8
        (b"EHLO [192.0.2.1]", False, True),
        (b"HELO client.example", False, True),
    ],
)
def test_hello_names(line: bytes, smtputf8: bool, accepted: bool) -> None:
    script = Script(ServerConfig(smtputf8=smtputf8))
    script.feed(line + b"\r\n")
    if accepted:
        assert isinstance(script.steps[-1], Hello)
        assert script.replies()[1].startswith("250")
    else:
        assert script.replies()[1:] == ["501 5.5.2 Error: invalid HELO/EHLO name"]
        assert script.conn.errors == 1


@pytest.mark.parametrize(
    "path",
    [b"<a\x01b@example.org>", b'<"a\x1b"@example.org>', b"<a@exa\x7fmple.org>", b"<a@[1.2\x02]>"],
)
def test_control_characters_in_addresses_are_refused(path: bytes) -> None:
    script = Script()
    script.feed(session(b"EHLO c", b"MAIL FROM:" + path, b"MAIL FROM:<a@b>", b"RCPT TO:" + path))
    assert script.codes()[-3:] == ["501", "250", "501"]


def test_postmaster_without_a_domain_is_a_recipient() -> None:
    script = Script()
    script.feed(session(b"EHLO c", b"MAIL FROM:<a@b>", b"RCPT TO:<Postmaster>"))
    assert script.steps[-1] == RcptTo("Postmaster")


def test_discarding_once_over_the_size_limit() -> None:
    script = Script(ServerConfig(max_message_size=100))
    script.feed(ENVELOPE + b"DATA\r\n" + b"x" * 60)
    assert not script.conn.discarding
    script.feed(b"y" * 60)
    assert script.conn.discarding
    assert len(content(script.steps)) <= 100
    script.feed(b"\r\n.\r\n")
    assert script.codes()[-1] == "552"
    assert not script.conn.discarding
    assert not any(isinstance(step, MessageComplete) for step in script.steps)
    bdat = Script(ServerConfig(max_message_size=100))
    bdat.feed(ENVELOPE + b"BDAT 150 LAST\r\n" + b"z" * 10)
    assert bdat.conn.discarding
    assert not any(isinstance(step, DataChunk) for step in bdat.steps)
