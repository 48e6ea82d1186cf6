"""smtpq's SMTP protocol core, sans-IO: a pure state machine for each side, as h11 is for HTTP.

Bytes go in, events come out; replies and commands are values. There is no socket, no event
loop and no clock here: the edge (:mod:`smtpq.edge`) and the relays (:mod:`smtpq.relay`) are
thin asyncio drivers around these machines. Every protocol rule lives here, once.
"""

from smtpq.smtp.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]
