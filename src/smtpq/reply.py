"""SMTP replies as values, and the one place where a reply is classified.

A :class:`Reply` carries the three-digit code, the text (with its RFC 3463 enhanced status code
split out), and optionally the command that provoked it and the remote host that gave it.
"""

from __future__ import annotations

import re
from enum import Enum

_ESC = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_CODE = re.compile(r"^[2-5]\d\d$")


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
    """An SMTP reply.

    ``Reply('250', 'Ok').message == '2.0.0 Ok'``: a leading enhanced status code in ``message`` is
    split into :attr:`enhanced_status_code`, and one is filled in from the code's class where the
    text has none (or where its class contradicts the code's).
    """

    __slots__ = ("_esc", "_text", "address", "code", "command", "remote_host")

    def __init__(
        self,
        code: str | None = None,
        message: str | None = None,
        command: str | None = None,
        address: str | None = None,
        *,
        remote_host: str | None = None,
    ) -> None:
        self.code = code
        self.command = command
        #: The envelope address the reply is about (the RCPT TO address, say), as in slimta.
        self.address = address
        #: The host that gave the reply, for a DSN's Remote-MTA; None when the reply is ours.
        self.remote_host = remote_host
        self._esc: str | None = None
        self._text = ""
        self.message = message

    @property
    def message(self) -> str | None:
        """The reply text with its enhanced status code in front (``'2.0.0 Ok'``)."""
        if self._esc is None:
            return self._text if self._text or self.code else None
        return f"{self._esc} {self._text}".rstrip()

    @message.setter
    def message(self, value: str | None) -> None:
        text = value or ""
        esc: str | None = None
        match = _ESC.match(text)
        if match:
            esc = ".".join(match.groups())
            text = text[match.end() :]
        cls = self.code[0] if self.code and _CODE.match(self.code) else None
        if cls in ("2", "4", "5") and (esc is None or esc[0] != cls):
            esc = f"{cls}.0.0" if esc is None else cls + esc[1:]
        self._esc = esc
        self._text = text

    @property
    def text(self) -> str:
        """The reply text without its enhanced status code."""
        return self._text

    @property
    def enhanced_status_code(self) -> str | None:
        """The RFC 3463 status code (``'5.1.1'``), or None for codes that carry none."""
        return self._esc

    @enhanced_status_code.setter
    def enhanced_status_code(self, value: str | None) -> None:
        self._esc = value

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

    def copy(self) -> Reply:
        """An independent copy."""
        new = Reply(self.code, None, self.command, self.address, remote_host=self.remote_host)
        new._esc, new._text = self._esc, self._text
        return new

    def to_dict(self) -> dict[str, str | None]:
        """Plain values, for storage."""
        return {
            "code": self.code,
            "message": self.message,
            "command": self.command,
            "address": self.address,
            "remote_host": self.remote_host,
        }

    @classmethod
    def from_dict(cls, data: dict[str, str | None]) -> Reply:
        """The inverse of :meth:`to_dict`."""
        return cls(
            data.get("code"),
            data.get("message"),
            data.get("command"),
            data.get("address"),
            remote_host=data.get("remote_host"),
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
