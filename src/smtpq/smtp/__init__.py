"""smtpq's SMTP protocol core, sans-IO: a pure state machine for each side, as h11 is for HTTP.

Bytes go in, events come out; replies and commands are values. There is no socket, no event
loop and no clock here: the edge (:mod:`smtpq.edge`) and the relays (:mod:`smtpq.relay`) are
thin asyncio drivers around these machines. Every protocol rule lives here, once.

The names here are the server's events and the connections of both sides; the client's
commands and events (``Hello``, ``Transaction``, ``TransactionDone``, ...) are in
:mod:`smtpq.smtp.client`, apart, since several would have the server's names.
"""

from smtpq.smtp import client
from smtpq.smtp._server_events import (
    NEED_DATA,
    AuthCredentials,
    BdatChunk,
    ConnectionClosed,
    DataChunk,
    DataStart,
    Event,
    Hello,
    Help,
    MailFrom,
    MessageComplete,
    NeedData,
    Noop,
    Quit,
    RcptTo,
    Reset,
    StartTls,
    Vrfy,
)
from smtpq.smtp._server_state import ServerState
from smtpq.smtp.client import ClientConnection, ClientState
from smtpq.smtp.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from smtpq.smtp.server import ServerConfig, ServerConnection, SessionLimit

__all__ = [
    "NEED_DATA",
    "AuthCredentials",
    "BdatChunk",
    "ClientConnection",
    "ClientState",
    "ConnectionClosed",
    "DataChunk",
    "DataStart",
    "Event",
    "Hello",
    "Help",
    "LocalProtocolError",
    "MailFrom",
    "MessageComplete",
    "NeedData",
    "Noop",
    "ProtocolError",
    "Quit",
    "RcptTo",
    "RemoteProtocolError",
    "Reset",
    "ServerConfig",
    "ServerConnection",
    "ServerState",
    "SessionLimit",
    "StartTls",
    "Vrfy",
    "client",
]
