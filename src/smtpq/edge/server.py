"""SmtpEdge: the SMTP server in front of a queue, on smtpq's own protocol core.

A message is answered ``250 2.6.0`` only after ``queue.enqueue`` has returned with every
resulting envelope stored; any failure is ``451 4.3.0`` — never a 5xx, never exception text.

The protocol is :class:`smtpq.smtp.ServerConnection`'s; each session
(:class:`~smtpq.edge.session.EdgeSession`) is a thin driver that answers its events with the
edge's rules: the relay policy, the recipient limit, AUTH against the credentials file, and the
queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from smtpq.clock import Clock, SystemClock
from smtpq.edge.access import RelayPolicy
from smtpq.edge.auth import PasswordFile
from smtpq.edge.session import EdgeSession
from smtpq.envelope import Envelope
from smtpq.errors import QueueError
from smtpq.reply import greeting_reply
from smtpq.smtp import ServerConfig
from smtpq.smtp._server_auth import MECHANISMS

__all__ = ["EdgeConfig", "EdgeSettings", "Enqueuer", "SmtpEdge"]

log = logging.getLogger("smtpq.edge")


class Enqueuer(Protocol):
    """What the edge fronts: :class:`smtpq.queue.Queue`, or anything with its ``enqueue``."""

    async def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str | QueueError]]:
        """Store ``envelope`` (maybe split); each result is a queue id or the error."""
        ...


@dataclass(frozen=True)
class EdgeConfig:
    """How the edge listens and whom it accepts mail from.

    :ivar host: address to listen on.
    :ivar port: port to listen on (0: any free port, see :attr:`SmtpEdge.port`).
    :ivar hostname: our name in the greeting and in ``envelope.receiver`` (default: the FQDN).
    :ivar max_message_size: bytes; advertised as EHLO SIZE, larger messages get ``552 5.3.4``.
    :ivar max_recipients: recipients per message; more get ``452 4.5.3``.
    :ivar timeout: seconds a client may stay silent (and that DATA may take) before ``421``.
    :ivar relay_domains: domains accepted from anyone (``.example.org`` also covers subdomains).
    :ivar trusted_networks: CIDR networks whose clients may relay anywhere.
    :ivar tls_cert: certificate chain (PEM) for STARTTLS, or for implicit TLS.
    :ivar tls_key: its private key (PEM); default: in ``tls_cert``.
    :ivar implicit_tls: TLS from the first byte (port 465 style) instead of STARTTLS.
    :ivar require_tls: refuse mail commands before STARTTLS.
    :ivar credentials_file: ``user:hash`` lines; AUTH PLAIN/LOGIN is offered (over TLS only)
        when set.
    :ivar auth_required: refuse mail from clients that have not authenticated (submission).
    :ivar smtputf8: offer SMTPUTF8 (RFC 6531).
    :ivar reverse_lookup: look up the client's host name (forward-confirmed) for the envelope.
    :ivar lookup_timeout: seconds the reverse lookup may take before the host is unknown.
    :ivar reuse_port: listen with SO_REUSEPORT, so that several worker processes share the
        address and the kernel spreads connections among them.
    """

    host: str = "127.0.0.1"
    port: int = 2525
    hostname: str | None = None
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 1000
    timeout: float = 300.0
    relay_domains: tuple[str, ...] = ()
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    tls_cert: str | None = None
    tls_key: str | None = None
    implicit_tls: bool = False
    require_tls: bool = False
    credentials_file: str | None = None
    auth_required: bool = False
    smtputf8: bool = True
    reverse_lookup: bool = True
    lookup_timeout: float = 5.0
    reuse_port: bool = False

    def __post_init__(self) -> None:
        # From TOML, lists arrive where tuples are meant; bad networks fail here, not later.
        object.__setattr__(self, "relay_domains", tuple(self.relay_domains))
        object.__setattr__(self, "trusted_networks", tuple(self.trusted_networks))
        RelayPolicy(self.relay_domains, self.trusted_networks)

    def tls_context(self) -> ssl.SSLContext | None:
        """The server TLS context for :attr:`tls_cert`, or None without one."""
        if not self.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


class EdgeSettings:
    """What the sessions accepted under one :class:`EdgeConfig` share: loaded once (the TLS
    context and the credentials file), replaced whole by :meth:`SmtpEdge.reconfigure`.

    :raises ValueError: for an inconsistent configuration; :class:`OSError` or
        :class:`ssl.SSLError` when the certificate cannot be loaded.
    """

    __slots__ = (
        "config",
        "greeting",
        "hostname",
        "implicit_tls",
        "passwords",
        "relay",
        "server",
        "tls",
    )

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.hostname = config.hostname or socket.getfqdn()
        self.greeting = greeting_reply(self.hostname)
        self.tls = config.tls_context()
        if (config.implicit_tls or config.require_tls) and self.tls is None:
            raise ValueError("implicit_tls and require_tls need tls_cert")
        if config.auth_required and not config.credentials_file:
            raise ValueError("auth_required needs credentials_file")
        if config.credentials_file and self.tls is None:
            log.warning("credentials_file without tls_cert: AUTH is offered over TLS only, never")
        self.passwords = PasswordFile(config.credentials_file) if config.credentials_file else None
        self.relay = RelayPolicy(config.relay_domains, config.trusted_networks)
        self.implicit_tls = config.implicit_tls
        self.server = ServerConfig(
            max_message_size=config.max_message_size,
            smtputf8=config.smtputf8,
            # With implicit TLS the whole connection is TLS already: no STARTTLS to offer.
            starttls=self.tls is not None and not config.implicit_tls,
            require_tls=config.require_tls,
            auth_mechanisms=MECHANISMS if self.passwords else (),
            auth_requires_tls=True,
            auth_required=config.auth_required,
        )


class SmtpEdge:
    """The SMTP server in front of a queue.

    :param queue: where accepted messages go (:class:`smtpq.queue.Queue`, or any
        :class:`Enqueuer`); ``250`` is answered only after its ``enqueue`` stored them all.
    :param config: listening, limits, TLS, AUTH and relay rules.
    :param clock: gives ``envelope.timestamp`` (default :class:`~smtpq.clock.SystemClock`).

    Use as ``async with SmtpEdge(queue, config) as edge:`` (or :meth:`start` / :meth:`stop`).
    """

    def __init__(
        self, queue: Enqueuer, config: EdgeConfig | None = None, *, clock: Clock | None = None
    ) -> None:
        self.queue = queue
        self.clock: Clock = clock or SystemClock()
        self._settings = EdgeSettings(config or EdgeConfig())
        self._server: asyncio.Server | None = None
        # Implicit TLS: the listening socket's context, into which reconfigure() reloads.
        self._listen_tls: ssl.SSLContext | None = None
        self._sessions: set[EdgeSession] = set()
        # Messages being stored: stop() lets them finish.
        self._tasks: set[asyncio.Task[object]] = set()

    @property
    def config(self) -> EdgeConfig:
        """The configuration new connections get."""
        return self._settings.config

    @property
    def hostname(self) -> str:
        """Our name in the greeting and in ``envelope.receiver``."""
        return self._settings.hostname

    def reconfigure(self, config: EdgeConfig) -> None:
        """Apply ``config`` to the connections accepted from now on: limits, relay rules, TLS
        certificate and credentials file (both read again). The address listened on, and
        whether TLS is implicit, stay as they are until a restart.

        :raises ValueError: for an inconsistent configuration (nothing is changed then), or
            :class:`OSError` / :class:`ssl.SSLError` for a certificate that cannot be loaded.
        """
        settings = EdgeSettings(config)
        if self._listen_tls is not None and config.tls_cert:
            self._listen_tls.load_cert_chain(config.tls_cert, config.tls_key)
        self._settings = settings

    def _session(self) -> EdgeSession:
        return EdgeSession(self, self._settings)

    async def start(self) -> None:
        """Listen; :attr:`port` tells the bound port."""
        if self._server is not None:
            return
        settings = self._settings
        config = settings.config
        self._listen_tls = settings.tls if settings.implicit_tls else None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._session,
            config.host,
            config.port,
            ssl=self._listen_tls,
            reuse_port=config.reuse_port or None,
        )
        log.info("SMTP edge listening on %s", self.addresses)

    async def stop(self, grace_period: float = 30.0) -> None:
        """Stop listening, let messages being stored finish, then close every connection."""
        if self._server is None:
            return
        self._server.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_period)
        for session in list(self._sessions):
            with contextlib.suppress(Exception):
                session.shut_down()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> SmtpEdge:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs listened on."""
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    @property
    def port(self) -> int:
        """The port listened on (useful with ``port=0``)."""
        addresses = self.addresses
        if not addresses:
            raise RuntimeError("the edge is not listening")
        return int(addresses[0][1])

    async def enqueue(self, envelope: Envelope) -> list[str] | None:
        """Hand ``envelope`` to the queue; its ids, or None when any part was not stored."""
        results = await self.queue.enqueue(envelope)
        ids: list[str] = []
        for env, result in results:
            if not isinstance(result, str):
                log.error("message from <%s> not stored: %s", env.sender, result)
                return None
            ids.append(result)
        return ids or None
