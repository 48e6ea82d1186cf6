"""The client's states and the two tables that move it: what each state lets the driver send,
and where each reply leads.

A mail transaction is one state here (TRANSACTION): its steps — MAIL, each RCPT, DATA or BDAT,
the content — and whether it ends with a transaction left open (DIRTY) are the rules of
:mod:`smtpq.smtp._client_transaction`.
"""

from __future__ import annotations

import enum

from smtpq.smtp._client_events import (
    Auth,
    ClientCommand,
    Hello,
    Quit,
    Reset,
    StartTls,
    Transaction,
)

__all__ = ["AWAITING", "ON_REPLY", "SEND", "ClientState"]


class ClientState(enum.Enum):
    """Where a client session is."""

    #: Connected: the greeting is awaited.
    CONNECTED = "connected"
    #: Greeted (or back after STARTTLS): say Hello.
    GREETED = "greeted"
    #: EHLO sent.
    EHLO = "ehlo"
    #: HELO sent, after a refused EHLO.
    HELO = "helo"
    #: Session set up, no transaction open: STARTTLS, AUTH, a transaction, QUIT.
    READY = "ready"
    #: STARTTLS sent.
    STARTTLS = "starttls"
    #: STARTTLS accepted: the driver runs the handshake, then calls ``tls_started()``.
    TLS = "tls"
    #: An AUTH exchange is under way.
    AUTH = "auth"
    #: A mail transaction is under way.
    TRANSACTION = "transaction"
    #: A transaction was left open (MAIL accepted, no content taken): RSET before the next.
    DIRTY = "dirty"
    #: RSET sent.
    RSET = "rset"
    #: QUIT sent.
    QUIT = "quit"
    #: The session is over: the server closed the connection, refused service, said 421, or
    #: answered QUIT.
    CLOSED = "closed"
    #: The server broke the protocol; nothing more can be trusted.
    ERROR = "error"


S = ClientState

#: (state, command) -> the state sending it leads to; a pair not here is a LocalProtocolError.
SEND: dict[tuple[ClientState, type[ClientCommand]], ClientState] = {
    (S.GREETED, Hello): S.EHLO,
    (S.READY, StartTls): S.STARTTLS,
    (S.READY, Auth): S.AUTH,
    (S.READY, Transaction): S.TRANSACTION,
    (S.READY, Reset): S.RSET,
    (S.DIRTY, Reset): S.RSET,
    (S.GREETED, Quit): S.QUIT,
    (S.READY, Quit): S.QUIT,
    (S.DIRTY, Quit): S.QUIT,
}

#: state -> {the reply code's first digit -> next state}. A ``421`` leads to CLOSED from any
#: state; a class not listed is a reply the command cannot have (a RemoteProtocolError).
#: EHLO refused with a 5xx goes to HELO (the connection sends it: RFC 5321 §3.2); a 334 during
#: AUTH is a challenge (the connection answers it).
ON_REPLY: dict[ClientState, dict[str, ClientState]] = {
    S.CONNECTED: {"2": S.GREETED, "4": S.CLOSED, "5": S.CLOSED},
    S.EHLO: {"2": S.READY, "4": S.GREETED, "5": S.HELO},
    S.HELO: {"2": S.READY, "4": S.GREETED, "5": S.GREETED},
    S.STARTTLS: {"2": S.TLS, "4": S.READY, "5": S.READY},
    S.AUTH: {"2": S.READY, "3": S.AUTH, "4": S.READY, "5": S.READY},
    S.RSET: {"2": S.READY, "4": S.DIRTY, "5": S.DIRTY},
    S.QUIT: {"2": S.CLOSED, "4": S.CLOSED, "5": S.CLOSED},
}

#: The command whose reply each waiting state awaits, as Replies name it.
AWAITING: dict[ClientState, str] = {
    S.CONNECTED: "CONNECT",
    S.EHLO: "EHLO",
    S.HELO: "HELO",
    S.STARTTLS: "STARTTLS",
    S.AUTH: "AUTH",
    S.RSET: "RSET",
    S.QUIT: "QUIT",
}
