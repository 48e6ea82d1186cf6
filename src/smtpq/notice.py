"""What one delivery status notification reports (:class:`Notice`), and its text as bytes.

Pure: no I/O, no clock. The queue's rules decide what a notice reports; this module writes it
(RFC 3464, and RFC 6533 for internationalised mail): a header block folded at 78 characters
(RFC 5322 §2.1.1, §2.2.3), a human-readable part that names for each recipient the host, its
reply and the SMTP stage that got it, the ``message/delivery-status`` fields in RFC 3464's order,
then the original message or its header.

Diagnostic-Code quotes a reply as the host gave it (``smtp;``); a reply that no remote host gave
(no ``remote_host``: a DNS failure, a null MX, an operator's bounce, an expiry) is ``x-local;``.
"""

from __future__ import annotations

import contextlib
import re
import textwrap
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.utils import format_datetime
from enum import StrEnum

from smtpq.dsn import split_orcpt, utf8_addr_decode, utf8_addr_encode, xtext_decode
from smtpq.envelope import Envelope
from smtpq.reply import Reply

__all__ = ["Action", "Notice", "Outcome", "fold", "render"]

CRLF = "\r\n"
#: RFC 5322 §2.1.1: lines SHOULD be at most 78 characters.
FOLD_AT = 78
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")
# A folded value breaks only before a run of spaces, so unfolding gives back every character.
_CHUNK = re.compile(r" *[^ ]+")
_SUBJECT = re.compile(rb"(?im)^subject:[ \t]*(.*(?:\r?\n[ \t].*)*)")


class Action(StrEnum):
    """RFC 3464 §2.3.3: what happened to a recipient."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"


@dataclass(frozen=True)
class Outcome:
    """One recipient of a notice.

    :ivar reply: the reply that decided it (None: delivered by a relay that gave none).
    :ivar gave_up: failed after temporary failures only: the retries ran out.
    :ivar expired: ... because the message's lifetime ran out (Status 4.4.7).
    """

    recipient: str
    reply: Reply | None = None
    gave_up: bool = False
    expired: bool = False


@dataclass(frozen=True)
class Notice:
    """One DSN: a message, an event, and each recipient it reports on.

    :ivar envelope: the original message (its sender gets the notice).
    :ivar outcomes: the recipients reported, each with its own reply.
    :ivar now: when the event happened (Date, Last-Attempt-Date).
    :ivar queue_id: the message's queue id, for the postmaster.
    :ivar attempts: delivery attempts made so far, this one included.
    :ivar retry_until: a delay warning's Will-Retry-Until (arrival + lifetime), if known.
    :ivar delayed_for: a delay warning's threshold (seconds since arrival).
    :ivar note: a line for the human-readable part (an operator's reason, say).
    """

    action: Action
    envelope: Envelope
    outcomes: tuple[Outcome, ...]
    now: float
    queue_id: str | None = None
    attempts: int = 0
    retry_until: float | None = None
    delayed_for: float | None = None
    note: str | None = None
    #: Boundary and Message-ID randomness; fixed only by tests that compare whole texts.
    token: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    @property
    def recipients(self) -> list[str]:
        """The recipients reported, in order."""
        return [o.recipient for o in self.outcomes]

    def status(self, outcome: Outcome) -> str:
        """The RFC 3463 status of one recipient (DESIGN §1): the reply's own, 4.4.7 when the
        lifetime ran out; a default from the action where the reply carries none."""
        if outcome.expired:
            return "4.4.7"
        reply = outcome.reply
        if reply is not None and reply.enhanced_status_code:
            return reply.enhanced_status_code
        return {Action.FAILED: "5.0.0", Action.DELAYED: "4.0.0"}.get(self.action, "2.0.0")


def render(notice: Notice, host: str, *, headers_only: bool = False) -> bytes:
    """The whole DSN message from ``MAILER-DAEMON@host`` to the notice's sender.

    An SMTPUTF8 original gets an RFC 6533 DSN (``message/global-delivery-status``, the original
    as ``message/global``): it came over a path that carries UTF-8, and the notice goes back
    to its sender.
    """
    env = notice.envelope
    utf8 = env.smtputf8
    boundary = f"=_smtpq_{notice.token}"
    status_type = "global-delivery-status" if utf8 else "delivery-status"
    human = _human(notice, host, headers_only)
    report = _report(notice, host, utf8)
    head, body = env.flatten()
    returned = head if headers_only else head + body
    if utf8:
        returned_type = "message/global-headers" if headers_only else "message/global"
    else:
        returned_type = "text/rfc822-headers" if headers_only else "message/rfc822"
    if returned and not returned.endswith(b"\n"):
        returned += b"\r\n"
    eight_bit = not (human.isascii() and report.isascii() and returned.isascii())
    fields = [
        ("From", f"Mail Delivery System <MAILER-DAEMON@{host}>"),
        ("To", f"<{env.sender}>"),
        ("Subject", _SUBJECTS[notice.action]),
        ("Date", _date(notice.now)),
        ("Message-ID", f"<{notice.token}@{host}>"),
        ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0"),
        (
            "Content-Type",
            f'multipart/report; report-type={status_type}; boundary="{boundary}"',
        ),
    ]
    if eight_bit:
        fields.append(("Content-Transfer-Encoding", "8bit"))
    charset = "us-ascii" if human.isascii() else "utf-8"
    text = "".join(fold(name, value) for name, value in fields) + CRLF
    text += "This is a MIME-encapsulated message." + CRLF + CRLF
    text += _part(boundary, f"text/plain; charset={charset}", "Notification", human)
    text += _part(boundary, f"message/{status_type}", "Delivery report", report)
    described = "Undelivered message" if notice.action is Action.FAILED else "Message"
    text += _part(boundary, returned_type, described + (" headers" if headers_only else ""), "")
    tail = f"{CRLF}--{boundary}--{CRLF}".encode()
    return text.encode("utf-8") + returned + tail


_SUBJECTS = {
    Action.FAILED: "Undelivered Mail Returned to Sender",
    Action.DELAYED: "Delayed Mail (still being retried)",
    Action.DELIVERED: "Successful Mail Delivery Report",
    Action.RELAYED: "Successful Mail Delivery Report",
}


def _part(boundary: str, content_type: str, description: str, content: str) -> str:
    cte = "" if content.isascii() else f"Content-Transfer-Encoding: 8bit{CRLF}"
    head = f"--{boundary}{CRLF}{fold('Content-Type', content_type)}{cte}"
    # The line break before a boundary belongs to the boundary: one more keeps the content's.
    return f"{head}Content-Description: {description}{CRLF}{CRLF}{content}{CRLF if content else ''}"


# -- header fields ---------------------------------------------------------------------------


def fold(name: str, value: str, width: int = FOLD_AT) -> str:
    """``name: value`` and CRLF, folded before spaces so that lines keep within ``width``
    characters where the words allow (RFC 5322 §2.2.3); unfolding gives ``value`` back.

    Control characters become spaces: nothing in a value can start a field of its own.
    """
    value = _CONTROLS.sub(" ", value).strip()
    lines: list[str] = []
    line = f"{name}:"
    for chunk in _CHUNK.findall(" " + value):
        if len(line) + len(chunk) > width and line != f"{name}:":
            lines.append(line)
            line = chunk
        else:
            line += chunk
    lines.append(line)
    return CRLF.join(lines) + CRLF


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _ascii(text: str) -> str:
    """Text for a ``message/delivery-status`` field, which is US-ASCII: other characters as
    ``\\x{HEX}`` (RFC 6533's embedded form)."""
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)


def _address(address: str, utf8: bool) -> str:
    """``address-type; address`` for Final- and Original-Recipient (RFC 3464 §2.3.1, RFC 6533)."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {address if utf8 else utf8_addr_encode(address)}"


def _original(envelope: Envelope, rcpt: str, utf8: bool) -> str:
    """Original-Recipient: the ORCPT decoded from xtext, or the address as given in RCPT."""
    orcpt = envelope.rcpt_params.get(rcpt, {}).get("ORCPT")
    if not orcpt:
        return _address(rcpt, utf8)
    addr_type, address = split_orcpt(orcpt)
    if addr_type.lower() == "utf-8":
        address = utf8_addr_decode(address)
        return f"utf-8; {address if utf8 else utf8_addr_encode(address)}"
    return f"{addr_type}; {address if utf8 else _ascii(address)}"


def _report(notice: Notice, host: str, utf8: bool) -> str:
    """The delivery-status fields: per message, then a block per recipient (RFC 3464 §2)."""
    env = notice.envelope
    text = (lambda s: s) if utf8 else _ascii
    out: list[str] = []
    if env.dsn_envid:
        out.append(fold("Original-Envelope-Id", text(xtext_decode(env.dsn_envid))))
    out.append(fold("Reporting-MTA", f"dns; {host}"))
    if notice.queue_id:
        out.append(fold("X-Smtpq-Queue-ID", notice.queue_id))
    if env.timestamp is not None:
        out.append(fold("Arrival-Date", _date(env.timestamp)))
    for outcome in notice.outcomes:
        reply = outcome.reply
        out.append(CRLF)
        out.append(fold("Original-Recipient", _original(env, outcome.recipient, utf8)))
        out.append(fold("Final-Recipient", _address(outcome.recipient, utf8)))
        out.append(fold("Action", str(notice.action)))
        out.append(fold("Status", notice.status(outcome)))
        if reply is not None and reply.remote_host:
            out.append(fold("Remote-MTA", f"dns; {text(reply.remote_host)}"))
        if reply is not None and reply.code:
            kind = "smtp" if reply.remote_host else "x-local"
            out.append(fold("Diagnostic-Code", f"{kind}; {text(reply.as_sent())}"))
        out.append(fold("Last-Attempt-Date", _date(notice.now)))
        if notice.action is Action.DELAYED and notice.retry_until is not None:
            out.append(fold("Will-Retry-Until", _date(notice.retry_until)))
    return "".join(out)


# -- the human-readable part -----------------------------------------------------------------


def duration(seconds: float) -> str:
    """``'5 days'``, ``'2 hours 35 minutes'``: the two largest units, rounded down."""
    left = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count, left = divmod(left, size)
        if count:
            parts.append(f"{count} {unit}{'s' if count != 1 else ''}")
    return " ".join(parts[:2]) or "0 seconds"


_STAGES = {
    "END OF DATA": "end of DATA command",
    ".": "end of DATA command",
}


def recipient_line(outcome: Outcome, action: Action) -> str:
    """``<rcpt>: host NAME[IP] said: REPLY (in reply to RCPT TO command)``, or what we know."""
    reply = outcome.reply
    head = f"<{outcome.recipient}>: "
    if reply is None:
        return head + "delivered"
    said = _CONTROLS.sub(" ", str(reply))
    if not reply.remote_host:
        return head + said
    where = reply.remote_host + (f"[{reply.remote_ip}]" if reply.remote_ip else "")
    if action in (Action.DELIVERED, Action.RELAYED):
        return f"{head}delivered via host {where}: {said}"
    command = (reply.command or "").upper()
    if command == "CONNECT":
        return f"{head}connecting to host {where}: {said}"
    stage = _STAGES.get(command, f"{command} command" if command else "")
    return f"{head}host {where} said: {said}" + (f" (in reply to {stage})" if stage else "")


def _wrap(line: str, indent: str = "    ") -> list[str]:
    """A line of the human part in lines of at most 78 characters (where the words allow)."""
    return textwrap.wrap(
        line, FOLD_AT, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    ) or [""]


def _subject(envelope: Envelope) -> str | None:
    """The original Subject as text: raw UTF-8 (SMTPUTF8) and RFC 2047 words decoded."""
    match = _SUBJECT.search(envelope.flatten()[0])
    if match is None:
        return None
    text = match.group(1).decode("utf-8", "replace")
    with contextlib.suppress(ValueError, LookupError):
        text = str(make_header(decode_header(text)))
    return " ".join(_CONTROLS.sub(" ", text).split())


def _intro(notice: Notice, headers_only: bool) -> list[str]:
    """What happened, as paragraphs (each wrapped at 78 characters by the caller)."""
    action = notice.action
    if action is Action.DELAYED:
        late = duration(notice.delayed_for or 0)
        until = notice.retry_until
        return [
            "THIS IS A WARNING ONLY: you do not need to send your message again.",
            f"Your message has not been delivered after {late} to the recipients listed "
            "below; delivery is still being attempted"
            + (f", until {_date(until)}." if until is not None else "."),
        ]
    if action is Action.RELAYED:
        return [
            "Your message was delivered to the mail systems listed below. They do not send "
            "delivery notifications, so this is the last one you will have for these "
            "recipients, unless delivery fails further on."
        ]
    if action is Action.DELIVERED:
        return ["Your message was delivered to the recipients listed below."]
    what = "Its header is" if headers_only else "It is"
    paragraph = "Your message could not be delivered to the recipients listed below. "
    paragraph += f"{what} attached to this report."
    quit = [o for o in notice.outcomes if o.gave_up]
    arrival = notice.envelope.timestamp
    if quit and arrival is not None:
        why = (
            "the message expired, its time in the queue ran out"
            if any(o.expired for o in quit)
            else "retries exhausted, every attempt failed temporarily"
        )
        who = "" if len(quit) == len(notice.outcomes) else " to those with a temporary reply"
        attempts = f"{notice.attempts} attempt{'s' if notice.attempts != 1 else ''}"
        paragraph += (
            f" Delivery{who} was given up after {duration(notice.now - arrival)} and "
            f"{attempts}: {why}."
        )
    return [paragraph]


def _human(notice: Notice, host: str, headers_only: bool) -> str:
    lines = [f"This is the mail system at host {host}."]
    for paragraph in _intro(notice, headers_only):
        lines += ["", *_wrap(paragraph, indent="")]
    if notice.note:
        lines += ["", _CONTROLS.sub(" ", notice.note)]
    subject = _subject(notice.envelope)
    lines.append("")
    if subject is not None:
        lines += _wrap(f"Subject: {subject}")
    if notice.queue_id:
        lines.append(f"Queue ID: {notice.queue_id}")
    lines.append("")
    for outcome in notice.outcomes:
        lines += _wrap(recipient_line(outcome, notice.action))
    lines.append("")
    lines += _wrap(
        f"For help, please write to the postmaster of {host} <postmaster@{host}>, "
        "including this report.",
        indent="",
    )
    return CRLF.join(lines) + CRLF


def outcomes_for(recipients: Sequence[str], reply: Reply | None) -> tuple[Outcome, ...]:
    """The same reply for every recipient (a bounce built from one reply)."""
    return tuple(Outcome(r, reply) for r in recipients)
