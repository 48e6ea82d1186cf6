"""The DATA content reader: finds the final dot, unstuffs, counts size and line lengths. Pure.

Content goes through as it arrives, in the pieces it arrived in; only a tail of at most four
octets (what could begin the end marker) waits for the next piece. The end is ``CRLF.CRLF``
and nothing else: a dot after a bare LF or a bare CR is content, so that no ``\\n.\\n``,
``\\n.\\r\\n`` or ``\\r.\\r`` variant ends a message early (SMTP smuggling).

Bare CR and bare LF policy: they are accepted and kept as they were sent. They never end a line
for the purposes of this reader (the end marker, dot-unstuffing, the 1,000-octet line limit):
only CRLF does. The message is stored byte for byte; the client side normalises line ends when
it relays the message on.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_TEXT_LINE", "DotReader"]

#: RFC 5321 §4.5.3.1.6: a text line is at most 1,000 octets with its CRLF.
MAX_TEXT_LINE: Final = 1000
_MAX_TEXT: Final = MAX_TEXT_LINE - 2

_END: Final = b"\r\n.\r\n"


def _tail(data: bytes) -> int:
    """How many octets at the end of ``data`` could begin ``CRLF.CRLF`` (or a stuffed dot)."""
    if data.endswith(b"\r\n.\r"):
        return 4
    if data.endswith(b"\r\n."):
        return 3
    if data.endswith(b"\r\n"):
        return 2
    return 1 if data.endswith(b"\r") else 0


class DotReader:
    """One message's DATA content, fed in pieces.

    :param limit: the size limit in octets as sent (stuffed, without the final dot line); 0 for
        none. Over it, content is no longer handed on, but read to its end all the same.

    :ivar size: octets of content so far, as sent.
    :ivar too_big: the size went over the limit.
    :ivar too_long: a line went over 1,000 octets.
    :ivar done: the final dot line has been read.
    """

    __slots__ = ("_held", "_line", "_start", "done", "limit", "size", "too_big", "too_long")

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.size = 0
        self.too_big = False
        self.too_long = False
        self.done = False
        # The content starts at a line's start: as if after a CRLF, which is not content.
        self._held = b"\r\n"
        self._start = True
        self._line = 0

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """Read ``data``: ``(content, end)``, the content unstuffed and ``end`` the index in
        ``data`` just after the final dot line, or -1 before it.

        Past the limit no content is handed on: what is handed on, however the input was cut,
        is the unstuffed first ``limit`` octets as sent.
        """
        held = self._held
        buf = held + data if held else data
        at = buf.find(_END)
        if at >= 0:
            piece = buf[: at + 2]
            end = at + 5 - len(held)
            self._held = b""
            self.done = True
        else:
            keep = _tail(buf)
            if keep:
                piece, self._held = buf[:-keep], buf[-keep:]
            else:
                piece, self._held = buf, b""
            end = -1
        if not piece:
            return b"", end
        start = 2 if self._start else 0  # the virtual CRLF, not content
        self._start = False
        sent = len(piece) - start
        room = self.limit - self.size if self.limit else sent
        self._count(piece[start:] if start else piece)
        if room <= 0:
            return b"", end
        kept = piece[: start + room] if room < sent else piece
        # Every CRLF-started dot is a stuffed one (RFC 5321 §4.5.2); the virtual CRLF in front of
        # the first line makes its dot one too.
        content = kept.replace(b"\r\n.", b"\r\n")
        return (content[start:] if start else content), end

    def _count(self, sent: bytes) -> None:
        size = len(sent)
        self.size += size
        if self.limit and self.size > self.limit:
            self.too_big = True
        if self.too_long:
            return
        carried = self._line
        last = sent.rfind(b"\r\n")
        if last < 0:
            self._line = carried + size
        else:
            self._line = size - last - 2
            first = sent.find(b"\r\n")
            if carried + first > _MAX_TEXT or not _lines_fit(sent, first, last):
                self.too_long = True
        if self._line > _MAX_TEXT:
            self.too_long = True


# Every window of this many octets holds the start of a CRLF: then no line is over 998.
_WINDOW: Final = 500


def _lines_fit(data: bytes, first: int, last: int) -> bool:
    """Whether no line between the CRLFs at ``first`` and ``last`` is over 998 octets.

    A line of 999 octets or more spans a whole window (501 positions, a step of 500), so if
    each window holds a CRLF no line is too long; that takes a few finds per kilobyte, where
    splitting into lines would make an object of each. Only a window without one is measured.
    """
    if last - first - 2 <= _MAX_TEXT:
        return True
    find = data.find
    for start in range(first + 2, last, _WINDOW):
        if find(b"\r\n", start, start + _WINDOW + 2) < 0:
            return max(map(len, data[first + 2 : last].split(b"\r\n"))) <= _MAX_TEXT
    return True
