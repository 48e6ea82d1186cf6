"""The server side of SMTP as a pure state machine: bytes in, events out, replies as values.

A driver feeds what it reads to :meth:`ServerConnection.receive_data`, takes events from
:meth:`~ServerConnection.next_event` until :data:`NEED_DATA`, answers each command event with
:meth:`~ServerConnection.send`, and writes :meth:`~ServerConnection.data_to_send` once per
batch: the replies of a pipelined group (RFC 2920) leave in one write, in order.

A client's fault comes out of ``next_event`` as :class:`~smtpq.smtp.RemoteProtocolError` whose
``reply`` is what to send (``500``, ``501``, ``503``, ``552``...); the session goes on. A
driver's misuse (an event left unanswered, a reply where none is due) is a
:class:`~smtpq.smtp.LocalProtocolError`. Nothing else comes out, whatever the client sends.

The per-session limits live here, in one place (:class:`ServerConfig`, as Postfix's smtpd has
them): client errors (the machine's own refusals, and every ``5xx`` the driver answers a command
with: refused recipients, failed AUTH), failed AUTH, junk commands and commands in all. Past the
hard limits, the reply that reached one is followed by a ``421`` and the session closes
(:attr:`~ServerConnection.limit_reached` says which); past the soft error limit,
:attr:`~ServerConnection.slowed` tells the driver to answer each further error after a delay.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final

from smtpq.reply import Replies, Reply, ReplyCode, syntax_reply
from smtpq.smtp._server_auth import MECHANISMS, SaslExchange
from smtpq.smtp._server_content import DotReader
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
    Reset,
    StartTls,
    Vrfy,
)
from smtpq.smtp._server_readers import (
    AUTH_LINE,
    COMMAND_LINE,
    LINE_LIMITS,
    MAX_LINE,
    Refusal,
    decode_argument,
    parse_auth,
    parse_bdat,
    parse_mail,
    parse_rcpt,
)
from smtpq.smtp._server_state import (
    AFTER_REPLY,
    COMMAND_STATES,
    OUT_OF_SEQUENCE,
    ServerState,
    Then,
    resolve,
)
from smtpq.smtp._server_writers import render
from smtpq.smtp.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["ServerConfig", "ServerConnection", "SessionLimit"]

S = ServerState

# RFC 3207 §4: before STARTTLS, when it is required, only these are answered.
_BEFORE_TLS: Final = frozenset({b"NOOP", b"EHLO", b"STARTTLS", b"QUIT"})
# RFC 5321 commands smtpq does not implement (502, not the 500 of an unknown command).
_NOT_IMPLEMENTED: Final = frozenset({b"EXPN", b"TURN", b"ETRN", b"ATRN", b"SEND", b"SOML", b"SAML"})
# Postfix's junk commands (smtpd_junk_command_limit): they move no mail, so past a limit each
# counts as an error, and a session cannot be kept alive with them alone.
_JUNK: Final = frozenset({b"NOOP", b"RSET", b"VRFY", b"HELP"})
_CLOSED: Final = ConnectionClosed()
_OK: Final = str(ReplyCode.OK)
_START_MAIL_INPUT: Final = str(ReplyCode.START_MAIL_INPUT)


class SessionLimit(Enum):
    """A per-session limit of :class:`ServerConfig` that ended a session (with a ``421``)."""

    #: ``hard_error_limit``.
    ERRORS = "error_limit"
    #: ``max_auth_failures``.
    AUTH_FAILURES = "auth_limit"
    #: ``max_commands``.
    COMMANDS = "command_limit"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What the server offers, and the limits it enforces itself (0 turns a limit off).

    :ivar max_message_size: octets (as sent); advertised as SIZE, more is ``552 5.3.4``.
    :ivar smtputf8: offer SMTPUTF8 (RFC 6531).
    :ivar starttls: offer STARTTLS (the driver has a TLS context).
    :ivar require_tls: refuse everything but NOOP, EHLO, STARTTLS and QUIT before TLS (530).
    :ivar auth_mechanisms: the SASL mechanisms offered, of ``'LOGIN'`` and ``'PLAIN'``.
    :ivar auth_requires_tls: offer and accept AUTH only over TLS.
    :ivar auth_required: refuse MAIL and VRFY until the client has authenticated (530).
    :ivar soft_error_limit: past this many client errors, :attr:`ServerConnection.slowed`: the
        driver answers each further error after a delay (Postfix's ``smtpd_soft_error_limit``).
    :ivar hard_error_limit: at this many client errors, ``421 4.7.0`` and close (Postfix's
        ``smtpd_hard_error_limit``).
    :ivar max_auth_failures: at this many AUTH answered ``5xx``, ``421 4.7.0`` and close.
    :ivar junk_command_limit: past this many NOOP, RSET, VRFY and HELP since the last message
        accepted, each counts as an error (Postfix's ``smtpd_junk_command_limit``).
    :ivar max_commands: command lines in a session; the one over it gets ``421 4.7.0``.
    """

    max_message_size: int = 0
    smtputf8: bool = True
    starttls: bool = False
    require_tls: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    auth_requires_tls: bool = True
    auth_required: bool = False
    soft_error_limit: int = 10
    hard_error_limit: int = 20
    max_auth_failures: int = 3
    junk_command_limit: int = 100
    max_commands: int = 10_000

    def __post_init__(self) -> None:
        unknown = set(self.auth_mechanisms) - set(MECHANISMS)
        if unknown:
            raise ValueError(f"unsupported AUTH mechanisms: {sorted(unknown)}")


@functools.lru_cache(maxsize=64)
def _helo_reply(hostname: str) -> Reply:
    return Reply(_OK, hostname)


@functools.lru_cache(maxsize=64)
def _ehlo_reply(hostname: str, keywords: tuple[str, ...]) -> Reply:
    # A few distinct replies per process (by TLS state and configuration): made once each.
    return Reply(_OK, "\n".join([hostname, *keywords]))


class _Marker:
    """What a reply may be due for besides an event: the greeting, or a client's error."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_GREETING: Final = _Marker("greeting")
_ERROR: Final = _Marker("error")

_Command = Callable[["ServerConnection", bytes], Event | NeedData]


class ServerConnection:
    """One SMTP session, server side.

    :param config: what is offered and enforced.
    :param tls: the connection is encrypted from the start (implicit TLS, port 465).

    The first reply the driver sends is its greeting (``220``, or ``421``/``554`` to turn the
    client away); events come only after it.

    :ivar errors: client errors so far: replies that came from a :class:`RemoteProtocolError`,
        ``5xx`` replies of the driver to commands, junk commands past their limit.
    :ivar auth_failures: AUTH exchanges answered ``5xx``.
    :ivar commands: command lines read so far.
    :ivar limit_reached: the limit that ended the session, if one did.
    :ivar tls: whether the session is encrypted.
    :ivar extended: whether the client greeted with EHLO.
    :ivar authenticated: whether an AUTH was answered ``235``.
    """

    __slots__ = (
        "_buf",
        "_chunk",
        "_dot",
        "_eof",
        "_fatal",
        "_greeted",
        "_junk",
        "_out",
        "_pending",
        "_pos",
        "_sasl",
        "_skipping",
        "_smtputf8",
        "_state",
        "_txn_size",
        "auth_failures",
        "authenticated",
        "commands",
        "config",
        "errors",
        "extended",
        "limit_reached",
        "tls",
    )

    def __init__(self, config: ServerConfig | None = None, *, tls: bool = False) -> None:
        self.config = config or ServerConfig()
        self.tls = tls
        self.extended = False
        self.authenticated = False
        self.errors = 0
        self.auth_failures = 0
        self.commands = 0
        self.limit_reached: SessionLimit | None = None
        self._junk = 0
        self._state = S.GREETING
        self._pending: Event | _Marker | None = _GREETING
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._skipping = False
        self._fatal = False
        self._greeted = False
        self._out: list[bytes] = []
        self._smtputf8 = False
        self._txn_size = 0
        self._dot: DotReader | None = None
        self._chunk: _Chunk | None = None
        self._sasl: SaslExchange | None = None

    # -- the driver's side ---------------------------------------------------------------------

    @property
    def state(self) -> ServerState:
        """Where the session is."""
        return self._state

    @property
    def closed(self) -> bool:
        """The session is over: write what is left to send, then close the connection."""
        return self._state is S.CLOSED

    @property
    def slowed(self) -> bool:
        """The client has made more errors than the soft limit: a driver sends the reply to each
        further error after a delay (Postfix's ``smtpd_error_sleep_time``)."""
        limit = self.config.soft_error_limit
        return bool(limit) and self.errors > limit

    @property
    def discarding(self) -> bool:
        """The message being received is over the size limit: no more of it is handed on, and
        it is refused at its end; a driver can drop what it holds of it now."""
        dot, chunk = self._dot, self._chunk
        if dot is not None:
            return dot.too_big
        return chunk is not None and chunk.refusal is Replies.TOO_BIG

    def receive_data(self, data: bytes) -> None:
        """Take what was read from the client; ``b''`` when it has closed its side."""
        if self._eof:
            raise LocalProtocolError("data after the end of input", Replies.SERVER_ERROR)
        if not data:
            self._eof = True
            return
        if self._state is S.TLS or self._state is S.CLOSED:
            return  # RFC 3207 §4: nothing sent before the handshake is acted on
        if self._pos >= len(self._buf):
            self._buf = data
        else:
            self._buf = self._buf[self._pos :] + data
        self._pos = 0

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA`. Raises :class:`RemoteProtocolError` for a
        client's fault (send its ``reply``)."""
        if self._pending is not None:
            what = "the greeting" if self._pending is _GREETING else repr(self._pending)
            raise LocalProtocolError(f"{what} is not answered yet", Replies.SERVER_ERROR)
        state = self._state
        if state in COMMAND_STATES:
            return self._next_command()
        if state is S.DATA:
            return self._next_content()
        if state is S.CHUNK:
            return self._next_chunk()
        if state is S.AUTH:
            return self._next_sasl()
        if state is S.TLS:
            return NEED_DATA
        return _CLOSED

    def send(self, reply: Reply) -> None:
        """Answer the event last returned (or greet, first); the reply is queued for
        :meth:`data_to_send`."""
        pending = self._pending
        if pending is None:
            raise LocalProtocolError(f"no event to answer with {reply}", reply)
        code = reply.code or ""
        if pending is _GREETING:
            self._out.append(render(reply, enhanced=False))
            self._pending = None
            self._state = S.INIT if code[:1] == "2" else S.CLOSED
            return
        if pending is _ERROR:
            self._out.append(render(reply))
            self._pending = None
            if self._fatal:
                self._state = S.CLOSED
            else:
                self._check_limits()
            return
        assert isinstance(pending, Event)
        kind = type(pending)
        if kind is DataStart:
            positive = code == _START_MAIL_INPUT
        elif code[:1] == "3":
            raise LocalProtocolError(f"{reply} cannot answer {pending!r}", reply)
        else:
            positive = code[:1] == "2"
        self._out.append(render(reply, enhanced=kind is not Hello))
        self._pending = None
        if positive:
            self._accepted(pending)
        elif code[:1] == "5":
            # The driver's refusal is the client's error too (a recipient refused, a password
            # wrong); a 4xx is the server's own state, and counts for nothing.
            self.errors += 1
            if kind is AuthCredentials:
                self.auth_failures += 1
        target = AFTER_REPLY[kind][0 if positive else 1]
        self._state = resolve(target, self._state, self._greeted)
        if target is Then.END:
            self._end_transaction()
        self._check_limits()

    def _check_limits(self) -> None:
        """After a reply: a limit reached ends the session with a 421 (Postfix checks its error
        limit before reading the next command; the reply that reached it is sent all the same)."""
        if self._state is S.CLOSED:
            return
        config = self.config
        if config.max_auth_failures and self.auth_failures >= config.max_auth_failures:
            self._limit(SessionLimit.AUTH_FAILURES, Replies.TOO_MANY_AUTH_FAILURES)
        elif config.hard_error_limit and self.errors >= config.hard_error_limit:
            self._limit(SessionLimit.ERRORS, Replies.TOO_MANY_ERRORS)

    def _limit(self, limit: SessionLimit, reply: Reply) -> None:
        self.limit_reached = limit
        self._out.append(render(reply))
        self._state = S.CLOSED

    def close(self, reply: Reply | None = None) -> None:
        """End the session from the server's side (a timeout, a shutdown): ``reply``, a
        ``421``, is queued for :meth:`data_to_send`; nothing more is read or answered."""
        if self._state is S.CLOSED:
            return
        if reply is not None:
            self._out.append(render(reply))
        self._pending = None
        self._state = S.CLOSED

    def data_to_send(self) -> bytes:
        """Every reply queued since the last call, as one block of bytes."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def hello_reply(self, hostname: str) -> Reply:
        """The ``250`` for the :class:`Hello` being answered: for EHLO, with the extensions
        this session offers now."""
        pending = self._pending
        if not isinstance(pending, Hello):
            raise LocalProtocolError("no HELO/EHLO to answer", Replies.SERVER_ERROR)
        if not pending.extended:
            return _helo_reply(hostname)
        return _ehlo_reply(hostname, tuple(self.extensions()))

    def extensions(self) -> list[str]:
        """The EHLO keywords this session offers now (STARTTLS until TLS; AUTH over TLS)."""
        config = self.config
        size = config.max_message_size
        keywords = ["PIPELINING", f"SIZE {size}" if size else "SIZE", "8BITMIME"]
        if config.smtputf8:
            keywords.append("SMTPUTF8")
        if config.starttls and not self.tls:
            keywords.append("STARTTLS")
        if config.auth_mechanisms and (self.tls or not config.auth_requires_tls):
            keywords.append("AUTH " + " ".join(config.auth_mechanisms))
        keywords += ["DSN", "ENHANCEDSTATUSCODES", "CHUNKING"]
        return keywords

    def tls_established(self) -> None:
        """The TLS layer has taken over after STARTTLS (the handshake is done, or under way on
        a socket that no longer yields clear text): the session starts over, RFC 3207 §4.2 —
        the client greets again, nothing learnt before counts, nothing read before is acted on;
        what :meth:`receive_data` gets from now on is read as coming through TLS."""
        if self._state is not S.TLS:
            raise LocalProtocolError("no STARTTLS in progress", Replies.SERVER_ERROR)
        self.tls = True
        self.extended = False
        self.authenticated = False
        self._greeted = False
        self._buf, self._pos = b"", 0
        self._end_transaction()
        self._state = S.INIT

    # -- replies' effects ----------------------------------------------------------------------

    def _accepted(self, event: Event) -> None:
        kind = type(event)
        if kind is Hello:
            assert isinstance(event, Hello)
            self.extended = event.extended
            self._greeted = True
            self._end_transaction()
        elif kind is MailFrom:
            assert isinstance(event, MailFrom)
            self._smtputf8 = event.smtputf8
        elif kind is DataStart:
            self._dot = DotReader(self.config.max_message_size)
        elif kind is MessageComplete:
            self._junk = 0  # as Postfix: junk is counted between messages delivered
        elif kind is AuthCredentials:
            self.authenticated = True
        elif kind is StartTls:
            # RFC 3207 §4 / STARTTLS injection: what came after the command is not acted on.
            self._buf, self._pos = b"", 0

    def _end_transaction(self) -> None:
        self._smtputf8 = False
        self._txn_size = 0
        self._dot = None
        self._chunk = None

    def _fault(
        self, reply: Reply, why: str, state: ServerState | None = None
    ) -> RemoteProtocolError:
        """Count a client's error; the session moves to ``state`` (if given) and awaits the
        error's reply."""
        self.errors += 1
        if state is not None:
            self._state = state
            if state is S.READY or state is S.INIT:
                self._end_transaction()
        self._pending = _ERROR
        return RemoteProtocolError(why, reply)

    def _fatal_fault(self, reply: Reply, why: str) -> RemoteProtocolError:
        error = self._fault(reply, why)
        self._fatal = True
        return error

    def _over_limit(self, limit: SessionLimit, reply: Reply, why: str) -> RemoteProtocolError:
        """A limit that is not an error of the client's: ``reply`` ends the session."""
        self.limit_reached = limit
        self._fatal = True
        self._pending = _ERROR
        return RemoteProtocolError(why, reply)

    # -- command lines -------------------------------------------------------------------------

    def _next_line(self, limit: int) -> bytes | None:
        """The next line without its CRLF, or None until one is complete."""
        buf, pos = self._buf, self._pos
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(buf) - pos > MAX_LINE:  # keep none of a line that is too long anyway
                self._buf, self._pos, self._skipping = b"", 0, True
            return None
        self._pos = nl + 1
        end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl  # 13: CR
        if self._skipping or end - pos + 2 > limit:
            self._skipping = False
            raise self._fault(Replies.LINE_TOO_LONG, "line too long")
        return buf[pos:end]

    def _next_command(self) -> Event | NeedData:
        line = self._next_line(MAX_LINE)
        if line is None:
            return self._closed() if self._eof else NEED_DATA
        self.commands += 1
        config = self.config
        if config.max_commands and self.commands > config.max_commands:
            raise self._over_limit(SessionLimit.COMMANDS, Replies.TOO_MANY_COMMANDS, "commands")
        if b"\x00" in line:  # refused whole: a NUL would end the line for C code and logs
            raise self._fault(Replies.NUL_IN_COMMAND, "NUL in command line")
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        command = _COMMANDS.get(verb)
        if command is None:
            if not verb:
                raise self._fault(Replies.BAD_SYNTAX, "empty command line")
            if verb in _NOT_IMPLEMENTED:
                raise self._fault(Replies.NOT_IMPLEMENTED, "command not implemented")
            raise self._fault(Replies.UNRECOGNIZED, "unknown command")
        if len(line) + 2 > LINE_LIMITS.get(verb, COMMAND_LINE):
            raise self._fault(Replies.LINE_TOO_LONG, f"{verb.decode()} line too long")
        if verb != b"BDAT":  # a refused BDAT's octets must still be read
            refusal = self._gate(verb)
            if refusal is not None:
                raise self._fault(refusal, f"{verb.decode()} refused")
        if verb in _JUNK:
            self._junk += 1
            if config.junk_command_limit and self._junk > config.junk_command_limit:
                self.errors += 1  # answered as usual; the limits are checked after the reply
        return command(self, arg)

    def _gate(self, verb: bytes) -> Reply | None:
        """Why ``verb`` may not be given now (TLS or AUTH required, out of sequence), or None."""
        config = self.config
        if config.require_tls and not self.tls and verb not in _BEFORE_TLS:
            return Replies.TLS_REQUIRED
        refusals = OUT_OF_SEQUENCE.get(verb)
        if refusals:
            refusal = refusals.get(self._state)
            if refusal is not None:
                return refusal
        if config.auth_required and not self.authenticated and verb in (b"MAIL", b"VRFY"):
            return Replies.AUTH_REQUIRED
        return None

    def _event(self, event: Event) -> Event:
        self._pending = event
        return event

    def _closed(self) -> Event:
        self._state = S.CLOSED
        return _CLOSED

    def _hello(self, arg: bytes, extended: bool) -> Event:
        raw = arg.strip()
        if not raw:
            raise self._fault(syntax_reply(f"{'EHLO' if extended else 'HELO'} hostname"), "no name")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._fault(Replies.BAD_HELLO_NAME, "HELO name not UTF-8") from None
        # The name goes into the Received field and the logs: no control character, and
        # UTF-8 only where SMTPUTF8 can be offered (to an EHLO, RFC 6531 §3.7.1).
        if not name.isprintable():
            raise self._fault(Replies.BAD_HELLO_NAME, "control character in HELO name")
        if not name.isascii() and not (extended and self.config.smtputf8):
            raise self._fault(Replies.BAD_HELLO_NAME, "non-ASCII HELO name without SMTPUTF8")
        return self._event(Hello(name, extended))

    def _ehlo(self, arg: bytes) -> Event:
        return self._hello(arg, True)

    def _helo(self, arg: bytes) -> Event:
        return self._hello(arg, False)

    def _mail(self, arg: bytes) -> Event:
        config = self.config
        try:
            event = parse_mail(
                decode_argument(arg),
                extended=self.extended,
                smtputf8=config.smtputf8,
                max_size=config.max_message_size,
            )
        except Refusal as refusal:
            raise self._fault(refusal.reply, str(refusal)) from None
        return self._event(event)

    def _rcpt(self, arg: bytes) -> Event:
        try:
            text = decode_argument(arg)
            event = parse_rcpt(text, extended=self.extended, smtputf8=self._smtputf8)
        except Refusal as refusal:
            raise self._fault(refusal.reply, str(refusal)) from None
        return self._event(event)

    def _data(self, arg: bytes) -> Event:
        if arg.strip():
            raise self._fault(syntax_reply("DATA"), "DATA with an argument")
        return self._event(DataStart())

    def _rset(self, arg: bytes) -> Event:
        if arg.strip():
            raise self._fault(syntax_reply("RSET"), "RSET with an argument")
        return self._event(Reset())

    def _noop(self, arg: bytes) -> Event:
        return self._event(Noop())

    def _quit(self, arg: bytes) -> Event:
        if arg.strip():
            raise self._fault(syntax_reply("QUIT"), "QUIT with an argument")
        return self._event(Quit())

    def _vrfy(self, arg: bytes) -> Event:
        text = arg.strip().decode("utf-8", "replace")
        if not text:
            raise self._fault(syntax_reply("VRFY address"), "VRFY without an argument")
        return self._event(Vrfy(text))

    def _help(self, arg: bytes) -> Event:
        return self._event(Help(arg.strip().decode("utf-8", "replace")))

    def _starttls(self, arg: bytes) -> Event:
        if arg.strip():
            raise self._fault(syntax_reply("STARTTLS"), "STARTTLS with an argument")
        if self.tls:
            raise self._fault(Replies.TLS_ACTIVE, "STARTTLS inside TLS")
        if not self.config.starttls:
            raise self._fault(Replies.TLS_UNAVAILABLE, "STARTTLS not offered")
        return self._event(StartTls())

    # -- AUTH ----------------------------------------------------------------------------------

    def _auth(self, arg: bytes) -> Event | NeedData:
        config = self.config
        if not self.extended:
            raise self._fault(Replies.NEED_EHLO, "AUTH without EHLO")
        if not config.auth_mechanisms:
            raise self._fault(Replies.AUTH_NOT_ENABLED, "AUTH not offered")
        if config.auth_requires_tls and not self.tls:
            raise self._fault(Replies.ENCRYPTION_REQUIRED, "AUTH before TLS")
        if self.authenticated:
            raise self._fault(Replies.ALREADY_AUTHENTICATED, "second AUTH")
        try:
            mechanism, initial = parse_auth(arg.decode("ascii", "replace"), config.auth_mechanisms)
            exchange = SaslExchange(mechanism)
            step = exchange.start(initial)
        except Refusal as refusal:
            raise self._fault(refusal.reply, str(refusal)) from None
        return self._sasl_step(exchange, step)

    def _sasl_step(self, exchange: SaslExchange, step: bytes | AuthCredentials) -> Event | NeedData:
        if isinstance(step, AuthCredentials):
            self._sasl = None
            self._state = S.READY
            return self._event(step)
        self._out.append(step)
        self._sasl = exchange
        self._state = S.AUTH
        return self._next_sasl()

    def _next_sasl(self) -> Event | NeedData:
        exchange = self._sasl
        assert exchange is not None
        try:
            line = self._next_line(AUTH_LINE)
        except RemoteProtocolError:
            self._state, self._sasl = S.READY, None
            raise
        if line is None:
            return self._closed() if self._eof else NEED_DATA
        try:
            step = exchange.respond(line)
        except Refusal as refusal:
            self._sasl = None
            raise self._fault(refusal.reply, str(refusal), S.READY) from None
        return self._sasl_step(exchange, step)

    # -- DATA ----------------------------------------------------------------------------------

    def _next_content(self) -> Event | NeedData:
        reader = self._dot
        assert reader is not None
        if reader.done:
            return self._content_end(reader)
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            return self._closed() if self._eof else NEED_DATA
        piece, end = reader.feed(buf[pos:] if pos else buf)
        if end < 0:
            self._buf, self._pos = b"", 0
        else:
            self._pos = pos + end
        if piece:
            return DataChunk(piece)
        if reader.done:
            return self._content_end(reader)
        return self._closed() if self._eof else NEED_DATA

    def _content_end(self, reader: DotReader) -> Event:
        # RFC 5321 §4.2.5 (and §4.5.3.1.10): the refusal comes after the whole content.
        if reader.too_big:
            raise self._fault(Replies.TOO_BIG, "message over the size limit", S.READY)
        if reader.too_long:
            raise self._fault(Replies.LINE_TOO_LONG, "text line over 1000 octets", S.READY)
        return self._event(MessageComplete())

    # -- BDAT ----------------------------------------------------------------------------------

    def _bdat(self, arg: bytes) -> Event | NeedData:
        try:
            size, last = parse_bdat(arg.decode("ascii", "replace"))
        except Refusal as malformed:
            # Its octets cannot be told from the next command: nothing more can be read.
            raise self._fatal_fault(malformed.reply, str(malformed)) from None
        gate = self._gate(b"BDAT")
        chunk = _Chunk(size, last, self._state, gate)
        if gate is None:
            self._txn_size += size
            limit = self.config.max_message_size
            if limit and self._txn_size > limit:
                chunk.refusal, chunk.resume = Replies.TOO_BIG, S.READY
        self._chunk = chunk
        self._state = S.CHUNK
        return self._next_chunk()

    def _next_chunk(self) -> Event | NeedData:
        chunk = self._chunk
        assert chunk is not None
        if chunk.left:
            buf, pos = self._buf, self._pos
            take = min(chunk.left, len(buf) - pos)
            if not take:
                return self._closed() if self._eof else NEED_DATA
            piece = buf[pos : pos + take]
            self._pos = pos + take
            chunk.left -= take
            if chunk.refusal is None:
                return DataChunk(piece)
            if chunk.left:
                return NEED_DATA
        if chunk.refusal is not None:
            self._chunk = None
            raise self._fault(chunk.refusal, "BDAT refused", chunk.resume)
        if chunk.last:
            return self._event(MessageComplete())
        return self._event(BdatChunk(chunk.size))


class _Chunk:
    """A BDAT chunk being read; with a refusal, its octets are read and dropped."""

    __slots__ = ("last", "left", "refusal", "resume", "size")

    def __init__(self, size: int, last: bool, resume: ServerState, refusal: Reply | None) -> None:
        self.size = self.left = size
        self.last = last
        self.resume = resume
        self.refusal = refusal


_COMMANDS: Final[dict[bytes, _Command]] = {
    b"EHLO": ServerConnection._ehlo,
    b"HELO": ServerConnection._helo,
    b"MAIL": ServerConnection._mail,
    b"RCPT": ServerConnection._rcpt,
    b"DATA": ServerConnection._data,
    b"BDAT": ServerConnection._bdat,
    b"RSET": ServerConnection._rset,
    b"NOOP": ServerConnection._noop,
    b"QUIT": ServerConnection._quit,
    b"VRFY": ServerConnection._vrfy,
    b"HELP": ServerConnection._help,
    b"STARTTLS": ServerConnection._starttls,
    b"AUTH": ServerConnection._auth,
}
