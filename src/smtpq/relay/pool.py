"""Connections to one host, reused across transactions (:class:`SmtpPool`), and the one place
where a failed session becomes a reply (:func:`reply_for_error`).

A delivery returns a Reply per recipient: the RCPT reply for refused recipients, the reply to
the content for accepted ones. Failures of the network or of the session are transient
replies with RFC 3463 codes:

=========================================================  ==================================
what happened                                              reply
=========================================================  ==================================
connection refused, unreachable, or connect timed out      ``451 4.4.1`` no answer from host
greeting other than 220 (a 5xx one too: try again later)   the host's 4xx, or ``451 4.4.1``
connection lost, or no reply in time, after connecting     ``451 4.4.2`` bad connection
a reply that breaks the protocol (garbage, overlong)       ``451 4.4.2`` bad connection
STARTTLS required but not offered; AUTH not offered        ``451 4.7.4`` security feature
TLS handshake or certificate verification failed           ``451 4.7.5`` cryptographic failure
EHLO/HELO, STARTTLS or AUTH refused (even with a 5xx)      the host's reply, made transient
anything else (a bug)                                      ``450 4.0.0``, logged with traceback
=========================================================  ==================================

Session-level refusals are transient on purpose: they concern our configuration or the host's
state, not the message, so the message waits in the queue (and bounces only when its retries
run out) rather than bouncing at once — as Postfix's ``smtp_sasl_auth_soft_bounce`` does.

Connections are reused: after a transaction the connection waits idle (at most
``idle_timeout`` seconds) for the next one. A connection whose last transaction ended (the
content answered, whatever the answer, or the sender refused) starts the next at once;
one left with a transaction open (no recipient accepted) gets RSET first. An idle connection
the host has closed meanwhile is found out by the first command, and replaced without failing
the delivery: nothing of the message was taken yet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from smtpq.envelope import Envelope
from smtpq.relay.base import before_connect
from smtpq.relay.session import (
    ConnectionLost,
    ReplyError,
    SmtpRelayConfig,
    SmtpSession,
    StepFailed,
    ip_literal,
    open_session,
)
from smtpq.reply import Reply, unexpected_error_reply
from smtpq.smtp.client import Transaction, needs_smtputf8
from smtpq.smtp.errors import LocalProtocolError, ProtocolError

__all__ = ["Delivery", "SmtpPool", "addressed", "reply_for_error", "transaction_for"]

log = logging.getLogger("smtpq.relay")

#: Commands that set the session up; a failure there concerns the host, not the message.
SETUP_COMMANDS = frozenset({"CONNECT", "EHLO", "HELO", "STARTTLS", "AUTH"})
# Idle connections kept per host without a pool_size. Generous: a busy smarthost sees dozens of
# deliveries at once, and a connection dropped only to be opened again for the next message
# costs a connect, EHLO and QUIT (each closes after idle_timeout anyway).
_DEFAULT_IDLE = 64


def _soft(reply: Reply, command: str, host: str | None, ip: str | None) -> Reply:
    """The host's reply, made transient when it was permanent (the enhanced code follows)."""
    code = reply.code if reply.is_transient() else "451"
    return reply.replace(code=code, command=command, remote_host=host, remote_ip=ip)


def reply_for_error(
    exc: BaseException, *, host: str | None, command: str, ip: str | None = None
) -> Reply:
    """The reply for a failed SMTP exchange with ``host`` (at ``ip``) during ``command`` (see
    the module docstring for the table). The one place where network and session failures are
    classified."""

    def reply(code: str, text: str) -> Reply:
        return Reply(code, text, command, None, remote_host=host, remote_ip=ip)

    cause = exc.__cause__
    if isinstance(exc, ssl.SSLError) or isinstance(cause, ssl.SSLError):
        error = exc if isinstance(exc, ssl.SSLError) else cause
        reason = getattr(error, "reason", None) or type(error).__name__
        return reply("451", f"4.7.5 TLS handshake with host failed: {reason}")
    if isinstance(exc, ProtocolError):
        if isinstance(exc, LocalProtocolError) and exc.reply.enhanced_status_code == "4.0.0":
            log.error("protocol misuse talking to %s during %s", host, command, exc_info=exc)
        return exc.reply.replace(command=command, remote_host=host, remote_ip=ip)
    if isinstance(exc, ReplyError):
        refused = exc.reply
        if command == "CONNECT" and not refused.is_transient():
            return reply("451", f"4.4.1 Host refused service: {refused}")
        if command in SETUP_COMMANDS:
            return _soft(refused, command, host, ip)
        return refused.replace(command=command, remote_host=host, remote_ip=ip)
    if command == "CONNECT":
        if isinstance(exc, TimeoutError):
            return reply("451", "4.4.1 No answer from host (connection timed out)")
        if isinstance(exc, ConnectionLost):
            return reply("451", "4.4.1 No answer from host (connection closed)")
        if isinstance(exc, OSError):
            errno = exc.errno
            detail = os.strerror(errno).lower() if errno else "connection failed"
            return reply("451", f"4.4.1 No answer from host ({detail})")
    if isinstance(exc, TimeoutError):
        return reply("451", f"4.4.2 Bad connection: timed out waiting for reply to {command}")
    if isinstance(exc, OSError | EOFError):
        return reply("451", f"4.4.2 Bad connection: connection lost during {command}")
    log.error("unexpected error talking to %s during %s", host, command, exc_info=exc)
    return unexpected_error_reply().replace(command=command, remote_host=host, remote_ip=ip)


@dataclass
class Delivery:
    """The outcome of one transaction with one host.

    :ivar replies: a Reply per recipient.
    :ivar host_failed: the host failed as a whole (connection, session set-up, connection lost,
        ``421``) rather than answering for the message: another host may do better.
    """

    replies: dict[str, Reply]
    host_failed: bool = False


def addressed(reply: Reply, rcpt: str) -> Reply:
    """``reply``, about ``rcpt``."""
    return reply.replace(address=rcpt)


def transaction_for(envelope: Envelope, recipients: Sequence[str]) -> Transaction:
    """The mail transaction that relays ``envelope`` to ``recipients``: the message byte for
    byte, and what its originator declared."""
    header, body = envelope.flatten()
    return Transaction(
        envelope.sender,
        tuple(recipients),
        (header, body),  # sent as two pieces: no whole copy of the message
        body=envelope.body_type,
        smtputf8=needs_smtputf8(envelope.smtputf8, envelope.sender, recipients, header),
        ret=envelope.dsn_ret,
        envid=envelope.dsn_envid,
        rcpt_params=envelope.rcpt_params,
    )


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
        self._timeouts = config.timeouts()
        self._idle: list[SmtpSession] = []
        self._busy = 0
        self._slots = asyncio.Semaphore(config.pool_size) if config.pool_size else None
        self._closing: set[asyncio.Future[None]] = set()
        # One timer for the idle connections: the oldest one's expiry (see _sweep).
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def empty(self) -> bool:
        """No connection open or in use."""
        return not self._idle and not self._busy

    # -- connections ---------------------------------------------------------------------------

    async def _connect(self) -> SmtpSession:
        await before_connect()  # the queue's connection rate limit for this destination
        return await open_session(
            self.address,
            self.port,
            self.config,
            name=self.name,
            helo_name=self.helo_name,
            timeouts=self._timeouts,
        )

    async def _acquire(self) -> tuple[SmtpSession, bool]:
        """An idle connection, or a new one; True for an idle one not heard from since.

        One left with a transaction open must answer RSET first (and is then heard from); a
        clean one is used as it is, to spare the round trip: the caller finds out at MAIL FROM
        whether the host closed it meanwhile.
        """
        while self._idle:
            session = self._idle.pop()
            if not session.usable:
                session.abort()
                continue
            if session.clean:
                return session, True
            try:
                reset = await session.reset()
            except StepFailed:
                session.abort()
                continue
            if reset:
                return session, False
            self._retire(session)
        return await self._connect(), False

    def _release(self, session: SmtpSession) -> None:
        cfg = self.config
        session.uses += 1
        keep = (
            session.usable
            and cfg.idle_timeout > 0
            and session.uses < cfg.max_messages
            and len(self._idle) < (cfg.pool_size or _DEFAULT_IDLE)
        )
        if not keep:
            self._retire(session)
            return
        loop = asyncio.get_running_loop()
        session.idle_since = loop.time()
        self._idle.append(session)
        if self._sweeper is None:
            self._sweeper = loop.call_at(session.idle_since + cfg.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Retire the connections idle for ``idle_timeout``, then wait for the next to be.

        The idle list is a stack (the most recently used connection is taken first), so its
        bottom is the oldest: one timer serves them all, instead of one per release.
        """
        self._sweeper = None
        idle, timeout = self._idle, self.config.idle_timeout
        loop = asyncio.get_running_loop()
        expired = loop.time() - timeout
        while idle and idle[0].idle_since <= expired:
            self._retire(idle.pop(0))
        if idle:
            self._sweeper = loop.call_at(idle[0].idle_since + timeout, self._sweep)

    def _retire(self, session: SmtpSession) -> None:
        """QUIT politely (the session closes when answered), or close at once if unusable."""
        session.quit()
        closed = session.closed
        if not closed.done():
            self._closing.add(closed)
            closed.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close the idle connections (QUIT) and wait for closings under way."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
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
        transaction = transaction_for(envelope, recipients)
        self._busy += 1
        session: SmtpSession | None = None
        try:
            while True:
                session, unheard = await self._acquire()
                try:
                    done = await session.transaction(transaction)
                    break
                except StepFailed as failed:
                    closed = isinstance(failed.error, ConnectionError)
                    if not (unheard and failed.command == "MAIL FROM" and closed):
                        raise
                # The host closed the idle connection: the next idle one, or a new one.
                session.abort()
                session = None
            return Delivery(dict(done.replies), done.closing)
        except StepFailed as failed:
            delivery = self._failed(failed, transaction, session)
            session = None
            return delivery
        except BaseException:
            # A bug or a cancellation mid-transaction: the session's state is unknown.
            if session is not None:
                session.abort()
            session = None
            raise
        finally:
            self._busy -= 1
            if session is not None:
                self._release(session)

    def _failed(
        self, failed: StepFailed, transaction: Transaction, session: SmtpSession | None
    ) -> Delivery:
        """Every recipient the host had not refused gets the failure's reply."""
        answered: dict[str, Reply] = {}
        ip = failed.ip or ip_literal(self.address)
        if session is not None:
            answered = session.conn.replies_so_far(transaction)
            ip = session.conn.remote_ip
            session.abort()
        reply = reply_for_error(failed.error, host=self.name, command=failed.command, ip=ip)
        replies: dict[str, Reply] = {}
        for rcpt in transaction.recipients:
            known = answered.get(rcpt)
            # Refusals of RCPT stand: the host answered for those recipients.
            refused = known is not None and not known.is_success()
            replies[rcpt] = known if refused and known is not None else addressed(reply, rcpt)
        return Delivery(replies, host_failed=True)
