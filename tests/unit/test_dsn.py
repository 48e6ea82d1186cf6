"""RFC 3461 parameter parsing: pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpq.dsn import (
    DsnParamError,
    is_xtext,
    parse_mail_params,
    parse_rcpt_params,
    split_orcpt,
    utf8_addr_decode,
    utf8_addr_encode,
    xtext_decode,
    xtext_encode,
)


def test_mail_params_split_out_and_normalised() -> None:
    found, rest = parse_mail_params(["SIZE=10", "ret=full", "ENVID=a+2Bb", "BODY=8BITMIME"])
    assert found == {"RET": "FULL", "ENVID": "a+2Bb"}
    assert rest == ["SIZE=10", "BODY=8BITMIME"]


@pytest.mark.parametrize(
    "params",
    [
        ["RET=ALL"],
        ["RET"],
        ["RET=FULL", "RET=HDRS"],
        ["ENVID="],
        ["ENVID=" + "x" * 101],
        ["ENVID=bad=char"],
        ["ENVID=a+zz"],
    ],
)
def test_bad_mail_params(params: list[str]) -> None:
    with pytest.raises(DsnParamError) as caught:
        parse_mail_params(params)
    assert caught.value.reply.startswith("501 5.5.4 ")


def test_rcpt_params() -> None:
    found, rest = parse_rcpt_params(["notify=failure,Delay", "ORCPT=rfc822;a+2Bb@x.example", "X"])
    assert found == {"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;a+2Bb@x.example"}
    assert rest == ["X"]
    assert parse_rcpt_params(["NOTIFY=NEVER"])[0] == {"NOTIFY": "NEVER"}
    utf8 = parse_rcpt_params(["ORCPT=utf-8;zoë@例え.example"])[0]
    assert utf8 == {"ORCPT": "utf-8;zoë@例え.example"}


@pytest.mark.parametrize(
    "params",
    [
        ["NOTIFY=NEVER,FAILURE"],
        ["NOTIFY=SUCCESS,SUCCESS"],
        ["NOTIFY=ALWAYS"],
        ["NOTIFY="],
        ["ORCPT=rfc822"],
        ["ORCPT=;a@b"],
        ["ORCPT=rfc 822;a@b"],
        ["ORCPT=rfc822;a=b@c"],
        ["ORCPT=utf-8;a\x01b"],
        ["ORCPT=rfc822;" + "a" * 500],
    ],
)
def test_bad_rcpt_params(params: list[str]) -> None:
    with pytest.raises(DsnParamError):
        parse_rcpt_params(params)


def test_xtext_examples() -> None:
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_decode("a+2Bb+3Dc+20d") == "a+b=c d"
    assert xtext_encode("é") == "+C3+A9"
    assert split_orcpt("rfc822;b+2Bx@example.net") == ("rfc822", "b+x@example.net")


@given(st.text())  # hypothesis leaves out lone surrogates, which UTF-8 cannot carry
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    assert is_xtext(encoded)
    assert xtext_decode(encoded) == text


def test_utf8_addr_xtext_examples() -> None:
    # RFC 6533 §3: "+", "=", "\\" and everything outside printable ASCII as \\x{HEX}.
    assert utf8_addr_encode("jürgen+x=y@bücher.example") == (
        "j\\x{FC}rgen\\x{2B}x\\x{3D}y@b\\x{FC}cher.example"
    )
    assert utf8_addr_decode("\\x{1F600}@x") == "\U0001f600@x"


@given(st.text(min_size=1))
def test_utf8_addr_round_trip(text: str) -> None:
    encoded = utf8_addr_encode(text)
    assert encoded.isascii()
    assert "+" not in encoded
    assert "=" not in encoded
    assert utf8_addr_decode(encoded) == text
