"""Command arguments to values: paths, ESMTP parameters, BDAT and AUTH arguments. Pure.

Each parser takes the argument text (after the verb) and returns values or raises
:class:`Refusal` with the reply to give; the connection turns a refusal into a
:class:`~smtpq.smtp.RemoteProtocolError` and counts it.
"""

from __future__ import annotations

import re
from typing import Final

from smtpq.dsn import DsnParamError, parse_mail_params, parse_rcpt_params
from smtpq.reply import (
    Replies,
    Reply,
    parameter_reply,
    syntax_reply,
    unsupported_parameter_reply,
)
from smtpq.smtp._server_events import MailFrom, RcptTo

__all__ = [
    "AUTH_LINE",
    "COMMAND_LINE",
    "LINE_LIMITS",
    "MAX_LINE",
    "Refusal",
    "decode_argument",
    "parse_auth",
    "parse_bdat",
    "parse_mail",
    "parse_path",
    "parse_rcpt",
]

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF...
COMMAND_LINE: Final = 512
#: ... and each extension that adds MAIL or RCPT parameters adds room: RFC 1870 SIZE (26),
#: RFC 6152 BODY (20, as Postfix allows), RFC 6531 SMTPUTF8 (10), RFC 3461 ENVID and RET (100)
#: and NOTIFY and ORCPT (500), RFC 4954 §5 AUTH= (500).
MAIL_LINE: Final = COMMAND_LINE + 26 + 20 + 10 + 100 + 500
RCPT_LINE: Final = COMMAND_LINE + 500
#: RFC 4954 §4: an AUTH command and each SASL response may be 12,288 octets.
AUTH_LINE: Final = 12288
#: Command -> its line limit in octets, CRLF included; any other command has COMMAND_LINE.
LINE_LIMITS: Final = {b"MAIL": MAIL_LINE, b"RCPT": RCPT_LINE, b"AUTH": AUTH_LINE}
#: The longest line there is any point in keeping while its end has not arrived.
MAX_LINE: Final = AUTH_LINE

# RFC 1870 allows any number; twenty digits are more octets than anyone will send.
_MAX_SIZE_DIGITS = 20


class Refusal(Exception):
    """A command cannot be taken: :attr:`reply` says why."""

    def __init__(self, reply: Reply, why: str) -> None:
        super().__init__(why)
        self.reply = reply


# RFC 5321 §4.1.2, liberal where real senders are: a local part may have dots anywhere (as
# Postfix and aiosmtpd accept), labels and local parts may be UTF-8 (RFC 6531); no comments, no
# spaces outside quotes, and no control character anywhere (none is in atext, qtextSMTP or
# dtext: an address with one would reach logs and headers).
_CONTROLS = r"\x00-\x1f\x7f"
_ATOMS = rf'[^\s<>()\[\]\\,;:@"{_CONTROLS}]+'
_QUOTED = rf'"(?:[^"\\{_CONTROLS}]|\\[ -~])*"'
_LOCAL = rf"(?:{_ATOMS}|{_QUOTED})"
_LABEL = rf'[^\s<>()\[\]\\,;:@".{_CONTROLS}]+'
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[^\[\]\\\s{_CONTROLS}]+\])"
_ROUTE = rf"@{_DOMAIN}(?:,@{_DOMAIN})*:"
# ``<mailbox>`` (a source route is dropped, RFC 5321 §4.1.1.3 / Appendix C), ``<local>``
# (``<postmaster>``), ``<>``, or a bare ``local@domain`` as broken clients send it.
_PATH = re.compile(
    rf"\s*(?:<(?:{_ROUTE})?({_LOCAL}(?:@{_DOMAIN})?)?>|({_LOCAL}@{_DOMAIN})(?=\s|\Z))"
)


def decode_argument(raw: bytes) -> str:
    """A command argument as text: UTF-8 (RFC 6531), else a ``553 5.6.7`` refusal."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(Replies.NOT_UTF8, "argument is not UTF-8") from None


def parse_path(text: str) -> tuple[str, str] | None:
    """``(address, rest)`` for a path at the start of ``text``; ``''`` for ``<>``; None when it
    is not a path."""
    match = _PATH.match(text)
    if match is None:
        return None
    address = match.group(1) or match.group(2) or ""
    return address, text[match.end() :]


def _keyword(text: str, keyword: str) -> str | None:
    """``text`` after ``keyword`` (``'FROM:'``), compared without case; None without it."""
    n = len(keyword)
    return text[n:] if text[:n].upper() == keyword else None


def _address(text: str, keyword: str, bad: Reply) -> tuple[str, list[str]]:
    rest = _keyword(text, keyword)
    parsed = parse_path(rest) if rest is not None else None
    if parsed is None:
        raise Refusal(bad, f"bad path after {keyword}")
    address, params = parsed
    return address, params.split()


def _split_param(param: str) -> tuple[str, str | None]:
    key, eq, value = param.partition("=")
    return key.upper(), value if eq else None


def parse_mail(text: str, *, extended: bool, smtputf8: bool, max_size: int) -> MailFrom:
    """``FROM:<path> [params]`` -> :class:`MailFrom` (``max_size`` 0: no limit)."""
    address, params = _address(text, "FROM:", Replies.BAD_SENDER)
    if params and not extended:
        raise Refusal(unsupported_parameter_reply(_split_param(params[0])[0]), "params after HELO")
    dsn: dict[str, str] = {}
    if params:
        try:
            dsn, params = parse_mail_params(params)
        except DsnParamError as exc:
            raise Refusal(parameter_reply(str(exc)), str(exc)) from None
    size: int | None = None
    body: str | None = None
    utf8 = False
    seen: set[str] = set()
    for param in params:
        key, value = _split_param(param)
        if key in seen:
            raise Refusal(parameter_reply(f"Duplicate {key} parameter"), "duplicate")
        seen.add(key)
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > _MAX_SIZE_DIGITS:
                raise Refusal(parameter_reply("SIZE must be a number"), "bad SIZE")
            size = int(value)
            if max_size and size > max_size:
                raise Refusal(Replies.TOO_BIG, "declared SIZE over the limit")
        elif key == "BODY":
            body = (value or "").upper()
            if body not in ("7BIT", "8BITMIME"):
                raise Refusal(parameter_reply("BODY must be 7BIT or 8BITMIME"), "bad BODY")
        elif key == "SMTPUTF8" and smtputf8:
            if value is not None:
                raise Refusal(parameter_reply("SMTPUTF8 takes no value"), "bad SMTPUTF8")
            utf8 = True
        elif key == "AUTH":
            # RFC 4954 §5: accepted and not passed on; smtpq trusts only its own AUTH.
            if not value:
                raise Refusal(parameter_reply("AUTH requires a value"), "bad AUTH")
        else:
            raise Refusal(unsupported_parameter_reply(key), f"unknown MAIL parameter {key}")
    _check_address(address, utf8)
    return MailFrom(address, size, body, utf8, dsn.get("RET"), dsn.get("ENVID"))


def parse_rcpt(text: str, *, extended: bool, smtputf8: bool) -> RcptTo:
    """``TO:<path> [params]`` -> :class:`RcptTo`; ``smtputf8``: the transaction's."""
    address, params = _address(text, "TO:", Replies.BAD_RECIPIENT)
    if not address:
        raise Refusal(Replies.BAD_RECIPIENT, "null recipient")
    dsn: dict[str, str] = {}
    if params:
        if not extended:
            key = _split_param(params[0])[0]
            raise Refusal(unsupported_parameter_reply(key), "params after HELO")
        try:
            dsn, rest = parse_rcpt_params(params)
        except DsnParamError as exc:
            raise Refusal(parameter_reply(str(exc)), str(exc)) from None
        if rest:
            key = _split_param(rest[0])[0]
            raise Refusal(unsupported_parameter_reply(key), f"unknown RCPT parameter {key}")
    _check_address(address, smtputf8)
    return RcptTo(address, dsn.get("NOTIFY"), dsn.get("ORCPT"))


def _check_address(address: str, smtputf8: bool) -> None:
    if not smtputf8 and not address.isascii():
        raise Refusal(Replies.NEEDS_SMTPUTF8, "non-ASCII address without SMTPUTF8")


def parse_bdat(text: str) -> tuple[int, bool]:
    """``size [LAST]`` -> ``(size, last)``; a refusal when malformed."""
    words = text.split()
    if (
        not 1 <= len(words) <= 2
        or not words[0].isdigit()
        or not words[0].isascii()
        or len(words[0]) > _MAX_SIZE_DIGITS
        or (len(words) == 2 and words[1].upper() != "LAST")
    ):
        raise Refusal(syntax_reply("BDAT size [LAST]"), "malformed BDAT")
    return int(words[0]), len(words) == 2


def parse_auth(text: str, mechanisms: tuple[str, ...]) -> tuple[str, str | None]:
    """``mechanism [initial-response]`` -> ``(MECHANISM, initial or None)``."""
    words = text.split()
    if not 1 <= len(words) <= 2:
        raise Refusal(syntax_reply("AUTH mechanism [initial-response]"), "malformed AUTH")
    mechanism = words[0].upper()
    if mechanism not in mechanisms:
        raise Refusal(Replies.UNKNOWN_MECHANISM, f"unknown mechanism {mechanism}")
    return mechanism, words[1] if len(words) == 2 else None
