"""SMTP replies as values, the one place where a reply is classified, and the one table of the
standard replies smtpq gives (:class:`Replies`, with :class:`ReplyCode` naming the bare codes).

A :class:`Reply` carries the three-digit code, the text (with its RFC 3463 enhanced status code
split out), and optionally the command that provoked it and the remote host that gave it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import Enum, IntEnum
from typing import Any, TypedDict, Unpack, final

_ESC = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_CODE = re.compile(r"^[2-5]\d\d$")


class ReplyChanges(TypedDict, total=False):
    """What :meth:`Reply.replace` may change."""

    code: str | None
    message: str | None
    command: str | None
    address: str | None
    remote_host: str | None
    remote_ip: str | None
    remote_dsn: bool | None
    enhanced_status_code: str


#: A reply as plain values (:meth:`Reply.to_dict`), as storages keep it.
ReplyDict = dict[str, str | bool | None]

_FIELDS = ("code", "command", "address", "remote_host", "remote_ip", "remote_dsn")


class ReplyClass(Enum):
    """What a reply means for the message: RFC 5321 §4.2.1, by the code's first digit."""

    SUCCESS = "success"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    INTERMEDIATE = "intermediate"
    UNKNOWN = "unknown"


_CLASSES = {
    "2": ReplyClass.SUCCESS,
    "3": ReplyClass.INTERMEDIATE,
    "4": ReplyClass.TRANSIENT,
    "5": ReplyClass.PERMANENT,
}


def classify(code: str | None) -> ReplyClass:
    """Classify a reply code; anything not a well-formed code is UNKNOWN."""
    if code is None or not _CODE.match(code):
        return ReplyClass.UNKNOWN
    return _CLASSES[code[0]]


class Reply:
    """An SMTP reply, immutable: changes make a new one (:meth:`replace`).

    ``Reply('250', 'Ok').message == '2.0.0 Ok'``: a leading enhanced status code in ``message`` is
    split into :attr:`enhanced_status_code`, and one is filled in from the code's class where the
    text has none (or where its class contradicts the code's).

    :ivar code: the three-digit code (a string, as in python-slimta), or None.
    :ivar command: the command the reply answered (``"RCPT TO"``), when known.
    :ivar address: the envelope address the reply is about (the RCPT TO address, say).
    :ivar remote_host: the host that gave the reply (its name), for a DSN's Remote-MTA; None
        when the reply is smtpq's own.
    :ivar remote_ip: that host's address, when the reply came over a connection.
    :ivar remote_dsn: for a success from a next hop: whether it advertised DSN (RFC 3461), so
        that the DSN parameters were passed on; None when unknown (not an SMTP relay).
    """

    __slots__ = (
        "_class",
        "_esc",
        "_raw",
        "_text",
        "address",
        "code",
        "command",
        "remote_dsn",
        "remote_host",
        "remote_ip",
    )

    code: str | None
    command: str | None
    address: str | None
    remote_host: str | None
    remote_ip: str | None
    remote_dsn: bool | None
    _class: ReplyClass
    _esc: str | None
    _raw: str | None
    _text: str

    def __init__(
        self,
        code: str | None = None,
        message: str | None = None,
        command: str | None = None,
        address: str | None = None,
        *,
        remote_host: str | None = None,
        remote_ip: str | None = None,
        remote_dsn: bool | None = None,
    ) -> None:
        text = message or ""
        esc: str | None = None
        match = _ESC.match(text)
        if match:
            esc = ".".join(match.groups())
            text = text[match.end() :]
        cls = code[0] if code and _CODE.match(code) else None
        if cls in ("2", "4", "5") and (esc is None or esc[0] != cls):
            esc = f"{cls}.0.0" if esc is None else cls + esc[1:]
        init = object.__setattr__
        init(self, "code", code)
        init(self, "command", command)
        init(self, "address", address)
        init(self, "remote_host", remote_host)
        init(self, "remote_ip", remote_ip)
        init(self, "remote_dsn", remote_dsn)
        # Classified once: the queue asks every reply its class, often more than once.
        init(self, "_class", _CLASSES[cls] if cls is not None else ReplyClass.UNKNOWN)
        init(self, "_esc", esc)
        init(self, "_raw", message)
        init(self, "_text", text)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Reply is immutable; use replace({name}=...)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Reply is immutable")

    def replace(self, **changes: Unpack[ReplyChanges]) -> Reply:
        """A copy with the given fields changed. ``enhanced_status_code`` replaces the code in
        front of the text (the new ``message``'s, or the old text)."""
        fields: dict[str, Any] = {name: getattr(self, name) for name in _FIELDS}
        fields["message"] = None
        fields.update(changes)
        esc = fields.pop("enhanced_status_code", None)
        if "message" not in changes:
            fields["message"] = self._text if esc else self._raw
        if esc:
            fields["message"] = f"{esc} {fields['message'] or ''}".rstrip()
        return Reply(**fields)

    @property
    def message(self) -> str | None:
        """The reply text with its enhanced status code in front (``'2.0.0 Ok'``)."""
        if self._esc is None:
            return self._text if self._text or self.code else None
        return f"{self._esc} {self._text}".rstrip()

    def as_sent(self) -> str:
        """The reply as its sender gave it: the code and the text without the enhanced status
        code filled in or corrected here (for a DSN's Diagnostic-Code, RFC 3464 §2.3.6)."""
        return f"{self.code or ''} {self._raw or ''}".strip()

    @property
    def text(self) -> str:
        """The reply text without its enhanced status code."""
        return self._text

    @property
    def enhanced_status_code(self) -> str | None:
        """The RFC 3463 status code (``'5.1.1'``), or None for codes that carry none."""
        return self._esc

    @property
    def reply_class(self) -> ReplyClass:
        """The class of this reply's code."""
        return self._class

    def is_success(self) -> bool:
        """A 2xx reply."""
        return self._class is ReplyClass.SUCCESS

    def is_transient(self) -> bool:
        """A 4xx reply: try again later."""
        return self._class is ReplyClass.TRANSIENT

    def is_permanent(self) -> bool:
        """A 5xx reply: do not try again."""
        return self._class is ReplyClass.PERMANENT

    def is_error(self) -> bool:
        """A 4xx or 5xx reply."""
        return self._class is ReplyClass.TRANSIENT or self._class is ReplyClass.PERMANENT

    def to_dict(self) -> ReplyDict:
        """Plain values, for storage."""
        data: ReplyDict = {
            "code": self.code,
            "message": self._raw,
            "command": self.command,
            "address": self.address,
            "remote_host": self.remote_host,
        }
        if self.remote_ip is not None:
            data["remote_ip"] = self.remote_ip
        if self.remote_dsn is not None:
            data["remote_dsn"] = self.remote_dsn
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, str | bool | None]) -> Reply:
        """The inverse of :meth:`to_dict`."""

        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) else None

        dsn = data.get("remote_dsn")
        return cls(
            text("code"),
            text("message"),
            text("command"),
            text("address"),
            remote_host=text("remote_host"),
            remote_ip=text("remote_ip"),
            remote_dsn=dsn if isinstance(dsn, bool) else None,
        )

    def __str__(self) -> str:
        return f"{self.code or ''} {self.message or ''}".strip()

    def __repr__(self) -> str:
        return f"Reply({self.code!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return (self.code, self.message) == (other.code, other.message)

    def __hash__(self) -> int:
        return hash((self.code, self.message))

    def __bool__(self) -> bool:
        return self.code is not None


class ReplyCode(IntEnum):
    """The bare reply codes smtpq gives or reads (RFC 5321 §4.2.3, RFC 3207, RFC 4954)."""

    SERVICE_READY = 220
    CLOSING = 221
    AUTH_SUCCESSFUL = 235
    OK = 250
    CANNOT_VRFY = 252
    HELP = 214
    AUTH_CONTINUE = 334
    START_MAIL_INPUT = 354
    SERVICE_UNAVAILABLE = 421
    MAILBOX_UNAVAILABLE_TEMPORARILY = 450
    LOCAL_ERROR = 451
    INSUFFICIENT_STORAGE = 452
    TEMPORARY_FAILURE = 454
    SYNTAX_ERROR = 500
    PARAMETER_SYNTAX_ERROR = 501
    NOT_IMPLEMENTED = 502
    BAD_SEQUENCE = 503
    PARAMETER_NOT_IMPLEMENTED = 504
    ACCESS_REQUIRED = 530
    AUTH_FAILED = 535
    ENCRYPTION_REQUIRED = 538
    MAILBOX_UNAVAILABLE = 550
    EXCEEDED_STORAGE = 552
    MAILBOX_NAME_NOT_ALLOWED = 553
    TRANSACTION_FAILED = 554
    PARAMETERS_NOT_RECOGNIZED = 555


def _r(code: ReplyCode, message: str) -> Reply:
    return Reply(str(int(code)), message)


@final
class Replies:
    """The standard replies, in one table: what smtpq's server says, and its own outcomes.

    Replies are immutable, so these are shared; a reply with a variable part is made by the
    functions below the table.
    """

    BYE = _r(ReplyCode.CLOSING, "2.0.0 Bye")
    AUTH_OK = _r(ReplyCode.AUTH_SUCCESSFUL, "2.7.0 Authentication successful")
    OK = _r(ReplyCode.OK, "2.0.0 OK")
    SENDER_OK = _r(ReplyCode.OK, "2.1.0 OK")
    RECIPIENT_OK = _r(ReplyCode.OK, "2.1.5 OK")
    VRFY = _r(
        ReplyCode.CANNOT_VRFY,
        "2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
    )
    HELP = _r(
        ReplyCode.HELP,
        "2.0.0 Commands: AUTH BDAT DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET STARTTLS VRFY",
    )
    START_DATA = _r(ReplyCode.START_MAIL_INPUT, "End data with <CR><LF>.<CR><LF>")
    READY_FOR_TLS = _r(ReplyCode.SERVICE_READY, "2.0.0 Ready to start TLS")

    SHUTTING_DOWN = _r(ReplyCode.SERVICE_UNAVAILABLE, "4.3.2 Service shutting down")
    TOO_MANY_ERRORS = _r(ReplyCode.SERVICE_UNAVAILABLE, "4.7.0 Error: too many errors")
    TOO_MANY_AUTH_FAILURES = _r(
        ReplyCode.SERVICE_UNAVAILABLE, "4.7.0 Error: too many failed authentications"
    )
    TOO_MANY_COMMANDS = _r(ReplyCode.SERVICE_UNAVAILABLE, "4.7.0 Error: too many commands")
    SERVER_ERROR = _r(ReplyCode.SERVICE_UNAVAILABLE, "4.3.0 Internal server error")
    QUEUE_ERROR = _r(
        ReplyCode.LOCAL_ERROR, "4.3.0 Queue error, message not accepted; try again later"
    )
    TOO_MANY_RECIPIENTS = _r(ReplyCode.INSUFFICIENT_STORAGE, "4.5.3 Too many recipients")
    AUTH_UNAVAILABLE = _r(ReplyCode.TEMPORARY_FAILURE, "4.7.0 Temporary authentication failure")
    TLS_UNAVAILABLE = _r(ReplyCode.TEMPORARY_FAILURE, "4.7.0 TLS not available")
    UNEXPECTED_ERROR = _r(
        ReplyCode.MAILBOX_UNAVAILABLE_TEMPORARILY, "4.0.0 Unexpected error during delivery attempt"
    )
    MISSING_RECIPIENT = _r(
        ReplyCode.MAILBOX_UNAVAILABLE_TEMPORARILY, "4.0.0 No result for this recipient"
    )

    UNRECOGNIZED = _r(ReplyCode.SYNTAX_ERROR, "5.5.1 Error: command not recognized")
    BAD_SYNTAX = _r(ReplyCode.SYNTAX_ERROR, "5.5.2 Error: bad syntax")
    NUL_IN_COMMAND = _r(ReplyCode.SYNTAX_ERROR, "5.5.2 Error: NUL character in command")
    BAD_HELLO_NAME = _r(ReplyCode.PARAMETER_SYNTAX_ERROR, "5.5.2 Error: invalid HELO/EHLO name")
    LINE_TOO_LONG = _r(ReplyCode.SYNTAX_ERROR, "5.5.6 Line too long")
    BAD_SENDER = _r(ReplyCode.PARAMETER_SYNTAX_ERROR, "5.1.7 Bad sender address syntax")
    BAD_RECIPIENT = _r(ReplyCode.PARAMETER_SYNTAX_ERROR, "5.1.3 Bad recipient address syntax")
    BAD_BASE64 = _r(ReplyCode.PARAMETER_SYNTAX_ERROR, "5.5.2 Can't decode base64")
    BAD_PLAIN = _r(ReplyCode.PARAMETER_SYNTAX_ERROR, "5.5.2 Can't split auth value")
    AUTH_ABORTED = _r(ReplyCode.PARAMETER_SYNTAX_ERROR, "5.7.0 Auth aborted")
    NOT_IMPLEMENTED = _r(ReplyCode.NOT_IMPLEMENTED, "5.5.1 Error: command not implemented")
    BAD_SEQUENCE = _r(ReplyCode.BAD_SEQUENCE, "5.5.1 Error: bad sequence of commands")
    NEED_HELO = _r(ReplyCode.BAD_SEQUENCE, "5.5.1 Error: send HELO/EHLO first")
    NEED_EHLO = _r(ReplyCode.BAD_SEQUENCE, "5.5.1 Error: send EHLO first")
    NESTED_MAIL = _r(ReplyCode.BAD_SEQUENCE, "5.5.1 Error: nested MAIL command")
    NEED_MAIL = _r(ReplyCode.BAD_SEQUENCE, "5.5.1 Error: need MAIL command")
    NEED_RCPT = _r(ReplyCode.BAD_SEQUENCE, "5.5.1 Error: need RCPT command")
    IN_TRANSACTION = _r(ReplyCode.BAD_SEQUENCE, "5.5.1 Error: MAIL transaction in progress")
    DATA_AFTER_BDAT = _r(ReplyCode.BAD_SEQUENCE, "5.5.1 Error: DATA after BDAT")
    ALREADY_AUTHENTICATED = _r(ReplyCode.BAD_SEQUENCE, "5.5.1 Error: already authenticated")
    AUTH_NOT_ENABLED = _r(ReplyCode.BAD_SEQUENCE, "5.5.1 Error: authentication not enabled")
    TLS_ACTIVE = _r(ReplyCode.BAD_SEQUENCE, "5.5.1 Error: TLS already active")
    UNKNOWN_MECHANISM = _r(
        ReplyCode.PARAMETER_NOT_IMPLEMENTED, "5.5.4 Unrecognized authentication type"
    )
    TLS_REQUIRED = _r(ReplyCode.ACCESS_REQUIRED, "5.7.0 Must issue a STARTTLS command first")
    AUTH_REQUIRED = _r(ReplyCode.ACCESS_REQUIRED, "5.7.0 Authentication required")
    AUTH_FAILED = _r(ReplyCode.AUTH_FAILED, "5.7.8 Authentication credentials invalid")
    ENCRYPTION_REQUIRED = _r(
        ReplyCode.ENCRYPTION_REQUIRED,
        "5.7.11 Encryption required for requested authentication mechanism",
    )
    NO_DOMAIN = _r(ReplyCode.MAILBOX_UNAVAILABLE, "5.1.3 Recipient address must include a domain")
    PREGREET = _r(ReplyCode.TRANSACTION_FAILED, "5.5.1 Error: commands sent before the greeting")
    TOO_BIG = _r(
        ReplyCode.EXCEEDED_STORAGE, "5.3.4 Message size exceeds fixed maximum message size"
    )
    NOT_UTF8 = _r(ReplyCode.MAILBOX_NAME_NOT_ALLOWED, "5.6.7 Address is not valid UTF-8")
    NEEDS_SMTPUTF8 = _r(
        ReplyCode.MAILBOX_NAME_NOT_ALLOWED, "5.6.7 Non-ASCII address requires SMTPUTF8"
    )


# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
_MAX_REPLY_LINE = 510


def greeting_reply(hostname: str) -> Reply:
    """``220``: the server's greeting (sent without an enhanced code, RFC 2034 §3)."""
    return _r(ReplyCode.SERVICE_READY, f"{hostname} ESMTP smtpq")


def timeout_reply(hostname: str) -> Reply:
    """``421 4.4.2``: the client was silent too long (RFC 5321 §4.5.3.2), or sent its message
    slower than the minimum rate."""
    return _r(ReplyCode.SERVICE_UNAVAILABLE, f"4.4.2 {hostname} Timeout exceeded")


def session_limit_reply(hostname: str) -> Reply:
    """``421 4.7.0``: the session has lasted as long as one may."""
    return _r(ReplyCode.SERVICE_UNAVAILABLE, f"4.7.0 {hostname} Error: session time limit exceeded")


def connection_limit_reply(hostname: str, ip: str | None = None) -> Reply:
    """``421 4.7.0``: too many connections, from everyone or (``ip``) from this client (Postfix's
    words)."""
    whom = f" from {ip}" if ip else ""
    return _r(ReplyCode.SERVICE_UNAVAILABLE, f"4.7.0 {hostname} Error: too many connections{whom}")


def syntax_reply(usage: str) -> Reply:
    """``501 5.5.4``: a command's arguments are wrong; ``usage`` shows the right form."""
    return _r(ReplyCode.PARAMETER_SYNTAX_ERROR, f"5.5.4 Syntax: {usage}")


def parameter_reply(text: str) -> Reply:
    """``501 5.5.4``: an ESMTP parameter has a bad value."""
    return _r(ReplyCode.PARAMETER_SYNTAX_ERROR, f"5.5.4 {text}")


def unsupported_parameter_reply(keyword: str) -> Reply:
    """``555 5.5.4``: a MAIL or RCPT parameter we do not know (RFC 5321 §4.1.1.11)."""
    return _r(ReplyCode.PARAMETERS_NOT_RECOGNIZED, f"5.5.4 Unsupported option: {keyword}")


def relay_denied_reply(address: str) -> Reply:
    """``554 5.7.1``: the client may not send to ``address`` through us."""
    return _r(ReplyCode.TRANSACTION_FAILED, f"5.7.1 <{address}>: Relay access denied")


def unknown_recipient_reply(address: str) -> Reply:
    """``550 5.1.1``: ``address`` is in a relay domain but not in the recipient map (Postfix's
    words for ``relay_recipient_maps``)."""
    return _r(
        ReplyCode.MAILBOX_UNAVAILABLE,
        f"5.1.1 <{address}>: Recipient address rejected: User unknown in relay recipient table",
    )


def chunk_received_reply(size: int) -> Reply:
    """``250 2.0.0``: a BDAT chunk (not the last) arrived (RFC 3030)."""
    return _r(ReplyCode.OK, f"2.0.0 Ok: {size} bytes")


def accepted_reply(ids: list[str]) -> Reply:
    """``250 2.6.0`` naming the queue ids, kept within one reply line."""
    head = "2.6.0 Message accepted for delivery; queued as "
    text = head + " ".join(ids)
    if len(text) + 4 > _MAX_REPLY_LINE:
        text = f"{head}{ids[0]} and {len(ids) - 1} more"
    return _r(ReplyCode.OK, text)


def queue_error_reply() -> Reply:
    """``451 4.3.0``: the queue could not take responsibility for the message."""
    return Replies.QUEUE_ERROR


def unexpected_error_reply() -> Reply:
    """``450 4.0.0``: the relay failed in a way nobody foresaw; try again later."""
    return Replies.UNEXPECTED_ERROR


def missing_recipient_reply() -> Reply:
    """``450 4.0.0``: the relay returned no result for a recipient; treat it as transient."""
    return Replies.MISSING_RECIPIENT
