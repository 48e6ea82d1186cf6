"""Envelope: byte-exact message handling and the serialisation frame."""

from __future__ import annotations

from collections.abc import Callable
from email.message import Message

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpq.envelope import HEAD_MIN, Envelope
from smtpq.errors import EnvelopeFormatError

DKIM_MSG = (
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel;\r\n"
    b"\th=from:subject; bh=abc=; b=XYZ\r\n"
    b"From:   Odd  Spacing <a@example.org>\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"\r\n"
    b"Body line 1\r\n.leading dot\r\n"
)


def test_parse_and_flatten_are_byte_exact() -> None:
    env = Envelope()
    env.parse(DKIM_MSG)
    head, body = env.flatten()
    assert head + body == DKIM_MSG
    assert head.endswith(b"\r\n\r\n")
    assert body == b"Body line 1\r\n.leading dot\r\n"


def test_headers_view_is_lazy_and_parsed() -> None:
    env = Envelope()
    env.parse(DKIM_MSG)
    assert env.headers["Subject"] == "=?utf-8?q?caf=C3=A9?="
    env.prepend_header("Received", "from x by y; Sat, 28 Nov 2026 12:00:00 +0000")
    assert env.headers["Received"].startswith("from x by y")


def test_prepend_keeps_the_rest_untouched() -> None:
    env = Envelope()
    env.parse(DKIM_MSG)
    env.prepend_header("Received", "from a by b; date")
    head, body = env.flatten()
    assert head + body == b"Received: from a by b; date\r\n" + DKIM_MSG


def test_long_header_is_folded_not_truncated() -> None:
    env = Envelope()
    env.parse(b"Subject: x\r\n\r\nbody")
    value = " ".join(f"word{i}" for i in range(40))
    env.prepend_header("Received", value)
    head, _ = env.flatten()
    first = head.split(b"\r\nSubject")[0]
    assert all(len(line) <= 78 for line in first.split(b"\r\n"))
    assert b" ".join(first.replace(b"\r\n\t", b" ").split()) == b"Received: " + value.encode()


def test_lf_only_message_gets_lf_headers() -> None:
    env = Envelope()
    env.parse(b"Subject: x\n\nbody\n")
    env.prepend_header("X-Test", "1")
    assert b"".join(env.flatten()) == b"X-Test: 1\nSubject: x\n\nbody\n"


@pytest.mark.parametrize(
    ("data", "head"),
    [
        (b"Subject: only headers\r\n", b"Subject: only headers\r\n"),
        (b"no header line here\r\n\r\nmore", b""),
        (b"\r\nbody only", b"\r\n"),
        (b"", b""),
    ],
)
def test_parse_edge_cases(data: bytes, head: bytes) -> None:
    env = Envelope()
    env.parse(data)
    assert env.flatten()[0] == head
    assert b"".join(env.flatten()) == data


def test_append_header_goes_before_the_blank_line() -> None:
    env = Envelope()
    env.parse(b"Subject: x\r\n\r\nbody")
    env.append_header("Date", "today")
    assert b"".join(env.flatten()) == b"Subject: x\r\nDate: today\r\n\r\nbody"
    bare = Envelope()
    bare.parse(b"no headers at all")
    bare.append_header("Date", "today")
    assert b"".join(bare.flatten()) == b"Date: today\r\n\r\nno headers at all"


def test_constructor_with_message_headers() -> None:
    msg = Message()
    msg["Subject"] = "hi"
    env = Envelope("a@b", ["c@d"], msg, b"body")
    head, body = env.flatten()
    assert head == b"Subject: hi\r\n\r\n"
    assert body == b"body"


def test_copy_is_independent() -> None:
    env = Envelope("a@b", ["c@d", "e@f"])
    env.parse(DKIM_MSG)
    env.rcpt_params["c@d"] = {"NOTIFY": "NEVER"}
    env.client["ip"] = "127.0.0.1"
    dup = env.copy(["e@f"])
    dup.client["ip"] = "::1"
    dup.rcpt_params["c@d"]["NOTIFY"] = "SUCCESS"
    assert dup.recipients == ["e@f"]
    assert env.recipients == ["c@d", "e@f"]
    assert env.client["ip"] == "127.0.0.1"
    assert env.rcpt_params["c@d"]["NOTIFY"] == "NEVER"
    assert dup.flatten() == env.flatten()


def _full() -> Envelope:
    env = Envelope("ä@example.org", ["x@example.com", "y@example.com"])
    env.parse(DKIM_MSG)
    env.client = {"ip": "192.0.2.1", "host": None, "name": "helo", "protocol": "ESMTPS"}
    env.receiver = "mx.example.org"
    env.timestamp = 1_800_000_000.5
    env.dsn_ret = "HDRS"
    env.dsn_envid = "ENV1"
    env.rcpt_params = {"x@example.com": {"NOTIFY": "FAILURE", "ORCPT": "rfc822;x@example.com"}}
    env.body_type = "8BITMIME"
    env.smtputf8 = True
    return env


def test_serialisation_round_trip_keeps_everything() -> None:
    env = _full()
    back = Envelope.from_bytes(env.to_bytes())
    for attr in (
        "sender", "recipients", "client", "receiver", "timestamp", "dsn_ret", "dsn_envid",
        "rcpt_params", "body_type", "smtputf8",
    ):  # fmt: skip
        assert getattr(back, attr) == getattr(env, attr), attr
    assert back.flatten() == env.flatten()


def test_serialisation_is_not_pickle() -> None:
    data = _full().to_bytes()
    assert data.startswith(b"SMTPQENV")
    assert b"\x80\x04" not in data[:16]


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[:-1],
        lambda d: d[:10],
        lambda d: b"",
        lambda d: d + b"x",
        lambda d: b"NOTSMTPQ" + d[8:],
        lambda d: d[:8] + b"\x09" + d[9:],
        lambda d: d[:60] + bytes([d[60] ^ 0xFF]) + d[61:],
    ],
)
def test_damaged_data_is_rejected_clearly(damage: object) -> None:
    data = _full().to_bytes()
    with pytest.raises(EnvelopeFormatError):
        Envelope.from_bytes(damage(data))  # type: ignore[operator]


def test_unknown_version_is_named() -> None:
    data = _full().to_bytes()
    with pytest.raises(EnvelopeFormatError, match="version 9"):
        Envelope.from_bytes(data[:8] + b"\x09" + data[9:])


@given(st.binary(max_size=2000), st.lists(st.emails(), max_size=4), st.text(max_size=30))
def test_round_trip_any_bytes(data: bytes, rcpts: list[str], sender: str) -> None:
    env = Envelope(sender, rcpts)
    env.parse(data)
    assert b"".join(env.flatten()) == data
    back = Envelope.from_bytes(env.to_bytes())
    assert back.flatten() == env.flatten()
    assert back.recipients == rcpts
    assert back.sender == sender


@given(st.binary(max_size=300))
def test_random_bytes_never_crash_from_bytes(data: bytes) -> None:
    with pytest.raises(EnvelopeFormatError):
        Envelope.from_bytes(data)


def test_has_header_matches_field_names_only() -> None:
    env = Envelope()
    env.parse(b"Subject: about Date: and more\r\nmessage-id :<x@y>\r\n\r\nDate: in the body\r\n")
    assert env.has_header("Message-ID")
    assert env.has_header("subject")
    assert not env.has_header("Date")
    assert not env.has_header("ID")


def test_head_gives_the_metadata_and_size_without_the_message() -> None:
    env = _full()
    data = env.to_bytes()
    need = Envelope.head_size(data[:HEAD_MIN])
    assert need < len(data) - len(env)  # the message itself is not needed
    head, size = Envelope.from_head(data[:need])
    assert size == len(env)
    for attr in ("sender", "recipients", "client", "timestamp", "rcpt_params", "smtputf8"):
        assert getattr(head, attr) == getattr(env, attr), attr
    assert head.flatten() == (b"", b"")
    assert Envelope.from_head(data)[1] == size  # more than needed is fine


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: d[: HEAD_MIN - 1], "truncated"),
        (lambda d: d[: HEAD_MIN + 5], "truncated"),
        (lambda d: b"NOTSMTPQ" + d[8:], "bad magic"),
        (lambda d: d[:8] + b"\x09" + d[9:], "version 9"),
        (lambda d: d[:HEAD_MIN] + b"[" + d[HEAD_MIN + 1 :], "metadata unreadable"),
    ],
)
def test_damaged_head_is_rejected_clearly(damage: Callable[[bytes], bytes], match: str) -> None:
    with pytest.raises(EnvelopeFormatError, match=match):
        Envelope.from_head(damage(_full().to_bytes()))
    with pytest.raises(EnvelopeFormatError, match="truncated"):
        Envelope.head_size(b"SMTPQENV")
