"""Replies to bytes: one line per text line, the enhanced status code on each (RFC 2034). Pure."""

from __future__ import annotations

import functools
from typing import Final

from smtpq.reply import Replies, Reply
from smtpq.smtp.errors import LocalProtocolError

__all__ = ["render"]


def render(reply: Reply, *, enhanced: bool = True) -> bytes:
    """``reply`` as it goes on the wire (see :func:`_render`); the standard replies are
    rendered once."""
    if not enhanced:
        return _render_plain(reply)
    known = _RENDERED.get(id(reply))
    if known is not None and known[0] is reply:
        return known[1]
    return _render(reply, enhanced)


@functools.lru_cache(maxsize=128)
def _render_plain(reply: Reply) -> bytes:
    # The greeting and the answers to HELO/EHLO: a few distinct ones per configuration.
    return _render(reply, False)


def _render(reply: Reply, enhanced: bool) -> bytes:
    """``reply`` as it goes on the wire.

    Lines of its text (split at ``\\n``) become the lines of a multi-line reply. ``enhanced``
    False leaves the enhanced status code out, as RFC 2034 §3 wants for the greeting and the
    answer to HELO/EHLO.
    """
    code = reply.code
    if code is None or len(code) != 3 or not code.isdigit() or code[0] not in "2345":
        raise LocalProtocolError(f"not a reply code: {code!r}", reply)
    text = reply.text
    if "\r" in text:  # a stray CR would end a line early on some clients
        text = text.replace("\r", "")
    esc = reply.enhanced_status_code if enhanced else None
    if "\n" not in text:
        if esc:
            return f"{code} {esc} {text}\r\n".encode() if text else f"{code} {esc}\r\n".encode()
        return f"{code} {text}\r\n".encode() if text else f"{code}\r\n".encode()
    lines = text.split("\n")
    prefix = f"{esc} " if esc else ""
    last = len(lines) - 1
    return "".join(
        f"{code}{' ' if i == last else '-'}{prefix}{line}\r\n" for i, line in enumerate(lines)
    ).encode()


# The table's replies live as long as the process, so their ids stay theirs.
_RENDERED: Final = {
    id(reply): (reply, _render(reply, True))
    for reply in vars(Replies).values()
    if isinstance(reply, Reply)
}
