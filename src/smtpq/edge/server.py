"""SmtpEdge: the SMTP server in front of a queue, on aiosmtpd.

A message is answered ``250 2.6.0`` only after ``queue.enqueue`` has returned with every
resulting envelope stored; any failure is ``451 4.3.0`` — never a 5xx, never exception text.

aiosmtpd finds its hooks by name and silently ignores a misspelt one (then accepting any
recipient), so the hooks here are few, and each is covered by an end-to-end test; a unit test
checks their names against the ones aiosmtpd calls. Protocol extensions (DSN parameters, SIZE
with an enhanced code, AUTH against hashed passwords, the exception reply) are overrides of
aiosmtpd's own methods in :class:`_EdgeProtocol`, not hooks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import logging
import re
import socket
import ssl
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, AnyStr, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from smtpq.clock import Clock, SystemClock
from smtpq.dsn import DsnParamError, parse_mail_params, parse_rcpt_params
from smtpq.edge.access import RelayPolicy
from smtpq.edge.auth import PasswordFile
from smtpq.envelope import Envelope
from smtpq.errors import QueueError

__all__ = ["EdgeConfig", "Enqueuer", "SmtpEdge"]

log = logging.getLogger("smtpq.edge")

QUEUE_ERROR = "451 4.3.0 Queue error, message not accepted; try again later"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
RELAY_DENIED = "554 5.7.1 <{}>: Relay access denied"
# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
_MAX_REPLY = 510


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


class _DefaultLimits(dict[str, int]):
    """Command line limits: 512 octets unless a command has its own (RFC 5321 §4.5.3.1.4)."""

    def __missing__(self, key: str) -> int:
        return SMTP.command_size_limit


class _EdgeSession(Session):
    """aiosmtpd's session, without the warning its deprecated ``login_data`` logs on use."""

    _quiet_login: Any = None

    @property
    def login_data(self) -> Any:
        """The authenticated login (aiosmtpd sets it after AUTH)."""
        return self._quiet_login

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._quiet_login = value


class _EdgeEnvelope(SmtpEnvelope):
    """aiosmtpd's envelope with the RFC 3461 parameters the client gave."""

    def __init__(self) -> None:
        super().__init__()
        self.dsn_ret: str | None = None
        self.dsn_envid: str | None = None
        self.rcpt_params: dict[str, dict[str, str]] = {}


def _hook_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The attribute names of ``cls`` that aiosmtpd looks up by prefix."""
    return sorted(
        {name for base in cls.__mro__ for name in vars(base) if name.startswith(prefixes)}
    )


# A plain ``<local@domain>`` path: what nearly every client sends. Anything else (quoted local
# parts, source routes, address literals, odd dots, the null path) goes to aiosmtpd's parser.
_PLAIN_PATH = re.compile(
    r'\s*<([^\s<>()\[\]\\,;:@".]+(?:\.[^\s<>()\[\]\\,;:@".]+)*)@([^\s<>()\[\]\\,;:@"]+)>'
)


class _EdgeProtocol(SMTP):
    """aiosmtpd's SMTP with the extensions the edge needs (overrides, not hooks).

    aiosmtpd builds its command and AUTH tables per connection with ``inspect.getmembers`` and
    ``dir`` over the protocol and the handler: :meth:`__dir__` gives it only the names it looks
    for, computed once per class, which takes a tenth of the CPU of a connection off.
    """

    _dir_names: list[str] | None = None

    def __dir__(self) -> list[str]:
        cls = type(self)
        if cls._dir_names is None:
            cls._dir_names = _hook_names(cls, ("smtp_", "auth_"))
        return cls._dir_names

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Parse a MAIL/RCPT path; plain ``<a@b>`` paths without the email header parser."""
        match = _PLAIN_PATH.match(arg)
        if match is None:
            return super()._getaddr(arg)
        local, domain = match.groups()
        if self.local_part_limit and len(local) > self.local_part_limit:
            return None, None
        return f"{local}@{domain}", arg[match.end() :].lstrip()

    def __init__(self, edge: SmtpEdge, handler: _EdgeHandler) -> None:
        config = edge.config
        implicit = config.implicit_tls and edge.tls is not None
        super().__init__(
            handler,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=config.smtputf8,
            decode_data=False,
            hostname=edge.hostname,
            ident="ESMTP smtpq",
            # With implicit TLS the whole connection is TLS already: no STARTTLS to offer.
            tls_context=None if implicit else edge.tls,
            require_starttls=config.require_tls,
            timeout=config.timeout,
            auth_required=config.auth_required,
            auth_require_tls=not implicit,
            loop=asyncio.get_running_loop(),
        )
        self.edge = edge
        self._reverse: asyncio.Task[str | None] | None = None
        # aiosmtpd keeps these limits in a class attribute shared by every connection, and the
        # parameters it does not know about need room of their own.
        self.command_size_limits = self._command_limits()

    @staticmethod
    def _command_limits() -> dict[str, int]:
        limits: dict[str, int] = dict.fromkeys(("MAIL", "RCPT"), SMTP.command_size_limit)
        limits["MAIL"] += 100 + 500  # RFC 3461 ENVID and RET, RFC 4954 §5 AUTH=
        limits["RCPT"] += 500
        return _DefaultLimits(limits)

    def _create_session(self) -> Session:
        return _EdgeSession(self.loop)

    def _create_envelope(self) -> SmtpEnvelope:
        return _EdgeEnvelope()

    # -- connection state ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register with the edge (first connection only; STARTTLS calls this again)."""
        self.edge._connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        """Forget the connection; stop a pending reverse lookup."""
        self.edge._connections.discard(self)
        if self._reverse is not None:
            self._reverse.cancel()
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        # Replaces aiosmtpd's, which closes silently: tell the client why (RFC 5321 §4.5.3.2),
        # as other MTAs do.
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(b"421 4.4.2 " + self.hostname.encode() + b" Timeout exceeded\r\n")
            self.transport.close()

    @property
    def is_tls(self) -> bool:
        """Whether this connection is encrypted (STARTTLS done, or implicit TLS)."""
        transport = self.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    @property
    def peer_ip(self) -> str | None:
        """The client's address."""
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else None

    async def client_host(self) -> str | None:
        """The client's verified host name, looked up once per connection."""
        ip = self.peer_ip
        if ip is None or not self.edge.config.reverse_lookup:
            return None
        if self._reverse is None:
            self._reverse = asyncio.ensure_future(reverse_name(ip, self.edge.config.lookup_timeout))
        return await asyncio.shield(self._reverse)

    # -- replies -------------------------------------------------------------------------------

    async def handle_exception(self, error: Exception) -> str:
        """Any unexpected error is a transient ``451 4.3.0``, logged here, never shown."""
        peer = self.session.peer if self.session is not None else None
        log.error("SMTP session with %r failed", peer, exc_info=error)
        return QUEUE_ERROR

    async def push(self, status: AnyStr) -> None:
        """Send a reply; aiosmtpd's own over-size reply gains its RFC 3463 code."""
        if isinstance(status, str) and status.startswith("552 Error: Too much mail data"):
            await super().push(TOO_BIG)
        else:
            await super().push(status)

    # -- DATA --------------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the content in bulk rather than one line at a time.

        The answers are aiosmtpd's: 503 without recipients, 501 with an argument, 552 5.3.4 over
        the size limit and 500 for a line over 1,000 octets (both after the whole content,
        RFC 5321 §4.2.5), then the DATA hook's reply.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content, refusal = await self._read_content()
        except asyncio.CancelledError:
            log.info("connection lost during DATA")
            self._writer.close()
            raise
        if refusal is not None:
            await self.push(refusal)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    async def _read_content(self) -> tuple[bytes, str | None]:
        """The message up to the lone dot, unstuffed; or a refusal once it has all arrived.

        The reader stops at each ``.<CRLF>`` (or at its buffer limit): a line of only a dot
        ends the content, any other dot at a line's end is message text.
        """
        reader, limit = self._reader, self.data_size_limit
        chunks: list[bytes] = []
        size = 0
        tail = b"\r\n"  # the content starts at a line's start
        too_much = False
        while True:
            try:
                chunk = await reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:  # no dot yet in a full buffer
                chunk = await reader.readexactly(exc.consumed)
            size += len(chunk)
            if not too_much:
                chunks.append(chunk)
            end = (tail + chunk[-5:])[-5:]  # the last bytes so far, across chunks
            if end == b"\r\n.\r\n":
                break
            tail = end[-4:]
            if limit and size > limit + 3:  # over the limit, whatever the end adds
                too_much = True
                chunks.clear()  # drain the rest, keep nothing
        if too_much or (limit and size - 3 > limit):
            return b"", "552 Error: Too much mail data"
        data = b"".join(chunks)[:-3]  # without the final dot line
        # aiosmtpd's limit: 1,001 octets with the CRLF, stuffed dot included.
        if max(map(len, data.split(b"\r\n"))) > self.line_length_limit - 2:
            return b"", "500 Line too long (see RFC5321 4.5.3.1.6)"
        # Transparency (RFC 5321 §4.5.2): a dot that starts a line was doubled by the client.
        if data.startswith(b".."):
            data = data[1:]
        return data.replace(b"\r\n..", b"\r\n."), None

    # -- MAIL and RCPT parameters (RFC 3461 DSN, RFC 1870 SIZE, RFC 4954 AUTH=) ---------------

    def _split_command(self, keyword: str, arg: str | None) -> tuple[str, list[str]] | None:
        """``('FROM:<a@b>', params)`` for an ESMTP command that parses, else None."""
        if arg is None or self.session is None or not self.session.extended_smtp:
            return None
        stripped = self._strip_command_keyword(keyword, arg)
        if stripped is None:
            return None
        address, rest = self._getaddr(stripped)
        if not address or rest is None:
            return None
        return keyword + stripped[: len(stripped) - len(rest)], rest.split()

    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL FROM with RET/ENVID stored, SIZE checked (552 5.3.4), AUTH= accepted."""
        parts = self._split_command("FROM:", arg)
        if parts is None:
            await super().smtp_MAIL(arg)
            return
        head, params = parts
        try:
            dsn, rest = parse_mail_params(params)
        except DsnParamError as exc:
            await self.push(exc.reply)
            return
        kept: list[str] = []
        limit = self.data_size_limit
        for param in rest:
            key, _, value = param.partition("=")
            key = key.upper()
            if key == "SIZE" and limit and value.isdigit() and int(value) > limit:
                await self.push(TOO_BIG)
                return
            # RFC 4954 §5: AUTH= is accepted; smtpq trusts only its own authentication.
            if key != "AUTH":
                kept.append(param)
        envelope = self.envelope
        assert isinstance(envelope, _EdgeEnvelope)
        fresh = not envelope.mail_from
        await super().smtp_MAIL(" ".join([head, *kept]))
        if fresh and envelope.mail_from:
            envelope.dsn_ret = dsn.get("RET")
            envelope.dsn_envid = dsn.get("ENVID")

    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT TO with NOTIFY/ORCPT validated (501 5.5.4) and stored per recipient."""
        parts = self._split_command("TO:", arg)
        if parts is None:
            await super().smtp_RCPT(arg)
            return
        head, params = parts
        try:
            dsn, rest = parse_rcpt_params(params)
        except DsnParamError as exc:
            await self.push(exc.reply)
            return
        envelope = self.envelope
        assert isinstance(envelope, _EdgeEnvelope)
        count = len(envelope.rcpt_tos)
        await super().smtp_RCPT(" ".join([head, *rest]))
        if len(envelope.rcpt_tos) > count and dsn:
            envelope.rcpt_params[envelope.rcpt_tos[-1]] = dsn

    # -- AUTH PLAIN / LOGIN against the password file, hashed off the event loop --------------

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        """RFC 4616 PLAIN: ``authzid NUL login NUL password``, initial response optional."""
        blob = await self._auth_response(args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        fields = blob.split(b"\x00")
        if len(fields) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._login(fields[1], fields[2])

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        """The LOGIN mechanism: user name and password in two challenges."""
        login = await self._auth_response(args, self.AuthLoginUsernameChallenge)
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await self._auth_response(args[:1], self.AuthLoginPasswordChallenge)
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._login(login, password)

    async def _auth_response(self, args: list[str], challenge: str) -> bytes | None:
        """The initial response in ``args``, or the answer to ``challenge``; None if refused
        (the client has been answered already)."""
        if len(args) == 1:
            blob = await self.challenge_auth(challenge)
            return blob if isinstance(blob, bytes) else None
        try:
            return base64.b64decode(args[1].encode(), validate=True)
        except (binascii.Error, UnicodeError):
            await self.push("501 5.5.2 Can't decode base64")
            return None

    async def _login(self, login: bytes, password: bytes) -> AuthResult:
        passwords = self.edge.passwords
        try:
            user = login.decode("utf-8")
            ok = passwords is not None and await passwords.check(user, password)
        except UnicodeError:
            ok = False
        except OSError:
            log.exception("credentials file unreadable")
            return AuthResult(
                success=False, handled=False, message="454 4.7.0 Temporary authentication failure"
            )
        if not ok:
            log.info("AUTH failed for %r from %s", login[:64], self.peer_ip)
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=user)


class _EdgeHandler:
    """The aiosmtpd hooks: EHLO keywords, the relay rule, the recipient limit, DATA -> queue."""

    _dir_names: list[str] | None = None

    def __dir__(self) -> list[str]:
        """Only the hook names aiosmtpd looks for (see :class:`_EdgeProtocol`)."""
        cls = type(self)
        if cls._dir_names is None:
            cls._dir_names = _hook_names(cls, ("handle_", "auth_"))
        return cls._dir_names

    def __init__(self, edge: SmtpEdge) -> None:
        self.edge = edge

    # Static, with its signature computed once (below): aiosmtpd inspects the EHLO hook's
    # signature on every connection, and a plain function that carries one is the cheap case.
    @staticmethod
    async def handle_EHLO(
        server: _EdgeProtocol,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Advertise DSN; offer AUTH only when there are credentials to check."""
        # With an EHLO hook, aiosmtpd leaves recording the name to the hook.
        session.host_name = hostname
        keep = [r for r in responses if server.edge.passwords or not r.startswith("250-AUTH")]
        return [*keep[:-1], "250-DSN", keep[-1]]

    async def handle_MAIL(
        self,
        server: _EdgeProtocol,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Accept the sender when it is well formed for this session (RFC 6531)."""
        refusal = _address_refusal(address, "SMTPUTF8" in mail_options)
        if refusal:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: _EdgeProtocol,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Refuse relaying that is not allowed (554 5.7.1) and recipients over the limit."""
        refusal = _address_refusal(address, envelope.smtp_utf8)
        if refusal:
            return refusal
        if "@" not in address:
            return "550 5.1.3 Recipient address must include a domain"
        if not self.edge.relay.allows(address, server.peer_ip, bool(session.authenticated)):
            log.info("relay denied from %s to <%s>", server.peer_ip, address)
            return RELAY_DENIED.format(address)
        if address in envelope.rcpt_tos:
            return "250 2.1.5 OK"  # the same recipient twice gets one copy
        if len(envelope.rcpt_tos) >= self.edge.config.max_recipients:
            return TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(
        self, server: _EdgeProtocol, session: Session, envelope: SmtpEnvelope
    ) -> str:
        """Enqueue the message; 250 with the queue ids once stored, else 451 4.3.0."""
        try:
            env = await self._envelope(server, session, envelope)
            ids = await self.edge.enqueue(env)
        except Exception:
            log.exception("enqueue failed for message from %r", envelope.mail_from)
            return QUEUE_ERROR
        if ids is None:
            return QUEUE_ERROR
        return _accepted(ids)

    async def _envelope(
        self, server: _EdgeProtocol, session: Session, envelope: SmtpEnvelope
    ) -> Envelope:
        sender = envelope.mail_from or ""
        env = Envelope("" if sender == "<>" else sender, list(envelope.rcpt_tos))
        env.parse(envelope.original_content or b"")
        tls, authenticated = server.is_tls, bool(session.authenticated)
        if session.extended_smtp:
            protocol = "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")
        else:
            protocol = "SMTP"
        env.client = {
            "ip": server.peer_ip,
            "host": await server.client_host(),
            "name": session.host_name,
            "protocol": protocol,
            "auth": str(session.auth_data) if authenticated else None,
        }
        env.receiver = self.edge.hostname
        env.timestamp = self.edge.clock.time()
        for option in envelope.mail_options:
            if option.startswith("BODY="):
                env.body_type = option[5:]
        env.smtputf8 = bool(envelope.smtp_utf8)
        if isinstance(envelope, _EdgeEnvelope):
            env.dsn_ret = envelope.dsn_ret
            env.dsn_envid = envelope.dsn_envid
            env.rcpt_params = {k: dict(v) for k, v in envelope.rcpt_params.items()}
        return env


def _address_refusal(address: str, smtputf8: bool) -> str | None:
    """Why an address cannot be taken, or None."""
    try:
        address.encode("utf-8")
    except UnicodeError:  # undecodable bytes, kept by aiosmtpd as surrogates
        return "553 5.6.7 Address is not valid UTF-8"
    if not smtputf8 and not address.isascii():
        return "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    return None


def _accepted(ids: list[str]) -> str:
    """``250 2.6.0`` naming the queue ids, kept within one reply line."""
    text = "250 2.6.0 Message accepted for delivery; queued as " + " ".join(ids)
    if len(text) <= _MAX_REPLY:
        return text
    head = f"250 2.6.0 Message accepted for delivery; queued as {ids[0]}"
    return f"{head} and {len(ids) - 1} more"


# aiosmtpd asks for the EHLO hook's signature on every connection (to tell its two forms apart):
# computed once here, inspect.signature finds it on the function instead of parsing it again.
_EdgeHandler.handle_EHLO.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    _EdgeHandler.handle_EHLO
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
        self._apply(config or EdgeConfig())
        self._server: asyncio.Server | None = None
        self._connections: set[_EdgeProtocol] = set()
        self._enqueues: set[asyncio.Task[list[tuple[Envelope, str | QueueError]]]] = set()

    def _apply(self, config: EdgeConfig, listener: ssl.SSLContext | None = None) -> None:
        """Check ``config`` and make it the edge's (TLS context and credentials loaded); an
        error (ValueError, OSError for a TLS file) leaves the edge as it was."""
        tls = config.tls_context()
        if (config.implicit_tls or config.require_tls) and tls is None:
            raise ValueError("implicit_tls and require_tls need tls_cert")
        if config.auth_required and not config.credentials_file:
            raise ValueError("auth_required needs credentials_file")
        if config.credentials_file and tls is None:
            log.warning("credentials_file without tls_cert: AUTH is offered over TLS only, never")
        if listener is not None and config.tls_cert:
            # The listening socket keeps the context it was made with: load the files into it.
            listener.load_cert_chain(config.tls_cert, config.tls_key)
            tls = listener
        self.config = config
        self.hostname = config.hostname or socket.getfqdn()
        self.tls = tls
        self.passwords = PasswordFile(config.credentials_file) if config.credentials_file else None
        self.relay = RelayPolicy(config.relay_domains, config.trusted_networks)

    def reconfigure(self, config: EdgeConfig) -> None:
        """Apply ``config`` to connections accepted from now on: limits, TLS context reloaded
        from the files, credentials file re-read; host/port are not changed.

        Nor is what the listening socket was made with (``implicit_tls``, ``reuse_port``).
        A config that cannot be applied (ValueError, or OSError for a TLS file) changes nothing.
        """
        implicit = self._server is not None and self.config.implicit_tls
        self._apply(
            replace(
                config,
                host=self.config.host,
                port=self.config.port,
                implicit_tls=self.config.implicit_tls,
                reuse_port=self.config.reuse_port,
            ),
            self.tls if implicit else None,
        )

    def _protocol(self) -> _EdgeProtocol:
        return _EdgeProtocol(self, _EdgeHandler(self))

    async def start(self) -> None:
        """Listen; :attr:`port` tells the bound port."""
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            self.config.host,
            self.config.port,
            ssl=self.tls if self.config.implicit_tls else None,
            reuse_port=self.config.reuse_port or None,
        )
        log.info("SMTP edge listening on %s", self.addresses)

    async def stop(self, grace_period: float = 30.0) -> None:
        """Stop listening, let messages being stored finish, then close every connection."""
        if self._server is None:
            return
        self._server.close()
        if self._enqueues:
            await asyncio.wait(list(self._enqueues), timeout=grace_period)
        for conn in list(self._connections):
            if conn.transport is not None and not conn.transport.is_closing():
                with contextlib.suppress(Exception):
                    conn._writer.write(b"421 4.3.2 Service shutting down\r\n")
                conn.transport.close()
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

    def _enqueue_done(self, task: asyncio.Task[list[tuple[Envelope, str | QueueError]]]) -> None:
        self._enqueues.discard(task)
        # The client may have gone (nobody awaits the result then): still, nothing goes unlogged.
        if not task.cancelled() and task.exception() is not None:
            log.error("enqueue failed", exc_info=task.exception())

    async def enqueue(self, envelope: Envelope) -> list[str] | None:
        """Hand ``envelope`` to the queue; its ids, or None when any part was not stored.

        The enqueue runs shielded: a client that disconnects cannot interrupt a write half way.
        """
        task = asyncio.ensure_future(self.queue.enqueue(envelope))
        self._enqueues.add(task)
        task.add_done_callback(self._enqueue_done)
        results = await asyncio.shield(task)
        ids: list[str] = []
        for env, result in results:
            if not isinstance(result, str):
                log.error("message from <%s> not stored: %s", env.sender, result)
                return None
            ids.append(result)
        return ids or None
