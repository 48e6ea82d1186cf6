"""SmtpEdge end to end: real SMTP clients (smtplib, aiosmtplib, raw sockets) over loopback, a
real Queue over a real DictStorage. Each hook and each answer the edge gives is exercised here."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtpq import DictStorage, Envelope, ManualClock, Queue, QueueError, RecipientDomainSplit
from smtpq.edge import EdgeConfig, RelayPolicy, SmtpEdge, hash_password
from tests.integration.smtp.conftest import TlsFiles
from tests.integration.smtp.edge_peers import GatedStorage, stored

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256;\r\n"
    b"\t h=from:to:subject; b=abc\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\tdot tab\r\n"
    b"8-bit: caf\xc3\xa9 \xff\xfe raw\r\n"
    b"trailing spaces   \r\n"
    b"\r\n"
    b"last line\r\n"
)

EdgeFactory = Callable[..., Awaitable[SmtpEdge]]


class FailingStorage(DictStorage):
    """A storage whose disk is broken: writes fail after ``ok`` successes."""

    def __init__(self, error: Exception, ok: int = 0) -> None:
        super().__init__()
        self.error, self.ok = error, ok

    async def write(self, envelope: Envelope, timestamp: float, *, claimed: bool = False) -> str:
        if self.ok <= 0:
            raise self.error
        self.ok -= 1
        return await super().write(envelope, timestamp, claimed=claimed)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_800_000_000.0)


@pytest.fixture
async def edge_factory(clock: ManualClock) -> AsyncIterator[EdgeFactory]:
    """``await make(store=None, queue=None, **EdgeConfig fields)``: a listening edge on port 0."""
    running: list[tuple[SmtpEdge, Queue | None]] = []

    async def make(store: DictStorage | None = None, queue: Any = None, **config: Any) -> SmtpEdge:
        own = None
        if queue is None:
            own = queue = Queue(store if store is not None else DictStorage(), clock=clock)
            await own.start()
        config.setdefault("port", 0)
        config.setdefault("hostname", "mx.smtpq.test")
        edge = SmtpEdge(queue, EdgeConfig(**config), clock=clock)
        await edge.start()
        running.append((edge, own))
        return edge

    yield make
    for edge, queue in running:
        await edge.stop()
        if queue is not None:
            await queue.stop()


def smtp_session(port: int, work: Callable[[smtplib.SMTP], Any]) -> Awaitable[Any]:
    """Run blocking smtplib code against the edge in a thread."""

    def run() -> Any:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10) as s:
            return work(s)

    return asyncio.to_thread(run)


# -- the message, byte for byte ----------------------------------------------------------------


async def test_smtplib_message_stored_byte_for_byte(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(store)

    def send(s: smtplib.SMTP) -> Any:
        return s.sendmail("alice@example.org", ["bob@example.net"], MESSAGE, ["BODY=8BITMIME"])

    refused = await smtp_session(edge.port, send)
    assert refused == {}
    [env] = await stored(store)
    assert b"".join(env.flatten()) == MESSAGE
    assert env.sender == "alice@example.org"
    assert env.recipients == ["bob@example.net"]
    assert env.body_type == "8BITMIME"
    assert env.smtputf8 is False


async def test_aiosmtplib_message_stored_byte_for_byte(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(store)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=edge.port, start_tls=False) as client:
        errors, reply = await client.sendmail(
            "alice@example.org", ["bob@example.net", "carol@example.net"], MESSAGE
        )
    assert errors == {}
    assert reply.startswith("2.6.0 Message accepted for delivery; queued as ")
    [env] = await stored(store)
    assert b"".join(env.flatten()) == MESSAGE
    assert env.recipients == ["bob@example.net", "carol@example.net"]


async def raw_session(port: int, lines: list[bytes]) -> list[bytes]:
    """Send each chunk and read one reply after it (multi-line replies read whole)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = [await reader.readline()]
    for chunk in lines:
        writer.write(chunk)
        await writer.drain()
        reply = await reader.readline()
        while reply[3:4] == b"-":
            reply = await reader.readline()
        replies.append(reply)
    writer.close()
    await writer.wait_closed()
    return replies


async def test_bare_lf_does_not_end_or_corrupt_the_message(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(store)
    body = b"Subject: bare\n\nline one\n.\r\nline two\n.\nend\r\n"
    replies = await raw_session(
        edge.port,
        [
            b"EHLO client.example\r\n",
            b"MAIL FROM:<a@example.org>\r\n",
            b"RCPT TO:<b@example.net>\r\n",
            b"DATA\r\n",
            body + b".\r\n",
            b"QUIT\r\n",
        ],
    )
    assert replies[5].startswith(b"250 2.6.0")
    [env] = await stored(store)
    # Only CRLF.CRLF ends the data: the lone dots after bare LFs stay, bytes unchanged.
    assert b"".join(env.flatten()) == body


async def test_dot_transparency(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(store)
    # smtplib doubles every dot that starts a line; the edge must take exactly one back.
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n.starts\r\nends.\r\n.\r\n...\r\nlast.\r\n"
    await smtp_session(edge.port, lambda s: s.sendmail("a@example.org", ["b@example.net"], body))
    [env] = await stored(store)
    assert b"".join(env.flatten()) == body


async def test_data_in_pieces_and_a_pipelined_command(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(store)
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    await reader.readline()
    writer.write(b"HELO client.example\r\nMAIL FROM:<a@example.org>\r\n")
    writer.write(b"RCPT TO:<b@example.net>\r\nDATA\r\n")
    replies = [await reader.readline() for _ in range(4)]
    assert replies[-1].startswith(b"354")
    # The end of data split over writes, the next command in the same write as its end.
    for piece in (b"Subject: p", b"ieces\r\n\r\nbody.", b"\r\nlast\r\n", b".", b"\r", b"\n"):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.01)
    assert (await reader.readline()).startswith(b"250 2.6.0")
    writer.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
    replies = [await reader.readline() for _ in range(3)]
    assert replies[-1].startswith(b"354")
    writer.write(b".\r\nQUIT\r\n")  # an empty message, then QUIT in the same segment
    assert (await reader.readline()).startswith(b"250 2.6.0")
    assert (await reader.readline()).startswith(b"221")
    writer.close()
    await writer.wait_closed()
    by_rcpt = {env.recipients[0]: b"".join(env.flatten()) for env in await stored(store)}
    assert by_rcpt["b@example.net"] == b"Subject: pieces\r\n\r\nbody.\r\nlast\r\n"
    assert by_rcpt["c@example.net"] == b""  # an empty message is a message


async def test_line_over_1000_octets_refused_and_session_goes_on(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(store)

    def send(s: smtplib.SMTP) -> list[Any]:
        s.ehlo()
        s.mail("a@example.org")
        s.rcpt("b@example.net")
        out: list[Any] = [s.data(b"Subject: long\r\n\r\n" + b"x" * 1200 + b"\r\n")]
        s.mail("a@example.org")
        s.rcpt("b@example.net")
        out.append(s.data(b"Subject: fine\r\n\r\n" + b"x" * 998 + b"\r\n"))
        return out

    too_long, fine = await smtp_session(edge.port, send)
    assert too_long[0] == 500
    assert fine[0] == 250
    [env] = await stored(store)
    assert env.headers["Subject"] == "fine"


async def test_null_sender_and_multiple_messages_per_session(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(store)

    def send(s: smtplib.SMTP) -> None:
        s.sendmail("", ["bob@example.net"], b"Subject: bounce\r\n\r\nx\r\n")
        s.rset()
        s.sendmail("alice@example.org", ["carol@example.net"], b"Subject: two\r\n\r\ny\r\n")

    await smtp_session(edge.port, send)
    envs = await stored(store)
    assert sorted((e.sender, e.recipients[0]) for e in envs) == [
        ("", "bob@example.net"),
        ("alice@example.org", "carol@example.net"),
    ]


# -- 250 only after the durable write; 451 and never a 5xx or exception text ------------------


async def test_250_is_sent_only_after_the_write_returned(edge_factory: EdgeFactory) -> None:
    store = GatedStorage()
    edge = await edge_factory(store)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=edge.port, start_tls=False) as client:
        sending = asyncio.ensure_future(
            client.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nbody\r\n")
        )
        await store.started.wait()
        assert not sending.done()  # the edge is inside the write: no reply can have left
        assert await store.load() == []
        store.gate.set()
        _, reply = await sending
    assert reply.startswith("2.6.0")
    [(_, id)] = await store.load()
    assert id in reply


@pytest.mark.parametrize(
    "error", [QueueError("disk full at /secret/path"), OSError(28, "No space left /secret/path")]
)
async def test_storage_failure_is_451_without_details(
    edge_factory: EdgeFactory, error: Exception
) -> None:
    store = FailingStorage(error)
    edge = await edge_factory(store)

    def send(s: smtplib.SMTP) -> tuple[int, bytes]:
        s.ehlo()
        s.mail("a@example.org")
        s.rcpt("b@example.net")
        code, text = s.data(b"Subject: x\r\n\r\nbody\r\n")
        # The session goes on: the next transaction starts clean.
        assert s.mail("a@example.org")[0] == 250
        return code, text

    code, text = await smtp_session(edge.port, send)
    assert (code, text[:5]) == (451, b"4.3.0")
    assert b"secret" not in text
    assert b"space" not in text
    assert await store.load() == []


async def test_any_part_of_a_split_failing_is_451(edge_factory: EdgeFactory, clock: Any) -> None:
    store = FailingStorage(QueueError("second write fails"), ok=1)
    queue = Queue(store, clock=clock, policies=[RecipientDomainSplit()])
    edge = await edge_factory(queue=queue)

    def send(s: smtplib.SMTP) -> Any:
        return s.sendmail("a@example.org", ["b@one.example", "c@two.example"], b"\r\nx\r\n")

    with pytest.raises(smtplib.SMTPDataError) as caught:
        await smtp_session(edge.port, send)
    assert caught.value.smtp_code == 451


async def test_split_message_names_every_queue_id(edge_factory: EdgeFactory, clock: Any) -> None:
    store = DictStorage()
    queue = Queue(store, clock=clock, policies=[RecipientDomainSplit()])
    edge = await edge_factory(queue=queue)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=edge.port, start_tls=False) as client:
        _, reply = await client.sendmail("a@x.example", ["b@one.example", "c@two.example"], b"x")
    ids = [id for _, id in await store.load()]
    assert len(ids) == 2
    assert all(id in reply for id in ids)


class ExplodingQueue:
    async def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str | QueueError]]:
        raise RuntimeError("internal detail /secret")


async def test_unexpected_queue_exception_is_451(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory(queue=ExplodingQueue())

    def send(s: smtplib.SMTP) -> Any:
        return s.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nbody\r\n")

    with pytest.raises(smtplib.SMTPDataError) as caught:
        await smtp_session(edge.port, send)
    assert caught.value.smtp_code == 451
    text = str(caught.value.smtp_error)  # bytes at run time, whatever typeshed says
    assert "4.3.0" in text
    assert "secret" not in text


async def test_exception_in_any_hook_is_451_without_details(
    edge_factory: EdgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> bool:
        raise RuntimeError("internal detail /secret")

    # Fault injection: a bug in what answers RCPT must still give a transient, opaque reply.
    monkeypatch.setattr(RelayPolicy, "decide", broken)
    edge = await edge_factory()

    def send(s: smtplib.SMTP) -> tuple[int, bytes]:
        s.ehlo()
        s.mail("a@example.org")
        return s.rcpt("b@example.net")

    code, text = await smtp_session(edge.port, send)
    assert code == 451
    assert text.startswith(b"4.3.0")
    assert b"secret" not in text


# -- no open relay; AUTH only over TLS -------------------------------------------------------


async def test_untrusted_client_may_only_send_to_relay_domains(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(
        store, trusted_networks=("10.0.0.0/8",), relay_domains=("example.net", ".example.com")
    )

    def send(s: smtplib.SMTP) -> list[tuple[int, bytes]]:
        s.ehlo()
        s.mail("spammer@elsewhere.example")
        replies = [
            s.rcpt("victim@elsewhere.example"),
            s.rcpt("bob@example.net"),
            s.rcpt("carol@sub.example.com"),
            s.rcpt("dave@example.com"),  # ".example.com" is subdomains only
            s.rcpt("eve@example.net.evil.example"),
        ]
        replies.append(s.data(b"Subject: x\r\n\r\nx\r\n"))
        return replies

    replies = await smtp_session(edge.port, send)
    assert [code for code, _ in replies] == [554, 250, 250, 554, 554, 250]
    assert replies[0][1] == b"5.7.1 <victim@elsewhere.example>: Relay access denied"
    [env] = await stored(store)
    assert env.recipients == ["bob@example.net", "carol@sub.example.com"]


async def test_trusted_network_may_relay_anywhere(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(store, trusted_networks=("127.0.0.0/8",))

    def send(s: smtplib.SMTP) -> Any:
        return s.sendmail("a@example.org", ["x@anywhere.example"], b"\r\nx\r\n")

    assert await smtp_session(edge.port, send) == {}
    assert len(await store.load()) == 1


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    path = tmp_path / "passwords"
    path.write_text(
        "# user:hash\n"
        f"alice@example.org:{hash_password('correct horse')}\n"
        f"bob:{hash_password('battery', scheme='pbkdf2_sha256')}\n"
    )
    return path


async def test_auth_is_not_offered_without_tls(
    edge_factory: EdgeFactory, tls_files: TlsFiles, credentials: Path
) -> None:
    edge = await edge_factory(
        trusted_networks=(),
        credentials_file=str(credentials),
        tls_cert=str(tls_files.cert),
        tls_key=str(tls_files.key),
    )
    plain = base64.b64encode(b"\0alice@example.org\0correct horse")
    replies = await raw_session(
        edge.port,
        [b"EHLO client.example\r\n", b"AUTH PLAIN " + plain + b"\r\n"],
    )
    assert replies[2].startswith(b"538 5.7.11")

    def ehlo(s: smtplib.SMTP) -> dict[str, str]:
        s.ehlo()
        return dict(s.esmtp_features)

    features = await smtp_session(edge.port, ehlo)
    assert "auth" not in features
    assert "starttls" in features


async def test_auth_after_starttls_allows_relaying(
    edge_factory: EdgeFactory,
    tls_files: TlsFiles,
    credentials: Path,
    client_tls: ssl.SSLContext,
) -> None:
    store = DictStorage()
    edge = await edge_factory(
        store,
        trusted_networks=(),
        credentials_file=str(credentials),
        tls_cert=str(tls_files.cert),
        tls_key=str(tls_files.key),
    )

    def send(s: smtplib.SMTP) -> Any:
        s.starttls(context=client_tls)
        s.ehlo()
        assert s.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
            s.login("alice@example.org", "wrong horse")
        assert wrong.value.smtp_code == 535
        # Unauthenticated, relaying is still refused.
        s.mail("alice@example.org")
        assert s.rcpt("x@elsewhere.example")[0] == 554
        s.rset()
        s.login("alice@example.org", "correct horse")
        return s.sendmail("alice@example.org", ["x@elsewhere.example"], b"Subject: x\r\n\r\nx\r\n")

    assert await smtp_session(edge.port, send) == {}
    [env] = await stored(store)
    assert env.client["auth"] == "alice@example.org"
    assert env.client["protocol"] == "ESMTPSA"


async def test_auth_login_mechanism(
    edge_factory: EdgeFactory,
    tls_files: TlsFiles,
    credentials: Path,
    client_tls: ssl.SSLContext,
) -> None:
    edge = await edge_factory(
        trusted_networks=(),
        credentials_file=str(credentials),
        tls_cert=str(tls_files.cert),
        tls_key=str(tls_files.key),
    )

    def login(s: smtplib.SMTP) -> tuple[int, bytes]:
        s.starttls(context=client_tls)
        s.ehlo()
        s.user, s.password = "bob", "battery"
        return s.auth("LOGIN", s.auth_login, initial_response_ok=False)

    code, _ = await smtp_session(edge.port, login)
    assert code == 235


async def test_implicit_tls_offers_auth(
    edge_factory: EdgeFactory,
    tls_files: TlsFiles,
    credentials: Path,
    client_tls: ssl.SSLContext,
) -> None:
    store = DictStorage()
    edge = await edge_factory(
        store,
        trusted_networks=(),
        credentials_file=str(credentials),
        tls_cert=str(tls_files.cert),
        tls_key=str(tls_files.key),
        implicit_tls=True,
    )

    def send() -> Any:
        with smtplib.SMTP_SSL("127.0.0.1", edge.port, context=client_tls, timeout=10) as s:
            s.ehlo()
            assert "starttls" not in s.esmtp_features
            s.login("bob", "battery")
            return s.sendmail("bob@example.org", ["x@elsewhere.example"], b"\r\nx\r\n")

    assert await asyncio.to_thread(send) == {}
    [env] = await stored(store)
    assert env.client["protocol"] == "ESMTPSA"
    assert env.client["auth"] == "bob"


async def test_auth_required_refuses_unauthenticated_mail(
    edge_factory: EdgeFactory, tls_files: TlsFiles, credentials: Path, client_tls: ssl.SSLContext
) -> None:
    edge = await edge_factory(
        credentials_file=str(credentials),
        tls_cert=str(tls_files.cert),
        tls_key=str(tls_files.key),
        auth_required=True,
    )

    def send(s: smtplib.SMTP) -> tuple[int, bytes]:
        s.starttls(context=client_tls)
        s.ehlo()
        return s.mail("a@example.org")

    code, _ = await smtp_session(edge.port, send)
    assert code == 530


async def test_require_tls(
    edge_factory: EdgeFactory, tls_files: TlsFiles, client_tls: ssl.SSLContext
) -> None:
    store = DictStorage()
    edge = await edge_factory(
        store, tls_cert=str(tls_files.cert), tls_key=str(tls_files.key), require_tls=True
    )

    def send(s: smtplib.SMTP) -> Any:
        s.ehlo()
        refused = s.mail("a@example.org")
        s.starttls(context=client_tls)
        s.ehlo()
        return refused, s.sendmail("a@example.org", ["b@example.net"], b"\r\nx\r\n")

    refused, result = await smtp_session(edge.port, send)
    assert refused[0] == 530
    assert result == {}
    [env] = await stored(store)
    assert env.client["protocol"] == "ESMTPS"


@pytest.mark.parametrize(
    "config",
    [
        {"implicit_tls": True},
        {"require_tls": True},
        {"auth_required": True},
    ],
)
def test_inconsistent_config_refused(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="need"):
        SmtpEdge(Queue(DictStorage()), EdgeConfig(**config))


async def test_unreadable_credentials_file_is_a_temporary_failure(
    edge_factory: EdgeFactory,
    tls_files: TlsFiles,
    credentials: Path,
    client_tls: ssl.SSLContext,
) -> None:
    edge = await edge_factory(
        credentials_file=str(credentials),
        tls_cert=str(tls_files.cert),
        tls_key=str(tls_files.key),
    )
    await asyncio.to_thread(credentials.unlink)

    def login(s: smtplib.SMTP) -> Any:
        s.starttls(context=client_tls)
        s.ehlo()
        s.login("bob", "battery")

    with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
        await smtp_session(edge.port, login)
    assert caught.value.smtp_code == 454


# -- limits ----------------------------------------------------------------------------------


async def test_size_limit_advertised_and_enforced(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(store, max_message_size=1000)

    def send(s: smtplib.SMTP) -> list[Any]:
        s.ehlo()
        out: list[Any] = [s.esmtp_features["size"]]
        out.append(s.mail("a@example.org", ["SIZE=1001"]))
        s.rset()
        s.mail("a@example.org")
        s.rcpt("b@example.net")
        out.append(s.data(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 20))
        out.append(s.mail("a@example.org", ["SIZE=900"]))
        s.rcpt("b@example.net")
        out.append(s.data(b"Subject: small\r\n\r\nsmall\r\n"))
        # The limit counts the content as sent: 1,000 octets pass, 1,001 do not.
        for size in (1001, 1000):
            s.mail("a@example.org")
            s.rcpt("b@example.net")
            head = b"Subject: %d\r\n\r\n" % size
            out.append(s.data(head + b"y" * (size - len(head) - 2) + b"\r\n")[0])
        return out

    size, mail_big, data_big, mail_ok, data_ok, over, at = await smtp_session(edge.port, send)
    assert (over, at) == (552, 250)
    assert size == "1000"
    assert mail_big == (552, b"5.3.4 Message size exceeds fixed maximum message size")
    assert data_big[0] == 552
    assert data_big[1].startswith(b"5.3.4")
    assert mail_ok[0] == 250
    assert data_ok[0] == 250
    assert sorted(env.headers["Subject"] for env in await stored(store)) == ["1000", "small"]


async def test_recipient_limit(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(store, max_recipients=2)

    def send(s: smtplib.SMTP) -> list[tuple[int, bytes]]:
        s.ehlo()
        s.mail("a@example.org")
        replies = [s.rcpt(f"r{i}@example.net") for i in range(3)]
        replies.append(s.rcpt("r0@example.net"))  # a repeat is not a new recipient
        replies.append(s.data(b"\r\nx\r\n"))
        return replies

    replies = await smtp_session(edge.port, send)
    assert [code for code, _ in replies] == [250, 250, 452, 250, 250]
    assert replies[2][1] == b"4.5.3 Too many recipients"
    [env] = await stored(store)
    assert env.recipients == ["r0@example.net", "r1@example.net"]


async def test_idle_client_is_told_and_disconnected(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory(timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    greeting = await reader.readline()
    assert greeting.startswith(b"220 mx.smtpq.test ESMTP smtpq")
    # Say nothing: the server gives up on us, says so, and closes.
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"421 4.4.2")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


# -- envelope details: client, DSN, SMTPUTF8 -------------------------------------------------


async def test_client_details_and_time(edge_factory: EdgeFactory, clock: ManualClock) -> None:
    store = DictStorage()
    edge = await edge_factory(store)
    await clock.advance(42)

    def send(s: smtplib.SMTP) -> None:
        s.helo("old-client.example")
        s.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")

    await smtp_session(edge.port, send)
    [env] = await stored(store)
    assert env.client["ip"] == "127.0.0.1"
    assert env.client["name"] == "old-client.example"
    assert env.client["protocol"] == "SMTP"
    assert env.client["auth"] is None
    assert env.client["host"] in (None, "localhost")  # forward-confirmed reverse name, if any
    assert env.receiver == "mx.smtpq.test"
    assert env.timestamp == 1_800_000_042.0


async def test_dsn_parameters_stored(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(store)

    def send(s: smtplib.SMTP) -> list[tuple[int, bytes]]:
        s.ehlo()
        assert "dsn" in s.esmtp_features
        replies = [
            s.mail("a@example.org", ["RET=hdrs", "ENVID=QQ314159+2B1", "AUTH=<>"]),
            s.rcpt("b@example.net", ["NOTIFY=success,delay", "ORCPT=rfc822;B+2BX@example.net"]),
            s.rcpt("c@example.net", ["NOTIFY=NEVER"]),
            s.rcpt("d@example.net"),
            s.rcpt("e@example.net", ["NOTIFY=NEVER,SUCCESS"]),
            s.rcpt("f@example.net", ["NOTIFY=SOMETIMES"]),
            s.rcpt("g@example.net", ["ORCPT=no-semicolon"]),
            s.rcpt("h@example.net", ["NOTIFY=DELAY", "NOTIFY=DELAY"]),
        ]
        replies.append(s.data(b"\r\nx\r\n"))
        return replies

    replies = await smtp_session(edge.port, send)
    assert [code for code, _ in replies] == [250, 250, 250, 250, 501, 501, 501, 501, 250]
    assert all(text.startswith(b"5.5.4") for code, text in replies if code == 501)
    [env] = await stored(store)
    assert env.dsn_ret == "HDRS"
    assert env.dsn_envid == "QQ314159+2B1"
    assert env.recipients == ["b@example.net", "c@example.net", "d@example.net"]
    assert env.rcpt_params == {
        "b@example.net": {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;B+2BX@example.net"},
        "c@example.net": {"NOTIFY": "NEVER"},
    }


async def test_bad_ret_refused(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory()

    def send(s: smtplib.SMTP) -> tuple[int, bytes]:
        s.ehlo()
        return s.mail("a@example.org", ["RET=ALL"])

    code, text = await smtp_session(edge.port, send)
    assert (code, text[:5]) == (501, b"5.5.4")


async def test_smtputf8_addresses(edge_factory: EdgeFactory) -> None:
    store = DictStorage()
    edge = await edge_factory(store)
    body = "Subject: grüße\r\nFrom: jürgen@bücher.example\r\n\r\nviel grüß\r\n".encode()

    def send(s: smtplib.SMTP) -> Any:
        s.ehlo()
        assert "smtputf8" in s.esmtp_features
        s.command_encoding = "utf-8"  # UTF-8 on the wire, but no SMTPUTF8 parameter
        refused_without = s.mail("jürgen@bücher.example")
        s.rset()
        return refused_without, s.sendmail(
            "jürgen@bücher.example", ["zoë@例え.example"], body, ["SMTPUTF8", "BODY=8BITMIME"]
        )

    refused_without, refused = await smtp_session(edge.port, send)
    assert refused_without[0] == 553
    assert refused_without[1].startswith(b"5.6.7")
    assert refused == {}
    [env] = await stored(store)
    assert env.sender == "jürgen@bücher.example"
    assert env.recipients == ["zoë@例え.example"]
    assert env.smtputf8 is True
    assert env.body_type == "8BITMIME"
    assert b"".join(env.flatten()) == body


async def test_edge_stop_closes_sessions(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory()
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    await reader.readline()
    await edge.stop()
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"421 4.3.2")
    writer.close()
