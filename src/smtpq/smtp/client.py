"""The client side of SMTP, sans-IO: :class:`ClientConnection`, and the commands and events it
speaks in.

The driver connects, then feeds the server's bytes to :meth:`~ClientConnection.receive_data`
(``b""`` at end of file), asks for exchanges with :meth:`~ClientConnection.send`, writes what
:meth:`~ClientConnection.data_to_send` gives (after each call to ``send`` or ``next_event``:
some replies call for bytes, the content after DATA's 354, HELO after a refused EHLO, the next
step of AUTH LOGIN), and reads outcomes from :meth:`~ClientConnection.next_event`, one event
per exchange::

    conn = ClientConnection(remote_host="mx.example", remote_ip="192.0.2.1")
    conn.receive_data(b"220 mx.example ESMTP\\r\\n")
    conn.next_event()          # Greeting(reply=Reply('220', ...))
    conn.send(Hello("client.example"))
    conn.data_to_send()        # b"EHLO client.example\\r\\n"

Nothing here reads a socket or a clock: the driver owns the timeouts, and
:attr:`~ClientConnection.awaiting` names the command whose reply it waits for.

What the client sends follows what the server advertised (RFC 5321, 1870, 2920, 3030, 3461,
6152, 6531):

* SIZE is declared when offered; a message over the declared limit is refused here
  (``552 5.3.4``) rather than sent.
* BODY=8BITMIME is declared when the originator declared it, or the content has 8-bit bytes,
  and the server offers 8BITMIME. To a server without 8BITMIME the content goes unchanged and
  undeclared, as Postfix (``disable_mime_output_conversion``) and Exim send it: converting it
  to 7 bits would break DKIM signatures and the byte-for-byte promise, and 7-bit-only servers
  are, in practice, gone.
* SMTPUTF8 is declared when the transaction needs it (:func:`needs_smtputf8`); a server
  without it gets nothing: ``554 5.6.7`` per recipient (RFC 6531 §3.4 forbids a silent
  downgrade).
* BDAT (one ``BDAT n LAST`` chunk) replaces DATA wherever CHUNKING is offered (as Exim and
  Exchange do; ``chunking=False`` turns that off): no dot-stuffing, and pipelined with MAIL and
  RCPT it makes the transaction one write and one round trip. A BINARYMIME body needs it
  (RFC 3030 §3), and BINARYMIME offered; else ``554 5.6.3``.
* RET, ENVID (MAIL) and NOTIFY, ORCPT (RCPT) are passed on only where DSN is offered, as
  RFC 3461 §4 requires; then success replies carry ``remote_dsn=True`` (else ``False``), so
  that NOTIFY=SUCCESS can be answered with a "relayed" DSN.
"""

from __future__ import annotations

from collections.abc import Callable

from smtpq.reply import Reply, unexpected_error_reply
from smtpq.smtp._client_events import (
    Auth,
    AuthDone,
    ClientCommand,
    ClientEvent,
    Closed,
    Extensions,
    Greeting,
    Hello,
    HelloDone,
    Quit,
    QuitDone,
    Reset,
    ResetDone,
    StartTls,
    StartTlsDone,
    Transaction,
    TransactionDone,
)
from smtpq.smtp._client_state import AWAITING, ON_REPLY, SEND, ClientState
from smtpq.smtp._client_transaction import TransactionRun
from smtpq.smtp._client_writers import (
    auth_login_step,
    auth_plain,
    canonical,
    data_content,
    dot_stuffed,
    needs_smtputf8,
)
from smtpq.smtp._replies import MAX_REPLY_LINE, BadReply, ReplyReader, parse_extensions, reply_text
from smtpq.smtp.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_REPLY_LINE",
    "Auth",
    "AuthDone",
    "ClientCommand",
    "ClientConnection",
    "ClientEvent",
    "ClientState",
    "Closed",
    "Extensions",
    "Greeting",
    "Hello",
    "HelloDone",
    "Quit",
    "QuitDone",
    "Reset",
    "ResetDone",
    "StartTls",
    "StartTlsDone",
    "Transaction",
    "TransactionDone",
    "canonical",
    "data_content",
    "dot_stuffed",
    "needs_smtputf8",
]

_NO_EXTENSIONS = Extensions()
_DONE_EVENT: dict[ClientState, Callable[[Reply], ClientEvent]] = {
    ClientState.CONNECTED: Greeting,
    ClientState.STARTTLS: StartTlsDone,
    ClientState.AUTH: AuthDone,
    ClientState.RSET: ResetDone,
    ClientState.QUIT: QuitDone,
}


class ClientConnection:
    """One client session's protocol state: bytes in, events out.

    :param remote_host: the server's name, for the Replies made here (``Reply.remote_host``).
    :param remote_ip: its address (``Reply.remote_ip``).
    :param chunking: use BDAT where the server offers CHUNKING.
    """

    __slots__ = (
        "_auth_steps",
        "_eof",
        "_error",
        "_hello",
        "_out",
        "_reader",
        "_ready_event",
        "_run",
        "chunking",
        "extensions",
        "remote_host",
        "remote_ip",
        "state",
    )

    def __init__(
        self,
        *,
        remote_host: str | None = None,
        remote_ip: str | None = None,
        chunking: bool = True,
    ) -> None:
        self.remote_host = remote_host
        self.remote_ip = remote_ip
        self.chunking = chunking
        self.state = ClientState.CONNECTED
        #: What the last EHLO advertised (empty after HELO, and until a Hello succeeded).
        self.extensions = _NO_EXTENSIONS
        self._reader = ReplyReader()
        self._out: list[bytes] = []
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._hello = b""
        self._auth_steps: list[bytes] = []
        self._run: TransactionRun | None = None
        self._ready_event: ClientEvent | None = None

    # -- the driver's side ---------------------------------------------------------------------

    @property
    def awaiting(self) -> str | None:
        """The command whose reply is awaited (``"CONNECT"`` for the greeting), or None."""
        if self.state is ClientState.TRANSACTION and self._run is not None:
            return self._run.awaiting
        return AWAITING.get(self.state)

    def replies_so_far(self, transaction: Transaction) -> dict[str, Reply]:
        """The replies to ``transaction`` so far, per recipient (none if it was not sent):
        what the server said before a failure (its refusals of RCPT stand)."""
        run = self._run
        return dict(run.replies) if run is not None and run.transaction is transaction else {}

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; ``b""`` when it closed the connection."""
        if not data:
            self._eof = True
        elif not self._eof and self.state is not ClientState.CLOSED:
            self._reader.feed(data)

    def data_to_send(self) -> bytes:
        """The bytes to write to the server now (``b""`` for none)."""
        return b"".join(self.chunks_to_send())

    def chunks_to_send(self) -> list[bytes]:
        """What :meth:`data_to_send` gives, in the pieces it is made of (none: empty): a driver
        that can write them one after the other (``transport.writelines``) spares a copy of
        each message it sends."""
        out = self._out
        self._out = []
        return out

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: start over with Hello (RFC 3207 §4.2);
        anything the server sent before the handshake is discarded."""
        if self.state is not ClientState.TLS:
            raise LocalProtocolError(f"no STARTTLS accepted in {self.state}", _bug())
        self._reader.discard()
        self.extensions = _NO_EXTENSIONS
        self.state = ClientState.GREETED

    def send(self, command: ClientCommand) -> None:
        """Ask for an exchange; its bytes are in :meth:`data_to_send`, its outcome comes from
        :meth:`next_event`. Raises :class:`LocalProtocolError` when the state does not allow
        the command, or the server did not offer what it needs (with a ``451 4.7.4``)."""
        state = SEND.get((self.state, type(command)))
        if state is None:
            what = type(command).__name__
            raise LocalProtocolError(f"cannot send {what} in {self.state}", _bug())
        if isinstance(command, Hello):
            name = command.name
            if not name or not name.isascii() or any(c in name for c in " \t\r\n"):
                raise LocalProtocolError(f"bad Hello name {name!r}", _bug())
            self._hello = name.encode("ascii")
            self._out.append(b"EHLO " + self._hello + b"\r\n")
        elif isinstance(command, StartTls):
            if not self.extensions.starttls:
                raise LocalProtocolError("STARTTLS not offered", self._not_offered("STARTTLS"))
            self._out.append(b"STARTTLS\r\n")
        elif isinstance(command, Auth):
            self._out.append(self._auth(command))
        elif isinstance(command, Transaction):
            state = self._transaction(command)
        elif isinstance(command, Reset):
            self._out.append(b"RSET\r\n")
        else:
            self._out.append(b"QUIT\r\n")
        self.state = state

    def next_event(self) -> ClientEvent | None:
        """The outcome of the exchange under way, or None when more bytes are needed.

        Raises :class:`RemoteProtocolError` when the server broke the protocol (its
        :attr:`~smtpq.smtp.errors.ProtocolError.reply` is a transient ``451 4.4.2``); the
        connection is then in ERROR and raises the same again.
        """
        if self._error is not None:
            raise self._error
        ready = self._ready_event
        if ready is not None:
            self._ready_event = None
            return ready
        state = self.state
        while state is not ClientState.TLS and state is not ClientState.CLOSED:
            try:
                code, lines = self._reader.next_reply()
                if not code:
                    break
                event = self._on_reply(code, lines)
            except BadReply as exc:
                raise self._fail(str(exc)) from None
            if event is not None:
                return event
            state = self.state
        if self._eof and self.state is not ClientState.CLOSED:
            awaiting = self.awaiting
            self.state = ClientState.CLOSED
            return Closed(awaiting)
        return None

    # -- exchanges -----------------------------------------------------------------------------

    def _auth(self, command: Auth) -> bytes:
        offered = self.extensions.auth
        if "AUTH" not in self.extensions.keywords:
            raise LocalProtocolError("AUTH not offered", self._not_offered("AUTH"))
        if "PLAIN" in offered:
            first = auth_plain(command.username, command.password)
            # Asked again (a 334) despite the initial response: the same answer, once.
            self._auth_steps = [first[len(b"AUTH PLAIN ") :]]
            return first
        if "LOGIN" in offered:
            self._auth_steps = [
                auth_login_step(command.username),
                auth_login_step(command.password),
            ]
            return b"AUTH LOGIN\r\n"
        mechanisms = " ".join(sorted(offered)) or "none"
        text = f"4.7.4 AUTH PLAIN or LOGIN is required, but host offers {mechanisms}"
        raise LocalProtocolError("no AUTH mechanism in common", self._reply("451", text, "AUTH"))

    def _transaction(self, command: Transaction) -> ClientState:
        dsn = self.extensions.dsn

        def make(code: str, text: str, what: str, address: str | None) -> Reply:
            return Reply(
                code,
                text,
                what,
                address,
                remote_host=self.remote_host,
                remote_ip=self.remote_ip,
                # What a success means for NOTIFY=SUCCESS; a refusal says nothing of it.
                remote_dsn=dsn if code[0] == "2" else None,
            )

        run = TransactionRun(command, self.extensions, make, self.chunking)
        first = run.start()
        if run.done:  # refused here: nothing sent, the session as it was
            self._ready_event = TransactionDone(run.result())
            return ClientState.READY
        self._run = run
        self._out.extend(first)
        return ClientState.TRANSACTION

    def _on_reply(self, code: str, lines: list[str]) -> ClientEvent | None:
        """One whole reply: the event it completes, or None (more replies to come)."""
        state = self.state
        text = reply_text(lines)
        if state is ClientState.TRANSACTION:
            run = self._run
            assert run is not None
            self._out.extend(run.on_reply(code, text))
            if not run.done:
                return None
            # Forgotten once answered: an idle pooled connection must not keep the message.
            self._run = None
            closing = run.closing
            self.state = (
                ClientState.CLOSED
                if closing
                else ClientState.DIRTY
                if run.open
                else ClientState.READY
            )
            return TransactionDone(run.result(), closing)
        awaiting = AWAITING.get(state)
        if awaiting is None:  # nothing asked: only a server closing may speak
            if code != "421":
                raise BadReply(f"unexpected reply {code} while idle")
            self.state = ClientState.CLOSED
            return Closed(None, self._reply(code, text, None))
        following = ClientState.CLOSED if code == "421" else ON_REPLY[state].get(code[0])
        if following is None:
            raise BadReply(f"unexpected reply {code} to {awaiting}")
        self.state = following
        if following is ClientState.HELO:
            self._out.append(b"HELO " + self._hello + b"\r\n")
            return None
        if following is ClientState.AUTH:
            self._out.append(self._auth_steps.pop(0) if self._auth_steps else b"*\r\n")
            return None
        reply = self._reply(code, text, awaiting)
        if state is ClientState.EHLO or state is ClientState.HELO:
            if following is ClientState.READY and state is ClientState.EHLO:
                self.extensions = parse_extensions(lines)
            return HelloDone(reply, self.extensions)
        return _DONE_EVENT[state](reply)

    # -- replies of our own --------------------------------------------------------------------

    def _reply(self, code: str, text: str, command: str | None) -> Reply:
        return Reply(code, text, command, remote_host=self.remote_host, remote_ip=self.remote_ip)

    def _not_offered(self, command: str) -> Reply:
        text = f"4.7.4 {command} is required, but was not offered by host"
        return self._reply("451", text, command)

    def _fail(self, description: str) -> RemoteProtocolError:
        """The server broke the protocol: ERROR, with a transient reply for the transaction."""
        reply = self._reply("451", f"4.4.2 Bad connection: {description}", self.awaiting)
        self._error = RemoteProtocolError(description, reply)
        self.state = ClientState.ERROR
        return self._error


def _bug() -> Reply:
    """The reply for our own misuse of the machine: a bug, transient."""
    return unexpected_error_reply()
