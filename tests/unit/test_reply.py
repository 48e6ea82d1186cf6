"""Reply: enhanced status codes and classification."""

from __future__ import annotations

import pytest

from smtpq.errors import QueueError
from smtpq.reply import (
    Replies,
    Reply,
    ReplyClass,
    ReplyCode,
    accepted_reply,
    classify,
    greeting_reply,
    queue_error_reply,
    relay_denied_reply,
    timeout_reply,
)


def test_default_enhanced_code_from_class() -> None:
    assert Reply("250", "Ok").message == "2.0.0 Ok"
    assert Reply("451", "Try later").enhanced_status_code == "4.0.0"
    assert Reply("550", "No").enhanced_status_code == "5.0.0"


def test_leading_enhanced_code_is_split() -> None:
    r = Reply("550", "5.1.1 No such user")
    assert r.enhanced_status_code == "5.1.1"
    assert r.text == "No such user"
    assert r.message == "5.1.1 No such user"
    assert str(r) == "550 5.1.1 No such user"


def test_enhanced_class_follows_the_code() -> None:
    assert Reply("450", "5.1.1 odd").message == "4.1.1 odd"


def test_codes_without_enhanced_status() -> None:
    assert Reply("354", "Go ahead").message == "Go ahead"
    assert Reply().message is None
    assert not Reply()


@pytest.mark.parametrize(
    ("code", "klass"),
    [
        ("250", ReplyClass.SUCCESS),
        ("354", ReplyClass.INTERMEDIATE),
        ("421", ReplyClass.TRANSIENT),
        ("554", ReplyClass.PERMANENT),
        ("99", ReplyClass.UNKNOWN),
        ("abc", ReplyClass.UNKNOWN),
        (None, ReplyClass.UNKNOWN),
    ],
)
def test_classify(code: str | None, klass: ReplyClass) -> None:
    assert classify(code) is klass


def test_helpers() -> None:
    assert Reply("250", "ok").is_success()
    assert Reply("421", "x").is_transient()
    assert Reply("421", "x").is_error()
    assert Reply("550", "x").is_permanent()
    assert Reply("550", "x").is_error()
    assert not Reply("250", "ok").is_error()


def test_round_trip_dict_and_equality() -> None:
    r = Reply("451", "4.7.1 greylisted", "RCPT", "a@b", remote_host="mx.example")
    back = Reply.from_dict(r.to_dict())
    assert back == r
    assert back.remote_host == "mx.example"
    assert back.command == "RCPT"
    assert hash(back) == hash(r)


def test_queue_error_reply() -> None:
    err = QueueError("disk full")
    assert err.reply.code == "451"
    assert err.reply.enhanced_status_code == "4.3.0"
    assert "disk full" not in str(err.reply)


def test_reply_is_immutable() -> None:
    r = Reply("250", "Ok")
    with pytest.raises(AttributeError):
        r.code = "550"
    with pytest.raises(AttributeError):
        del r.address


def test_replace_makes_a_changed_copy() -> None:
    r = Reply(
        "452", "4.2.2 Mailbox full", "RCPT TO", "a@b", remote_host="mx", remote_ip="192.0.2.9"
    )
    expired = r.replace(enhanced_status_code="4.4.7")
    assert expired.message == "4.4.7 Mailbox full"
    assert (expired.code, expired.command, expired.address) == ("452", "RCPT TO", "a@b")
    assert (expired.remote_host, expired.remote_ip) == ("mx", "192.0.2.9")
    assert r.message == "4.2.2 Mailbox full"
    other = r.replace(address="c@d", code="552", message="5.2.2 Full")
    assert (other.address, str(other)) == ("c@d", "552 5.2.2 Full")
    assert r.replace(remote_dsn=True).remote_dsn is True
    assert r.replace(remote_host=None).remote_host is None


def test_round_trip_keeps_remote_ip_and_dsn() -> None:
    r = Reply("250", "2.0.0 Ok", "DATA", "a@b", remote_host="mx", remote_ip="::1", remote_dsn=False)
    back = Reply.from_dict(r.to_dict())
    assert (back.remote_ip, back.remote_dsn) == ("::1", False)
    assert "remote_ip" not in Reply("250", "Ok").to_dict()


def test_as_sent_keeps_the_text_as_given() -> None:
    bare = Reply("550", "No such user here")
    assert bare.message == "5.0.0 No such user here"
    assert bare.as_sent() == "550 No such user here"
    assert Reply("452", "4.2.2 Mailbox full").as_sent() == "452 4.2.2 Mailbox full"
    assert Reply("450", "5.1.1 odd").as_sent() == "450 5.1.1 odd"
    back = Reply.from_dict(bare.to_dict())
    assert (back.as_sent(), back.message) == (bare.as_sent(), bare.message)
    assert bare.replace(address="a@b").as_sent() == "550 No such user here"
    assert bare.replace(enhanced_status_code="5.1.1").as_sent() == "550 5.1.1 No such user here"


def test_the_table_of_standard_replies() -> None:
    replies = [r for r in vars(Replies).values() if isinstance(r, Reply)]
    assert len(replies) > 40
    codes = {int(code) for code in ReplyCode}
    for reply in replies:
        assert reply.code is not None
        assert int(reply.code) in codes, reply
        # Every one carries an enhanced code of its own class (RFC 2034), but 3xx carry none.
        if reply.code[0] == "3":
            assert reply.enhanced_status_code is None
        else:
            assert reply.enhanced_status_code is not None
            assert reply.enhanced_status_code[0] == reply.code[0], reply
    assert str(ReplyCode.START_MAIL_INPUT) == "354"
    assert queue_error_reply() is Replies.QUEUE_ERROR


def test_replies_with_a_variable_part() -> None:
    assert str(relay_denied_reply("a@b")) == "554 5.7.1 <a@b>: Relay access denied"
    assert str(accepted_reply(["A1", "B2"])) == (
        "250 2.6.0 Message accepted for delivery; queued as A1 B2"
    )
    many = accepted_reply([f"{i:032x}" for i in range(40)])
    assert len(str(many)) <= 510
    assert str(many).endswith(f"queued as {0:032x} and 39 more")
    assert str(greeting_reply("mx.example")) == "220 2.0.0 mx.example ESMTP smtpq"
    assert str(timeout_reply("mx.example")) == "421 4.4.2 mx.example Timeout exceeded"
