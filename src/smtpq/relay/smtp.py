"""Outbound SMTP with aiosmtplib: :class:`StaticSmtpRelay` (a smarthost), and the connection
pool that :class:`~smtpq.relay.mx.MxSmtpRelay` shares.

A delivery returns a Reply per recipient: the RCPT reply for refused recipients, the DATA reply
for accepted ones. Failures of the network or of the session are transient replies with RFC 3463
codes, made in one place, :func:`reply_for_error`:

=========================================================  ==================================
what happened                                              reply
=========================================================  ==================================
connection refused, unreachable, or connect timed out      ``451 4.4.1`` no answer from host
greeting other than 220 (a 5xx one too: try again later)   the host's 4xx, or ``451 4.4.1``
connection lost, or no reply in time, after connecting     ``451 4.4.2`` bad connection
STARTTLS required but not offered; AUTH not offered        ``451 4.7.4`` security feature
TLS handshake or certificate verification failed           ``451 4.7.5`` cryptographic failure
EHLO/HELO, STARTTLS or AUTH refused (even with a 5xx)      the host's reply, made transient
anything else (a bug)                                      ``450 4.0.0``, logged with traceback
=========================================================  ==================================

Session-level refusals are transient on purpose: they concern our configuration or the host's
state, not the message, so the message waits in the queue (and bounces only when its retries
run out) rather than bouncing at once — as Postfix's ``smtp_sasl_auth_soft_bounce`` does.

Connections are reused: after a transaction the connection waits idle (at most
``idle_timeout`` seconds) for the next one. A connection whose last transaction ended cleanly
(the message accepted, or the sender refused) starts the next at once; otherwise RSET comes
first. An idle connection the host has closed meanwhile is found out by the first command, and
replaced without failing the delivery: nothing of the message was sent yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import SMTPResponse

from smtpq.envelope import Envelope
from smtpq.relay.base import RecipientResult, Relay
from smtpq.reply import Reply, unexpected_error_reply

__all__ = [
    "Delivery",
    "SmtpPool",
    "SmtpRelayConfig",
    "StaticSmtpRelay",
    "TlsMode",
    "reply_for_error",
]

log = logging.getLogger("smtpq.relay")

#: Commands that set the session up; a failure there concerns the host, not the message.
SETUP_COMMANDS = frozenset({"CONNECT", "EHLO", "HELO", "STARTTLS", "AUTH"})
# Characters that would end an address on the command line (after a quoted local part).
_UNSENDABLE = re.compile(r"[\s<>\x00-\x1f\x7f]")
_QUOTED_LOCAL = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"')
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
# Idle connections kept per host without a pool_size. Generous: a busy smarthost sees dozens of
# deliveries at once, and a connection dropped only to be opened again for the next message
# costs a connect, EHLO and QUIT (each closes after idle_timeout anyway).
_DEFAULT_IDLE = 64
# RSET and QUIT on a connection we are about to reuse or drop: no reason to wait long.
_HOUSEKEEPING_TIMEOUT = 10.0


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

    def __post_init__(self) -> None:
        # Built from TOML, ``tls`` arrives as a plain string: make it the enum (ValueError if
        # it is none of the modes; "off" is the daemon's word for NONE).
        mode = "none" if self.tls == "off" else self.tls
        object.__setattr__(self, "tls", TlsMode(mode))


def _text(message: str) -> str:
    """A reply's lines as one line (aiosmtplib joins them with newlines)."""
    return " ".join(message.split())


def _soft(code: int, message: str, command: str, host: str | None) -> Reply:
    """The host's reply, made transient when it was permanent (the enhanced code follows)."""
    transient = str(code) if 400 <= code < 500 else "451"
    return Reply(transient, _text(message), command, None, remote_host=host)


def reply_for_error(exc: BaseException, *, host: str | None, command: str) -> Reply:
    """The reply for a failed SMTP exchange with ``host`` during ``command`` (see the module
    docstring for the table). The one place where network and session failures are classified.
    """

    def reply(code: str, text: str) -> Reply:
        return Reply(code, text, command, None, remote_host=host)

    cause = exc.__cause__
    if isinstance(exc, ssl.SSLError) or isinstance(cause, ssl.SSLError):
        error = exc if isinstance(exc, ssl.SSLError) else cause
        reason = getattr(error, "reason", None) or type(error).__name__
        return reply("451", f"4.7.5 TLS handshake with host failed: {reason}")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return reply("451", f"4.7.4 {command} is required, but was not offered by host")
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        if 400 <= exc.code < 500:
            return _soft(exc.code, exc.message, command, host)
        return reply("451", f"4.4.1 Host refused service: {exc.code} {_text(exc.message)}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if command in SETUP_COMMANDS:
            return _soft(exc.code, exc.message, command, host)
        return reply(str(exc.code), _text(exc.message))
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError):
        return reply("451", "4.4.1 No answer from host (connection timed out)")
    if command == "CONNECT" and isinstance(exc, aiosmtplib.SMTPConnectError | OSError):
        error = cause if isinstance(cause, OSError) else exc
        errno = getattr(error, "errno", None)
        detail = os.strerror(errno).lower() if errno else "connection failed"
        return reply("451", f"4.4.1 No answer from host ({detail})")
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return reply("451", f"4.4.2 Bad connection: timed out waiting for reply to {command}")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | OSError | EOFError):
        return reply("451", f"4.4.2 Bad connection: connection lost during {command}")
    log.error("unexpected error talking to %s during %s", host, command, exc_info=exc)
    return unexpected_error_reply().replace(command=command, remote_host=host)


@dataclass
class Delivery:
    """The outcome of one transaction with one host.

    :ivar replies: a Reply per recipient.
    :ivar host_failed: the host failed as a whole (connection, session set-up, connection lost,
        ``421``) rather than answering for the message: another host may do better.
    """

    replies: dict[str, Reply]
    host_failed: bool = False


def _sendable(address: str) -> bool:
    """Whether an address can go on a command line as ``<address>``."""
    return not _UNSENDABLE.search(_QUOTED_LOCAL.sub("", address, count=1))


def _needs_smtputf8(envelope: Envelope, recipients: Sequence[str]) -> bool:
    """RFC 6531: non-ASCII addresses or header fields need an SMTPUTF8 session."""
    header, _ = envelope.flatten()
    return not (
        envelope.sender.isascii() and all(r.isascii() for r in recipients) and header.isascii()
    )


class _Connection:
    """An aiosmtplib session and its bookkeeping in the pool."""

    __slots__ = ("clean", "idle_timer", "smtp", "uses")

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp
        self.uses = 0
        self.idle_timer: asyncio.TimerHandle | None = None
        #: No mail transaction open: the next can begin without RSET.
        self.clean = True


class _StepFailed(Exception):
    """A command failed; carries the command name for :func:`reply_for_error`."""

    def __init__(self, command: str, error: BaseException) -> None:
        super().__init__(command)
        self.command = command
        self.error = error


class SmtpPool:
    """Connections to one host and port, reused across transactions.

    :param address: what to connect to (a host name or an IP address).
    :param port: the port.
    :param config: the session settings.
    :param name: the host's name, for TLS (SNI, verification) and ``Reply.remote_host``;
        default ``address``.
    :param helo_name: our EHLO name (default: ``config.helo_name`` or the FQDN).
    """

    def __init__(
        self,
        address: str,
        port: int,
        config: SmtpRelayConfig,
        *,
        name: str | None = None,
        helo_name: str | None = None,
    ) -> None:
        self.address = address
        self.port = port
        self.config = config
        self.name = name or address
        self.helo_name = helo_name or config.helo_name or socket.getfqdn()
        self._idle: list[_Connection] = []
        self._busy = 0
        self._slots = asyncio.Semaphore(config.pool_size) if config.pool_size else None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def empty(self) -> bool:
        """No connection open or in use."""
        return not self._idle and not self._busy

    # -- connections ---------------------------------------------------------------------------

    async def _connect(self, starttls: bool = True) -> _Connection:
        cfg = self.config
        implicit = cfg.tls is TlsMode.IMPLICIT
        smtp = aiosmtplib.SMTP(
            hostname=self.address,
            port=self.port,
            local_hostname=self.helo_name,
            timeout=cfg.connect_timeout,
            use_tls=implicit,
            start_tls=False,
            validate_certs=cfg.tls_verify,
            cert_bundle=cfg.ca_file,
        )
        command = "CONNECT"
        try:
            await smtp.connect()
            command = "EHLO"
            await self._hello(smtp)
            if starttls and cfg.tls in (TlsMode.OPPORTUNISTIC, TlsMode.REQUIRED):
                if smtp.supports_extension("starttls"):
                    command = "STARTTLS"
                    if await self._starttls(smtp):
                        command = "EHLO"
                        await self._hello(smtp)
                elif cfg.tls is TlsMode.REQUIRED:
                    command = "STARTTLS"
                    raise aiosmtplib.SMTPNotSupported("STARTTLS not offered")
            if cfg.username is not None:
                command = "AUTH"
                if not smtp.supports_extension("auth"):
                    raise aiosmtplib.SMTPNotSupported("AUTH not offered")
                await smtp.login(cfg.username, cfg.password or "", timeout=cfg.connect_timeout)
        except ssl.SSLError as exc:
            smtp.close()
            if cfg.tls is TlsMode.OPPORTUNISTIC and command == "STARTTLS":
                # Opportunistic: a host whose TLS is broken still gets the mail, in plain text.
                log.warning("TLS with %s failed (%s); retrying without", self.name, exc)
                return await self._connect(starttls=False)
            raise _StepFailed(command, exc) from exc
        except Exception as exc:
            smtp.close()
            raise _StepFailed(command, exc) from exc
        except asyncio.CancelledError:
            smtp.close()
            raise
        return _Connection(smtp)

    async def _starttls(self, smtp: aiosmtplib.SMTP) -> bool:
        """STARTTLS; False when refused and TLS is only opportunistic (the session goes on)."""
        try:
            await smtp.starttls(server_hostname=self.name, timeout=self.config.connect_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            if self.config.tls is TlsMode.REQUIRED or not smtp.is_connected:
                raise
            log.info("%s refused STARTTLS (%s); going on without", self.name, exc)
            return False
        return True

    async def _hello(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo(timeout=self.config.connect_timeout)
        except aiosmtplib.SMTPHeloError:
            if not smtp.is_connected:
                raise
            await smtp.helo(timeout=self.config.connect_timeout)

    async def _acquire(self) -> tuple[_Connection, bool]:
        """An idle connection, or a new one; True for an idle one not heard from since.

        One left in a transaction must answer RSET first (and is then heard from); a clean
        one is used as it is, to spare the round trip: the caller finds out at MAIL FROM
        whether the host closed it meanwhile.
        """
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if not conn.smtp.is_connected:
                conn.smtp.close()
                continue
            if conn.clean:
                return conn, True
            try:
                reply = await conn.smtp.execute_command(b"RSET", timeout=_HOUSEKEEPING_TIMEOUT)
            except (aiosmtplib.SMTPException, OSError):
                conn.smtp.close()
                continue
            if reply.code == 250:
                conn.clean = True
                return conn, False
            self._retire(conn)
        return await self._connect(), False

    def _release(self, conn: _Connection) -> None:
        cfg = self.config
        conn.uses += 1
        keep = (
            conn.smtp.is_connected
            and cfg.idle_timeout > 0
            and conn.uses < cfg.max_messages
            and len(self._idle) < (cfg.pool_size or _DEFAULT_IDLE)
        )
        if not keep:
            self._retire(conn)
            return
        loop = asyncio.get_running_loop()
        conn.idle_timer = loop.call_later(cfg.idle_timeout, self._expire, conn)
        self._idle.append(conn)

    def _expire(self, conn: _Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
            self._retire(conn)

    def _retire(self, conn: _Connection) -> None:
        """QUIT politely in the background, then close."""
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
        if not conn.smtp.is_connected:
            conn.smtp.close()
            return
        task = asyncio.ensure_future(self._quit(conn.smtp))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _quit(smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.quit(timeout=_HOUSEKEEPING_TIMEOUT)
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            smtp.close()

    async def close(self) -> None:
        """Close the idle connections (QUIT) and wait for closings under way."""
        while self._idle:
            self._retire(self._idle.pop())
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    # -- delivery ------------------------------------------------------------------------------

    async def deliver(self, envelope: Envelope, recipients: Sequence[str]) -> Delivery:
        """One transaction for ``recipients``; never raises for SMTP or network failures."""
        if self._slots is None:
            return await self._deliver(envelope, recipients)
        async with self._slots:
            return await self._deliver(envelope, recipients)

    async def _deliver(self, envelope: Envelope, recipients: Sequence[str]) -> Delivery:
        replies: dict[str, Reply] = {}
        self._busy += 1
        conn: _Connection | None = None
        try:
            while True:
                conn, unheard = await self._acquire()
                try:
                    host_failed = await self._transaction(conn, envelope, recipients, replies)
                    break
                except _StepFailed as failed:
                    if not (unheard and failed.command == "MAIL FROM" and _closed(failed)):
                        raise
                # The host closed the idle connection: the next idle one, or a new one.
                conn.smtp.close()
                conn = None
        except _StepFailed as failed:
            reply = reply_for_error(failed.error, host=self.name, command=failed.command)
            for rcpt in recipients:
                # Refusals of RCPT stand: the host answered for those recipients.
                if rcpt not in replies or replies[rcpt].is_success():
                    replies[rcpt] = addressed(reply, rcpt)
            if conn is not None:
                conn.smtp.close()
            conn = None
            host_failed = True
        except BaseException:
            # A bug or a cancellation mid-transaction: the session's state is unknown.
            if conn is not None:
                conn.smtp.close()
            conn = None
            raise
        finally:
            self._busy -= 1
            if conn is not None:
                self._release(conn)
        return Delivery(replies, host_failed)

    @staticmethod
    async def _step(command: str, pending: Awaitable[SMTPResponse]) -> SMTPResponse:
        """Await one command; failures become :class:`_StepFailed` naming it."""
        try:
            response = await pending
        except aiosmtplib.SMTPDataError as exc:
            return SMTPResponse(exc.code, exc.message)
        except Exception as exc:
            raise _StepFailed(command, exc) from exc
        return response

    async def _transaction(
        self,
        conn: _Connection,
        envelope: Envelope,
        recipients: Sequence[str],
        replies: dict[str, Reply],
    ) -> bool:
        """MAIL, RCPT each, DATA for the accepted; fills ``replies``. True if the host failed."""
        cfg, host, smtp = self.config, self.name, conn.smtp
        peer = smtp.get_transport_info("peername") if smtp.is_connected else None
        ip = str(peer[0]) if peer else None

        def answer(command: str, resp: SMTPResponse, rcpt: str) -> Reply:
            # On a success: whether the DSN parameters went on (RFC 3461), for NOTIFY=SUCCESS.
            passed = smtp.supports_extension("dsn") if 200 <= resp.code < 300 else None
            text = _text(resp.message)
            return Reply(
                str(resp.code),
                text,
                command,
                rcpt,
                remote_host=host,
                remote_ip=ip,
                remote_dsn=passed,
            )

        utf8 = smtp.supports_extension("smtputf8")
        if _needs_smtputf8(envelope, recipients) and not utf8:
            text = "5.6.7 SMTPUTF8 is required, but was not offered by host"
            for rcpt in recipients:
                replies[rcpt] = Reply("554", text, "MAIL FROM", rcpt, remote_host=host)
            return False
        encoding = "utf-8" if utf8 else "ascii"
        if not _sendable(envelope.sender):
            for rcpt in recipients:
                replies[rcpt] = Reply("553", "5.1.7 Bad sender address syntax", "MAIL FROM", rcpt)
            return False
        message = b"".join(envelope.flatten())
        options = self._mail_options(smtp, envelope, len(message), utf8)
        conn.clean = False
        resp = await self._step(
            "MAIL FROM",
            smtp.execute_command(
                b"MAIL",
                b"FROM:<" + envelope.sender.encode(encoding) + b">",
                *options,
                timeout=cfg.command_timeout,
            ),
        )
        if resp.code != 250:
            conn.clean = True  # no transaction began
            for rcpt in recipients:
                replies[rcpt] = answer("MAIL FROM", resp, rcpt)
            return resp.code == 421
        dsn = smtp.supports_extension("dsn")
        accepted: list[str] = []
        for rcpt in recipients:
            if not _sendable(rcpt):
                text = "5.1.3 Bad destination mailbox address syntax"
                replies[rcpt] = Reply("553", text, "RCPT TO", rcpt)
                continue
            params = envelope.rcpt_params.get(rcpt, {}) if dsn else {}
            resp = await self._step(
                "RCPT TO",
                smtp.execute_command(
                    b"RCPT",
                    b"TO:<" + rcpt.encode(encoding) + b">",
                    *_encoded_params(params, encoding),
                    timeout=cfg.command_timeout,
                ),
            )
            if resp.code == 421:  # the host is closing: the recipients not refused wait
                for other in recipients:
                    if other not in replies or replies[other].is_success():
                        replies[other] = answer("RCPT TO", resp, other)
                return True
            replies[rcpt] = answer("RCPT TO", resp, rcpt)
            if resp.code in (250, 251):
                accepted.append(rcpt)
        if not accepted:
            return False
        resp = await self._step("DATA", self._data(smtp, message))
        conn.clean = resp.code == 250  # the message taken: the transaction is over
        for rcpt in accepted:
            replies[rcpt] = answer("DATA", resp, rcpt)
        return resp.code == 421

    async def _data(self, smtp: aiosmtplib.SMTP, message: bytes) -> SMTPResponse:
        """DATA, then the content: the reply refusing DATA, or the one to the final dot.

        aiosmtplib's ``data()`` rewrites every line ending of the message by regular expression;
        what an SMTP session stored needs that only in the rare message with a bare CR or LF.
        """
        timeout = self.config.data_timeout
        start = await smtp.execute_command(b"DATA", timeout=timeout)
        if start.code != 354:
            return start
        protocol = smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost after DATA")
        # No await between the write and read_response: the reply cannot arrive unexpected.
        protocol.write(wire_content(message))
        return await protocol.read_response(timeout=timeout)

    @staticmethod
    def _mail_options(
        smtp: aiosmtplib.SMTP, envelope: Envelope, size: int, utf8: bool
    ) -> list[bytes]:
        options: list[str] = []
        if envelope.smtputf8 and utf8:
            options.append("SMTPUTF8")
        if envelope.body_type == "8BITMIME" and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if smtp.supports_extension("size"):
            options.append(f"SIZE={size}")
        if smtp.supports_extension("dsn"):
            if envelope.dsn_ret:
                options.append(f"RET={envelope.dsn_ret}")
            if envelope.dsn_envid:
                options.append(f"ENVID={envelope.dsn_envid}")
        return [o.encode("ascii") for o in options]


def wire_content(message: bytes) -> bytes:
    """``message`` as DATA carries it (RFC 5321 §4.5.2): CRLF line endings, a dot doubled at
    the start of a line, then the lone dot that ends it."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = _LINE_ENDING.sub(b"\r\n", message)  # a bare CR or LF: a line ending of its own
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    message = message.replace(b"\n.", b"\n..")
    if message.startswith(b"."):
        message = b"." + message
    return message + b".\r\n"


def _closed(failed: _StepFailed) -> bool:
    """The command failed because the connection was found closed."""
    return isinstance(failed.error, (aiosmtplib.SMTPServerDisconnected, ConnectionError))


def _encoded_params(params: Mapping[str, str], encoding: str) -> list[bytes]:
    """``KEY=value`` parameters; one the session cannot carry (UTF-8 in ASCII) is left out."""
    out: list[bytes] = []
    for key, value in sorted(params.items()):
        with contextlib.suppress(UnicodeEncodeError):
            out.append(f"{key}={value}".encode(encoding))
    return out


def addressed(reply: Reply, rcpt: str) -> Reply:
    """``reply``, about ``rcpt``."""
    return reply.replace(address=rcpt)


class StaticSmtpRelay(Relay):
    """Delivers every message to one host (a smarthost), reusing connections.

    :param host: the smarthost's name or address.
    :param port: its port (587 with ``TlsMode.REQUIRED`` and AUTH, 465 with IMPLICIT, ...).
    :param pool_size: most connections at once (overrides ``config.pool_size``).
    :param config: TLS, AUTH, timeouts and reuse (:class:`SmtpRelayConfig`).

    ``attempt`` returns a Reply per recipient: RCPT refusals, the DATA reply for the others.
    """

    def __init__(
        self,
        host: str,
        port: int = 25,
        pool_size: int | None = None,
        *,
        config: SmtpRelayConfig | None = None,
    ) -> None:
        config = config or SmtpRelayConfig()
        if pool_size is not None:
            config = dataclasses.replace(config, pool_size=pool_size)
        self.config = config
        self.pool = SmtpPool(host, port, config)

    async def attempt(self, envelope: Envelope, attempts: int) -> dict[str, RecipientResult]:
        """Deliver to the smarthost; see :meth:`smtpq.relay.base.Relay.attempt`."""
        delivery = await self.pool.deliver(envelope, list(dict.fromkeys(envelope.recipients)))
        return dict(delivery.replies)

    async def close(self) -> None:
        """QUIT the idle connections."""
        with contextlib.suppress(Exception):
            await self.pool.close()
