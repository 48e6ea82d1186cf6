"""Properties of the sans-IO SMTP client, with hypothesis. Pure: no loop.

* however the server's byte stream is split into reads, the events are the same;
* dot-stuffing round-trips: a reference unstuffer gives back the message, with CRLF endings;
* a message given in parts (header block, body) goes on the wire exactly as given whole;
* random reply bytes, in any state, get nothing out of the machine but its events and its own
  ProtocolError.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Callable, Iterator

from hypothesis import given
from hypothesis import strategies as st

from smtpq.smtp.client import (
    Auth,
    ClientCommand,
    ClientConnection,
    ClientEvent,
    Hello,
    Quit,
    Reset,
    StartTls,
    Transaction,
    canonical,
    data_content,
)
from smtpq.smtp.errors import ProtocolError

# One session: each step is what the client sends, then what the server answers to it.
GREETING = b"220-mx.example ESMTP\r\n220 ready\r\n"
SCRIPT: list[tuple[ClientCommand, bytes]] = [
    (
        Hello("c.example"),
        b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-DSN\r\n250-STARTTLS\r\n"
        b"250 AUTH PLAIN LOGIN\r\n",
    ),
    (Auth("u", "p"), b"235 2.7.0 Ok\r\n"),
    (
        Transaction(
            "a@example.org",
            ("a@x.example", "b@x.example", "c@x.example"),
            b"Subject: x\r\n\r\n.\r\nbody\r\n",
            rcpt_params={"a@x.example": {"NOTIFY": "SUCCESS"}},
        ),
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550-5.1.1 No such\r\n550 5.1.1 user\r\n"
        b"250 2.1.5 Ok\r\n354 Go\r\n250 2.0.0 Queued\r\n",
    ),
    (
        Transaction("a@example.org", ("d@x.example",), b"x\r\n"),
        b"250 Ok\r\n550 No\r\n554 5.5.1 No valid recipients\r\n",
    ),
    (Reset(), b"250 2.0.0 Ok\r\n"),
    (Quit(), b"221 2.0.0 Bye\r\n"),
]


def splits(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """``data`` cut at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        yield data[start:end]


def run(cut: Callable[[bytes], Iterator[bytes]]) -> tuple[list[ClientEvent], list[bytes]]:
    """The script, with each server answer fed in the chunks ``cut`` makes of it."""
    conn = ClientConnection(remote_host="mx.example", remote_ip="192.0.2.1")
    events: list[ClientEvent] = []
    sent: list[bytes] = []

    def answer(data: bytes) -> None:
        for chunk in cut(data):
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not None:
                events.append(event)
            sent.append(conn.data_to_send())

    answer(GREETING)
    for command, reply in SCRIPT:
        conn.send(command)
        sent.append(conn.data_to_send())
        answer(reply)
    return events, [b"".join(sent)]


WHOLE = run(lambda data: iter([data]))


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    assert run(lambda data: splits(data, cuts)) == WHOLE


def test_byte_by_byte_gives_the_same_events() -> None:
    events, _ = WHOLE
    assert len(events) == 1 + len(SCRIPT)
    assert run(lambda data: (data[i : i + 1] for i in range(len(data)))) == WHOLE


# -- dot-stuffing ------------------------------------------------------------------------------


def unstuff(wire: bytes) -> bytes:
    """A reference DATA reader (RFC 5321 §4.5.2): lines up to the lone dot, each leading dot
    removed."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire.split(b"\r\n")
    end = lines.index(b".")
    assert end == len(lines) - 2  # nothing after the terminator, and no early one
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines[:end])


_pieces = st.sampled_from(
    [b"\r\n", b"\n", b"\r", b".", b"..", b"a", b" ", b"\r\n.\r\n", b"\r\n.", b"\xc3\xa9"]
)


@given(st.lists(_pieces, max_size=40).map(b"".join))
def test_dot_stuffing_round_trips(message: bytes) -> None:
    wire = data_content(message)
    with_crlf = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if with_crlf and not with_crlf.endswith(b"\r\n"):
        with_crlf += b"\r\n"
    assert unstuff(wire) == with_crlf == canonical(message)


# -- content in parts --------------------------------------------------------------------------

_EHLOS = {
    "data": b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 8BITMIME\r\n",
    "bdat": b"250-mx.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SIZE 100000\r\n",
    "one by one": b"250-mx.example\r\n250 8BITMIME\r\n",
}


def wire(content: bytes | tuple[bytes, ...], ehlo: bytes) -> bytes:
    """Everything the client writes for one transaction to ``content``, every reply a yes."""
    conn = ClientConnection(chunking=True)
    conn.receive_data(b"220 mx.example\r\n")
    conn.next_event()
    conn.send(Hello("c.example"))
    conn.receive_data(ehlo)
    conn.next_event()
    conn.data_to_send()
    conn.send(Transaction("a@example.org", ("b@x.example",), content))
    out = [conn.data_to_send()]
    went_ahead = False
    while conn.awaiting is not None:
        go_ahead = conn.awaiting == "DATA" and not went_ahead
        went_ahead = went_ahead or go_ahead
        conn.receive_data(b"354 Go\r\n" if go_ahead else b"250 Ok\r\n")
        conn.next_event()
        out.append(conn.data_to_send())
    return b"".join(out)


@given(
    st.lists(_pieces, max_size=30).map(b"".join),
    st.integers(min_value=0, max_value=200),
    st.sampled_from(sorted(_EHLOS)),
)
def test_content_in_parts_goes_as_the_whole(message: bytes, cut: int, ehlo: str) -> None:
    parts = (message[:cut], message[cut:])
    assert wire(parts, _EHLOS[ehlo]) == wire(message, _EHLOS[ehlo])


# -- the fuzzer --------------------------------------------------------------------------------

_reply_like = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda code, sep, text, end: code + sep + text + end,
        st.sampled_from([b"220", b"221", b"235", b"250", b"334", b"354", b"421", b"503", b"550"]),
        st.sampled_from([b" ", b"-", b"", b"x"]),
        st.binary(max_size=40),
        st.sampled_from([b"\r\n", b"\n", b"\r", b""]),
    ),
)


@given(st.integers(min_value=0, max_value=len(SCRIPT)), st.lists(_reply_like, max_size=20))
def test_random_replies_give_only_events_or_protocol_errors(step: int, chunks: list[bytes]) -> None:
    conn = ClientConnection(remote_host="mx.example")
    conn.receive_data(GREETING)
    conn.next_event()
    for command, reply in SCRIPT[:step]:
        conn.send(command)
        conn.receive_data(reply)
        conn.next_event()
    if step < len(SCRIPT):
        conn.send(SCRIPT[step][0])
    error: ProtocolError | None = None
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        try:
            while conn.next_event() is not None:
                pass
        except ProtocolError as exc:
            error = exc
            break
        assert isinstance(conn.data_to_send(), bytes)
    if error is not None:
        assert error.reply.is_transient()
        return
    # Whatever the server said, the client may still be asked for something, or refuse it
    # in its own terms.
    for command in (Hello("c.example"), StartTls(), Reset(), Quit()):
        with contextlib.suppress(ProtocolError):
            conn.send(command)
