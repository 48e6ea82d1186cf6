"""One SMTP session of the edge: a thin :class:`asyncio.Protocol` around the server machine.

Each read is fed to :class:`~smtpq.smtp.ServerConnection`; its events are answered in order
and the replies of the batch leave in one write. An answer that must wait (the queue storing a
message, a password check) pauses reading until it is given, so a client cannot pile up input
meanwhile; the rest of its pipelined batch is taken up afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

from smtpq.envelope import Envelope
from smtpq.reply import (
    Replies,
    Reply,
    accepted_reply,
    chunk_received_reply,
    relay_denied_reply,
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
    StartTls,
    Vrfy,
)

if TYPE_CHECKING:
    from smtpq.edge.server import EdgeSettings, SmtpEdge

__all__ = ["EdgeSession", "reverse_name"]

log = logging.getLogger("smtpq.edge")


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
    """The edge's side of one client connection."""

    __slots__ = (
        "_auth_user",
        "_busy",
        "_chunks",
        "_conn",
        "_edge",
        "_ended",
        "_helo",
        "_ip",
        "_last_read",
        "_loop",
        "_mail",
        "_recipients",
        "_reverse",
        "_settings",
        "_timer",
        "_transport",
    )

    def __init__(self, edge: SmtpEdge, settings: EdgeSettings) -> None:
        self._edge = edge
        self._settings = settings
        self._loop = asyncio.get_running_loop()
        self._conn = ServerConnection(settings.server, tls=settings.implicit_tls)
        self._transport: asyncio.Transport | None = None
        self._ip: str | None = None
        self._helo: str | None = None
        self._auth_user: str | None = None
        self._mail: MailFrom | None = None
        # Recipients in order, each with its RFC 3461 parameters (a dict: repeats are one).
        self._recipients: dict[str, dict[str, str]] = {}
        self._chunks: list[bytes] = []
        self._busy = False
        self._ended = False  # the client shut its side
        self._reverse: asyncio.Task[str | None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0

    # -- the transport's side ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Greet the client."""
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._ip = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self._edge._sessions.add(self)
        self._conn.send(self._settings.greeting)
        transport.write(self._conn.data_to_send())
        self._last_read = self._loop.time()
        self._timer = self._loop.call_later(self._settings.config.timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        """Feed the machine; answer what it makes of the batch."""
        self._last_read = self._loop.time()
        self._conn.receive_data(data)
        if not self._busy:
            self._process()

    def eof_received(self) -> bool | None:
        """The client shut its side: finish what it sent, and send a reply still due."""
        if self._ended:
            return None
        self._ended = True
        self._conn.receive_data(b"")
        if self._busy:
            # Keep the socket open for writing until the reply (to the final dot, say) is out;
            # a TLS transport cannot be kept half-open.
            return not self._conn.tls
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the session. A message being stored is stored all the same."""
        self._edge._sessions.discard(self)
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
        if self._reverse is not None and not self._busy:
            # With a message being stored, the lookup (bounded by lookup_timeout) still names
            # its client.
            self._reverse.cancel()

    def shut_down(self) -> None:
        """The edge is stopping: ``421`` and close."""
        self._close(Replies.SHUTTING_DOWN)

    # -- the machine's events ------------------------------------------------------------------

    def _process(self) -> None:
        conn = self._conn
        try:
            while not self._busy and not conn.closed:
                try:
                    event = conn.next_event()
                except RemoteProtocolError as exc:
                    conn.send(exc.reply)
                    continue
                if event is NEED_DATA:
                    break
                assert isinstance(event, Event)
                try:
                    reply = HANDLERS[type(event)](self, event)
                except Exception:
                    # A bug of ours: a transient refusal, logged here, never shown.
                    log.exception("SMTP session with %s failed on %r", self._ip, event)
                    reply = Replies.QUEUE_ERROR
                if reply is not None:
                    conn.send(reply)
        except Exception:
            log.exception("SMTP session with %s failed", self._ip)
            self._close(Replies.SERVER_ERROR)
            return
        if not self._busy:  # else the batch's replies leave with the one still due
            self._flush()

    def _flush(self) -> None:
        transport = self._transport
        if transport is None:
            return
        data = self._conn.data_to_send()
        if data:
            transport.write(data)
        if self._conn.closed and not self._busy:
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
            log.exception("SMTP session with %s failed", self._ip)
            reply = Replies.QUEUE_ERROR
        if self._transport is None or self._conn.closed:
            return  # the client went, or the edge closed the session
        self._busy = False
        self._conn.send(reply)
        if not self._ended and not self._transport.is_closing():
            self._transport.resume_reading()
        self._process()

    def _check_idle(self) -> None:
        timeout = self._settings.config.timeout
        idle = self._loop.time() - self._last_read
        if self._busy or idle < timeout:
            # Busy: waiting on ourselves, not on the client.
            wait = timeout if self._busy else timeout - idle
            self._timer = self._loop.call_later(wait, self._check_idle)
            return
        if self._transport is not None and not self._transport.is_closing():
            self._close(timeout_reply(self._settings.hostname))

    # -- answers -------------------------------------------------------------------------------

    def _hello(self, event: Hello) -> Reply:
        self._helo = event.name
        self._reset()
        return self._conn.hello_reply(self._settings.hostname)

    def _mail_from(self, event: MailFrom) -> Reply:
        self._reset()
        self._mail = event
        settings = self._settings
        if self._reverse is None and settings.config.reverse_lookup and self._ip is not None:
            # Looked up while the client goes on with RCPT and DATA.
            lookup = reverse_name(self._ip, settings.config.lookup_timeout)
            self._reverse = self._loop.create_task(lookup)
        return Replies.SENDER_OK

    def _rcpt_to(self, event: RcptTo) -> Reply:
        address = event.address
        if "@" not in address:
            return Replies.NO_DOMAIN
        if not self._settings.relay.allows(address, self._ip, self._auth_user is not None):
            log.info("relay denied from %s to <%s>", self._ip, address)
            return relay_denied_reply(address)
        recipients = self._recipients
        if address in recipients:
            return Replies.RECIPIENT_OK  # the same recipient twice gets one copy
        if len(recipients) >= self._settings.config.max_recipients:
            return Replies.TOO_MANY_RECIPIENTS
        recipients[address] = event.dsn_params()
        return Replies.RECIPIENT_OK

    def _data_start(self, event: DataStart) -> Reply:
        self._chunks = []
        return Replies.START_DATA

    def _data_chunk(self, event: DataChunk) -> None:
        self._chunks.append(event.data)

    def _bdat_chunk(self, event: BdatChunk) -> Reply:
        return chunk_received_reply(event.size)

    def _message_complete(self, event: MessageComplete) -> None:
        content = b"".join(self._chunks)
        self._chunks = []
        env = self._envelope(content)
        self._reset()
        self._wait_for(self._store(env), track=True)

    def _envelope(self, content: bytes) -> Envelope:
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
            "ip": self._ip,
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
            log.info("TLS handshake with %s failed: %s", self._ip, exc)
            transport.close()
            return
        if secure is None or self._transport is None:
            return  # the client went during the handshake
        self._transport = secure
        self._busy = False
        self._process()

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
            log.info("AUTH failed for %r from %s", event.login[:64], self._ip)
            return Replies.AUTH_FAILED
        self._auth_user = user
        return Replies.AUTH_OK

    def _reset_command(self, event: Reset) -> Reply:
        self._reset()
        return Replies.OK

    def _reset(self) -> None:
        self._mail = None
        self._recipients = {}
        self._chunks = []

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
