"""The edge's fast MAIL/RCPT path parser agrees with aiosmtpd's own parser."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from smtpq.edge.server import _EdgeHandler, _EdgeProtocol

PATHS = [
    "<a@b.c>", "<a@b.c> SIZE=10", "<>", " <a@b>", '<"q x"@b>', "a@b", "<a..b@c>", "<.a@c>",
    "<a.@c>", "<a@[1.2.3.4]>", "<@x:a@b>", "<ü@b.c>", "<a@b", "<a b@c>", "<a@b> ",
    "<a.b+c@d-e.f>  BODY=8BITMIME NOTIFY=NEVER", "<a@b@c>", "<x(comment)@y>", "",
]  # fmt: skip


def _outcome(parse: Callable[[str], object], arg: str) -> object:
    """The result, or the class of the exception (aiosmtpd's parser raises on some input)."""
    try:
        return parse(arg)
    except Exception as exc:
        return type(exc)


def _both(arg: str, limit: int = 0) -> tuple[object, object]:
    fast = _EdgeProtocol.__new__(_EdgeProtocol)
    slow = SMTP.__new__(SMTP)
    fast.local_part_limit = slow.local_part_limit = limit
    return _outcome(fast._getaddr, arg), _outcome(slow._getaddr, arg)


@pytest.mark.parametrize("arg", PATHS)
def test_same_as_aiosmtpd(arg: str) -> None:
    fast, slow = _both(arg)
    assert fast == slow


def test_local_part_limit() -> None:
    fast, slow = _both("<" + "a" * 70 + "@b.c>", limit=64)
    assert fast == slow == (None, None)


@given(st.text(alphabet='ab.@<>" (),:[]\\+-ü', max_size=20))
def test_same_as_aiosmtpd_on_any_text(arg: str) -> None:
    fast, slow = _both(arg)
    assert fast == slow


def test_dir_lists_every_hook_aiosmtpd_would_find() -> None:
    proto = _EdgeProtocol.__new__(_EdgeProtocol)
    expected = {n for n in object.__dir__(proto) if n.startswith(("smtp_", "auth_"))}
    assert set(dir(proto)) == expected
    handler = _EdgeHandler.__new__(_EdgeHandler)
    hooks = {n for n in object.__dir__(handler) if n.startswith(("handle_", "auth_"))}
    assert set(dir(handler)) == hooks
    assert {"handle_DATA", "handle_RCPT", "handle_MAIL", "handle_EHLO"} <= hooks
