"""SASL framing for AUTH PLAIN (RFC 4616) and LOGIN: challenges out, credentials in. Pure.

The machine runs the exchange itself (the ``334`` challenges and the base64); the driver sees
only the resulting :class:`AuthCredentials`, and checks the password.
"""

from __future__ import annotations

import binascii
from typing import Final

from smtpq.reply import Replies
from smtpq.smtp._server_events import AuthCredentials
from smtpq.smtp._server_readers import Refusal

__all__ = ["MECHANISMS", "SaslExchange"]

#: The mechanisms the machine can run.
MECHANISMS: Final = ("LOGIN", "PLAIN")

_EMPTY_CHALLENGE: Final = b"334 \r\n"
_USERNAME: Final = b"334 VXNlcm5hbWU6\r\n"  # "Username:"
_PASSWORD: Final = b"334 UGFzc3dvcmQ6\r\n"  # "Password:"


def _decode(response: bytes) -> bytes:
    """A client's base64 response; ``*`` cancels the exchange (RFC 4954 §4)."""
    if response == b"*":
        raise Refusal(Replies.AUTH_ABORTED, "client cancelled AUTH")
    # RFC 4954 §4: "=" is an initial response that is empty.
    if response == b"=":
        return b""
    try:
        return binascii.a2b_base64(response, strict_mode=True)
    except binascii.Error:
        raise Refusal(Replies.BAD_BASE64, "AUTH response is not base64") from None


class SaslExchange:
    """One AUTH exchange: :meth:`start`, then :meth:`respond` to each client line, each
    returning the challenge to send or the credentials once complete."""

    __slots__ = ("_login", "mechanism")

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self._login: bytes | None = None

    def start(self, initial: str | None) -> bytes | AuthCredentials:
        """The step after ``AUTH mechanism [initial]``."""
        if initial is not None:
            return self.respond(initial.encode("ascii", "replace"))
        return _EMPTY_CHALLENGE if self.mechanism == "PLAIN" else _USERNAME

    def respond(self, line: bytes) -> bytes | AuthCredentials:
        """The step after the client's response ``line`` (without its CRLF)."""
        blob = _decode(line.strip())
        if self.mechanism == "PLAIN":
            fields = blob.split(b"\x00")
            if len(fields) != 3:
                raise Refusal(Replies.BAD_PLAIN, "PLAIN response is not authzid NUL user NUL pw")
            return AuthCredentials("PLAIN", fields[0], fields[1], fields[2])
        if self._login is None:
            self._login = blob
            return _PASSWORD
        return AuthCredentials("LOGIN", b"", self._login, blob)
