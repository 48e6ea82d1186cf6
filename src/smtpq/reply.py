"""SMTP replies as values, and the one place where a reply is classified.

A :class:`Reply` carries the three-digit code, the text (with its RFC 3463 enhanced status code
split out), and optionally the command that provoked it and the remote host that gave it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypedDict, Unpack

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


def classify(code: str | None) -> ReplyClass:
    """Classify a reply code; anything not a well-formed code is UNKNOWN."""
    if code is None or not _CODE.match(code):
        return ReplyClass.UNKNOWN
    return {
        "2": ReplyClass.SUCCESS,
        "3": ReplyClass.INTERMEDIATE,
        "4": ReplyClass.TRANSIENT,
        "5": ReplyClass.PERMANENT,
    }[code[0]]


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
        return classify(self.code)

    def is_success(self) -> bool:
        """A 2xx reply."""
        return self.reply_class is ReplyClass.SUCCESS

    def is_transient(self) -> bool:
        """A 4xx reply: try again later."""
        return self.reply_class is ReplyClass.TRANSIENT

    def is_permanent(self) -> bool:
        """A 5xx reply: do not try again."""
        return self.reply_class is ReplyClass.PERMANENT

    def is_error(self) -> bool:
        """A 4xx or 5xx reply."""
        return self.reply_class in (ReplyClass.TRANSIENT, ReplyClass.PERMANENT)

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


def queue_error_reply() -> Reply:
    """``451 4.3.0``: the queue could not take responsibility for the message."""
    return Reply("451", "4.3.0 Queue error, message not accepted; try again later")


def unexpected_error_reply() -> Reply:
    """``450 4.0.0``: the relay failed in a way nobody foresaw; try again later."""
    return Reply("450", "4.0.0 Unexpected error during delivery attempt")


def missing_recipient_reply() -> Reply:
    """``450 4.0.0``: the relay returned no result for a recipient; treat it as transient."""
    return Reply("450", "4.0.0 No result for this recipient")
