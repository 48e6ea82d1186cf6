"""The edge's limits over real sockets on loopback: connections (in all, per client, per minute),
errors, failed AUTH, time (per read, DATA rate, session length), commands, pre-greet talkers,
strict syntax, routing tricks, the recipient map, size. Each limit is reached, its reply checked,
and a normal client is served meanwhile. Clients come from several loopback addresses
(127.0.0.2, 127.0.0.3) so that one can be at its limits while another is not."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from smtpq.clock import SystemClock
from smtpq.daemon.metrics import Metrics
from smtpq.edge import EdgeConfig, SmtpEdge
from smtpq.edge.auth import VERIFIERS
from smtpq.edge.session import EdgeSession
from tests.integration.smtp.conftest import TlsFiles
from tests.integration.smtp.edge_peers import RUNNERS, RawClient, serving, stored

# Untrusted clients (loopback is trusted by default), sending to a domain we accept mail for.
UNTRUSTED: dict[str, Any] = {"trusted_networks": (), "relay_domains": ("example.net",)}
HELLO = b"EHLO client.example\r\n"
TRANSACTION = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
MESSAGE = b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"


async def connect(port: int, source: str = "127.0.0.2", **kwargs: Any) -> RawClient:
    """A connection from ``source``, its greeting not read yet."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0), **kwargs
    )
    return RawClient(reader, writer)


async def greeted(port: int, source: str = "127.0.0.2") -> RawClient:
    client = await connect(port, source)
    assert (await client.replies(1))[0].startswith("220 ")
    return client


async def turned_away(port: int, source: str = "127.0.0.2") -> str:
    """The one reply a refused connection gets, after which it is closed."""
    client = await connect(port, source)
    [reply] = await client.replies(1)
    assert await asyncio.wait_for(client.reader.read(), 10) == b""
    await client.close()
    return reply


async def deliver(port: int, source: str = "127.0.0.3") -> str:
    """A whole, normal session; the reply to its message."""
    client = await greeted(port, source)
    await client.send(HELLO + TRANSACTION + MESSAGE + b"QUIT\r\n")
    replies = await client.replies(6)
    assert replies[5] == "221 2.0.0 Bye"
    await client.close()
    return replies[4]


async def closed(client: RawClient) -> bool:
    """Whether the edge closed the connection (after its last reply)."""
    rest = await asyncio.wait_for(client.reader.read(), 10)
    await client.close()
    return rest == b""


def session_of(edge: SmtpEdge, port_of_client: int) -> EdgeSession:
    [session] = [s for s in edge._sessions if s._transport is not None
                 and s._transport.get_extra_info("peername")[1] == port_of_client]  # fmt: skip
    return session


# -- connections -------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", list(RUNNERS))
def test_client_connection_limit(loop: str, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with serving(**UNTRUSTED, max_client_connections=3) as (edge, store):
            clients = [await greeted(edge.port) for _ in range(3)]
            for _ in range(4):
                reply = await turned_away(edge.port)
                assert reply == "421 4.7.0 mx.smtpq.test Error: too many connections from 127.0.0.2"
            # Another address is served meanwhile.
            assert (await deliver(edge.port, "127.0.0.3")).startswith("250 2.6.0")
            await clients[0].close()
            await asyncio.sleep(0.1)
            again = await greeted(edge.port)  # room again, once one has closed
            assert edge.refusals["client_connection_limit"] == 4
            assert edge.connections == 3
            for client in [again, *clients[1:]]:
                await client.close()
            assert len(await stored(store)) == 1

    caplog.set_level(logging.INFO, "smtpq.edge")
    RUNNERS[loop](scenario())
    lines = [r for r in caplog.records if "refused: over the limit" in r.getMessage()]
    assert len(lines) == 1  # once a minute per client, not once per refusal
    assert "127.0.0.2" in lines[0].getMessage()


async def test_over_implicit_tls_a_refused_connection_hears_its_421_too(
    tls_files: TlsFiles, client_tls: ssl.SSLContext
) -> None:
    tls: dict[str, Any] = {
        "tls_cert": str(tls_files.cert),
        "tls_key": str(tls_files.key),
        "implicit_tls": True,
    }
    # timeout: the bound of a refused client's handshake too (at most REFUSAL_HANDSHAKE_TIMEOUT)
    async with serving(**UNTRUSTED, **tls, max_client_connections=1, timeout=1.0) as (edge, _):
        first = await connect(edge.port, ssl=client_tls)
        assert (await first.replies(1))[0].startswith("220 ")
        refused = await connect(edge.port, ssl=client_tls)
        assert await refused.replies(1) == [
            "421 4.7.0 mx.smtpq.test Error: too many connections from 127.0.0.2"
        ]
        assert await closed(refused)
        # A client that never completes the handshake is closed without a word.
        silent = await connect(edge.port)
        assert await closed(silent)
        assert edge.refusals["client_connection_limit"] == 2
        await first.close()


async def test_connection_limit_in_all() -> None:
    async with serving(max_connections=2) as (edge, _):
        first = await greeted(edge.port, "127.0.0.2")
        second = await greeted(edge.port, "127.0.0.3")
        assert await turned_away(edge.port, "127.0.0.4") == (
            "421 4.7.0 mx.smtpq.test Error: too many connections"
        )
        await first.close()
        await asyncio.sleep(0.1)
        assert (await deliver(edge.port, "127.0.0.4")).startswith("250 2.6.0")
        await second.close()
        assert edge.refusals["connection_limit"] == 1


async def test_client_connection_rate() -> None:
    async with serving(**UNTRUSTED, max_client_connection_rate=3) as (edge, _):
        for _ in range(3):
            await (await greeted(edge.port)).close()
        assert (await turned_away(edge.port)).startswith("421 4.7.0 ")
        assert (await deliver(edge.port, "127.0.0.3")).startswith("250 2.6.0")
        assert edge.refusals["client_rate_limit"] == 1


async def test_trusted_networks_are_exempt_from_the_per_client_limits() -> None:
    async with serving(max_client_connections=1, max_client_connection_rate=1) as (edge, _):
        clients = [await greeted(edge.port) for _ in range(3)]  # 127.0.0.0/8 is trusted
        for client in clients:
            await client.close()


# -- errors and AUTH ---------------------------------------------------------------------------


async def test_refused_recipients_reach_the_hard_error_limit() -> None:
    async with serving(**UNTRUSTED, error_delay=0.01) as (edge, _):
        client = await greeted(edge.port)
        rcpts = b"".join(b"RCPT TO:<user%d@elsewhere.example>\r\n" % n for n in range(25))
        await client.send(HELLO + b"MAIL FROM:<a@example.org>\r\n" + rcpts)
        replies = await client.replies(2 + 20 + 1)
        assert replies[2:22] == [
            f"554 5.7.1 <user{n}@elsewhere.example>: Relay access denied" for n in range(20)
        ]
        assert replies[22] == "421 4.7.0 Error: too many errors"
        assert await closed(client)
        assert edge.refusals["relay_denied"] == 20
        assert edge.refusals["error_limit"] == 1
        assert (await deliver(edge.port)).startswith("250 2.6.0")


async def test_errors_past_the_soft_limit_are_answered_late() -> None:
    delay = 0.3
    async with serving(soft_error_limit=2, hard_error_limit=5, error_delay=delay) as (edge, _):
        client = await greeted(edge.port)
        await client.send(b"FOO\r\n" * 2)
        assert len(await client.replies(2)) == 2  # within the soft limit: at once
        started = time.monotonic()
        await client.send(b"FOO\r\n" * 4)
        replies = await client.replies(4)
        # Errors 3 and 4 came each after the delay; the 5th reached the hard limit: its reply
        # and the 421 came at once.
        assert time.monotonic() - started >= 2 * delay
        assert replies[-1] == "421 4.7.0 Error: too many errors"
        assert await closed(client)


def credentials(tmp_path: Path) -> Path:
    """alice's password as scrypt with a cost 16 times lower than smtpq's (n = 2**10): the
    checks are all the same work, only quicker."""
    salt = b"s" * 16
    key = hashlib.scrypt(b"right", salt=salt, n=2**10, r=8, p=1, dklen=32)
    encoded = f"scrypt$1024$8$1${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"
    path = tmp_path / "passwd"
    path.write_text(f"alice:{encoded}\n")
    return path


def auth_config(tls_files: TlsFiles, tmp_path: Path) -> dict[str, Any]:
    return {
        "tls_cert": str(tls_files.cert),
        "tls_key": str(tls_files.key),
        "implicit_tls": True,
        "credentials_file": str(credentials(tmp_path)),
        "error_delay": 0.01,
    }


async def guess(port: int, client_tls: ssl.SSLContext, source: str) -> list[str]:
    """Three wrong passwords in a row; the replies, then the edge's last word."""
    client = await connect(port, source, ssl=client_tls)
    await client.replies(1)
    await client.send(HELLO)
    await client.replies(1)
    replies: list[str] = []
    for n in range(3):
        await client.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0guess%d" % n) + b"\r\n")
        replies += await client.replies(1)
    replies += await client.replies(1)
    assert await closed(client)
    return replies


async def test_auth_guessing_is_cut_off_and_bounded(
    tls_files: TlsFiles,
    tmp_path: Path,
    client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "smtpq.edge")
    async with serving(**auth_config(tls_files, tmp_path)) as (edge, _):
        most = 0
        stop = asyncio.Event()

        async def watch() -> None:
            nonlocal most
            while not stop.is_set():
                running = [t for t in threading.enumerate() if t.name.startswith("smtpq-auth")]
                most = max(most, len(running))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        sources = [f"127.0.0.{n}" for n in range(10, 18)]
        results = await asyncio.gather(*(guess(edge.port, client_tls, s) for s in sources))
        stop.set()
        await watcher
        for replies in results:
            assert replies == ["535 5.7.8 Authentication credentials invalid"] * 3 + [
                "421 4.7.0 Error: too many failed authentications"
            ]
        assert edge.refusals["auth_failed"] == 8 * 3
        assert edge.refusals["auth_limit"] == 8
        failed = [
            r.getMessage() for r in caplog.records if r.getMessage().startswith("AUTH failed")
        ]
        assert sorted(set(failed)) == [f"AUTH failed for 'alice' from {s}" for s in sources]
        # Eight guessers at once, and never more than the process's few verifier threads.
        assert 1 <= most <= VERIFIERS


# -- time ------------------------------------------------------------------------------------


async def test_a_trickle_of_content_is_cut_off() -> None:
    async with serving(timeout=1.0, min_data_rate=1000) as (edge, _):
        client = await greeted(edge.port)
        await client.send(HELLO + TRANSACTION + b"DATA\r\n")
        await client.replies(4)
        reply: list[str] = []
        for _ in range(100):  # a byte every 0.1 s: 10 B/s, well under 1000 B/s
            try:
                await client.send(b"x")
            except ConnectionError:
                break
            try:
                reply = await asyncio.wait_for(client.replies(1), 0.1)
                break
            except TimeoutError:
                continue
        assert reply == ["421 4.4.2 mx.smtpq.test Timeout exceeded"]
        assert edge.refusals["data_rate"] == 1


async def test_a_slow_steady_message_completes_past_the_timeout() -> None:
    async with serving(timeout=2.0, min_data_rate=100) as (edge, store):
        client = await greeted(edge.port)
        await client.send(HELLO + TRANSACTION + b"DATA\r\n")
        await client.replies(4)
        started = time.monotonic()
        await client.send(b"Subject: slow\r\n\r\n")
        for _ in range(30):  # 30 x 200 octets, 0.1 s apart: ~2,000 B/s, 3 s in all
            await client.send(b"y" * 198 + b"\r\n")
            await asyncio.sleep(0.1)
        await client.send(b".\r\n")
        assert (await client.replies(1))[0].startswith("250 2.6.0")
        assert time.monotonic() - started > 2.0  # longer than the timeout: no one deadline
        await client.close()
        [env] = await stored(store)
        assert len(env.body) == 30 * 200


async def test_session_length_and_command_count() -> None:
    async with serving(max_session_time=0.5) as (edge, _):
        client = await greeted(edge.port)
        replies: list[str] = []
        for _ in range(100):
            try:
                await client.send(b"NOOP\r\n")
                replies += await client.replies(1)
            except ConnectionError:
                break
            if replies[-1].startswith("421"):
                break
            await asyncio.sleep(0.05)
        assert replies[-1] == "421 4.7.0 mx.smtpq.test Error: session time limit exceeded"
        assert edge.refusals["session_limit"] == 1
    async with serving(max_commands=4) as (edge, _):
        client = await greeted(edge.port)
        await client.send(b"NOOP\r\n" * 6)
        replies = await client.replies(5)
        assert replies[-1] == "421 4.7.0 Error: too many commands"
        assert await closed(client)
        assert edge.refusals["command_limit"] == 1


async def test_pre_greet_talkers_are_refused() -> None:
    async with serving(greet_delay=0.3) as (edge, _):
        talker = await connect(edge.port)
        await talker.send(HELLO)
        assert await talker.replies(1) == ["554 Error: commands sent before the greeting"]
        assert await closed(talker)
        # A client that waits for the greeting is served.
        assert (await deliver(edge.port)).startswith("250 2.6.0")
        assert edge.refusals["pregreet"] == 1


# -- syntax and routing ------------------------------------------------------------------------


async def test_latin1_hello_name_is_refused_at_ehlo(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving() as (edge, store):
        client = await greeted(edge.port)
        await client.send(b"EHLO caf\xe9.example\r\nNOOP\r\nMAIL F\0ROM:<a\0@b>\r\n")
        assert await client.replies(3) == [
            "501 5.5.2 Error: invalid HELO/EHLO name",
            "250 2.0.0 OK",
            "500 5.5.2 Error: NUL character in command",
        ]
        await client.send(HELLO + TRANSACTION + MESSAGE)
        replies = await client.replies(5)
        assert replies[-1].startswith("250 2.6.0")  # not the 451 after DATA it used to be
        await client.close()
        [env] = await stored(store)
        assert env.client["name"] == "client.example"
    assert "\0" not in caplog.text


@pytest.mark.parametrize(
    "recipient",
    ["user%elsewhere.example@example.net", "elsewhere!user@example.net",
     '"user@elsewhere.example"@example.net'],
)  # fmt: skip
async def test_untrusted_routing_is_refused(recipient: str) -> None:
    async with serving(**UNTRUSTED) as (edge, _):
        client = await greeted(edge.port)
        rcpt = f"RCPT TO:<{recipient}>\r\nRCPT TO:<user@example.net>\r\n".encode()
        await client.send(HELLO + b"MAIL FROM:<a@example.org>\r\n" + rcpt)
        replies = await client.replies(4)
        assert replies[2] == f"554 5.7.1 <{recipient}>: Relay access denied"
        assert replies[3] == "250 2.1.5 OK"
        await client.close()
        assert edge.refusals["untrusted_routing"] == 1
    async with serving(relay_domains=("example.net",)) as (edge, _):  # a trusted client may
        client = await greeted(edge.port)
        await client.send(
            HELLO + f"MAIL FROM:<a@example.org>\r\nRCPT TO:<{recipient}>\r\n".encode()
        )
        assert (await client.replies(3))[2] == "250 2.1.5 OK"
        await client.close()


@pytest.mark.parametrize("postmaster", [None, "hostmaster@example.net"])
async def test_postmaster_without_a_domain(postmaster: str | None) -> None:
    async with serving(**UNTRUSTED, postmaster=postmaster) as (edge, store):
        client = await greeted(edge.port)
        await client.send(HELLO + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<Postmaster>\r\n")
        assert (await client.replies(3))[2] == "250 2.1.5 OK"
        await client.send(b"RCPT TO:<root>\r\n" + MESSAGE)
        replies = await client.replies(3)
        assert replies[0] == "550 5.1.3 Recipient address must include a domain"
        assert replies[2].startswith("250 2.6.0")
        await client.close()
        [env] = await stored(store)
        assert env.recipients == [postmaster or "postmaster@mx.smtpq.test"]


async def test_recipient_map_refuses_unknown_recipients_and_is_reloaded(tmp_path: Path) -> None:
    known = tmp_path / "recipients"
    known.write_text("alice@example.net\n@lists.example.net\n")
    config = {**UNTRUSTED, "relay_domains": ("example.net", ".example.net")}
    async with serving(**config, recipient_map=str(known)) as (edge, _):
        client = await greeted(edge.port)
        rcpts = b"".join(
            f"RCPT TO:<{a}>\r\n".encode()
            for a in ("alice@example.net", "bob@example.net", "any@lists.example.net")
        )
        await client.send(HELLO + b"MAIL FROM:<a@example.org>\r\n" + rcpts)
        replies = await client.replies(5)
        assert replies[2:] == [
            "250 2.1.5 OK",
            "550 5.1.1 <bob@example.net>: Recipient address rejected: "
            "User unknown in relay recipient table",
            "250 2.1.5 OK",
        ]
        await client.close()
        known.write_text("alice@example.net\nbob@example.net\n")
        edge.reconfigure(EdgeConfig(port=0, hostname="mx.smtpq.test", recipient_map=str(known),
                                    **config))  # fmt: skip
        client = await greeted(edge.port)
        await client.send(HELLO + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.net>\r\n")
        assert (await client.replies(3))[2] == "250 2.1.5 OK"
        await client.close()
        assert edge.refusals["unknown_recipient"] == 1
        with pytest.raises(ValueError, match="recipient_map"):
            EdgeConfig(recipient_map=str(tmp_path / "missing"))


# -- memory, half-close -----------------------------------------------------------------------


async def test_an_oversize_message_is_not_held() -> None:
    async with serving(max_message_size=10_000) as (edge, store):
        client = await greeted(edge.port)
        await client.send(HELLO + TRANSACTION + b"DATA\r\n")
        await client.replies(4)
        [session] = edge._sessions
        await client.send(b"x" * 9_000 + b"\r\n")
        await asyncio.sleep(0.1)
        assert len(session._content) == 9_000  # the CRLF waits: it may begin the final dot
        for _ in range(50):  # 100 kB more: refused, and not kept
            await client.send(b"z" * 1_998 + b"\r\n")
        await client.send(b".\r\n")
        reply = await client.replies(1)
        assert reply == ["552 5.3.4 Message size exceeds fixed maximum message size"]
        assert len(session._content) == 0
        await client.close()
        assert await stored(store) == []


@pytest.mark.parametrize("loop", list(RUNNERS))
def test_reply_to_the_final_dot_right_after_a_half_close(loop: str) -> None:
    async def scenario() -> None:
        async with serving() as (edge, store):
            client = await greeted(edge.port)
            await client.send(HELLO + TRANSACTION + MESSAGE)
            client.writer.write_eof()
            replies = await client.replies(5)
            assert replies[-1].startswith("250 2.6.0")
            assert await closed(client)
            assert len(await stored(store)) == 1

    RUNNERS[loop](scenario())


# -- metrics ------------------------------------------------------------------------------------


async def test_refusals_are_served_as_metrics() -> None:
    async with serving(**UNTRUSTED, max_client_connections=1) as (edge, store):
        metrics = Metrics(store, SystemClock())
        metrics.add_edge(edge)
        held = await greeted(edge.port)
        await turned_away(edge.port)
        client = await greeted(edge.port, "127.0.0.3")
        await client.send(HELLO + b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@elsewhere.example>\r\n")
        await client.replies(3)
        text = (await metrics.render()).decode()
        assert 'smtpq_edge_refusals_total{reason="client_connection_limit"} 1.0' in text
        assert 'smtpq_edge_refusals_total{reason="relay_denied"} 1.0' in text
        assert 'smtpq_edge_refusals_total{reason="error_limit"} 0.0' in text
        assert "smtpq_edge_connections 2.0" in text
        assert "smtpq_edge_accept_pauses_total 0.0" in text
        for c in (held, client):
            await c.close()
