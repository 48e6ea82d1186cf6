"""A scripted driver for the server machine: answers every event by a fixed rule, no loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from smtpq.reply import Replies, Reply, accepted_reply, chunk_received_reply, greeting_reply
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
    ServerConfig,
    ServerConnection,
    StartTls,
    Vrfy,
)

PASSWORD = b"secret"


def answer(conn: ServerConnection, event: Event) -> Reply:
    """What a permissive driver answers; passwords other than PASSWORD fail."""
    fixed: dict[type[Event], Reply] = {
        MailFrom: Replies.SENDER_OK,
        RcptTo: Replies.RECIPIENT_OK,
        DataStart: Replies.START_DATA,
        MessageComplete: accepted_reply(["ID1"]),
        StartTls: Replies.READY_FOR_TLS,
        Reset: Replies.OK,
        Noop: Replies.OK,
        Quit: Replies.BYE,
        Vrfy: Replies.VRFY,
        Help: Replies.HELP,
    }
    if isinstance(event, Hello):
        return conn.hello_reply("mx.test")
    if isinstance(event, BdatChunk):
        return chunk_received_reply(event.size)
    if isinstance(event, AuthCredentials):
        return Replies.AUTH_OK if event.password == PASSWORD else Replies.AUTH_FAILED
    return fixed[type(event)]


#: What the script records: an event, or the reply of a client error.
Step = Event | Reply


@dataclass
class Script:
    """Feeds a :class:`ServerConnection` and records events, errors and output.

    ``answers`` overrides the reply for an event type (a function of the event).
    """

    config: ServerConfig = field(default_factory=ServerConfig)
    tls: bool = False
    answers: dict[type[Event], Callable[[Event], Reply]] = field(default_factory=dict)
    conn: ServerConnection = field(init=False)
    steps: list[Step] = field(default_factory=list)
    output: bytes = b""

    def __post_init__(self) -> None:
        self.conn = ServerConnection(self.config, tls=self.tls)
        self.conn.send(greeting_reply("mx.test"))
        self.output = self.conn.data_to_send()

    def feed(self, *chunks: bytes) -> bytes:
        """Receive each chunk and run the events it makes; the bytes written meanwhile (one
        write per chunk, as a driver does)."""
        written = b""
        for chunk in chunks:
            if self.conn.closed:  # a driver has closed the connection by now
                break
            self.conn.receive_data(chunk)
            self.run()
            data = self.conn.data_to_send()
            written += data
        self.output += written
        return written

    def run(self) -> None:
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                self.steps.append(exc.reply)
                conn.send(exc.reply)
                continue
            if event is NEED_DATA:
                return
            assert isinstance(event, Event)
            self.steps.append(event)
            if isinstance(event, ConnectionClosed):
                return
            if isinstance(event, DataChunk):
                continue
            rule = self.answers.get(type(event))
            conn.send(rule(event) if rule else answer(conn, event))
            if conn.closed:
                return

    def events(self) -> list[Step]:
        """The steps with consecutive content pieces joined (their boundaries mean nothing)."""
        return merge(self.steps)

    def replies(self) -> list[str]:
        """The reply lines written so far (without CRLF), greeting included."""
        return self.output.decode("utf-8", "replace").split("\r\n")[:-1]

    def codes(self) -> list[str]:
        """The code of each complete reply written after the greeting."""
        return [line[:3] for line in self.replies()[1:] if line[3:4] != "-"]


def merge(steps: Iterable[Step]) -> list[Step]:
    """Join consecutive :class:`DataChunk` steps into one."""
    out: list[Step] = []
    for step in steps:
        if isinstance(step, DataChunk) and out and isinstance(out[-1], DataChunk):
            out[-1] = DataChunk(out[-1].data + step.data)
        else:
            out.append(step)
    return out


def content(steps: Iterable[Step]) -> bytes:
    """Every content piece, joined."""
    return b"".join(step.data for step in steps if isinstance(step, DataChunk))


def session(*commands: bytes) -> bytes:
    """Command lines, CRLF-terminated, as one stream."""
    return b"".join(c + b"\r\n" for c in commands)


ENVELOPE = session(b"EHLO client.test", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.net>")
