"""smtpq's SMTP protocol core, sans-IO: a pure state machine for each side, as h11 is for HTTP.

Bytes go in, events come out; replies and commands are values. There is no socket, no event
loop and no clock here: the edge (:mod:`smtpq.edge`) and the relays (:mod:`smtpq.relay`) are
thin asyncio drivers around these machines. Every protocol rule lives here, once.
"""

from smtpq.smtp import client
from smtpq.smtp.client import ClientConnection, ClientState
from smtpq.smtp.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

# The client's commands and events (Hello, Transaction, TransactionDone, ...) are in
# smtpq.smtp.client, apart from the server's, whose names would be the same.
__all__ = [
    "ClientConnection",
    "ClientState",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "client",
]
