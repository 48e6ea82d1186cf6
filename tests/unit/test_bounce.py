"""Bounces and what makes them: python-slimta's Bounce and bounce_factory forms, the default
BounceFactory, and a slimta function as a Notifier."""

from __future__ import annotations

import email
from email.message import Message
from typing import cast

from smtpq.bounce import Bounce, BounceFactory, FunctionNotifier, notify_wants
from smtpq.envelope import Envelope
from smtpq.notice import Action, Notice, Outcome
from smtpq.reply import Reply
from tests.dsn_grammar import check_dsn

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
    check_dsn(b"".join(bounce.flatten()))


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
    dsn = check_dsn(b"".join(bounce.flatten()))
    assert dsn.recipients[0]["Action"] == "delayed"
    assert dsn.recipients[0]["Status"] == "4.7.1"
    assert dsn.recipients[0]["Diagnostic-Code"] == "x-local; 451 4.7.1 later"  # not added to
    assert "will retry" in dsn.human


def _notice(action: Action, outcomes: tuple[Outcome, ...], env: Envelope | None = None) -> Notice:
    return Notice(action, env or _original(), outcomes, 1_800_000_100.0, "q1", 2)


def test_factory_notify_makes_one_dsn_per_notice() -> None:
    factory = BounceFactory("mta.example.org")
    outcomes = (
        Outcome("a@example.com", Reply("550", "5.1.1 a unknown", remote_host="mx")),
        Outcome("b@example.com", Reply("552", "5.2.2 b full", remote_host="mx")),
    )
    [dsn] = factory.notify(_notice(Action.FAILED, outcomes))
    assert dsn.sender == ""
    assert dsn.recipients == ["s@example.org"]
    report = check_dsn(b"".join(dsn.flatten()))
    assert [r["Status"] for r in report.recipients] == ["5.1.1", "5.2.2"]
    assert report.returned is not None
    assert report.returned.get_content_type() == "message/rfc822"
    # Other notices return the header only; a null sender gets nothing.
    [warning] = factory.notify(_notice(Action.DELAYED, outcomes))
    returned = check_dsn(b"".join(warning.flatten())).returned
    assert returned is not None
    assert returned.get_content_type() == "text/rfc822-headers"
    silent = _original()
    silent.sender = ""
    assert factory.notify(_notice(Action.FAILED, outcomes, silent)) == []


def test_function_notifier_calls_a_slimta_factory_once_per_reply() -> None:
    calls: list[tuple[list[str], Reply]] = []

    def slimta_factory(envelope: Envelope, reply: Reply) -> Envelope | None:
        calls.append((list(envelope.recipients), reply))
        return Envelope("", [envelope.sender])

    notifier = FunctionNotifier(slimta_factory, BounceFactory("m"))
    no = Reply("550", "5.1.1 no")
    late = Reply("452", "4.2.2 full")
    outcomes = (
        Outcome("a@example.com", no),
        Outcome("b@example.com", late, gave_up=True, expired=True),
        Outcome("c@example.com", no),
    )
    assert len(notifier.notify(_notice(Action.FAILED, outcomes))) == 2
    assert [rcpts for rcpts, _ in calls] == [["a@example.com", "c@example.com"], ["b@example.com"]]
    assert calls[0][1] == no
    # The lifetime ran out: its last reply, with status 4.4.7.
    assert calls[1][1] == Reply("452", "4.4.7 full")
    # Delay warnings are not the slimta function's: it can only make failure bounces.
    [warning] = notifier.notify(_notice(Action.DELAYED, outcomes[:1]))
    assert len(calls) == 2
    assert b"Action: delayed" in b"".join(warning.flatten())


def test_slimta_call_form_for_a_success_report_honours_notify_success() -> None:
    env = _original(["a@x", "b@x"])
    env.rcpt_params["a@x"] = {"NOTIFY": "SUCCESS"}
    report = BounceFactory("m")(env, Reply("250", "2.0.0 Ok"), action="relayed")
    assert report is not None
    dsn = check_dsn(b"".join(report.flatten()))
    assert [r["Final-Recipient"] for r in dsn.recipients] == ["rfc822; a@x"]
    assert dsn.recipients[0]["Action"] == "relayed"
    del env.rcpt_params["a@x"]
    assert BounceFactory("m")(env, Reply("250", "2.0.0 Ok"), action="relayed") is None
