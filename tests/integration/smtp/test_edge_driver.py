"""The edge's driver over real sockets: one write per pipelined batch, reading paused while a
reply is pending, half-close, STARTTLS input discarded, reconfigure, timeouts on both loops."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smtpq.edge import EdgeConfig, SmtpEdge, hash_password
from smtpq.edge.session import EdgeSession
from tests.integration.smtp.conftest import TlsFiles
from tests.integration.smtp.edge_peers import (
    RUNNERS,
    GatedStorage,
    RawClient,
    make_certificate,
    serving,
    stored,
)

TRANSACTION = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
CONTENT = b"Subject: x\r\n\r\nbody\r\n.\r\n"
MESSAGE = b"DATA\r\n" + CONTENT


def only_session(edge: SmtpEdge) -> EdgeSession:
    [session] = edge._sessions
    return session


def count_writes(session: EdgeSession) -> list[bytes]:
    """The writes the session makes to its transport from now on."""
    transport: Any = session._transport
    writes: list[bytes] = []
    write: Callable[[bytes], None] = transport.write

    def counted(data: bytes) -> None:
        writes.append(data)
        write(data)

    transport.write = counted
    return writes


async def test_one_write_per_pipelined_batch() -> None:
    async with serving() as (edge, store):
        client = await RawClient.connect(edge.port)
        writes = count_writes(only_session(edge))
        await client.send(b"EHLO c\r\n" + TRANSACTION + b"RCPT TO:<c@example.net>\r\nDATA\r\n")
        assert [r[:3] for r in await client.replies(5)] == ["250"] * 4 + ["354"]
        assert len(writes) == 1
        await client.send(b"body\r\n.\r\nNOOP\r\n")
        await client.replies(2)
        assert len(writes) == 2  # the message's 250 (after the store) and the NOOP's, together
        # BDAT: the store is awaited in the middle of the group; its replies still leave once.
        await client.send(TRANSACTION + b"BDAT 4 LAST\r\nbodyQUIT\r\n")
        assert [r[:3] for r in await client.replies(4)] == ["250", "250", "250", "221"]
        assert len(writes) == 3
        assert b"".join(writes[2:]).count(b"\r\n") == 4
        await client.close()
        assert len(await stored(store)) == 2


async def storing(port: int, store: GatedStorage) -> RawClient:
    """A client whose message the edge is storing (held at the gate)."""
    client = await RawClient.connect(port)
    await client.send(b"EHLO c\r\n" + TRANSACTION + b"DATA\r\n")
    await client.replies(4)
    await client.send(CONTENT)
    await store.started.wait()
    return client


async def test_reading_paused_while_the_message_is_stored() -> None:
    store = GatedStorage()
    async with serving(store) as (edge, _):
        client = await storing(edge.port, store)
        session = only_session(edge)
        assert session._transport is not None
        assert not session._transport.is_reading()  # a client cannot pile up input meanwhile
        await client.send(b"NOOP\r\n")
        store.gate.set()
        replies = await client.replies(2)
        assert replies[0].startswith("250 2.6.0 ")
        assert replies[1] == "250 2.0.0 OK"
        assert session._transport.is_reading()
        await client.close()


@pytest.mark.parametrize("loop", list(RUNNERS))
def test_reply_to_the_final_dot_after_the_client_shut_its_side(loop: str) -> None:
    async def scenario() -> None:
        store = GatedStorage()
        async with serving(store) as (edge, _):
            client = await storing(edge.port, store)
            client.writer.write_eof()
            store.gate.set()
            assert (await client.replies(1))[0].startswith("250 2.6.0 Message accepted")
            assert await asyncio.wait_for(client.reader.read(), 10) == b""  # then closed
            await client.close()
            assert len(await stored(store)) == 1

    RUNNERS[loop](scenario())


# -- STARTTLS ---------------------------------------------------------------------------------


def tls_config(tls_files: TlsFiles) -> dict[str, Any]:
    return {"tls_cert": str(tls_files.cert), "tls_key": str(tls_files.key)}


@pytest.mark.parametrize("loop", list(RUNNERS))
def test_input_pipelined_after_starttls_is_never_executed(
    loop: str, tls_files: TlsFiles, client_tls: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        async with serving(**tls_config(tls_files)) as (edge, store):
            client = await RawClient.connect(edge.port)
            await client.send(b"EHLO c\r\n")
            await client.replies(1)
            # A man in the middle appends a whole transaction to the client's STARTTLS.
            injected = TRANSACTION + MESSAGE + b"QUIT\r\n"
            await client.send(b"STARTTLS\r\n" + injected)
            assert await client.replies(1) == ["220 2.0.0 Ready to start TLS"]
            await client.writer.start_tls(client_tls)
            await client.send(b"NOOP\r\nSTARTTLS\r\nMAIL FROM:<a@b.example>\r\n")
            assert await client.replies(3) == [
                "250 2.0.0 OK",
                "503 5.5.1 Error: TLS already active",
                "503 5.5.1 Error: send HELO/EHLO first",  # the session started over
            ]
            await client.send(b"EHLO c\r\n" + TRANSACTION + MESSAGE + b"QUIT\r\n")
            replies = await client.replies(6)
            assert replies[4].startswith("250 2.6.0")
            assert replies[5] == "221 2.0.0 Bye"
            await client.close()
            [env] = await stored(store)  # only the one sent over TLS
        assert env.client["protocol"] == "ESMTPS"

    RUNNERS[loop](scenario())


# -- timeouts and shutdown, on both loops -----------------------------------------------------


@pytest.mark.parametrize("loop", list(RUNNERS))
def test_idle_and_shutdown_421(loop: str) -> None:
    async def scenario() -> None:
        async with serving(timeout=0.3) as (edge, _):
            idle = await RawClient.connect(edge.port)
            await idle.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nDATA\r\n")
            assert (await idle.replies(4))[-1] == "421 4.4.2 mx.smtpq.test Timeout exceeded"
            assert await asyncio.wait_for(idle.reader.read(), 10) == b""
            await idle.close()
        async with serving() as (edge, _):
            busy = await RawClient.connect(edge.port)
            await busy.send(b"EHLO c\r\n" + TRANSACTION)
            await busy.replies(3)  # in a transaction, when the edge stops
            await edge.stop()
            assert await busy.replies(1) == ["421 4.3.2 Service shutting down"]
            assert await asyncio.wait_for(busy.reader.read(), 10) == b""
            await busy.close()

    RUNNERS[loop](scenario())


# -- reconfigure ------------------------------------------------------------------------------


def ehlo_size(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo()
        return s.esmtp_features["size"]


async def test_reconfigure_applies_to_new_connections(tmp_path: Path) -> None:
    async with serving(max_message_size=1000) as (edge, _):
        before = await RawClient.connect(edge.port)
        edge.reconfigure(
            EdgeConfig(
                port=0,
                hostname="mx2.smtpq.test",
                max_message_size=500,
                trusted_networks=(),
                relay_domains=("example.com",),
            )
        )
        assert edge.config.max_message_size == 500
        assert await asyncio.to_thread(ehlo_size, edge.port) == "500"
        after = await RawClient.connect(edge.port)
        for client in (before, after):
            await client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.net>\r\n")
        # The connection accepted before keeps the rules it was accepted under.
        assert "250 SIZE 1000" not in (old := await before.replies(3))
        assert old[-1] == "250 2.1.5 OK"
        assert (await after.replies(3))[-1] == "554 5.7.1 <x@example.net>: Relay access denied"
        await before.close()
        await after.close()


async def test_reconfigure_reloads_certificate_and_credentials(
    tmp_path: Path, tls_files: TlsFiles, client_tls: ssl.SSLContext
) -> None:
    first = tmp_path / "first"
    first.write_text(f"alice:{hash_password('one', scheme='pbkdf2_sha256')}\n")
    second = tmp_path / "second"
    second.write_text(f"bob:{hash_password('two', scheme='pbkdf2_sha256')}\n")
    cert, key = make_certificate(tmp_path, "reloaded")
    config = {**tls_config(tls_files), "credentials_file": str(first)}

    def login(port: int, user: str, password: str) -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.starttls(context=client_tls)
            assert isinstance(s.sock, ssl.SSLSocket)
            peer = ssl.DER_cert_to_PEM_cert(s.sock.getpeercert(binary_form=True) or b"")
            try:
                code = s.login(user, password)[0]
            except smtplib.SMTPAuthenticationError as exc:
                code = exc.smtp_code
            return code, peer

    async with serving(**config) as (edge, _):
        code, peer = await asyncio.to_thread(login, edge.port, "alice", "one")
        assert code == 235
        assert peer.strip() == tls_files.cert.read_text().strip()
        edge.reconfigure(
            EdgeConfig(port=0, tls_cert=str(cert), tls_key=str(key), credentials_file=str(second))
        )
        code, peer = await asyncio.to_thread(login, edge.port, "alice", "one")
        assert code == 535
        assert peer.strip() == cert.read_text().strip()
        code, _ = await asyncio.to_thread(login, edge.port, "bob", "two")
        assert code == 235


async def test_reconfigure_implicit_tls_certificate(
    tmp_path: Path, tls_files: TlsFiles, client_tls: ssl.SSLContext
) -> None:
    cert, key = make_certificate(tmp_path, "reloaded")

    def served(port: int) -> str:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls, timeout=10) as s:
            assert isinstance(s.sock, ssl.SSLSocket)
            return ssl.DER_cert_to_PEM_cert(s.sock.getpeercert(binary_form=True) or b"")

    async with serving(**tls_config(tls_files), implicit_tls=True) as (edge, _):
        assert (
            await asyncio.to_thread(served, edge.port)
        ).strip() == tls_files.cert.read_text().strip()
        edge.reconfigure(
            EdgeConfig(port=0, tls_cert=str(cert), tls_key=str(key), implicit_tls=True)
        )
        assert (await asyncio.to_thread(served, edge.port)).strip() == cert.read_text().strip()


async def test_reconfigure_refuses_a_bad_configuration() -> None:
    async with serving(max_message_size=1000) as (edge, _):
        with pytest.raises(ValueError, match="need"):
            edge.reconfigure(EdgeConfig(require_tls=True))
        with pytest.raises(OSError, match="No such file"):
            edge.reconfigure(EdgeConfig(tls_cert="/nonexistent/cert.pem"))
        assert edge.config.max_message_size == 1000
        assert await asyncio.to_thread(ehlo_size, edge.port) == "1000"
