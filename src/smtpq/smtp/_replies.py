"""Replies from bytes: the reply grammar of RFC 5321 §4.2, and the EHLO keywords of §4.1.1.1.

A reply is one or more lines ``code-text`` ... ``code text``, each at most 512 octets with its
CRLF (§4.5.3.1.5), every line with the same code. A bare LF also ends a line (a CR before it
is dropped): being lenient there costs nothing and loses nothing. Anything else — a line that
does not start with a code, an overlong line, a multi-line reply whose codes differ — is a
:class:`BadReply`, which the connection makes a ``RemoteProtocolError``: the session cannot be
trusted further.
"""

from __future__ import annotations

from collections.abc import Sequence

from smtpq.smtp._client_events import Extensions

__all__ = ["MAX_REPLY_LINE", "BadReply", "ReplyReader", "parse_extensions", "reply_text"]

#: RFC 5321 §4.5.3.1.5: a reply line, its CRLF included.
MAX_REPLY_LINE = 512
_FIRST_DIGITS = frozenset(b"2345")
_DIGITS = frozenset(b"0123456789")
_SPACE, _HYPHEN, _CR = ord(" "), ord("-"), ord("\r")
_NO_REPLY: tuple[str, list[str]] = ("", [])


class BadReply(ValueError):
    """The server broke the reply grammar, or gave a reply its command cannot have; the message
    says how."""


class ReplyReader:
    """Splits the server's byte stream into replies: ``(code, lines of text)``."""

    __slots__ = ("_buffer", "_code", "_lines")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._code = ""
        self._lines: list[str] = []

    def feed(self, data: bytes) -> None:
        """Add bytes from the server."""
        self._buffer += data

    def discard(self) -> None:
        """Forget everything buffered (after STARTTLS, RFC 3207 §4.2: nothing sent before the
        handshake may be taken as said under TLS)."""
        self._buffer.clear()
        self._code = ""
        self._lines = []

    def next_reply(self) -> tuple[str, list[str]]:
        """The next whole reply, or ``('', [])`` when more bytes are needed; raises
        :class:`BadReply` when the stream breaks the grammar."""
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) >= MAX_REPLY_LINE:
                    raise BadReply(f"reply line over {MAX_REPLY_LINE} octets")
                return _NO_REPLY
            if end >= MAX_REPLY_LINE:  # with its LF, over the limit
                raise BadReply(f"reply line over {MAX_REPLY_LINE} octets")
            stop = end - 1 if end and buffer[end - 1] == _CR else end
            separator = buffer[3] if stop > 3 else _SPACE
            if not (
                stop >= 3
                and buffer[0] in _FIRST_DIGITS
                and buffer[1] in _DIGITS
                and buffer[2] in _DIGITS
                and separator in (_SPACE, _HYPHEN)
            ):
                raise BadReply(f"malformed reply line {bytes(buffer[: min(stop, 40)])!r}")
            code = buffer[:3].decode("ascii")
            if self._code and code != self._code:
                raise BadReply("multi-line reply with differing codes")
            self._lines.append(buffer[4:stop].decode("utf-8", "replace"))
            del buffer[: end + 1]
            if separator == _HYPHEN:
                self._code = code
                continue
            lines, self._lines, self._code = self._lines, [], ""
            return code, lines


def reply_text(lines: Sequence[str]) -> str:
    """A reply's lines as one line of text, as replies are kept and reported."""
    return " ".join(" ".join(lines).split())


def parse_extensions(lines: Sequence[str]) -> Extensions:
    """The service extensions of an EHLO reply's lines (the first is the server's name).

    Keywords are case-insensitive; ``AUTH=LOGIN PLAIN`` (an old, pre-standard form some
    servers still send) counts as AUTH.
    """
    keywords: dict[str, str] = {}
    for line in lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            keyword, params = "AUTH", f"{keyword[5:]} {params}"
        if keyword:
            keywords[keyword] = f"{keywords[keyword]} {params}" if keyword in keywords else params
    size: int | None = None
    if "SIZE" in keywords:
        limit = keywords["SIZE"].strip()
        size = int(limit) if limit.isdigit() else 0
    return Extensions(
        keywords=keywords,
        pipelining="PIPELINING" in keywords,
        size=size,
        eightbitmime="8BITMIME" in keywords,
        binarymime="BINARYMIME" in keywords,
        smtputf8="SMTPUTF8" in keywords,
        dsn="DSN" in keywords,
        chunking="CHUNKING" in keywords,
        starttls="STARTTLS" in keywords,
        enhancedstatuscodes="ENHANCEDSTATUSCODES" in keywords,
        auth=frozenset(keywords.get("AUTH", "").upper().split()),
    )
