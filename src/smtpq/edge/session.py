"""One SMTP session of the edge: a thin :class:`asyncio.Protocol` around the server machine.

Each read is fed to :class:`~smtpq.smtp.ServerConnection`; its events are answered in order
and the replies of the batch leave in one write. An answer that must wait (the queue storing a
message, a password check, the delay after an error past the soft limit) pauses reading until
it is given, so a client cannot pile up input meanwhile; the rest of its pipelined batch is
taken up afterwards.

Time: one timer per session, re-armed lazily, holds the client to the per-read timeout, to the
minimum DATA rate while message content arrives (:func:`~smtpq.edge.limits.content_deadline`)
and to the session's length. Time spent waiting on ourselves (storing, checking a password) is
never held against the client.

Memory: message content goes into one buffer as it arrives (the machine hands on nothing past
the size limit, and the buffer is dropped as soon as the message is known to be too big); the
envelope copies its header block and body out of it once, and the buffer is freed: a message
is in memory at most twice, for a moment.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

from smtpq.edge.limits import content_deadline
from smtpq.envelope import Envelope
from smtpq.reply import (
    Replies,
    Reply,
    accepted_reply,
    chunk_received_reply,
    session_limit_reply,
    timeout_reply,
)
from smtpq.smtp import (
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
    Noop,
    Quit,
    RcptTo,
    RemoteProtocolError,
    Reset,
    ServerConnection,
    ServerState,
    StartTls,
    Vrfy,
)

if TYPE_CHECKING:
    from smtpq.edge.server import EdgeSettings, SmtpEdge

__all__ = ["SESSION_REFUSALS", "EdgeSession", "reverse_name"]

log = logging.getLogger("smtpq.edge")

#: What sessions refuse, besides the machine's limits and the relay rule (metric labels).
SESSION_REFUSALS: Final = (
    "pregreet",
    "timeout",
    "data_rate",
    "session_limit",
    "unknown_recipient",
    "auth_failed",
    "protocol_error",
)
_CONTENT: Final = frozenset({ServerState.DATA, ServerState.CHUNK})
_IN_TRANSACTION: Final = frozenset(
    {ServerState.MAIL, ServerState.RCPT, ServerState.CHUNKING, ServerState.DATA, ServerState.CHUNK}
)
# While a session waits on us (storing a message), its timer looks again this often.
_BUSY_RECHECK: Final = 1.0


async def reverse_name(ip: str, timeout: float) -> str | None:
    """The client's host name if its address maps back to it (FCrDNS), else None."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            name, _ = await loop.getnameinfo((ip, 0), socket.NI_NAMEREQD)
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return None
    return name if any(info[4][0] == ip for info in infos) else None


class EdgeSession(asyncio.Protocol):
    """The edge's side of one client connection, from ``ip``, admitted by the edge (which
    counts it until :meth:`release`)."""

    __slots__ = (
        "_attached",
        "_auth_user",
        "_busy",
        "_closing",
        "_conn",
        "_content",
        "_edge",
        "_ended",
        "_ends_at",
        "_greeted",
        "_helo",
        "_last_read",
        "_loop",
        "_mail",
        "_read_by",
        "_recipients",
        "_released",
        "_reverse",
        "_settings",
        "_timer",
        "_transport",
        "ip",
    )

    def __init__(self, edge: SmtpEdge, settings: EdgeSettings, ip: str) -> None:
        self._edge = edge
        self._settings = settings
        self.ip = ip
        self._loop = asyncio.get_running_loop()
        self._conn = ServerConnection(settings.server, tls=settings.implicit_tls)
        self._transport: asyncio.Transport | None = None
        self._helo: str | None = None
        self._auth_user: str | None = None
        self._mail: MailFrom | None = None
        # Recipients in order, each with its RFC 3461 parameters (a dict: repeats are one).
        self._recipients: dict[str, dict[str, str]] = {}
        self._content = bytearray()
        self._busy = False
        self._ended = False  # the client shut its side
        self._greeted = False
        self._closing = False
        self._attached = False
        self._released = False
        self._reverse: asyncio.Task[str | None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = self._read_by = self._ends_at = 0.0

    def attach(self) -> EdgeSession:
        """The loop takes the connection's socket (``connect_accepted_socket``'s protocol
        factory): from now on the transport closes it."""
        self._attached = True
        return self

    @property
    def attached(self) -> bool:
        """Whether the loop took the socket (see :meth:`attach`)."""
        return self._attached

    def release(self) -> None:
        """The connection is over: the edge no longer counts it (once, however it ended)."""
        if not self._released:
            self._released = True
            self._edge._release(self.ip)

    # -- the transport's side ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Greet the client, now or after the greeting delay."""
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._edge._sessions.add(self)
        config = self._settings.config
        now = self._loop.time()
        self._ends_at = now + config.max_session_time if config.max_session_time else 0.0
        if config.greet_delay > 0:
            self._busy = True  # on ourselves: no timeout meanwhile
            self._timer = self._loop.call_later(config.greet_delay, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._greeted = True
        self._busy = False
        self._conn.send(self._settings.greeting)
        transport.write(self._conn.data_to_send())
        self._last_read = self._loop.time()
        self._read_by = self._last_read + self._settings.config.timeout
        self._timer = self._loop.call_at(self._next_check(), self._check_time)

    def data_received(self, data: bytes) -> None:
        """Feed the machine; answer what it makes of the batch."""
        now = self._loop.time()
        if not self._greeted:
            self._pregreet()
            return
        conn = self._conn
        timeout = self._settings.config.timeout
        if conn.state in _CONTENT:
            rate = self._settings.config.min_data_rate
            self._read_by = content_deadline(self._read_by, now, len(data), timeout, rate)
        else:
            self._read_by = now + timeout
        self._last_read = now
        conn.receive_data(data)
        if not self._busy:
            self._process()

    def eof_received(self) -> bool | None:
        """The client shut its side: finish what it sent, and send a reply still due."""
        if self._ended:
            return None
        self._ended = True
        if not self._greeted:
            return None  # gone before the greeting: nothing to answer
        self._conn.receive_data(b"")
        if self._busy:
            # Keep the socket open for writing until the reply (to the final dot, say) is out;
            # a TLS transport cannot be kept half-open.
            return not self._conn.tls
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the session. A message being stored is stored all the same."""
        self._transport = None
        self._content = bytearray()
        self.release()
        self._edge._closed(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._reverse is not None and not self._busy:
            # With a message being stored, the lookup (bounded by lookup_timeout) still names
            # its client.
            self._reverse.cancel()

    def shut_down(self) -> None:
        """The edge is stopping: ``421`` and close."""
        self._close(Replies.SHUTTING_DOWN)

    def _pregreet(self) -> None:
        """The client talked before the greeting: refused instead of greeted."""
        self._greeted = True
        if self._timer is not None:
            self._timer.cancel()
        self._edge._refused("pregreet")
        log.info("client %s talked before the greeting; disconnected", self.ip)
        self._conn.send(Replies.PREGREET)
        self._busy = False
        self._flush()

    # -- the machine's events ------------------------------------------------------------------

    def _process(self) -> None:
        conn = self._conn
        try:
            while not self._busy and not conn.closed:
                errors = conn.errors
                try:
                    event = conn.next_event()
                except RemoteProtocolError as exc:
                    self._edge._refused("protocol_error")
                    conn.send(exc.reply)
                    if conn.state not in _IN_TRANSACTION:
                        self._reset()
                    self._slow_down()
                    continue
                if event is NEED_DATA:
                    if self._content and conn.discarding:  # over the size limit: refused
                        self._content = bytearray()
                    break
                assert isinstance(event, Event)
                try:
                    reply = HANDLERS[type(event)](self, event)
                except Exception:
                    # A bug of ours: a transient refusal, logged here, never shown.
                    log.exception("SMTP session with %s failed on %r", self.ip, event)
                    reply = Replies.QUEUE_ERROR
                if reply is not None:
                    conn.send(reply)
                    if conn.errors > errors:
                        self._slow_down()
        except Exception:
            log.exception("SMTP session with %s failed", self.ip)
            self._close(Replies.SERVER_ERROR)
            return
        if not self._busy:  # else the batch's replies leave with the one still due
            self._flush()

    def _slow_down(self) -> None:
        """After a reply to an error: past the soft limit, hold it (and what follows) back for
        the error delay."""
        conn = self._conn
        if not conn.slowed or conn.closed:
            return
        delay = self._settings.config.error_delay
        if delay <= 0:
            return
        self._busy = True
        if self._transport is not None:
            self._transport.pause_reading()
        self._loop.call_later(delay, self._resume)

    def _resume(self) -> None:
        """What the session waited for is done: read and answer again."""
        if self._transport is None:
            return  # the client went
        self._busy = False
        if self._conn.closed:  # the last reply ended the session (a limit, QUIT)
            self._flush()
            return
        self._read_by = self._loop.time() + self._settings.config.timeout
        if not self._ended and not self._transport.is_closing():
            self._transport.resume_reading()
        self._process()

    def _flush(self) -> None:
        transport = self._transport
        if transport is None:
            return
        conn = self._conn
        data = conn.data_to_send()
        if data:
            transport.write(data)
        if conn.closed and not self._busy and not self._closing:
            self._closing = True
            limit = conn.limit_reached
            if limit is not None:
                self._edge._refused(limit.value)
                log.info("closing the session with %s: %s", self.ip, limit.value)
            transport.close()

    def _close(self, reply: Reply) -> None:
        self._conn.close(reply)
        self._busy = False
        self._flush()

    def _wait_for(self, work: Coroutine[Any, Any, Reply], track: bool = False) -> None:
        """Answer the pending event with ``work``'s reply once it is done; read nothing until
        then. A ``track``ed task is one the edge waits for when it stops (a message's store)."""
        self._busy = True
        if self._transport is not None:
            self._transport.pause_reading()
        task = self._loop.create_task(work)
        if track:
            self._edge._tasks.add(task)
        task.add_done_callback(self._answer)

    def _answer(self, task: asyncio.Task[Reply]) -> None:
        self._edge._tasks.discard(task)
        if task.cancelled():
            return
        try:
            reply = task.result()
        except Exception:
            log.exception("SMTP session with %s failed", self.ip)
            reply = Replies.QUEUE_ERROR
        if self._transport is None or self._conn.closed:
            return  # the client went, or the edge closed the session
        self._busy = False
        errors = self._conn.errors
        self._conn.send(reply)
        if self._conn.errors > errors:
            self._slow_down()
        if not self._busy:
            self._resume()

    # -- time ----------------------------------------------------------------------------------

    def _next_check(self) -> float:
        ends = self._ends_at
        return min(self._read_by, ends) if ends else self._read_by

    def _check_time(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        now = self._loop.time()
        ends = self._ends_at
        if self._busy:
            # Waiting on ourselves, not on the client: a message being stored is answered,
            # whatever the time.
            self._timer = self._loop.call_later(_BUSY_RECHECK, self._check_time)
            return
        hostname = self._settings.hostname
        if ends and now >= ends:
            self._edge._refused("session_limit")
            log.info("closing the session with %s: session time limit", self.ip)
            self._close(session_limit_reply(hostname))
        elif now >= self._read_by:
            silent = now - self._last_read >= self._settings.config.timeout
            self._edge._refused("data_rate" if not silent else "timeout")
            if not silent:
                log.info("closing the session with %s: message content too slow", self.ip)
            self._close(timeout_reply(hostname))
        else:
            self._timer = self._loop.call_at(self._next_check(), self._check_time)

    # -- answers -------------------------------------------------------------------------------

    def _hello(self, event: Hello) -> Reply:
        self._helo = event.name
        self._reset()
        return self._conn.hello_reply(self._settings.hostname)

    def _mail_from(self, event: MailFrom) -> Reply:
        self._reset()
        self._mail = event
        settings = self._settings
        if self._reverse is None and settings.config.reverse_lookup and self.ip:
            # Looked up while the client goes on with RCPT and DATA.
            lookup = reverse_name(self.ip, settings.config.lookup_timeout)
            self._reverse = self._loop.create_task(lookup)
        return Replies.SENDER_OK

    def _rcpt_to(self, event: RcptTo) -> Reply:
        settings = self._settings
        address, refusal, reason = settings.recipients.check(
            event.address, self.ip or None, self._auth_user is not None
        )
        if refusal is not None:
            if reason is not None:
                self._edge._refused(reason)
                log.info("RCPT from %s to <%s> refused: %s", self.ip, address, reason)
            return refusal
        recipients = self._recipients
        if address in recipients:
            return Replies.RECIPIENT_OK  # the same recipient twice gets one copy
        if len(recipients) >= settings.config.max_recipients:
            return Replies.TOO_MANY_RECIPIENTS
        recipients[address] = event.dsn_params()
        return Replies.RECIPIENT_OK

    def _data_start(self, event: DataStart) -> Reply:
        self._content = bytearray()
        return Replies.START_DATA

    def _data_chunk(self, event: DataChunk) -> None:
        self._content += event.data

    def _bdat_chunk(self, event: BdatChunk) -> Reply:
        return chunk_received_reply(event.size)

    def _message_complete(self, event: MessageComplete) -> None:
        env = self._envelope(self._content)
        self._reset()
        self._wait_for(self._store(env), track=True)

    def _envelope(self, content: bytearray) -> Envelope:
        mail = self._mail
        assert mail is not None
        recipients = self._recipients
        env = Envelope(mail.address, list(recipients))
        env.parse(content)
        tls, authenticated = self._conn.tls, self._auth_user is not None
        if self._conn.extended:
            protocol = "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")
        else:
            protocol = "SMTP"
        env.client = {
            "ip": self.ip or None,
            "host": None,
            "name": self._helo,
            "protocol": protocol,
            "auth": self._auth_user,
        }
        env.receiver = self._settings.hostname
        env.timestamp = self._edge.clock.time()
        env.body_type = mail.body
        env.smtputf8 = mail.smtputf8
        env.dsn_ret = mail.ret
        env.dsn_envid = mail.envid
        env.rcpt_params = {rcpt: params for rcpt, params in recipients.items() if params}
        return env

    async def _store(self, env: Envelope) -> Reply:
        """``250 2.6.0`` once the queue has stored every part of it; else ``451 4.3.0``."""
        try:
            if self._reverse is not None:
                env.client["host"] = await asyncio.shield(self._reverse)
            ids = await self._edge.enqueue(env)
        except Exception:
            log.exception("enqueue failed for message from <%s>", env.sender)
            return Replies.QUEUE_ERROR
        return Replies.QUEUE_ERROR if ids is None else accepted_reply(ids)

    def _start_tls(self, event: StartTls) -> None:
        self._conn.send(Replies.READY_FOR_TLS)
        self._flush()  # the 220 goes in the clear, before the handshake
        self._busy = True
        if self._transport is not None:
            self._transport.pause_reading()
        task = self._loop.create_task(self._handshake())
        task.add_done_callback(_log_failure)

    async def _handshake(self) -> None:
        transport, context = self._transport, self._settings.tls
        assert transport is not None
        assert context is not None
        # From here on, whatever reaches data_received comes through TLS: start_tls hands the
        # socket to the TLS layer before it yields, and what came in the clear before it (read
        # while paused, or with the STARTTLS) has been dropped by the machine.
        self._conn.tls_established()
        self._auth_user = None
        try:
            secure = await self._loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self._settings.config.timeout,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            log.info("TLS handshake with %s failed: %s", self.ip, exc)
            transport.close()
            return
        if secure is None or self._transport is None:
            return  # the client went during the handshake
        self._transport = secure
        self._resume()

    def _authenticate(self, event: AuthCredentials) -> None:
        self._wait_for(self._check_password(event))

    async def _check_password(self, event: AuthCredentials) -> Reply:
        passwords = self._settings.passwords
        try:
            user = event.login.decode("utf-8")
        except UnicodeError:
            return Replies.AUTH_FAILED
        # RFC 4616 §2: acting as another identity is not something this edge grants.
        if event.authzid and event.authzid != event.login:
            return Replies.AUTH_FAILED
        try:
            ok = passwords is not None and await passwords.check(user, event.password)
        except OSError:
            log.exception("credentials file unreadable")
            return Replies.AUTH_UNAVAILABLE
        if not ok:
            self._edge._refused("auth_failed")
            log.info("AUTH failed for %r from %s", user[:64], self.ip)  # %r: no raw controls
            return Replies.AUTH_FAILED
        self._auth_user = user
        return Replies.AUTH_OK

    def _reset_command(self, event: Reset) -> Reply:
        self._reset()
        return Replies.OK

    def _reset(self) -> None:
        self._mail = None
        self._recipients = {}
        self._content = bytearray()

    def _closed(self, event: ConnectionClosed) -> None:
        """The machine is closed now: the batch's last write closes the transport."""


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("STARTTLS failed", exc_info=task.exception())


def _fixed(reply: Reply) -> Callable[[EdgeSession, Event], Reply]:
    return lambda session, event: reply


_Handler = Callable[[EdgeSession, Any], Reply | None]

#: Every event the machine gives, and what answers it (a test holds this against the events).
HANDLERS: Final[dict[type[Event], _Handler]] = {
    Hello: EdgeSession._hello,
    MailFrom: EdgeSession._mail_from,
    RcptTo: EdgeSession._rcpt_to,
    DataStart: EdgeSession._data_start,
    DataChunk: EdgeSession._data_chunk,
    BdatChunk: EdgeSession._bdat_chunk,
    MessageComplete: EdgeSession._message_complete,
    StartTls: EdgeSession._start_tls,
    AuthCredentials: EdgeSession._authenticate,
    Reset: EdgeSession._reset_command,
    Noop: _fixed(Replies.OK),
    Vrfy: _fixed(Replies.VRFY),
    Help: _fixed(Replies.HELP),
    Quit: _fixed(Replies.BYE),
    ConnectionClosed: EdgeSession._closed,
}
