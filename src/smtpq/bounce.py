"""Bounces: RFC 3464 delivery status notifications, built as raw bytes.

A :class:`Bounce` is an :class:`~smtpq.envelope.Envelope` from the null sender to the original
sender, whose message is a ``multipart/report; report-type=delivery-status`` with a human part, a
``message/delivery-status`` part (RFC 3464 §2) and the original message (or its headers).
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from smtpq.envelope import Envelope
from smtpq.reply import Reply

__all__ = ["Bounce", "BounceFactory", "notify_wants"]

CRLF = "\r\n"


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _oneline(text: str) -> str:
    """Header-safe text: no line breaks can be injected into the report."""
    return " ".join(text.split())


class Bounce(Envelope):
    """A DSN for the recipients of ``envelope``, all of which got ``reply``.

    :param envelope: the original message, with only the recipients this notice is about.
    :param reply: the reply that failed them (or delayed them, with ``action='delayed'``).
    :param headers_only: return only the original's headers (RET=HDRS), not the whole message.
    :param reporting_mta: our host name, for Reporting-MTA and the From address.
    :param now: when the notice is made (Last-Attempt-Date, Date), epoch seconds.
    :param action: ``'failed'`` or ``'delayed'`` (RFC 3464 §2.3.3).
    :param diagnostic: text added to the explanation (for example, that retries ran out).
    """

    def __init__(
        self,
        envelope: Envelope,
        reply: Reply,
        headers_only: bool = False,
        *,
        reporting_mta: str | None = None,
        now: float | None = None,
        action: str = "failed",
        diagnostic: str | None = None,
    ) -> None:
        super().__init__("", [envelope.sender])
        host = reporting_mta or socket.getfqdn()
        when = now if now is not None else (envelope.timestamp or 0.0)
        self.timestamp = when
        self.receiver = host
        self.parse(_build(envelope, reply, headers_only, host, when, action, diagnostic))


def _status(reply: Reply) -> str:
    if reply.enhanced_status_code:
        return reply.enhanced_status_code
    return "5.0.0" if reply.is_permanent() else "4.0.0"


def _build(
    env: Envelope,
    reply: Reply,
    headers_only: bool,
    host: str,
    now: float,
    action: str,
    diagnostic: str | None,
) -> bytes:
    boundary = f"=_smtpq_{uuid.uuid4().hex}"
    failed = action == "failed"
    subject = (
        "Undelivered Mail Returned to Sender" if failed else "Delayed Mail (still being retried)"
    )
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{env.sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{uuid.uuid4().hex}@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    rcpts = "".join(f"    <{r}>{CRLF}" for r in env.recipients)
    what = (
        "could not be delivered to the following recipients:"
        if failed
        else "has not yet been delivered to the following recipients; delivery will be retried:"
    )
    human = (
        f"This is the mail system at host {host}.{CRLF}{CRLF}"
        f"Your message {what}{CRLF}{CRLF}{rcpts}{CRLF}"
        f"The remote reply was:{CRLF}    {_oneline(str(reply))}{CRLF}"
    )
    if diagnostic:
        human += f"{CRLF}{_oneline(diagnostic)}{CRLF}"
    report = [f"Reporting-MTA: dns; {host}"]
    if env.dsn_envid:
        report.append(f"Original-Envelope-Id: {_oneline(env.dsn_envid)}")
    if env.timestamp is not None:
        report.append(f"Arrival-Date: {_date(env.timestamp)}")
    report.append("")
    status = _status(reply)
    diag = _oneline(str(reply))
    if diagnostic:
        diag = f"{diag} ({_oneline(diagnostic)})"
    for rcpt in env.recipients:
        orcpt = env.rcpt_params.get(rcpt, {}).get("ORCPT")
        if orcpt:
            report.append(f"Original-Recipient: {_oneline(orcpt)}")
        utf8 = not rcpt.isascii()
        report.append(f"Final-Recipient: {'utf-8' if utf8 else 'rfc822'}; {rcpt}")
        report.append(f"Action: {action}")
        report.append(f"Status: {status}")
        if reply.remote_host:
            report.append(f"Remote-MTA: dns; {_oneline(reply.remote_host)}")
        if reply.code:
            report.append(f"Diagnostic-Code: smtp; {diag}")
        report.append(f"Last-Attempt-Date: {_date(now)}")
        report.append("")
    original_head, original_body = env.flatten()
    if headers_only:
        returned_type, returned = "text/rfc822-headers", original_head
    else:
        returned_type, returned = "message/rfc822", original_head + original_body
    if env.smtputf8:  # RFC 6533: internationalised messages are returned as message/global
        returned_type = "message/global-headers" if headers_only else "message/global"
    text = CRLF.join(head) + CRLF + CRLF
    text += "This is a MIME-encapsulated message." + CRLF + CRLF
    text += f"--{boundary}{CRLF}Content-Type: text/plain; charset=utf-8{CRLF}"
    text += f"Content-Description: Notification{CRLF}{CRLF}{human}{CRLF}"
    text += f"--{boundary}{CRLF}Content-Type: message/delivery-status{CRLF}"
    text += f"Content-Description: Delivery report{CRLF}{CRLF}{CRLF.join(report)}{CRLF}"
    text += f"--{boundary}{CRLF}Content-Type: {returned_type}{CRLF}"
    text += f"Content-Description: Undelivered message{CRLF}{CRLF}"
    tail = f"{CRLF}--{boundary}--{CRLF}".encode()
    if not returned.endswith(b"\n"):
        returned += b"\r\n"
    return text.encode("utf-8") + returned + tail


def notify_wants(envelope: Envelope, recipient: str, kind: str) -> bool:
    """Whether RFC 3461 NOTIFY for ``recipient`` asks for ``kind`` (``FAILURE``, ``DELAY``).

    Without NOTIFY, failures and delays may be reported (RFC 3461 §4.1: the MTA's own settings
    decide whether delay warnings are sent at all).
    """
    notify = envelope.rcpt_params.get(recipient, {}).get("NOTIFY")
    if notify is None:
        return kind in ("FAILURE", "DELAY")
    values = {v.strip().upper() for v in notify.split(",")}
    return "NEVER" not in values and kind in values


@dataclass
class BounceFactory:
    """The default ``bounce_factory(envelope, reply)``: a DSN unless none may or need be sent.

    None for a null sender (RFC 5321 §6.1: never bounce a bounce) and for recipients whose NOTIFY
    excludes failures; RET=HDRS returns headers only.
    """

    reporting_mta: str | None = None

    def __call__(
        self,
        envelope: Envelope,
        reply: Reply,
        *,
        now: float | None = None,
        diagnostic: str | None = None,
        action: str = "failed",
    ) -> Bounce | None:
        """Build the bounce, or None."""
        if not envelope.sender:
            return None
        kind = "FAILURE" if action == "failed" else "DELAY"
        wanted = [r for r in envelope.recipients if notify_wants(envelope, r, kind)]
        if not wanted:
            return None
        subject = envelope if wanted == envelope.recipients else envelope.copy(wanted)
        return Bounce(
            subject,
            reply,
            headers_only=(envelope.dsn_ret or "").upper() == "HDRS",
            reporting_mta=self.reporting_mta,
            now=now,
            action=action,
            diagnostic=diagnostic,
        )
