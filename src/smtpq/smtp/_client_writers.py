"""Client bytes on the wire: command lines, and the message content as DATA and BDAT carry it.

The content is kept byte for byte; only its line endings are made canonical (CRLF, RFC 5321
§2.3.8) when it has a bare CR or LF, which a message that came over SMTP has not: the check is
three counts in C, the regular expression runs only for the rare message that needs it.
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Iterable, Mapping

__all__ = [
    "auth_login_step",
    "auth_plain",
    "canonical",
    "canonical_parts",
    "data_content",
    "dot_stuffed",
    "encoded_params",
    "needs_smtputf8",
    "sendable",
    "stuffed_parts",
]

_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
# Characters that would end an address on the command line (after a quoted local part).
_UNSENDABLE = re.compile(r"[\s<>\x00-\x1f\x7f]")
_QUOTED_LOCAL = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"')


def _crlf_only(data: bytes) -> bool:
    """No bare CR or LF in ``data``: three counts in C (a regular expression costs more)."""
    crlf = data.count(b"\r\n")
    return data.count(b"\n") == crlf and data.count(b"\r") == crlf


def canonical(message: bytes) -> bytes:
    """``message`` with CRLF line endings (a bare CR or LF is a line ending of its own), ending
    with CRLF unless empty."""
    if not _crlf_only(message):
        message = _LINE_ENDING.sub(b"\r\n", message)
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message


def dot_stuffed(message: bytes) -> bytes:
    """Canonical ``message`` as DATA carries it (RFC 5321 §4.5.2): a dot doubled at the start
    of a line, then the lone dot that ends it."""
    return b"".join(stuffed_parts((message,)))


def canonical_parts(parts: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The parts of a message (in order, e.g. its header block and its body) with CRLF line
    endings, as :func:`canonical` makes the whole, without joining them where each part already
    is canonical and ends with CRLF (a message that came over SMTP): each part then starts a
    line, and can be sent as it is. Empty parts are left out."""
    parts = tuple(part for part in parts if part)
    for part in parts:
        if not (part.endswith(b"\r\n") and _crlf_only(part)):
            whole = canonical(b"".join(parts))
            return (whole,) if whole else ()
    return parts


def stuffed_parts(parts: tuple[bytes, ...]) -> list[bytes]:
    """Parts from :func:`canonical_parts` as DATA carries them: each dot-stuffed (each starts a
    line), then the lone dot. A part without a dot to double is not copied."""
    out = []
    for part in parts:
        part = part.replace(b"\n.", b"\n..")
        out.append(b"." + part if part.startswith(b".") else part)
    out.append(b".\r\n")
    return out


def data_content(message: bytes) -> bytes:
    """Any ``message`` as DATA carries it: :func:`canonical`, then :func:`dot_stuffed`."""
    return dot_stuffed(canonical(message))


def encoded_params(params: Mapping[str, str], encoding: str) -> list[bytes]:
    """``KEY=value`` parameters; one the session cannot carry (UTF-8 in ASCII) is left out."""
    out: list[bytes] = []
    for key, value in sorted(params.items()):
        with contextlib.suppress(UnicodeEncodeError):
            out.append(f"{key}={value}".encode(encoding))
    return out


def sendable(address: str) -> bool:
    """Whether an address can go on a command line as ``<address>``."""
    if address.startswith('"'):
        address = _QUOTED_LOCAL.sub("", address, count=1)
    return not _UNSENDABLE.search(address)


def needs_smtputf8(declared: bool, sender: str, recipients: Iterable[str], header: bytes) -> bool:
    """RFC 6531: an SMTPUTF8 session is needed for non-ASCII addresses or header fields, or when
    the originator asked for one (``declared``)."""
    return declared or not (
        sender.isascii() and all(r.isascii() for r in recipients) and header.isascii()
    )


def auth_plain(username: str, password: str) -> bytes:
    """``AUTH PLAIN`` with its initial response (RFC 4616: authzid empty, authcid, password)."""
    token = base64.b64encode(b"\0" + username.encode() + b"\0" + password.encode())
    return b"AUTH PLAIN " + token + b"\r\n"


def auth_login_step(value: str) -> bytes:
    """One answer of AUTH LOGIN: the user name, then the password, each in base64."""
    return base64.b64encode(value.encode()) + b"\r\n"
