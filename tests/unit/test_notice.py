"""The text of a DSN (smtpq.notice): pure, parsed back with the ``email`` package and held to
RFC 3464's grammar (tests/dsn_grammar.py)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from smtpq.bounce import Bounce
from smtpq.dsn import xtext_encode
from smtpq.envelope import Envelope
from smtpq.notice import FOLD_AT, Action, Notice, Outcome, duration, fold, recipient_line
from smtpq.reply import Reply
from tests.dsn_grammar import Dsn, check_dsn, typed

ARRIVAL = 1_800_000_000.0
HOST = "mx.origin.example"


def original(rcpts: list[str], subject: str = "Quarterly figures") -> Envelope:
    env = Envelope("alice@origin.example", rcpts)
    env.parse(f"From: <alice@origin.example>\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())
    env.timestamp = ARRIVAL
    return env


def remote(code: str, text: str, command: str = "RCPT TO") -> Reply:
    return Reply(code, text, command, remote_host="mx.dest.example", remote_ip="192.0.2.7")


def render(notice: Notice, *, headers_only: bool = False) -> Dsn:
    bounce = Bounce.of(notice, HOST, headers_only=headers_only)
    return check_dsn(b"".join(bounce.flatten()))


def unfold(text: str) -> str:
    return re.sub(r"\r\n(?=[ \t])", "", text)


def words(text: str) -> str:
    """The human part with its lines joined (it is wrapped at 78 characters)."""
    return " ".join(text.split())


def test_one_report_with_each_recipients_own_fields() -> None:
    env = original(["a@dest.example", "b@dest.example", "c@dest.example"])
    outcomes = (
        Outcome("a@dest.example", remote("550", "5.1.1 <a@dest.example>: User unknown")),
        Outcome("b@dest.example", remote("552", "5.2.2 <b@dest.example>: Mailbox full")),
        Outcome("c@dest.example", Reply("556", "5.1.10 Domain accepts no mail (null MX)")),
    )
    dsn = render(Notice(Action.FAILED, env, outcomes, ARRIVAL + 60, "q1", 1))
    assert dsn.per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert dsn.per_message["X-Smtpq-Queue-ID"] == "q1"
    a, b, c = (dsn.recipient(f"{x}@dest.example") for x in "abc")
    assert (a["Status"], b["Status"], c["Status"]) == ("5.1.1", "5.2.2", "5.1.10")
    assert a["Diagnostic-Code"] == "smtp; 550 5.1.1 <a@dest.example>: User unknown"
    assert b["Diagnostic-Code"] == "smtp; 552 5.2.2 <b@dest.example>: Mailbox full"
    assert a["Remote-MTA"] == b["Remote-MTA"] == "dns; mx.dest.example"
    # No server said it: locally generated, and no Remote-MTA.
    assert c["Diagnostic-Code"] == "x-local; 556 5.1.10 Domain accepts no mail (null MX)"
    assert "Remote-MTA" not in c
    assert all(r["Action"] == "failed" for r in dsn.recipients)
    human = words(dsn.human)
    assert (
        "<a@dest.example>: host mx.dest.example[192.0.2.7] said: 550 5.1.1 <a@dest.example>:"
        in human
    )
    assert "(in reply to RCPT TO command)" in human
    assert "<c@dest.example>: 556 5.1.10 Domain accepts no mail (null MX)" in human
    assert "Subject: Quarterly figures" in human
    assert f"postmaster of {HOST} <postmaster@{HOST}>" in human
    assert dsn.message["Subject"] == "Undelivered Mail Returned to Sender"
    assert dsn.returned is not None
    assert dsn.returned.get_content_type() == "message/rfc822"


def test_original_recipient_always_and_envid_decoded() -> None:
    env = original(["a@dest.example", "b@dest.example"])
    env.dsn_envid = xtext_encode("id+1=2")
    env.rcpt_params["a@dest.example"] = {
        "ORCPT": "rfc822;" + xtext_encode("Orig+bad3@dest.example")
    }
    reply = remote("550", "5.1.1 no")
    notice = Notice(Action.FAILED, env, tuple(Outcome(r, reply) for r in env.recipients), ARRIVAL)
    dsn = render(notice)
    assert dsn.per_message["Original-Envelope-Id"] == "id+1=2"
    assert dsn.recipient("a@dest.example")["Original-Recipient"] == "rfc822; Orig+bad3@dest.example"
    # Without ORCPT, the address as given in RCPT.
    assert dsn.recipient("b@dest.example")["Original-Recipient"] == "rfc822; b@dest.example"


def test_given_up_keeps_the_reply_exact_and_says_why() -> None:
    env = original(["a@dest.example", "b@dest.example"])
    full = remote("452", "4.2.2 Mailbox full, try later")
    refused = remote("550", "5.7.1 Refused")
    outcomes = (
        Outcome("a@dest.example", full, gave_up=True, expired=True),
        Outcome("b@dest.example", refused),
    )
    dsn = render(Notice(Action.FAILED, env, outcomes, ARRIVAL + 5 * 86400, "q", 37))
    a = dsn.recipient("a@dest.example")
    assert a["Status"] == "4.4.7"  # the lifetime ran out
    assert a["Diagnostic-Code"] == "smtp; 452 4.2.2 Mailbox full, try later"  # as the host said
    assert dsn.recipient("b@dest.example")["Status"] == "5.7.1"
    assert "given up after 5 days and 37 attempts" in words(dsn.human)
    retries = Notice(
        Action.FAILED, env, (Outcome("a@dest.example", full, gave_up=True),), ARRIVAL + 7200
    )
    exhausted = render(retries)
    assert exhausted.recipient("a@dest.example")["Status"] == "4.2.2"  # the last reply's
    assert "retries exhausted" in words(exhausted.human)


def test_delay_warning_fields() -> None:
    env = original(["a@dest.example"])
    reply = remote("451", "4.7.1 Greylisted")
    notice = Notice(
        Action.DELAYED,
        env,
        (Outcome("a@dest.example", reply),),
        ARRIVAL + 4.2 * 3600,
        attempts=7,
        retry_until=ARRIVAL + 5 * 86400,
        delayed_for=4 * 3600,
    )
    dsn = render(notice, headers_only=True)
    fields = dsn.recipient("a@dest.example")
    assert fields["Action"] == "delayed"
    assert fields["Status"] == "4.7.1"
    assert fields["Diagnostic-Code"] == "smtp; 451 4.7.1 Greylisted"
    assert fields["Will-Retry-Until"] == "Wed, 20 Jan 2027 08:00:00 +0000"
    assert dsn.message["Subject"] == "Delayed Mail (still being retried)"
    assert "not been delivered after 4 hours" in words(dsn.human)
    assert "WARNING ONLY" in dsn.human
    assert dsn.returned is not None
    assert dsn.returned.get_content_type() == "text/rfc822-headers"


def test_relayed_report() -> None:
    env = original(["a@dest.example"])
    ok = remote("250", "2.0.0 Ok: queued as 4F1", "end of DATA")
    dsn = render(Notice(Action.RELAYED, env, (Outcome("a@dest.example", ok),), ARRIVAL + 1))
    fields = dsn.recipient("a@dest.example")
    assert (fields["Action"], fields["Status"]) == ("relayed", "2.0.0")
    assert fields["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 4F1"
    assert "delivered via host mx.dest.example[192.0.2.7]: 250 2.0.0 Ok" in words(dsn.human)
    assert dsn.message["Subject"] == "Successful Mail Delivery Report"


def test_smtputf8_original_gets_a_global_dsn() -> None:
    env = original(["jürgen@dest.example", "a@dest.example"], subject="Grüße")
    env.smtputf8 = True
    env.rcpt_params["a@dest.example"] = {"ORCPT": "utf-8;" + "b\\x{FC}ro@dest.example"}
    reply = remote("550", "5.1.1 unknown")
    outcomes = tuple(Outcome(r, reply) for r in env.recipients)
    bounce = Bounce.of(Notice(Action.FAILED, env, outcomes, ARRIVAL), HOST)
    assert bounce.smtputf8
    assert bounce.body_type == "8BITMIME"
    dsn = check_dsn(b"".join(bounce.flatten()))
    assert dsn.report_type == "global-delivery-status"
    assert dsn.recipients[0]["Final-Recipient"] == "utf-8; jürgen@dest.example"
    assert dsn.recipient("a@dest.example")["Original-Recipient"] == "utf-8; büro@dest.example"
    assert dsn.returned is not None
    assert dsn.returned.get_content_type() == "message/global"
    assert "Subject: Grüße" in dsn.human


def test_utf8_address_in_a_plain_dsn_is_encoded() -> None:
    env = original(["jürgen@dest.example"])
    dsn = render(
        Notice(Action.FAILED, env, (Outcome("jürgen@dest.example", remote("550", "x")),), 0.0)
    )
    assert dsn.report_type == "delivery-status"
    assert dsn.recipients[0]["Final-Recipient"] == "utf-8; j\\x{FC}rgen@dest.example"


def test_stages_in_the_human_part() -> None:
    def line(command: str, code: str = "554", text: str = "5.0.0 no") -> str:
        return recipient_line(Outcome("a@x", remote(code, text, command)), Action.FAILED)

    assert line("MAIL FROM").endswith("(in reply to MAIL FROM command)")
    assert line("DATA").endswith("(in reply to DATA command)")
    assert line("end of DATA").endswith("(in reply to end of DATA command)")
    connect = line("CONNECT", "451", "4.4.1 No answer from host (connection refused)")
    assert connect == (
        "<a@x>: connecting to host mx.dest.example[192.0.2.7]: "
        "451 4.4.1 No answer from host (connection refused)"
    )


def test_no_field_can_be_injected() -> None:
    env = original(["a@x"])
    reply = remote("550", "no\r\nAction: delivered\r\n\r\nFinal-Recipient: rfc822; b@x")
    dsn = render(Notice(Action.FAILED, env, (Outcome("a@x", reply),), 0.0))
    assert len(dsn.recipients) == 1
    assert dsn.recipients[0]["Action"] == "failed"


def test_duration() -> None:
    assert duration(5 * 86400) == "5 days"
    assert duration(4 * 3600) == "4 hours"
    assert duration(9300) == "2 hours 35 minutes"
    assert duration(86400 + 3600 + 61) == "1 day 1 hour"
    assert duration(0.5) == "0 seconds"


_words = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30)


@given(st.lists(_words, min_size=1, max_size=40), st.lists(st.integers(1, 3), min_size=40))
def test_fold_keeps_every_character_and_the_width(words: list[str], gaps: list[int]) -> None:
    value = "".join(w + " " * g for w, g in zip(words, gaps, strict=False)).rstrip()
    folded = fold("Diagnostic-Code", value)
    assert folded.endswith("\r\n")
    lines = folded[:-2].split("\r\n")
    assert unfold(folded[:-2]) == f"Diagnostic-Code: {value}"
    for i, text in enumerate(lines):
        assert len(text) <= FOLD_AT or len(text.split()) == 1 + (i == 0)
        assert text.strip(), "no folded line of white space only"
        assert i == 0 or text[0] == " "


_text = st.text(st.characters(codec="utf-8"), max_size=60)  # no lone surrogates
_address = st.from_regex(r"[a-z0-9.+=-]{1,12}@[a-z]{1,8}\.example", fullmatch=True)
_codes = st.sampled_from(["421", "450", "451", "452", "550", "551", "552", "553", "554"])


@given(
    rcpts=st.lists(_address, min_size=1, max_size=5, unique=True),
    texts=st.lists(_text, min_size=5, max_size=5),
    codes=st.lists(_codes, min_size=5, max_size=5),
    envid=_text,
    orcpt=_text,
    utf8=st.booleans(),
    action=st.sampled_from([Action.FAILED, Action.DELAYED]),
    hosts=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_any_report_parses_and_keeps_to_the_grammar(
    rcpts: list[str],
    texts: list[str],
    codes: list[str],
    envid: str,
    orcpt: str,
    utf8: bool,
    action: Action,
    hosts: list[bool],
) -> None:
    env = original(rcpts)
    env.smtputf8 = utf8
    env.dsn_envid = xtext_encode(envid) if envid else None
    env.rcpt_params[rcpts[0]] = {"ORCPT": "rfc822;" + xtext_encode(orcpt or "x@y")}
    outcomes = []
    for rcpt, text, code, host in zip(rcpts, texts, codes, hosts, strict=False):
        reply = remote(code, text) if host else Reply(code, text)
        outcomes.append(Outcome(rcpt, reply))
    dsn = render(Notice(action, env, tuple(outcomes), ARRIVAL, retry_until=ARRIVAL + 1))
    assert [typed(r["Final-Recipient"])[1] for r in dsn.recipients] == rcpts
    for fields, outcome in zip(dsn.recipients, outcomes, strict=True):
        assert outcome.reply is not None
        kind, said = typed(fields["Diagnostic-Code"])
        assert kind == ("smtp" if outcome.reply.remote_host else "x-local")
        quoted = outcome.reply.as_sent()
        if quoted.isprintable() and (utf8 or quoted.isascii()):
            assert said == quoted  # the reply exactly as given
    if envid and utf8 and envid.isprintable() and envid == envid.strip():
        assert dsn.per_message["Original-Envelope-Id"] == envid
