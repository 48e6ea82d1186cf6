"""RFC 3464 bounces, parsed back with the standard library."""

from __future__ import annotations

import email
from email.message import Message
from typing import cast

from smtpq.bounce import Bounce, BounceFactory, notify_wants
from smtpq.envelope import Envelope
from smtpq.reply import Reply

ORIGINAL = b"From: <s@example.org>\r\nSubject: hello\r\nDKIM-Signature: x\r\n\r\nthe body\r\n"


def _original(rcpts: list[str] | None = None) -> Envelope:
    env = Envelope("s@example.org", rcpts or ["a@example.com", "b@example.com"])
    env.parse(ORIGINAL)
    env.timestamp = 1_800_000_000.0
    return env


def _parts(bounce: Envelope) -> list[Message]:
    msg = email.message_from_bytes(b"".join(bounce.flatten()))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    return _subparts(msg)


def _subparts(msg: Message) -> list[Message]:
    """The sub-messages of a multipart or message/delivery-status part."""
    parts = msg.get_payload()
    assert isinstance(parts, list)
    return [cast(Message, p) for p in parts]


def test_bounce_is_a_dsn_to_the_sender_from_null() -> None:
    reply = Reply("550", "5.1.1 No such user", remote_host="mx.example.com")
    bounce = Bounce(_original(), reply, reporting_mta="mta.example.org", now=1_800_000_100.0)
    assert bounce.sender == ""
    assert bounce.recipients == ["s@example.org"]
    human, status, returned = _parts(bounce)
    assert human.get_content_type() == "text/plain"
    assert "a@example.com" in human.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_msg, *per_rcpt = _subparts(status)
    assert per_msg["Reporting-MTA"] == "dns; mta.example.org"
    assert per_msg["Arrival-Date"].startswith("Fri, 15 Jan 2027")
    assert [b["Final-Recipient"] for b in per_rcpt] == [
        "rfc822; a@example.com",
        "rfc822; b@example.com",
    ]
    for block in per_rcpt:
        assert block["Action"] == "failed"
        assert block["Status"] == "5.1.1"
        assert block["Remote-MTA"] == "dns; mx.example.com"
        assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
        assert block["Last-Attempt-Date"]
    assert returned.get_content_type() == "message/rfc822"
    assert ORIGINAL in b"".join(bounce.flatten())


def test_headers_only() -> None:
    bounce = Bounce(_original(), Reply("550", "no"), headers_only=True, reporting_mta="m")
    _, _, returned = _parts(bounce)
    assert returned.get_content_type() == "text/rfc822-headers"
    text = b"".join(bounce.flatten())
    assert b"DKIM-Signature: x" in text
    assert b"the body" not in text


def test_injection_in_reply_cannot_add_fields() -> None:
    bounce = Bounce(_original(["a@x"]), Reply("550", "no\r\nAction: delivered"), reporting_mta="m")
    _, status, _ = _parts(bounce)
    assert _subparts(status)[1].get_all("Action") == ["failed"]


def test_factory_never_bounces_null_sender() -> None:
    env = _original()
    env.sender = ""
    assert BounceFactory("m")(env, Reply("550", "no")) is None


def test_factory_honours_notify_and_ret() -> None:
    env = _original(["a@x", "b@x", "c@x"])
    env.rcpt_params = {"a@x": {"NOTIFY": "NEVER"}, "b@x": {"NOTIFY": "SUCCESS,DELAY"}}
    env.dsn_ret = "HDRS"
    env.dsn_envid = "QQ314159"
    bounce = BounceFactory("m")(env, Reply("550", "no"))
    assert bounce is not None
    text = b"".join(bounce.flatten())
    assert b"Final-Recipient: rfc822; c@x" in text
    assert b"a@x" not in text.split(b"text/rfc822-headers")[0].split(b"delivery-status")[1]
    assert b"Original-Envelope-Id: QQ314159" in text
    assert b"the body" not in text
    env.rcpt_params["c@x"] = {"NOTIFY": "NEVER"}
    assert BounceFactory("m")(env, Reply("550", "no")) is None


def test_notify_wants() -> None:
    env = _original(["a@x"])
    assert notify_wants(env, "a@x", "FAILURE")
    assert notify_wants(env, "a@x", "DELAY")
    assert not notify_wants(env, "a@x", "SUCCESS")
    env.rcpt_params["a@x"] = {"NOTIFY": "failure"}
    assert not notify_wants(env, "a@x", "DELAY")
    env.rcpt_params["a@x"] = {"NOTIFY": "delay,failure"}
    assert notify_wants(env, "a@x", "DELAY")


def test_delayed_action_and_diagnostic() -> None:
    bounce = BounceFactory("m")(
        _original(["a@x"]),
        Reply("451", "4.7.1 later"),
        action="delayed",
        diagnostic="will retry",
    )
    assert bounce is not None
    text = b"".join(bounce.flatten())
    assert b"Action: delayed" in text
    assert b"Status: 4.7.1" in text
    assert b"(will retry)" in text
