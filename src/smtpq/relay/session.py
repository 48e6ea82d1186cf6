"""One outbound SMTP connection: :class:`SmtpSession`, the thin ``asyncio.Protocol`` driver of
the sans-IO :class:`~smtpq.smtp.client.ClientConnection`, and how a session is set up
(:func:`open_session`: connect, greeting, EHLO, STARTTLS per :class:`TlsMode`, AUTH).

The protocol rules are the machine's; the driver only moves bytes, keeps one timer per wait,
and turns failures into exceptions naming the command (:class:`StepFailed`) for
:func:`~smtpq.relay.pool.reply_for_error`. A reply wakes the waiting coroutine once per
exchange (a whole pipelined transaction is one), and bytes the machine wants sent in answer to
a reply (the content after 354) are written from the protocol callback, without a round trip
through the event loop.

Timeouts (RFC 5321 §4.5.3.2) are per awaited reply, and run from the last bytes received:
``connect_timeout`` for the connection, greeting, EHLO, STARTTLS and AUTH; ``command_timeout``
for MAIL and RCPT; ``data_timeout`` for DATA, the content and BDAT; RSET and QUIT on a
connection being reused or dropped get at most 10 s.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

from smtpq.reply import Reply
from smtpq.smtp.client import (
    Auth,
    AuthDone,
    ClientCommand,
    ClientConnection,
    ClientEvent,
    ClientState,
    Closed,
    Greeting,
    Hello,
    HelloDone,
    Quit,
    Reset,
    ResetDone,
    StartTls,
    StartTlsDone,
    Transaction,
    TransactionDone,
)
from smtpq.smtp.errors import ProtocolError

__all__ = [
    "ConnectionLost",
    "ReplyError",
    "SessionTimeout",
    "SmtpRelayConfig",
    "SmtpSession",
    "StepFailed",
    "TlsMode",
    "open_session",
]

log = logging.getLogger("smtpq.relay")

# RSET and QUIT on a connection we are about to reuse or drop: no reason to wait long.
HOUSEKEEPING_TIMEOUT = 10.0


class TlsMode(enum.StrEnum):
    """How a session is encrypted."""

    #: STARTTLS when the host offers it; plain text otherwise (and after a failed handshake).
    OPPORTUNISTIC = "opportunistic"
    #: STARTTLS must succeed, else the delivery is deferred (``4.7.4`` / ``4.7.5``).
    REQUIRED = "required"
    #: TLS from the first byte (submissions port 465).
    IMPLICIT = "implicit"
    #: Never encrypt.
    NONE = "none"


@dataclass(frozen=True)
class SmtpRelayConfig:
    """How smtpq talks SMTP to a host.

    :ivar helo_name: our name in EHLO (default: the FQDN).
    :ivar tls: :class:`TlsMode`.
    :ivar tls_verify: verify the host's certificate and name (with STARTTLS or implicit TLS).
    :ivar ca_file: CA bundle for verification (default: the system's).
    :ivar username: AUTH (PLAIN or LOGIN) with this user; None: no AUTH.
    :ivar password: its password.
    :ivar connect_timeout: seconds for the connection, greeting, EHLO, STARTTLS and AUTH each.
    :ivar command_timeout: seconds for the reply to MAIL, RCPT, RSET (RFC 5321 §4.5.3.2: 5 min).
    :ivar data_timeout: seconds for the reply to DATA and to the final dot (RFC: 10 min).
    :ivar pool_size: most connections at once to one host (None: no limit), and most kept
        idle (None: 64).
    :ivar idle_timeout: seconds an idle connection is kept for the next message (0: no reuse).
    :ivar max_messages: transactions per connection before it is closed.
    :ivar chunking: send with BDAT (RFC 3030) where the host offers CHUNKING; else DATA.
    """

    helo_name: str | None = None
    tls: TlsMode = TlsMode.OPPORTUNISTIC
    tls_verify: bool = False
    ca_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    pool_size: int | None = None
    idle_timeout: float = 30.0
    max_messages: int = 100
    chunking: bool = True

    def __post_init__(self) -> None:
        # Built from TOML, ``tls`` arrives as a plain string: make it the enum (ValueError if
        # it is none of the modes; "off" is the daemon's word for NONE).
        mode = "none" if self.tls == "off" else self.tls
        object.__setattr__(self, "tls", TlsMode(mode))

    def timeouts(self) -> dict[str, float]:
        """Seconds to wait for the reply to each command, as :attr:`ClientConnection.awaiting`
        names it."""
        setup, command, data = self.connect_timeout, self.command_timeout, self.data_timeout
        housekeeping = min(command, HOUSEKEEPING_TIMEOUT)
        return {
            "CONNECT": setup,
            "EHLO": setup,
            "HELO": setup,
            "STARTTLS": setup,
            "AUTH": setup,
            "MAIL FROM": command,
            "RCPT TO": command,
            "DATA": data,
            "BDAT": data,
            "RSET": housekeeping,
            "QUIT": housekeeping,
        }


# -- failures ----------------------------------------------------------------------------------


class ReplyError(Exception):
    """The host refused a step of the session set-up (greeting, EHLO, STARTTLS, AUTH, RSET)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class ConnectionLost(ConnectionError):
    """The host closed the connection while ``command``'s reply was awaited."""

    def __init__(self, command: str | None) -> None:
        super().__init__(f"connection lost during {command}")
        self.command = command


class SessionTimeout(TimeoutError):
    """No reply to ``command`` in time."""

    def __init__(self, command: str | None) -> None:
        super().__init__(f"timed out waiting for reply to {command}")
        self.command = command


class StepFailed(Exception):
    """A step failed; names the command for :func:`~smtpq.relay.pool.reply_for_error`.

    :ivar ip: the peer's address, when the connection was made (the set-up failed after it).
    """

    def __init__(self, command: str, error: BaseException) -> None:
        super().__init__(command)
        self.command = command
        self.error = error
        self.ip: str | None = None


def _failed_command(exc: BaseException, default: str) -> str:
    """The command a failure concerns: the one awaited when it happened."""
    command: str | None = None
    if isinstance(exc, ConnectionLost | SessionTimeout):
        command = exc.command
    elif isinstance(exc, ProtocolError):
        command = exc.reply.command
    return command or default


# -- the protocol ------------------------------------------------------------------------------


class SmtpSession(asyncio.Protocol):
    """A connection to one host, driving a :class:`ClientConnection`.

    :ivar conn: the protocol state.
    :ivar uses: transactions made on it (for the pool's ``max_messages``).
    :ivar idle_since: when it was last put back idle (loop time; the pool's).
    """

    __slots__ = (
        "_closed",
        "_loop",
        "_lost",
        "_pending",
        "_progress",
        "_timeouts",
        "_timer",
        "_transport",
        "_waiter",
        "conn",
        "idle_since",
        "uses",
    )

    def __init__(
        self, conn: ClientConnection, timeouts: Mapping[str, float], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.conn = conn
        self.uses = 0
        self.idle_since = 0.0
        self._timeouts = timeouts
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[ClientEvent] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._progress = 0.0
        # An outcome that came while nobody waited: the greeting (before the first wait), or
        # the server speaking unasked (a 421 while idle) or breaking the protocol.
        self._pending: ClientEvent | BaseException | None = None
        self._lost = False
        self._closed: asyncio.Future[None] = loop.create_future()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is one without being an asyncio.Transport subclass).
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.conn.remote_ip = str(peer[0])

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._progress = now = self._loop.time()
        self._pump()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # Still waiting, perhaps now for a command with a shorter timeout (DATA after
            # MAIL): the timer must not fire later than that one's deadline.
            self._arm(now + self._timeout())

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.conn.receive_data(b"")
        self._pump()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._closed.done():
            self._closed.set_result(None)

    def _pump(self) -> None:
        """Take every outcome the machine has now; write what it asks to send."""
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                self._deliver(exc)
                return
            out = conn.chunks_to_send()
            if out and not self._lost:
                self._send(out)
            if event is None:
                return
            self._deliver(event)

    def _deliver(self, outcome: ClientEvent | BaseException) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)
            return
        if self._pending is None:
            self._pending = outcome
        if not isinstance(outcome, Greeting) and self._transport is not None:
            # Unasked: the server is closing (421), answered our QUIT, or broke the protocol.
            self._transport.close()

    def _send(self, chunks: list[bytes]) -> None:
        """Write the machine's pieces as they are (uvloop sends them without joining them: a
        message is not copied whole on its way out)."""
        assert self._transport is not None
        if len(chunks) == 1:
            self._transport.write(chunks[0])
        else:
            self._transport.writelines(chunks)

    # waiting

    async def _wait(self) -> ClientEvent:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if isinstance(pending, BaseException):
                raise pending
            return pending
        loop = self._loop
        waiter: asyncio.Future[ClientEvent] = loop.create_future()
        self._waiter = waiter
        self._progress = now = loop.time()
        self._arm(now + self._timeout())
        try:
            return await waiter
        finally:
            self._waiter = None

    def _timeout(self) -> float:
        return self._timeouts.get(self.conn.awaiting or "", HOUSEKEEPING_TIMEOUT)

    def _arm(self, deadline: float) -> None:
        """Make sure the timer fires by ``deadline``.

        One timer per session, re-armed lazily: a wait that ends leaves it running (a reply
        comes in milliseconds, a timeout is minutes), and when it fires it checks the deadline
        of the wait then under way, if any. So most waits cost no timer at all.
        """
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        """The timer: fails the wait under way if its deadline passed, else waits for it."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait arms it again
        deadline = self._progress + self._timeout()
        if deadline > self._loop.time():
            self._arm(deadline)
            return
        waiter.set_exception(SessionTimeout(self.conn.awaiting))

    async def exchange(self, command: ClientCommand | None, name: str) -> ClientEvent:
        """Send ``command`` (None: only wait, for the greeting); its outcome. Failures raise
        :class:`StepFailed` (``name``: the command to blame when none more precise is known)."""
        conn = self.conn
        try:
            event: ClientEvent | None = None
            if command is not None:
                if not self.usable_for_send:
                    raise ConnectionLost(name)
                conn.send(command)
                event = conn.next_event()  # an outcome decided without the server, or None
                out = conn.chunks_to_send()
                if out:
                    self._send(out)
            if event is None:
                event = await self._wait()
            if isinstance(event, Closed):
                raise ConnectionLost(event.awaiting or name)
        except (OSError, TimeoutError, ProtocolError) as exc:
            raise StepFailed(_failed_command(exc, name), exc) from exc
        return event

    # state

    @property
    def usable_for_send(self) -> bool:
        """Connected, and nothing said unasked."""
        return not self._lost and self._pending is None

    @property
    def usable(self) -> bool:
        """Idle and fit for another transaction (perhaps after RSET)."""
        return self.usable_for_send and self.conn.state in (ClientState.READY, ClientState.DIRTY)

    @property
    def clean(self) -> bool:
        """No transaction open: the next can begin without RSET."""
        return self.conn.state is ClientState.READY

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done when the connection is closed."""
        return self._closed

    # steps

    async def greeting(self) -> None:
        """The server's greeting; ReplyError unless it is a 2xx."""
        event = await self.exchange(None, "CONNECT")
        assert isinstance(event, Greeting)
        if not event.reply.is_success():
            raise StepFailed("CONNECT", ReplyError(event.reply))

    async def hello(self, name: str) -> None:
        """EHLO (or HELO); ReplyError if refused."""
        event = await self.exchange(Hello(name), "EHLO")
        assert isinstance(event, HelloDone)
        if not event.reply.is_success():
            raise StepFailed(event.reply.command or "EHLO", ReplyError(event.reply))

    async def starttls(
        self, context: ssl.SSLContext, server_name: str, required: bool, timeout: float
    ) -> bool:
        """STARTTLS and the handshake; False when refused and not ``required``."""
        event = await self.exchange(StartTls(), "STARTTLS")
        assert isinstance(event, StartTlsDone)
        if not event.reply.is_success():
            if required:
                raise StepFailed("STARTTLS", ReplyError(event.reply))
            log.info("%s refused STARTTLS (%s); going on without", server_name, event.reply)
            return False
        assert self._transport is not None
        async with asyncio.timeout(timeout):
            transport = await self._loop.start_tls(
                self._transport, self, context, server_hostname=server_name
            )
        self._transport = cast(asyncio.Transport, transport)
        self.conn.tls_started()
        return True

    async def auth(self, username: str, password: str) -> None:
        """AUTH; ReplyError if refused."""
        event = await self.exchange(Auth(username, password), "AUTH")
        assert isinstance(event, AuthDone)
        # 235 is RFC 4954's success; a 2xx (smtp-sink's 250) is taken as one too.
        if not event.reply.is_success():
            raise StepFailed("AUTH", ReplyError(event.reply))

    async def transaction(self, transaction: Transaction) -> TransactionDone:
        """One mail transaction; its per-recipient outcome."""
        event = await self.exchange(transaction, "MAIL FROM")
        assert isinstance(event, TransactionDone)
        return event

    async def reset(self) -> bool:
        """RSET; whether it was accepted."""
        event = await self.exchange(Reset(), "RSET")
        assert isinstance(event, ResetDone)
        return event.reply.is_success()

    def quit(self) -> None:
        """QUIT, and close when answered (or after a short while in any case)."""
        if not self.usable:
            self.abort()
            return
        self.conn.send(Quit())
        self._send(self.conn.chunks_to_send())
        self._loop.call_later(HOUSEKEEPING_TIMEOUT, self.abort)

    def abort(self) -> None:
        """Close at once."""
        if self._transport is not None:
            self._transport.abort()


@functools.lru_cache(maxsize=8)
def tls_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """A client TLS context, made once per setting (loading the CAs is not cheap)."""
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def ip_literal(address: str) -> str | None:
    """``address`` if it is an IP address (what a connection to it reaches), else None."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


async def open_session(
    address: str,
    port: int,
    config: SmtpRelayConfig,
    *,
    name: str,
    helo_name: str,
    timeouts: Mapping[str, float],
    starttls: bool = True,
) -> SmtpSession:
    """Connect to ``address``, and set the session up: greeting, EHLO, STARTTLS as
    ``config.tls`` says (``starttls=False``: the retry after a broken handshake), AUTH.

    Raises :class:`StepFailed` naming the step that failed.
    """
    loop = asyncio.get_running_loop()
    mode = config.tls
    context = None if mode is TlsMode.NONE else tls_context(config.tls_verify, config.ca_file)
    implicit = mode is TlsMode.IMPLICIT
    conn = ClientConnection(
        remote_host=name, remote_ip=ip_literal(address), chunking=config.chunking
    )
    session: SmtpSession | None = None
    command = "CONNECT"
    try:
        async with asyncio.timeout(config.connect_timeout):
            _, session = await loop.create_connection(
                lambda: SmtpSession(conn, timeouts, loop),
                address,
                port,
                ssl=context if implicit else None,
                server_hostname=name if implicit else None,
            )
        await session.greeting()
        command = "EHLO"
        await session.hello(helo_name)
        if starttls and context is not None and not implicit:
            required = mode is TlsMode.REQUIRED
            if required or conn.extensions.starttls:
                command = "STARTTLS"
                if await session.starttls(context, name, required, config.connect_timeout):
                    command = "EHLO"
                    await session.hello(helo_name)
        if config.username is not None:
            command = "AUTH"
            await session.auth(config.username, config.password or "")
    except Exception as exc:
        if session is not None:
            session.abort()
        failed = exc if isinstance(exc, StepFailed) else StepFailed(command, exc)
        failed.ip = conn.remote_ip
        broken_tls = failed.command == "STARTTLS" and isinstance(failed.error, ssl.SSLError)
        if broken_tls and mode is TlsMode.OPPORTUNISTIC:
            # Opportunistic: a host whose TLS is broken still gets the mail, in plain text.
            log.warning("TLS with %s failed (%s); retrying without", name, failed.error)
            return await open_session(
                address,
                port,
                config,
                name=name,
                helo_name=helo_name,
                timeouts=timeouts,
                starttls=False,
            )
        if failed is exc:
            raise
        raise failed from exc
    except asyncio.CancelledError:
        if session is not None:
            session.abort()
        raise
    return session
