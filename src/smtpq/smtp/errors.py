"""Protocol errors, by who was at fault (h11's split), each carrying the reply it calls for."""

from __future__ import annotations

from smtpq.reply import Reply

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """A breach of the SMTP protocol.

    :ivar reply: what it calls for: for a server, the reply to send the client (``500 5.5.2``,
        ``421 4.7.0`` ...); for a client, the outcome to report for the transaction (a transient
        ``451 4.4.2`` when the server broke the protocol, say).
    """

    def __init__(self, msg: str, reply: Reply) -> None:
        super().__init__(msg)
        self.reply = reply


class LocalProtocolError(ProtocolError):
    """Our side misused the state machine (a bug in the driver): sent an event the state does
    not allow, or asked for something the peer did not offer."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: a malformed command or reply, a line over its limit, data
    where none may come. The connection may be unusable afterwards; :attr:`reply` says what to
    answer (server) or report (client)."""
