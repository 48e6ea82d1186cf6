"""The message content as the relay's DATA sends it (RFC 5321 §4.5.2). Pure."""

from __future__ import annotations

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from smtpq.relay.smtp import wire_content


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
    assert wire_content(message) == wire


# Lines of dots, bare CRs and LFs, and text: the cases where a shortcut could go wrong.
_pieces = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b" ", b"\r\n.\r\n"])


@given(st.lists(_pieces, min_size=1, max_size=30).map(b"".join))
def test_same_bytes_as_aiosmtplib_data(message: bytes) -> None:
    # aiosmtplib's own DATA transformation is the oracle (for any message but the empty one,
    # which it sends as one empty line).
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
    assert wire_content(message) == expected
