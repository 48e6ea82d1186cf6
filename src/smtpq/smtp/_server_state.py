"""The server session's states and its two tables: which command may come in which state, and
where the driver's reply to each event takes the session. Pure data and two small lookups."""

from __future__ import annotations

from enum import Enum
from typing import Final

from smtpq.reply import Replies, Reply
from smtpq.smtp._server_events import (
    AuthCredentials,
    BdatChunk,
    DataStart,
    Event,
    Hello,
    Help,
    MailFrom,
    MessageComplete,
    Noop,
    Quit,
    RcptTo,
    Reset,
    StartTls,
    Vrfy,
)

__all__ = ["AFTER_REPLY", "COMMAND_STATES", "OUT_OF_SEQUENCE", "ServerState", "Then", "resolve"]


class ServerState(Enum):
    """Where a server session is."""

    #: Connected; the driver has not sent its greeting yet.
    GREETING = "greeting"
    #: Greeted; no HELO/EHLO yet.
    INIT = "init"
    #: HELO/EHLO done, no mail transaction.
    READY = "ready"
    #: MAIL accepted, no recipient yet.
    MAIL = "mail"
    #: At least one recipient accepted.
    RCPT = "rcpt"
    #: DATA answered 354: the content, up to the final dot.
    DATA = "data"
    #: A BDAT chunk's octets.
    CHUNK = "chunk"
    #: Between the BDAT chunks of a transaction.
    CHUNKING = "chunking"
    #: A SASL exchange (AUTH PLAIN / LOGIN) between challenges and responses.
    AUTH = "auth"
    #: STARTTLS answered 220: waiting for the driver's handshake; input is discarded.
    TLS = "tls"
    #: QUIT answered, a 421 sent, or the client gone.
    CLOSED = "closed"

    # Members are singletons compared by identity: hash them so too, not by Enum's __hash__
    # (a Python-level call on every set and dict lookup of the state, several per command).
    __hash__ = object.__hash__


S = ServerState

#: The states in which the next line is a command.
COMMAND_STATES: Final = frozenset({S.INIT, S.READY, S.MAIL, S.RCPT, S.CHUNKING})

_TRANSACTION: Final = (S.MAIL, S.RCPT, S.CHUNKING)


def _refuse(reply: Reply, *states: ServerState) -> dict[ServerState, Reply]:
    return dict.fromkeys(states, reply)


#: Command -> the states where it is out of sequence, with the ``503`` to give there. A command
#: not listed (HELO, EHLO, RSET, NOOP, QUIT, VRFY, HELP) is in sequence in every command state.
OUT_OF_SEQUENCE: Final[dict[bytes, dict[ServerState, Reply]]] = {
    b"MAIL": {**_refuse(Replies.NEED_HELO, S.INIT), **_refuse(Replies.NESTED_MAIL, *_TRANSACTION)},
    b"RCPT": {
        **_refuse(Replies.NEED_HELO, S.INIT),
        **_refuse(Replies.NEED_MAIL, S.READY),
        **_refuse(Replies.BAD_SEQUENCE, S.CHUNKING),
    },
    b"DATA": {
        **_refuse(Replies.NEED_HELO, S.INIT),
        **_refuse(Replies.NEED_MAIL, S.READY),
        **_refuse(Replies.NEED_RCPT, S.MAIL),
        **_refuse(Replies.DATA_AFTER_BDAT, S.CHUNKING),
    },
    b"BDAT": {
        **_refuse(Replies.NEED_HELO, S.INIT),
        **_refuse(Replies.NEED_MAIL, S.READY),
        **_refuse(Replies.NEED_RCPT, S.MAIL),
    },
    b"AUTH": {
        **_refuse(Replies.NEED_EHLO, S.INIT),
        **_refuse(Replies.IN_TRANSACTION, *_TRANSACTION),
    },
    b"STARTTLS": _refuse(Replies.IN_TRANSACTION, *_TRANSACTION),
}


class Then(Enum):
    """A move that depends on the session rather than naming a state."""

    #: The state does not change.
    KEEP = "keep"
    #: The transaction is over: back to READY, or to INIT before any HELO/EHLO.
    END = "end"


#: Event answered -> (where a positive reply takes the session, where a negative one does).
#: Positive is 2xx, and 354 for DATA.
AFTER_REPLY: Final[dict[type[Event], tuple[ServerState | Then, ServerState | Then]]] = {
    Hello: (S.READY, Then.KEEP),
    MailFrom: (S.MAIL, Then.KEEP),
    RcptTo: (S.RCPT, Then.KEEP),
    DataStart: (S.DATA, Then.KEEP),
    BdatChunk: (S.CHUNKING, Then.END),
    MessageComplete: (Then.END, Then.END),
    StartTls: (S.TLS, Then.KEEP),
    AuthCredentials: (Then.KEEP, Then.KEEP),
    Reset: (Then.END, Then.KEEP),
    Noop: (Then.KEEP, Then.KEEP),
    Vrfy: (Then.KEEP, Then.KEEP),
    Help: (Then.KEEP, Then.KEEP),
    Quit: (S.CLOSED, S.CLOSED),
}


def resolve(target: ServerState | Then, state: ServerState, greeted: bool) -> ServerState:
    """The state ``target`` means for a session in ``state`` (greeted: HELO/EHLO done)."""
    if target is Then.KEEP:
        return state
    if target is Then.END:
        return S.READY if greeted else S.INIT
    return target
