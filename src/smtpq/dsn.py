"""RFC 3461 delivery status notification parameters of MAIL and RCPT: parsing and validation.

Pure: no I/O. The edge validates what a client sends; the relay passes the same values on.

Values are kept in their wire form (xtext-encoded, as received), so that they travel to the next
hop unchanged: ``envelope.dsn_ret`` (``'FULL'`` or ``'HDRS'``), ``envelope.dsn_envid`` (xtext)
and ``envelope.rcpt_params[address]`` with ``'NOTIFY'`` (``'NEVER'`` or a comma-separated list of
``SUCCESS``, ``FAILURE``, ``DELAY``, upper case) and ``'ORCPT'`` (``'addr-type;xtext'``). A
bounce decodes them with :func:`xtext_decode` where it writes Original-Envelope-Id and
Original-Recipient (RFC 3464 §2.2.1, §2.3.1).

RFC 6533 writes UTF-8 addresses in ASCII as ``utf-8-addr-xtext``: ``\\x{HEX}`` for each character
outside the printable ASCII that needs no quoting (:func:`utf8_addr_encode`,
:func:`utf8_addr_decode`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "DsnParamError",
    "parse_mail_params",
    "parse_rcpt_params",
    "split_orcpt",
    "utf8_addr_decode",
    "utf8_addr_encode",
    "xtext_decode",
    "xtext_encode",
]

#: RFC 3461 §4.4: an ENVID is at most 100 characters; §4.2: an ORCPT value at most 500.
MAX_ENVID = 100
MAX_ORCPT = 500

# xtext: "!" to "~" except "+" and "=", or "+" and two (upper case) hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_XCHAR_HEX = re.compile(r"\+([0-9A-F]{2})")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})
# RFC 6533 §3: QCHAR is printable ASCII but "+", "=" and "\\"; EmbeddedUnicodeChar is \\x{HEX}.
_QCHAR = re.compile(r"[!-*,-<>-\[\]-~]")
_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{2,6})\}")


class DsnParamError(ValueError):
    """A DSN parameter is malformed; :attr:`reply` is the SMTP reply to give (``501 5.5.4``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.reply = f"501 5.5.4 {text}"


def is_xtext(value: str) -> bool:
    """Whether ``value`` is valid xtext (RFC 3461 §4)."""
    return _XTEXT.fullmatch(value) is not None


def xtext_encode(text: str) -> str:
    """Encode ``text`` as xtext: ``+``, ``=`` and characters outside ``!``..``~`` as ``+XX``.

    Non-ASCII characters are encoded byte by byte from their UTF-8 form.
    """
    out: list[str] = []
    for char in text:
        if "!" <= char <= "~" and char not in "+=":
            out.append(char)
        else:
            out.extend(f"+{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


def xtext_decode(value: str) -> str:
    """Decode xtext (``+2B`` -> ``+``); bytes that are not UTF-8 are replaced, never raised."""
    data = bytearray()
    # split() with a group alternates text and the hex digits of each "+XX".
    for i, part in enumerate(_XCHAR_HEX.split(value)):
        data += bytes([int(part, 16)]) if i % 2 else part.encode("utf-8", "replace")
    return data.decode("utf-8", "replace")


def utf8_addr_encode(address: str) -> str:
    """``address`` as RFC 6533 ``utf-8-addr-xtext``: ASCII only, ``\\x{HEX}`` for the rest."""
    return "".join(c if _QCHAR.match(c) else f"\\x{{{ord(c):02X}}}" for c in address)


def utf8_addr_decode(value: str) -> str:
    """The inverse of :func:`utf8_addr_encode` (also of ``utf-8-addr-unitext``)."""

    def char(match: re.Match[str]) -> str:
        point = int(match.group(1), 16)
        return chr(point) if point <= 0x10FFFF else match.group(0)

    return _EMBEDDED.sub(char, value)


def split_orcpt(value: str) -> tuple[str, str]:
    """``'rfc822;a+2Bb@example.org'`` -> ``('rfc822', 'a+b@example.org')``, decoded."""
    addr_type, _, address = value.partition(";")
    return addr_type, xtext_decode(address)


def _take(params: Iterable[str], known: frozenset[str]) -> tuple[dict[str, str], list[str]]:
    """Pull the ``known`` keywords out of ESMTP parameters; the others are returned as they were."""
    found: dict[str, str] = {}
    rest: list[str] = []
    for param in params:
        keyword, eq, value = param.partition("=")
        key = keyword.upper()
        if key not in known:
            rest.append(param)
            continue
        if key in found:
            raise DsnParamError(f"Duplicate {key} parameter")
        if not eq or not value:
            raise DsnParamError(f"{key} requires a value")
        found[key] = value
    return found, rest


def parse_mail_params(params: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Validate RET and ENVID among MAIL FROM parameters.

    Returns ``({'RET': 'FULL'|'HDRS', 'ENVID': xtext}, other parameters)``, only the keys given.
    Raises :class:`DsnParamError` for a malformed or repeated one.
    """
    found, rest = _take(params, frozenset({"RET", "ENVID"}))
    if "RET" in found:
        ret = found["RET"].upper()
        if ret not in ("FULL", "HDRS"):
            raise DsnParamError("RET must be FULL or HDRS")
        found["RET"] = ret
    if "ENVID" in found:
        envid = found["ENVID"]
        if len(envid) > MAX_ENVID or not is_xtext(envid):
            raise DsnParamError("ENVID must be xtext of at most 100 characters")
    return found, rest


def parse_rcpt_params(params: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Validate NOTIFY and ORCPT among RCPT TO parameters.

    Returns ``({'NOTIFY': 'NEVER'|'SUCCESS,FAILURE,DELAY'..., 'ORCPT': 'type;xtext'}, others)``.
    Raises :class:`DsnParamError` for a malformed or repeated one.
    """
    found, rest = _take(params, frozenset({"NOTIFY", "ORCPT"}))
    if "NOTIFY" in found:
        values = found["NOTIFY"].upper().split(",")
        if values != ["NEVER"] and (not set(values) <= _NOTIFY or len(set(values)) != len(values)):
            raise DsnParamError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
        found["NOTIFY"] = ",".join(values)
    if "ORCPT" in found:
        orcpt = found["ORCPT"]
        addr_type, semi, address = orcpt.partition(";")
        valid = (
            semi
            and address
            and len(orcpt) <= MAX_ORCPT
            and _ATOM.fullmatch(addr_type)
            # RFC 6533's utf-8 address type allows UTF-8 characters; none allows controls.
            and (is_xtext(address) if addr_type.lower() == "rfc822" else address.isprintable())
            and " " not in address
        )
        if not valid:
            raise DsnParamError("ORCPT must be addr-type;xtext")
    return found, rest
