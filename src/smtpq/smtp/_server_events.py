"""What the server machine reads from a client: one event per command, and the message content.

Every event but :class:`DataChunk` and :class:`ConnectionClosed` is a command that awaits the
driver's reply (:meth:`ServerConnection.send`). Values only: frozen, slotted, no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "NEED_DATA",
    "AuthCredentials",
    "BdatChunk",
    "ConnectionClosed",
    "DataChunk",
    "DataStart",
    "Event",
    "Hello",
    "Help",
    "MailFrom",
    "MessageComplete",
    "NeedData",
    "Noop",
    "Quit",
    "RcptTo",
    "Reset",
    "StartTls",
    "Vrfy",
]


class Event:
    """Base class of what :meth:`ServerConnection.next_event` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """HELO (``extended=False``) or EHLO: answer with :meth:`ServerConnection.hello_reply`."""

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    """MAIL FROM, its parameters validated.

    :ivar address: the reverse-path, ``''`` for the null path ``<>``.
    :ivar size: the RFC 1870 SIZE the client declared (already within the limit).
    :ivar body: ``'7BIT'`` or ``'8BITMIME'`` (RFC 6152), upper case, when given.
    :ivar smtputf8: whether the transaction is internationalised (RFC 6531).
    :ivar ret: RFC 3461 RET, ``'FULL'`` or ``'HDRS'``.
    :ivar envid: RFC 3461 ENVID, xtext as received.
    """

    address: str
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    """RCPT TO, its parameters validated.

    :ivar notify: RFC 3461 NOTIFY, ``'NEVER'`` or a comma-separated list, upper case.
    :ivar orcpt: RFC 3461 ORCPT, ``'addr-type;xtext'`` as received.
    """

    address: str
    notify: str | None = None
    orcpt: str | None = None

    def dsn_params(self) -> dict[str, str]:
        """The DSN parameters given, as :attr:`smtpq.Envelope.rcpt_params` keeps them."""
        params: dict[str, str] = {}
        if self.notify is not None:
            params["NOTIFY"] = self.notify
        if self.orcpt is not None:
            params["ORCPT"] = self.orcpt
        return params


@dataclass(frozen=True, slots=True)
class DataStart(Event):
    """DATA: answer ``354`` to receive the content, anything else to refuse it."""


@dataclass(frozen=True, slots=True)
class DataChunk(Event):
    """A piece of the message content, unstuffed (DATA) or as sent (BDAT). Needs no reply.

    The pieces of one message, joined, are the message; their boundaries mean nothing.
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class BdatChunk(Event):
    """A BDAT chunk other than the last has arrived (its content came as :class:`DataChunk`);
    answer ``250`` to go on, anything else ends the transaction."""

    size: int


@dataclass(frozen=True, slots=True)
class MessageComplete(Event):
    """The content is complete (the final dot, or BDAT LAST): answer with the outcome of the
    whole transaction. The transaction ends whatever the reply."""


@dataclass(frozen=True, slots=True)
class StartTls(Event):
    """STARTTLS: answer ``220`` and start the handshake, then call
    :meth:`ServerConnection.tls_established`."""


@dataclass(frozen=True, slots=True)
class AuthCredentials(Event):
    """AUTH PLAIN or LOGIN, the SASL exchange done: check the password, answer ``235`` or
    ``535``.

    :ivar mechanism: ``'PLAIN'`` or ``'LOGIN'``.
    :ivar authzid: the identity to act as (PLAIN only; ``b''`` when not given).
    """

    mechanism: str
    authzid: bytes
    login: bytes
    password: bytes

    def __repr__(self) -> str:
        # Never a password in a log line or a test failure.
        return f"AuthCredentials({self.mechanism!r}, login={self.login!r})"


@dataclass(frozen=True, slots=True)
class Reset(Event):
    """RSET: the transaction is dropped once this is answered ``250``."""


@dataclass(frozen=True, slots=True)
class Noop(Event):
    """NOOP."""


@dataclass(frozen=True, slots=True)
class Quit(Event):
    """QUIT: the session ends once it is answered."""


@dataclass(frozen=True, slots=True)
class Vrfy(Event):
    """VRFY ``argument``."""

    argument: str


@dataclass(frozen=True, slots=True)
class Help(Event):
    """HELP [``argument``]."""

    argument: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The client closed its side, or the session is over: close the connection."""


class NeedData:
    """The type of :data:`NEED_DATA`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: :meth:`ServerConnection.next_event` has nothing until more bytes are received.
NEED_DATA: Final = NeedData()
