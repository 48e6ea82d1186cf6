"""SmtpEdge: the SMTP server in front of a queue, on smtpq's own protocol core.

A message is answered ``250 2.6.0`` only after ``queue.enqueue`` has returned with every
resulting envelope stored; any failure is ``451 4.3.0`` — never a 5xx, never exception text.

The protocol is :class:`smtpq.smtp.ServerConnection`'s; each session
(:class:`~smtpq.edge.session.EdgeSession`) is a thin driver that answers its events with the
edge's rules: the relay policy, the recipient map and limit, AUTH against the credentials file,
and the queue.

The edge faces the Internet with Postfix's defences, with Postfix's defaults: limits on
connections (in all, per client address, per client per minute: :mod:`smtpq.edge.limits`), on
errors, failed AUTH and commands per session (:class:`~smtpq.smtp.ServerConfig`), on time (a
per-read timeout, a minimum DATA rate, a session length), descriptors running out
(:mod:`smtpq.edge.listener`), pre-greeting talkers, and routing tricks. Each refusal is counted
in :attr:`SmtpEdge.refusals` (the daemon's ``smtpq_edge_refusals_total``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import resource
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, cast

from smtpq.clock import Clock, SystemClock
from smtpq.edge._malloc import map_large_blocks_apart
from smtpq.edge.access import RelayDecision, RelayPolicy
from smtpq.edge.auth import PasswordFile
from smtpq.edge.limits import ClientTable, ConnectionLimits, ConnectionRefusal
from smtpq.edge.listener import Listener, bind
from smtpq.edge.recipients import RecipientMap, RecipientRules
from smtpq.edge.session import SESSION_REFUSALS, EdgeSession
from smtpq.envelope import Envelope
from smtpq.errors import QueueError
from smtpq.reply import connection_limit_reply, greeting_reply
from smtpq.smtp import ServerConfig, SessionLimit
from smtpq.smtp._server_auth import MECHANISMS

__all__ = ["REFUSALS", "EdgeConfig", "EdgeSettings", "Enqueuer", "SmtpEdge"]

log = logging.getLogger("smtpq.edge")


#: Seconds a client turned away over implicit TLS has for its handshake (its 421 follows it).
REFUSAL_HANDSHAKE_TIMEOUT = 10.0


class _TurnAway(asyncio.Protocol):
    """A connection over a limit: its one reply (sent once TLS is up), then closed."""

    def __init__(self, line: bytes) -> None:
        self.line = line
        self.attached = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attached = True
        stream = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        stream.write(self.line)
        stream.close()


class Enqueuer(Protocol):
    """What the edge fronts: :class:`smtpq.queue.Queue`, or anything with its ``enqueue``."""

    async def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str | QueueError]]:
        """Store ``envelope`` (maybe split); each result is a queue id or the error."""
        ...


#: Every reason :attr:`SmtpEdge.refusals` counts (the metric's label values).
REFUSALS: Final = (
    *(r.value for r in ConnectionRefusal),
    *(limit.value for limit in SessionLimit),
    *(d.value for d in RelayDecision if d is not RelayDecision.ALLOWED),
    *SESSION_REFUSALS,
)


@dataclass(frozen=True)
class EdgeConfig:
    """How the edge listens, whom it accepts mail from, and its limits (0 turns one off).

    :ivar host: address to listen on.
    :ivar port: port to listen on (0: any free port, see :attr:`SmtpEdge.port`).
    :ivar hostname: our name in the greeting and in ``envelope.receiver`` (default: the FQDN).
    :ivar max_message_size: bytes; advertised as EHLO SIZE, larger messages get ``552 5.3.4``
        (read to their end, and not kept past the limit).
    :ivar max_recipients: recipients per message; more get ``452 4.5.3``.
    :ivar relay_domains: domains accepted from anyone (``.example.org`` also covers subdomains).
    :ivar trusted_networks: CIDR networks whose clients may relay anywhere; they are exempt
        from the per-client connection limits (as Postfix's ``$mynetworks`` by default).
    :ivar allow_untrusted_routing: accept ``user%host@``, ``host!user@`` and
        ``"user@host"@`` recipients in the relay domains from untrusted, unauthenticated
        clients (Postfix's ``allow_untrusted_routing``; default: refused, ``554 5.7.1``).
    :ivar recipient_map: a file of the addresses (and ``@domain`` entries) that exist in the
        relay domains (:mod:`smtpq.edge.recipients`); others get ``550 5.1.1`` at RCPT. Read
        again by :meth:`SmtpEdge.reconfigure` (SIGHUP). Default: every address is accepted.
    :ivar postmaster: where mail to ``<postmaster>`` (no domain, which RFC 5321 §4.5.1 makes
        every server accept, from anyone) is delivered; default ``postmaster@`` our hostname.
        smtpq delivers nothing locally: the default suits a host whose own name's mail is
        routed elsewhere (its MX, a ``[routes]`` entry); otherwise name a mailbox elsewhere.
    :ivar max_connections: connections at once, in all; more get ``421 4.7.0`` at once.
    :ivar max_client_connections: connections at once from one address (Postfix's
        ``smtpd_client_connection_count_limit``); more get ``421 4.7.0``.
    :ivar max_client_connection_rate: connections one address may open per minute
        (``smtpd_client_connection_rate_limit``); more get ``421 4.7.0``. Default off.
    :ivar soft_error_limit: past this many errors in a session (refused commands and
        recipients, syntax errors, failed AUTH), each further error is answered after
        ``error_delay`` seconds (``smtpd_soft_error_limit``, ``smtpd_error_sleep_time``).
    :ivar error_delay: see ``soft_error_limit``.
    :ivar hard_error_limit: at this many errors, ``421 4.7.0`` and close
        (``smtpd_hard_error_limit``).
    :ivar max_auth_failures: failed AUTH per session; then ``421 4.7.0``.
    :ivar junk_command_limit: NOOP, RSET, VRFY and HELP between messages before each counts as
        an error (``smtpd_junk_command_limit``).
    :ivar max_commands: command lines per session; then ``421 4.7.0``.
    :ivar timeout: seconds a client may stay silent, in any state, before ``421 4.4.2`` (RFC
        5321 §4.5.3.2: 5 minutes).
    :ivar min_data_rate: octets per second a message's content must arrive at, on average
        (``smtpd_min_data_rate``): each octet buys ``1 / min_data_rate`` seconds more, up to
        ``timeout``; below it, ``421 4.4.2``. So a large message on a slow link completes, and
        a client trickling a byte at a time is cut off.
    :ivar max_session_time: seconds a session may last; then ``421 4.7.0``.
    :ivar greet_delay: seconds to wait before the greeting; a client that talks meanwhile (a
        pre-greet talker, as Postfix's postscreen finds them) gets ``554 5.5.1`` and is
        disconnected. Default 0: greet at once.
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
    relay_domains: tuple[str, ...] = ()
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    allow_untrusted_routing: bool = False
    recipient_map: str | None = None
    postmaster: str | None = None
    max_connections: int = 1000
    max_client_connections: int = 50
    max_client_connection_rate: int = 0
    soft_error_limit: int = 10
    error_delay: float = 1.0
    hard_error_limit: int = 20
    max_auth_failures: int = 3
    junk_command_limit: int = 100
    max_commands: int = 10_000
    timeout: float = 300.0
    min_data_rate: int = 500
    max_session_time: float = 3600.0
    greet_delay: float = 0.0
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
        if self.recipient_map and not os.path.isfile(self.recipient_map):
            raise ValueError(f"recipient_map {self.recipient_map} not found")
        if self.postmaster is not None and "@" not in self.postmaster:
            raise ValueError("postmaster must be an address with a domain")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")

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
        "limits",
        "passwords",
        "recipients",
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
        self.relay = RelayPolicy(
            config.relay_domains,
            config.trusted_networks,
            allow_untrusted_routing=config.allow_untrusted_routing,
        )
        known = RecipientMap.load(config.recipient_map) if config.recipient_map else None
        postmaster = config.postmaster or f"postmaster@{self.hostname}"
        self.recipients = RecipientRules(self.relay, known, postmaster)
        self.limits = ConnectionLimits(
            config.max_connections, config.max_client_connections, config.max_client_connection_rate
        )
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
            soft_error_limit=config.soft_error_limit,
            hard_error_limit=config.hard_error_limit,
            max_auth_failures=config.max_auth_failures,
            junk_command_limit=config.junk_command_limit,
            max_commands=config.max_commands,
        )


class SmtpEdge:
    """The SMTP server in front of a queue.

    :param queue: where accepted messages go (:class:`smtpq.queue.Queue`, or any
        :class:`Enqueuer`); ``250`` is answered only after its ``enqueue`` stored them all.
    :param config: listening, limits, TLS, AUTH and relay rules.
    :param clock: gives ``envelope.timestamp`` (default :class:`~smtpq.clock.SystemClock`).

    Use as ``async with SmtpEdge(queue, config) as edge:`` (or :meth:`start` / :meth:`stop`).

    :ivar refusals: refusals so far by reason (every one of :data:`REFUSALS`, from 0).
    """

    def __init__(
        self, queue: Enqueuer, config: EdgeConfig | None = None, *, clock: Clock | None = None
    ) -> None:
        self.queue = queue
        self.clock: Clock = clock or SystemClock()
        self._settings = EdgeSettings(config or EdgeConfig())
        self._listener: Listener | None = None
        # Implicit TLS: the listening socket's context, into which reconfigure() reloads.
        self._listen_tls: ssl.SSLContext | None = None
        self._clients = ClientTable()
        self._sessions: set[EdgeSession] = set()
        # Connections being set up (the TLS handshake, for implicit TLS).
        self._connecting: set[asyncio.Task[Any]] = set()
        # Messages being stored: stop() lets them finish.
        self._tasks: set[asyncio.Task[object]] = set()
        self.refusals: collections.Counter[str] = collections.Counter(dict.fromkeys(REFUSALS, 0))

    @property
    def config(self) -> EdgeConfig:
        """The configuration new connections get."""
        return self._settings.config

    @property
    def hostname(self) -> str:
        """Our name in the greeting and in ``envelope.receiver``."""
        return self._settings.hostname

    @property
    def connections(self) -> int:
        """Connections open now."""
        return self._clients.total

    @property
    def accept_pauses(self) -> int:
        """How many times accepting paused for want of file descriptors."""
        return self._listener.pauses if self._listener is not None else 0

    def reconfigure(self, config: EdgeConfig) -> None:
        """Apply ``config`` to the connections accepted from now on: limits, relay rules, TLS
        certificate, credentials file and recipient map (the files are read again). The
        address listened on, and whether TLS is implicit, stay as they are until a restart.

        :raises ValueError: for an inconsistent configuration (nothing is changed then), or
            :class:`OSError` / :class:`ssl.SSLError` for a file that cannot be loaded.
        """
        settings = EdgeSettings(config)
        if self._listen_tls is not None and config.tls_cert:
            self._listen_tls.load_cert_chain(config.tls_cert, config.tls_key)
        self._settings = settings

    async def start(self) -> None:
        """Listen; :attr:`port` tells the bound port.

        Messages are held in memory while they arrive: on glibc, the process's allocator is
        told to give every block of 1 MiB or more a mapping of its own (:mod:`smtpq.edge._malloc`),
        so that they leave nothing behind.
        """
        if self._listener is not None:
            return
        map_large_blocks_apart()
        settings = self._settings
        config = settings.config
        self._listen_tls = settings.tls if settings.implicit_tls else None
        sockets = bind(config.host, config.port, reuse_port=config.reuse_port)
        self._listener = Listener(sockets, self._accepted)
        self._listener.start()
        log.info("SMTP edge listening on %s", self.addresses)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # A session is a descriptor, and the queue needs some of its own.
        if config.max_connections and 0 <= soft < config.max_connections + 64:
            log.warning(
                "max_connections is %d but the process may open only %d files: raise the "
                "limit (ulimit -n, LimitNOFILE=) or lower max_connections",
                config.max_connections,
                soft,
            )

    async def stop(self, grace_period: float = 30.0) -> None:
        """Stop listening, let messages being stored finish, then close every connection."""
        if self._listener is None:
            return
        self._listener.close()
        for task in list(self._connecting):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_period)
        for session in list(self._sessions):
            with contextlib.suppress(Exception):
                session.shut_down()
        await asyncio.sleep(0)  # let the transports close
        self._listener = None

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
        if self._listener is None:
            return []
        return [s.getsockname()[:2] for s in self._listener.sockets]

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

    # -- connections ---------------------------------------------------------------------------

    def _accepted(self, sock: socket.socket, address: Any) -> None:
        """A connection accepted by the listener: admitted and handed to a session, or refused."""
        settings = self._settings
        ip = str(address[0]) if isinstance(address, tuple) and address else ""
        loop = asyncio.get_running_loop()
        now = loop.time()
        exempt = settings.relay.network_trusted(ip)
        refusal = self._clients.admit(ip, now, settings.limits, exempt=exempt)
        if refusal is not None:
            self._refuse(sock, ip, refusal, now)
            return
        session = EdgeSession(self, settings, ip)
        done = functools.partial(self._connected, session, sock)
        self._connect(sock, session.attach, settings.config.timeout, done)

    def _connect(
        self,
        sock: socket.socket,
        protocol: Callable[[], asyncio.BaseProtocol],
        handshake_timeout: float,
        done: Callable[[asyncio.Task[Any]], None],
    ) -> None:
        """Give ``sock`` a transport (after the handshake, with implicit TLS) and ``protocol``;
        ``done`` hears of the outcome. Cancelled by :meth:`stop` while under way."""
        loop = asyncio.get_running_loop()
        tls = self._listen_tls
        connect = loop.connect_accepted_socket(
            protocol, sock, ssl=tls, ssl_handshake_timeout=handshake_timeout if tls else None
        )
        task = loop.create_task(connect)
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        task.add_done_callback(done)

    def _connected(
        self, session: EdgeSession, sock: socket.socket, task: asyncio.Task[Any]
    ) -> None:
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            # The connection is over before its session began (a TLS handshake failed).
            session.release()
            if not session.attached:
                sock.close()  # else its transport closed it (closing it again might close
                # whatever descriptor took its number since)
            if error is not None:
                log.info("connection from %s failed: %s", session.ip, error)

    def _refuse(self, sock: socket.socket, ip: str, refusal: ConnectionRefusal, now: float) -> None:
        self.refusals[refusal.value] += 1
        settings = self._settings
        total = refusal is ConnectionRefusal.CONNECTIONS
        if self._clients.should_log("" if total else ip, now):
            limits = settings.limits
            limit = {
                ConnectionRefusal.CONNECTIONS: f"{limits.total} in all",
                ConnectionRefusal.CLIENT_CONNECTIONS: f"{limits.per_client} per client",
                ConnectionRefusal.CLIENT_RATE: f"{limits.rate} per client per minute",
            }[refusal]
            log.warning(
                "connections from %s refused: over the limit of %s (logged once a minute)",
                "everyone" if total else ip,
                limit,
            )
        line = f"{connection_limit_reply(settings.hostname, None if total else ip)}\r\n".encode()
        if self._listen_tls is None:
            # Told in the clear, at once, without a transport.
            with contextlib.suppress(OSError):
                sock.setblocking(False)  # a client that reads nothing cannot hold the loop
                sock.send(line)
            sock.close()
            return
        # With implicit TLS the reply needs the handshake first (as Postfix's wrapper mode
        # does it), bounded by a short timeout; then it is sent and the connection closed.
        turn_away = _TurnAway(line)
        timeout = min(settings.config.timeout, REFUSAL_HANDSHAKE_TIMEOUT)
        done = functools.partial(self._turned_away, turn_away, sock)
        self._connect(sock, lambda: turn_away, timeout, done)

    def _turned_away(
        self, turn_away: _TurnAway, sock: socket.socket, task: asyncio.Task[Any]
    ) -> None:
        failed = task.cancelled() or task.exception() is not None
        if failed and not turn_away.attached:
            sock.close()  # the handshake failed or timed out (else its transport closed it)

    def _closed(self, session: EdgeSession) -> None:
        """A session's connection is gone: its descriptor is free."""
        self._sessions.discard(session)
        if self._listener is not None:
            self._listener.resume()

    def _release(self, ip: str) -> None:
        self._clients.release(ip)

    def _refused(self, reason: str) -> None:
        self.refusals[reason] += 1
