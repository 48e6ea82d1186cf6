"""smtpq's MAIL/RCPT path parser against aiosmtpd's (the parser the edge used to rely on):
wherever smtpq accepts a path, aiosmtpd reads the same address; plain paths both accept."""

from __future__ import annotations

import re

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from smtpq.smtp._server_readers import parse_path

PATHS = [
    "<a@b.c>", "<a@b.c> SIZE=10", "<>", " <a@b>", '<"q x"@b>', "a@b", "<a..b@c>", "<.a@c>",
    "<a.@c>", "<a@[1.2.3.4]>", "<@x:a@b>", "<ü@b.c>", "<a@b> ", "<postmaster>", '<"a\\"b"@c>',
    "<a.b+c@d-e.f>  BODY=8BITMIME NOTIFY=NEVER", "<@x,@y:a@b> SIZE=1", "a@b SIZE=1",
]  # fmt: skip
REFUSED = ["<a@b", "<a b@c>", "<a@b@c>", "<a@b..c>", "<x(comment)@y>", "", "<a@b.>", "a@b>"]

# The plain <local@domain> paths nearly every client sends (the edge's old fast path).
_PLAIN = re.compile(
    r'<([^\s<>()\[\]\\,;:@".]+(?:\.[^\s<>()\[\]\\,;:@".]+)*)@([^\s<>()\[\]\\,;:@"]+)>'
)


def aiosmtpd(text: str) -> tuple[str | None, str | None]:
    server = SMTP.__new__(SMTP)
    server.local_part_limit = 0
    address, rest = server._getaddr(text)
    return address, rest


def agrees(text: str) -> None:
    """If smtpq reads a path, aiosmtpd reads the same address and the same parameters."""
    parsed = parse_path(text)
    if parsed is None:
        return
    address, rest = parsed
    theirs, their_rest = aiosmtpd(text)
    assert theirs == (address or "<>")
    if not rest or rest[0].isspace():  # aiosmtpd reads "<a@b>(x)" as a comment
        assert (their_rest or "").split() == rest.split()


@pytest.mark.parametrize("text", PATHS)
def test_accepted_as_aiosmtpd_does(text: str) -> None:
    assert parse_path(text) is not None
    agrees(text)


@pytest.mark.parametrize("text", REFUSED)
def test_refused(text: str) -> None:
    assert parse_path(text) is None


@given(st.text(alphabet='ab.@<>" (),:[]\\+-ü', max_size=20))
def test_agrees_with_aiosmtpd_on_any_text(text: str) -> None:
    agrees(text)


_atom = st.text(alphabet="abcxyz0189+-_=~!#$%&'*/?^`{|}", min_size=1, max_size=8)
_plain = st.tuples(
    st.lists(_atom, min_size=1, max_size=3).map(".".join),
    st.lists(_atom, min_size=1, max_size=3).map(".".join),
).map(lambda parts: f"<{parts[0]}@{parts[1]}>")


@given(_plain)
def test_every_plain_path_is_read(text: str) -> None:
    assert _PLAIN.fullmatch(text)
    assert parse_path(text) == (text[1:-1], "")
    agrees(text)
