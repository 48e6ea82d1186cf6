"""Today's relay before smtpq had its own SMTP client: aiosmtplib under the same connection
pool, kept only as a benchmark peer for ``bench/relay_bench.py`` (issue 12: the new relay must
reach 3x this one in the same run). Nothing in ``src`` imports it.

It is the relay of main up to the protocol core, unchanged but for its names (``AiosmtplibPool``,
``AiosmtplibRelay``) and for what it now shares with smtpq: the configuration, ``Delivery``,
``addressed``, the DATA content (``data_content``, which was its ``wire_content``) and the
checks on addresses and parameters, the same functions as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Sequence

import aiosmtplib
from aiosmtplib import SMTPResponse

from smtpq.envelope import Envelope
from smtpq.relay.base import RecipientResult, Relay
from smtpq.relay.smtp import Delivery, SmtpRelayConfig, TlsMode, addressed
from smtpq.reply import Reply, unexpected_error_reply
from smtpq.smtp._client_writers import encoded_params, sendable
from smtpq.smtp.client import data_content

__all__ = ["AiosmtplibPool", "AiosmtplibRelay", "reply_for_error"]

log = logging.getLogger("bench.aiosmtplib_relay")

#: Commands that set the session up; a failure there concerns the host, not the message.
SETUP_COMMANDS = frozenset({"CONNECT", "EHLO", "HELO", "STARTTLS", "AUTH"})
# Idle connections kept per host without a pool_size. Generous: a busy smarthost sees dozens of
# deliveries at once, and a connection dropped only to be opened again for the next message
# costs a connect, EHLO and QUIT (each closes after idle_timeout anyway).
_DEFAULT_IDLE = 64
# RSET and QUIT on a connection we are about to reuse or drop: no reason to wait long.
_HOUSEKEEPING_TIMEOUT = 10.0


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


class AiosmtplibPool:
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

        def answer(command: str, resp: SMTPResponse, rcpt: str) -> Reply:
            return Reply(str(resp.code), _text(resp.message), command, rcpt, remote_host=host)

        utf8 = smtp.supports_extension("smtputf8")
        if _needs_smtputf8(envelope, recipients) and not utf8:
            text = "5.6.7 SMTPUTF8 is required, but was not offered by host"
            for rcpt in recipients:
                replies[rcpt] = Reply("554", text, "MAIL FROM", rcpt, remote_host=host)
            return False
        encoding = "utf-8" if utf8 else "ascii"
        if not sendable(envelope.sender):
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
            if not sendable(rcpt):
                text = "5.1.3 Bad destination mailbox address syntax"
                replies[rcpt] = Reply("553", text, "RCPT TO", rcpt)
                continue
            params = envelope.rcpt_params.get(rcpt, {}) if dsn else {}
            resp = await self._step(
                "RCPT TO",
                smtp.execute_command(
                    b"RCPT",
                    b"TO:<" + rcpt.encode(encoding) + b">",
                    *encoded_params(params, encoding),
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
        protocol.write(data_content(message))
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


def _closed(failed: _StepFailed) -> bool:
    """The command failed because the connection was found closed."""
    return isinstance(failed.error, (aiosmtplib.SMTPServerDisconnected, ConnectionError))


class AiosmtplibRelay(Relay):
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
        self.pool = AiosmtplibPool(host, port, config)

    async def attempt(self, envelope: Envelope, attempts: int) -> dict[str, RecipientResult]:
        """Deliver to the smarthost; see :meth:`smtpq.relay.base.Relay.attempt`."""
        delivery = await self.pool.deliver(envelope, list(dict.fromkeys(envelope.recipients)))
        return dict(delivery.replies)

    async def close(self) -> None:
        """QUIT the idle connections."""
        with contextlib.suppress(Exception):
            await self.pool.close()
