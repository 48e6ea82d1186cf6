"""Properties of the server machine: chunking does not matter, dot-unstuffing matches a
line-by-line reference, and nothing but its own protocol errors ever comes out of it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpq.reply import Reply, greeting_reply
from smtpq.smtp import (
    NEED_DATA,
    ConnectionClosed,
    DataChunk,
    Event,
    Hello,
    NeedData,
    RemoteProtocolError,
    ServerConfig,
    ServerConnection,
    ServerState,
    StartTls,
)
from smtpq.smtp._server_content import DotReader
from tests.unit.server_script import ENVELOPE, Script, answer, content

CONFIG = ServerConfig(max_message_size=2000, hard_error_limit=50)


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """``data`` cut at any points (no empty piece: that would be the end of input)."""
    cuts = st.lists(st.integers(0, len(data)), max_size=12).map(sorted)
    return cuts.map(
        lambda at: [data[i:j] for i, j in zip([0, *at], [*at, len(data)], strict=True) if i < j]
    )


# -- any split of the input gives the same events and replies ---------------------------------

_line = st.binary(max_size=40).filter(lambda b: b"\r\n" not in b)
_text = st.lists(
    st.one_of(_line, st.sampled_from([b".", b"..", b".x", b"\r", b"\n.", b"x" * 1001])),
    max_size=6,
)


@st.composite
def commands(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from([b"EHLO c", b"HELO c", b"RSET", b"NOOP", b"VRFY x"])) + b"\r\n"
    if kind == 1:
        params = draw(st.sampled_from([b"", b" SIZE=100", b" SIZE=99999", b" BODY=8BITMIME"]))
        return b"MAIL FROM:<a@example.org>" + params + b"\r\n"
    if kind == 2:
        params = draw(st.sampled_from([b"", b" NOTIFY=NEVER", b" NOTIFY=BAD", b" X=1"]))
        return b"RCPT TO:<b@example.net>" + params + b"\r\n"
    if kind == 3:
        lines = draw(_text)
        stuffed = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
        return b"DATA\r\n" + stuffed + b".\r\n"
    if kind == 4:
        chunk = draw(st.binary(max_size=30))
        last = draw(st.sampled_from([b"", b" LAST"]))
        return b"BDAT %d%s\r\n" % (len(chunk), last) + chunk
    if kind == 5:
        return draw(st.binary(max_size=30)) + b"\r\n"
    if kind == 6:
        return b"AUTH PLAIN AGEAYg==\r\n"
    if kind == 7:
        return b"QUIT\r\n"
    return ENVELOPE


@st.composite
def split_sessions(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = b"EHLO c\r\n" + b"".join(draw(st.lists(commands(), max_size=10)))
    return stream, draw(splits(stream))


@given(split_sessions())
def test_any_split_gives_the_same_events_and_replies(case: tuple[bytes, list[bytes]]) -> None:
    stream, pieces = case
    whole = Script(CONFIG)
    whole.feed(stream)
    split = Script(CONFIG)
    split.feed(*pieces)
    assert split.events() == whole.events()
    assert split.output == whole.output


# -- dot-stuffing: unstuffing against a simple reference --------------------------------------


def stuff(lines: list[bytes]) -> bytes:
    """RFC 5321 §4.5.2, the sender's side: a line that starts with a dot gets another."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def unstuff(stuffed: bytes) -> bytes:
    """The receiver's side, line by line: drop the first dot of a line that has one."""
    lines = stuffed.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@given(st.lists(_line, max_size=8).flatmap(lambda ls: st.tuples(st.just(ls), splits(stuff(ls)))))
def test_stuffed_content_round_trips(case: tuple[list[bytes], list[bytes]]) -> None:
    lines, pieces = case
    script = Script(CONFIG)
    script.feed(ENVELOPE + b"DATA\r\n", *pieces, b".\r\n")
    assert content(script.steps) == b"".join(line + b"\r\n" for line in lines)


_stuffed = st.binary(max_size=60).filter(lambda b: b"\r\n.\r\n" not in b"\r\n" + b + b"\r\n")


@given(_stuffed.flatmap(lambda b: st.tuples(st.just(b), splits(b + b"\r\n.\r\n"))))
def test_unstuffing_matches_the_reference(case: tuple[bytes, list[bytes]]) -> None:
    stuffed, pieces = case
    reader = DotReader()
    out: list[bytes] = []
    for piece in pieces:
        assert not reader.done
        data, end = reader.feed(piece)
        out.append(data)
        if end >= 0:
            assert piece[end:] == b""  # nothing after the final dot line here
    assert reader.done
    assert b"".join(out) == unstuff(stuffed + b"\r\n")
    assert reader.size == len(stuffed) + 2


@given(
    st.lists(
        st.one_of(st.integers(0, 80), st.integers(990, 1004)), min_size=1, max_size=10
    ).flatmap(
        lambda sizes: st.tuples(st.just(sizes), splits(b"".join(b"x" * n + b"\r\n" for n in sizes)))
    )
)
def test_line_limit_matches_the_reference(case: tuple[list[int], list[bytes]]) -> None:
    sizes, pieces = case
    reader = DotReader()
    for piece in pieces:
        reader.feed(piece)
    reader.feed(b".\r\n")
    assert reader.done
    assert reader.too_long == any(n > 998 for n in sizes)


# -- the fuzzer: nothing comes out but the machine's own protocol errors ----------------------

_words = st.sampled_from(
    [
        b"EHLO c", b"HELO c", b"MAIL FROM:<a@b>", b"MAIL FROM:<>", b"RCPT TO:<c@d>", b"DATA",
        b"BDAT 3", b"BDAT 2 LAST", b"BDAT x", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"HELP",
        b"STARTTLS", b"AUTH LOGIN", b"AUTH PLAIN", b"AUTH PLAIN =", b"*", b"Ym9i", b".", b"..",
        b"MAIL FROM:<\xff> SMTPUTF8", b"RCPT TO:<a@b> ORCPT=x", b"EXPN", b"",
    ]
)  # fmt: skip
_noise = st.one_of(
    _words.map(lambda w: w + b"\r\n"),
    _words,
    st.binary(max_size=50),
    st.sampled_from([b"\r\n", b"\n", b"\r", b".\r\n", b"\r\n.\r\n", b"x" * 2000]),
)
_configs = st.builds(
    ServerConfig,
    max_message_size=st.sampled_from([0, 10, 1000]),
    smtputf8=st.booleans(),
    starttls=st.booleans(),
    require_tls=st.booleans(),
    auth_mechanisms=st.sampled_from([(), ("PLAIN",), ("LOGIN", "PLAIN")]),
    auth_requires_tls=st.booleans(),
    auth_required=st.booleans(),
    hard_error_limit=st.sampled_from([0, 5, 20]),
)


def next_step(conn: ServerConnection) -> Event | NeedData | Reply:
    """The next event, or the reply a client's error calls for."""
    try:
        return conn.next_event()
    except RemoteProtocolError as exc:
        return exc.reply


@settings(max_examples=300)
@given(_configs, st.booleans(), st.lists(_noise, max_size=25), st.data())
def test_fuzzer_gets_only_protocol_errors(
    config: ServerConfig, tls: bool, chunks: list[bytes], data: st.DataObject
) -> None:
    conn = ServerConnection(config, tls=tls)
    conn.send(greeting_reply("mx"))
    for chunk in [*filter(None, chunks), b""]:
        conn.receive_data(chunk)
        while not conn.closed:
            event = next_step(conn)
            if isinstance(event, Reply):
                assert event.code is not None
                assert event.code[0] in "45"
                conn.send(event)
                continue
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                break
            if isinstance(event, DataChunk):
                continue
            assert isinstance(event, Event)
            if data.draw(st.booleans(), label="refuse"):
                reply = Reply("554", "5.0.0 no") if not isinstance(event, Hello) else None
                conn.send(reply or conn.hello_reply("mx"))
            else:
                conn.send(answer(conn, event))
            if isinstance(event, StartTls) and conn.state is ServerState.TLS:
                conn.tls_established()
        conn.data_to_send()
    assert conn.closed  # the end of input ends the session, whatever state it was in
