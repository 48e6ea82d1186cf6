"""A checker of delivery status notifications: parsed with Python's ``email`` package, and the
report fields held to RFC 3464's grammar (§2.1-2.3; RFC 6533 for the global form).

``check_dsn(data)`` asserts and returns the parsed report, so that tests go on to compare
values: :class:`Dsn` has the message, its parts, the per-message fields and one dict of fields
per recipient (values unfolded, names as written).
"""

from __future__ import annotations

import email
import re
from dataclasses import dataclass
from email.message import Message
from email.policy import compat32
from email.utils import parsedate_to_datetime
from typing import cast

# RFC 5322 §3.2.3 atom (RFC 822's, which RFC 3464 refers to, is the same for our purposes).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_TYPED = re.compile(rf"^({_ATOM})[ \t]*;[ \t]*(.*)$")  # type ";" *text
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
# RFC 5322 §3.3 date-time (folding white space between its parts), a comment after it.
_DATE = re.compile(
    r"^(?:(Mon|Tue|Wed|Thu|Fri|Sat|Sun), *)? *\d{1,2} +(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|"
    r"Nov|Dec) +\d{4} +\d\d:\d\d(:\d\d)? +[+-]\d{4}( +\(.*\))?$"
)
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext

PER_MESSAGE = ("Original-Envelope-Id", "Reporting-MTA", "DSN-Gateway", "Received-From-MTA",
               "Arrival-Date")  # fmt: skip
PER_RECIPIENT = ("Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA",
                 "Diagnostic-Code", "Last-Attempt-Date", "Final-Log-ID",
                 "Will-Retry-Until")  # fmt: skip
_TYPED_FIELDS = frozenset({"Reporting-MTA", "DSN-Gateway", "Received-From-MTA",
                           "Original-Recipient", "Final-Recipient", "Remote-MTA",
                           "Diagnostic-Code"})  # fmt: skip
_DATE_FIELDS = frozenset({"Arrival-Date", "Last-Attempt-Date", "Will-Retry-Until"})


@dataclass
class Dsn:
    """A checked DSN."""

    message: Message
    human: str
    report_type: str
    per_message: dict[str, str]
    recipients: list[dict[str, str]]
    returned: Message | None

    def recipient(self, address: str) -> dict[str, str]:
        """The fields of the recipient whose Final-Recipient is ``address``."""
        [fields] = [r for r in self.recipients if typed(r["Final-Recipient"])[1] == address]
        return fields


def typed(value: str) -> tuple[str, str]:
    """``'rfc822; a@b'`` -> ``('rfc822', 'a@b')``."""
    match = _TYPED.match(value)
    assert match, value
    return match.group(1), match.group(2)


def _unfold(block: str) -> list[tuple[str, str]]:
    """The fields of a block, unfolded (RFC 5322 §2.2.3: CRLF before WSP is removed)."""
    fields: list[tuple[str, str]] = []
    for line in block.split("\r\n"):
        if line[:1] in (" ", "\t"):
            assert fields, f"continuation line first: {line!r}"
            assert line.strip(), "a folded line of white space only"
            name, value = fields[-1]
            fields[-1] = (name, value + line)
            continue
        name, colon, value = line.partition(":")
        assert colon, f"not a field: {line!r}"
        assert _FIELD_NAME.match(name), f"not a field name: {line!r}"
        fields.append((name, value.strip(" \t")))
    return fields


def _check_block(
    fields: list[tuple[str, str]], order: tuple[str, ...], utf8: bool
) -> dict[str, str]:
    """Known fields at most once and in the grammar's order, the others ``X-`` extensions; the
    values of typed and date fields well formed."""
    seen: dict[str, str] = {}
    position = -1
    for name, value in fields:
        canonical = next((k for k in order if k.lower() == name.lower()), None)
        if canonical is None:
            assert name.lower().startswith("x-"), f"unknown field {name}"
            seen[name] = value
            continue
        assert canonical not in seen, f"{canonical} twice"
        assert order.index(canonical) > position, f"{canonical} out of order"
        position = order.index(canonical)
        assert "\r" not in value
        assert "\n" not in value
        assert utf8 or value.isascii(), f"{canonical} is not US-ASCII: {value!r}"
        if canonical in _TYPED_FIELDS:
            typed(value)
        if canonical in _DATE_FIELDS:
            assert _DATE.match(value), f"{canonical}: {value!r}"
            parsedate_to_datetime(value)
        if canonical == "Status":
            assert _STATUS.match(value), value
        if canonical == "Action":
            assert value.lower() in _ACTIONS, value
        seen[canonical] = value
    return seen


def _raw_part(data: bytes, boundary: str, content_type: str) -> str:
    """The body of the MIME part of ``content_type``, as sent (the ``email`` package rebuilds
    delivery-status parts; the grammar is about the bytes)."""
    delimiter = b"\r\n--" + boundary.encode()
    for chunk in data.split(delimiter)[1:]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        if re.search(rb"(?im)^content-type:\s*" + re.escape(content_type.encode()), head):
            return body.decode("utf-8")
    raise AssertionError(f"no {content_type} part")


def check_dsn(data: bytes) -> Dsn:
    """Parse ``data`` as a DSN and check it; the parsed report."""
    header_block = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    for line in header_block.split("\r\n"):
        # Longer only where one word is: "Name: word", or a continuation line of one word.
        assert len(line) <= 78 or len(line.split()) <= 2, f"header line not folded: {line!r}"
    msg = email.message_from_bytes(data, policy=compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg["From"].startswith("Mail Delivery System <MAILER-DAEMON@")
    assert msg["Auto-Submitted"] == "auto-replied"
    report_type = str(msg.get_param("report-type"))
    assert report_type in ("delivery-status", "global-delivery-status")
    utf8 = report_type == "global-delivery-status"
    parts = cast(list[Message], msg.get_payload())
    assert 2 <= len(parts) <= 3
    human, status = parts[0], parts[1]
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == f"message/{report_type}"
    boundary = msg.get_boundary()
    assert boundary is not None
    raw = _raw_part(data, boundary, f"message/{report_type}")
    assert raw.endswith("\r\n"), "the last field must end with CRLF"
    blocks = [b for b in re.split(r"\r\n\r\n+", raw.strip("\r\n")) if b]
    assert len(blocks) >= 2, "a per-message block and at least one per-recipient block"
    per_message = _check_block(_unfold(blocks[0]), PER_MESSAGE, utf8)
    assert "Reporting-MTA" in per_message
    recipients = []
    for block in blocks[1:]:
        fields = _check_block(_unfold(block), PER_RECIPIENT, utf8)
        for required in ("Final-Recipient", "Action", "Status"):
            assert required in fields, f"{required} missing"
        if "Will-Retry-Until" in fields:
            assert fields["Action"] == "delayed", "Will-Retry-Until is for delayed recipients"
        recipients.append(fields)
    returned = parts[2] if len(parts) == 3 else None
    if returned is not None:
        allowed = ["message/rfc822", "text/rfc822-headers"]
        if utf8:
            allowed += ["message/global", "message/global-headers"]
        assert returned.get_content_type() in allowed
    payload = human.get_payload(decode=True)
    assert isinstance(payload, bytes)
    text = payload.decode(human.get_content_charset() or "us-ascii")
    for line in text.splitlines():
        assert len(line) <= 78 or len(line.split()) == 1, f"human part line too long: {line!r}"
    return Dsn(msg, text, report_type, per_message, recipients, returned)
