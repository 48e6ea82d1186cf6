"""Real SMTP servers on loopback for the relay tests: an aiosmtpd sink that records what it
receives and answers as told (per recipient), raw servers that misbehave (bad greetings,
silence), and Postfix's own ``smtp-sink`` (which, unlike aiosmtpd, advertises DSN).

aiosmtpd reads commands one at a time from a stream, so it handles pipelined input, but it does
not advertise PIPELINING, nor offer CHUNKING: the sink can add both (``pipelining=True``,
``chunking=True``: a small BDAT of RFC 3030 on top of aiosmtpd's DATA handling)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope


@dataclass
class Received:
    """One transaction the sink accepted."""

    sender: str
    recipients: list[str]
    data: bytes
    mail_options: list[str]
    rcpt_options: list[str]
    tls: bool
    login: str | None
    #: The content came by BDAT rather than DATA.
    chunked: bool = False
    #: When MAIL was handled, the commands after it had already arrived (one pipelined write).
    pipelined: bool = False


@dataclass
class SinkBehaviour:
    """How the sink answers: per-recipient RCPT replies, the MAIL and DATA replies."""

    rcpt: dict[str, str] = field(default_factory=dict)
    mail: str | None = None
    data: str = "250 2.0.0 Ok: queued as SINK1"
    #: While set, DATA is never answered (for timeouts).
    hang_data: asyncio.Event | None = None
    #: This many MAIL commands are answered by closing the connection (a host gone meanwhile).
    close_at_mail: int = 0
    #: Seconds before each RCPT is answered (a slow host).
    rcpt_delay: float = 0.0


class _SinkHandler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.pipelined = False

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        extra = [
            f"250-{keyword}"
            for keyword, wanted in (
                ("PIPELINING", self.sink.pipelining),
                ("CHUNKING", self.sink.chunking),
            )
            if wanted
        ]
        return [*responses[:-1], *extra, responses[-1]]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        if self.sink.behaviour.close_at_mail > 0:
            self.sink.behaviour.close_at_mail -= 1
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()
            return "421 4.3.2 Gone"  # never reaches the client
        if self.sink.behaviour.mail:
            return self.sink.behaviour.mail
        # What the stream holds beyond this command: the RCPTs, if they came in the same write.
        self.pipelined = bool(getattr(server._reader, "_buffer", b""))
        self.sink.transaction_started()
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        if self.sink.behaviour.rcpt_delay:
            await asyncio.sleep(self.sink.behaviour.rcpt_delay)
        reply = self.sink.behaviour.rcpt.get(address.split("@")[0])
        self.sink.rcpt_log.append((address, reply or "250 2.1.5 Ok"))
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        self.sink.resets += 1
        if envelope.mail_from is not None:
            self.sink.transaction_ended()
        return "250 2.0.0 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        behaviour = self.sink.behaviour
        if behaviour.hang_data is not None:
            await asyncio.Event().wait()  # never answers; the client's timeout fires
        login = session.auth_data.login.decode() if session.auth_data else None
        self.sink.received.append(
            Received(
                sender=envelope.mail_from or "",
                recipients=list(envelope.rcpt_tos),
                data=envelope.original_content or b"",
                mail_options=list(envelope.mail_options),
                rcpt_options=list(envelope.rcpt_options),
                tls=server.transport is not None
                and server.transport.get_extra_info("ssl_object") is not None,
                login=login,
                chunked=isinstance(server, _SinkSmtp) and server.chunked,
                pipelined=self.pipelined,
            )
        )
        self.sink.arrived_at.append(asyncio.get_running_loop().time())
        self.sink.transaction_ended()
        self.sink.arrived.set()
        return behaviour.data


class _SinkSmtp(SMTP):
    """aiosmtpd's server with BDAT (RFC 3030) and, optionally, a STARTTLS that is refused (a
    host with a broken TLS set-up)."""

    def __init__(self, *args: Any, sink: Sink, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sink = sink
        self.chunked = False
        self._chunks: list[bytes] = []

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.sink.refuse_starttls:
            await self.push("454 4.7.0 TLS not available due to temporary reason")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_BDAT(self, arg: str) -> None:
        if not self.sink.chunking:
            await self.push('500 Error: command "BDAT" not recognized')
            return
        size, _, last = arg.partition(" ")
        if not size.isdigit() or last.upper() not in ("", "LAST"):
            await self.push("501 5.5.4 Syntax: BDAT size [LAST]")
            return
        chunk = await self._reader.readexactly(int(size))  # read even when refused
        if self.envelope is None or not self.envelope.rcpt_tos:
            self._chunks = []
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        self._chunks.append(chunk)
        if not last:
            await self.push(f"250 2.0.0 {len(chunk)} octets received")
            return
        content, self._chunks = b"".join(self._chunks), []
        self.envelope.content = self.envelope.original_content = content
        self.chunked = True
        status = await self._call_handler_hook("DATA")
        self.chunked = False
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)


class Sink:
    """An aiosmtpd server on ``host``, port 0 unless given; counts connections.

    :param tls: offer STARTTLS with this context (or, with ``implicit``, TLS from the start).
    :param users: require AUTH (over TLS) with these user -> password pairs.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: ssl.SSLContext | None = None,
        implicit: bool = False,
        users: dict[str, str] | None = None,
        smtputf8: bool = True,
        refuse_starttls: bool = False,
        pipelining: bool = False,
        chunking: bool = False,
    ) -> None:
        self.refuse_starttls = refuse_starttls
        self.pipelining, self.chunking = pipelining, chunking
        self.host, self.port = host, port
        self.tls, self.implicit, self.users, self.smtputf8 = tls, implicit, users, smtputf8
        self.behaviour = SinkBehaviour()
        self.received: list[Received] = []
        self.arrived = asyncio.Event()
        self.connections = 0
        self.resets = 0
        #: Every RCPT TO address with the reply it was given, in order.
        self.rcpt_log: list[tuple[str, str]] = []
        #: The loop time at which each transaction's content arrived.
        self.arrived_at: list[float] = []
        #: Mail transactions under way now, and the most there ever were at once.
        self.transactions = 0
        self.most_transactions = 0
        self.protocols: list[SMTP] = []
        self._server: asyncio.Server | None = None

    def _authenticate(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert self.users is not None
        ok = (
            isinstance(data, LoginPassword)
            and self.users.get(data.login.decode()) == data.password.decode()
        )
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    def _protocol(self) -> SMTP:
        self.connections += 1
        kwargs: dict[str, Any] = {}
        if self.users is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True)
        proto = _SinkSmtp(
            _SinkHandler(self),
            sink=self,
            hostname=f"sink.{self.host}",
            tls_context=None if self.implicit else self.tls,
            enable_SMTPUTF8=self.smtputf8,
            auth_require_tls=not self.implicit,
            loop=asyncio.get_running_loop(),
            **kwargs,
        )
        self.protocols.append(proto)
        return proto

    def transaction_started(self) -> None:
        self.transactions += 1
        self.most_transactions = max(self.most_transactions, self.transactions)

    def transaction_ended(self) -> None:
        self.transactions = max(0, self.transactions - 1)

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.host, self.port, ssl=self.tls if self.implicit else None
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def drop_connections(self) -> None:
        """Close every open connection abruptly (as a server restart would)."""
        for proto in self.protocols:
            if proto.transport is not None:
                proto.transport.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.drop_connections()
            await self._server.wait_closed()
            self._server = None


class RawServer:
    """A TCP server that sends a fixed greeting (or nothing) and then ignores the client."""

    def __init__(self, greeting: bytes | None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.greeting, self.host, self.port = greeting, host, port
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return len(self._writers)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.greeting is not None:
            writer.write(self.greeting)
            await writer.drain()
        await reader.read()  # until the client goes away

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()


#: Postfix's test server, where installed (Debian: /usr/sbin; else Postfix's daemon directory).
SMTP_SINK = shutil.which("smtp-sink") or "/usr/lib/postfix/sbin/smtp-sink"


@dataclass(frozen=True)
class Dump:
    """One transaction smtp-sink took."""

    mail_args: str
    rcpt_args: list[str]
    #: The message as smtp-sink wrote it: dot-stuffing undone, lines ending in LF.
    message: bytes


class PostfixSink:
    """Postfix's ``smtp-sink`` on ``host:port``: accepts everything, advertises PIPELINING,
    8BITMIME, AUTH (any password), ENHANCEDSTATUSCODES and DSN, and dumps each transaction
    (with its ``X-Mail-Args`` and ``X-Rcpt-Args``) to a file. ``flags`` turn extensions off
    (``-p``, ``-8``, ``-a``, ``-N``, ...) or make commands fail (``-f``, ``-Q``): ``man smtp-sink``.

    Started and stopped by its pid. As root it drops to ``nobody`` (its ``-u``): its dump
    directory is a fresh one in the system's temporary directory, which ``nobody`` can reach
    (a test's own tmp_path is private to root), removed by :meth:`stop`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *flags: str) -> None:
        self.host, self.port, self.flags = host, port, flags
        self.directory = Path(tempfile.mkdtemp(prefix="smtpq-smtp-sink-"))
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> PostfixSink:
        """Start and wait until it accepts connections."""
        command = [SMTP_SINK, "-d", f"{self.directory}/%M.", "-h", "sink.postfix.test"]
        if os.geteuid() == 0:
            self.directory.chmod(0o777)
            command += ["-u", "nobody"]
        # A short, one-off spawn: blocking is harmless here and keeps the pid ours to signal.
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            [*command, *self.flags, f"{self.host}:{self.port}", "16"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        async with asyncio.timeout(20):
            while True:
                try:
                    _, writer = await asyncio.open_connection(self.host, self.port)
                except OSError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"smtp-sink exited {self.proc.returncode}") from None
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                await writer.wait_closed()
                return self

    def transactions(self) -> list[str]:
        """The dumped transactions, as text (generated headers, then the message)."""
        return [p.read_text(errors="replace") for p in sorted(self.directory.iterdir())]

    def dumps(self) -> list[Dump]:
        """The transactions whose content was taken, parsed, in no particular order
        (smtp-sink opens a dump at MAIL: one with no content, or not ended yet, is left out)."""
        found = []
        for path in sorted(self.directory.iterdir()):
            head, received, rest = path.read_bytes().partition(b"\nReceived: ")
            if not received or not rest.endswith(b"\n\n"):
                continue
            fields = [line.split(b": ", 1) for line in head.split(b"\n")]
            message = rest.split(b"\n", 3)[3]  # after the three lines of its Received:
            found.append(
                Dump(
                    mail_args=next(v.decode() for k, v in fields if k == b"X-Mail-Args"),
                    rcpt_args=[v.decode() for k, v in fields if k == b"X-Rcpt-Args"],
                    message=message[:-1],  # smtp-sink ends a dump with an empty line
                )
            )
        return found

    async def stop(self) -> None:
        """SIGTERM by pid, wait, and remove the dump directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.proc.wait, 10)
        shutil.rmtree(self.directory, ignore_errors=True)
