"""The protocol errors say who was at fault and carry their reply."""

from __future__ import annotations

from smtpq.reply import Reply
from smtpq.smtp import LocalProtocolError, ProtocolError, RemoteProtocolError


def test_errors_carry_their_reply_and_fault() -> None:
    remote = RemoteProtocolError("line too long", Reply("500", "5.5.6 Line too long"))
    local = LocalProtocolError("DATA before RCPT", Reply("451", "4.3.0 Internal error"))
    assert isinstance(remote, ProtocolError)
    assert isinstance(local, ProtocolError)
    assert not isinstance(remote, LocalProtocolError)
    assert str(remote.reply) == "500 5.5.6 Line too long"
    assert str(local) == "DATA before RCPT"
