"""What an SMTP client sends and what it learns, as values: commands given to
:meth:`ClientConnection.send`, events returned by :meth:`ClientConnection.next_event`.

A command is one *exchange* the driver asks for (the hello, with its HELO fallback; a whole mail
transaction, pipelined or not); its outcome comes back as one event, so that the driver wakes
once per exchange, not once per reply line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from smtpq.reply import Reply

__all__ = [
    "Auth",
    "AuthDone",
    "ClientCommand",
    "ClientEvent",
    "Closed",
    "Extensions",
    "Greeting",
    "Hello",
    "HelloDone",
    "Quit",
    "QuitDone",
    "Reset",
    "ResetDone",
    "StartTls",
    "StartTlsDone",
    "Transaction",
    "TransactionDone",
]


# -- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """EHLO ``name``; HELO ``name`` when the server refuses EHLO with a 5xx (RFC 5321 §3.2)."""

    name: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS (RFC 3207). After its 220 the driver runs the handshake, then calls
    :meth:`ClientConnection.tls_started` and says :class:`Hello` again."""


@dataclass(frozen=True, slots=True)
class Auth:
    """AUTH with PLAIN (preferred, with an initial response) or LOGIN (RFC 4954)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Transaction:
    """One mail transaction: MAIL, RCPT for each recipient, DATA or BDAT with the content.

    :ivar sender: the reverse-path (``''``: the null sender).
    :ivar recipients: the forward-paths, each at most once.
    :ivar content: the message as stored (any line endings; made canonical on the wire): whole,
        or its parts in order (its header block and its body), which are then sent one after
        the other without being joined, so that a large message is not copied whole.
    :ivar body: the BODY= the originator declared (``'8BITMIME'``, ``'BINARYMIME'``, ...).
    :ivar smtputf8: the transaction needs SMTPUTF8 (:func:`needs_smtputf8`).
    :ivar ret: RFC 3461 RET (``'FULL'``/``'HDRS'``), passed on where DSN is offered.
    :ivar envid: RFC 3461 ENVID (xtext), likewise.
    :ivar rcpt_params: per recipient NOTIFY / ORCPT (wire form), likewise.
    """

    sender: str
    recipients: tuple[str, ...]
    content: bytes | tuple[bytes, ...] = field(repr=False)
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    rcpt_params: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reset:
    """RSET: end a transaction left open (RFC 5321 §4.1.1.5)."""


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT."""


ClientCommand = Hello | StartTls | Auth | Transaction | Reset | Quit


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Extensions:
    """What an EHLO reply advertised (RFC 5321 §4.1.1.1); HELO advertises nothing.

    :ivar keywords: every keyword (upper case) and its parameters as sent.
    :ivar size: the SIZE limit (RFC 1870); 0: SIZE without a fixed limit; None: no SIZE.
    :ivar auth: the AUTH mechanisms (upper case).
    """

    keywords: Mapping[str, str] = field(default_factory=dict)
    pipelining: bool = False
    size: int | None = None
    eightbitmime: bool = False
    binarymime: bool = False
    smtputf8: bool = False
    dsn: bool = False
    chunking: bool = False
    starttls: bool = False
    enhancedstatuscodes: bool = False
    auth: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's greeting (``220`` to go on, anything else: no service)."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class HelloDone:
    """The reply to EHLO (or, after a refused EHLO, to HELO) and what it advertised."""

    reply: Reply
    extensions: Extensions


@dataclass(frozen=True, slots=True)
class StartTlsDone:
    """The reply to STARTTLS: ``220``, start the handshake; else the session goes on in plain."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class AuthDone:
    """The final reply of the AUTH exchange (``235``: authenticated)."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class TransactionDone:
    """The outcome of a :class:`Transaction`: a Reply per recipient.

    A refused recipient has its RCPT reply (or the MAIL reply, or our own verdict on an address
    that cannot be sent); an accepted one the reply to the content (or the DATA refusal).

    :ivar closing: the server said ``421``: it is closing the connection, and recipients it had
        not refused carry that ``421``.
    """

    replies: Mapping[str, Reply]
    closing: bool = False


@dataclass(frozen=True, slots=True)
class ResetDone:
    """The reply to RSET."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class QuitDone:
    """The reply to QUIT."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Closed:
    """The server closed the connection.

    :ivar awaiting: the command whose reply never came (``"MAIL FROM"``), or None when nothing
        was outstanding (after QUIT, or while idle).
    :ivar reply: the ``421`` the server sent before closing, when it did.
    """

    awaiting: str | None
    reply: Reply | None = None


ClientEvent = (
    Greeting | HelloDone | StartTlsDone | AuthDone | TransactionDone | ResetDone | QuitDone | Closed
)
