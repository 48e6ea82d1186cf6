"""The message content as DATA sends it (RFC 5321 §4.5.2), now the protocol core's. Pure."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpq.smtp.client import data_content


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"Subject: x\r\n\r\nbody\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n"),
        (b"", b".\r\n"),
        (b"no final line ending", b"no final line ending\r\n.\r\n"),
        (b".starts\r\n..two\r\n.\r\nmid.dle\r\n", b"..starts\r\n...two\r\n..\r\nmid.dle\r\n.\r\n"),
        (b"bare\nlf\n.dot\n", b"bare\r\nlf\r\n..dot\r\n.\r\n"),
        (b"bare\rcr\r\r\n", b"bare\r\ncr\r\n\r\n.\r\n"),
    ],
)
def test_wire_content(message: bytes, wire: bytes) -> None:
    assert data_content(message) == wire


def reference(message: bytes) -> bytes:
    """DATA's transformation written the slow, obvious way, line by line: the oracle."""
    lines = re.split(rb"\r\n|\r|\n", message)
    if lines[-1] == b"":
        lines.pop()  # the message ended with a line ending
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


# Lines of dots, bare CRs and LFs, and text: the cases where a shortcut could go wrong.
_pieces = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b" ", b"\r\n.\r\n"])


@given(st.lists(_pieces, max_size=30).map(b"".join))
def test_same_bytes_as_the_line_by_line_reference(message: bytes) -> None:
    assert data_content(message) == reference(message)
