"""SmtpEdge.reconfigure: what a daemon's SIGHUP gives the edge, over real loopback sessions.

New limits, a renewed certificate and a new credentials file apply to connections accepted
from then on; open sessions carry on; the listening address stays; a config that cannot be
applied changes nothing."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from smtpq import DictStorage, Queue
from smtpq.edge import EdgeConfig, SmtpEdge, hash_password


def make_certificate(cert: Path, key: Path, name: str) -> None:
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "2", "-subj", f"/CN={name}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[SmtpEdge]:
    """An edge on a free port with a certificate of its own (renewable in the test)."""
    make_certificate(tmp_path / "cert.pem", tmp_path / "key.pem", "first")
    queue = Queue(DictStorage())
    await queue.start()
    config = EdgeConfig(
        port=0,
        hostname="mx.smtpq.test",
        max_message_size=1000,
        tls_cert=str(tmp_path / "cert.pem"),
        tls_key=str(tmp_path / "key.pem"),
        reverse_lookup=False,
    )
    edge = SmtpEdge(queue, config)
    await edge.start()
    yield edge
    await edge.stop()
    await queue.stop()


def connect(edge: SmtpEdge) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", edge.port, local_hostname="client.example", timeout=10)
    client.ehlo()
    return client


def send(client: smtplib.SMTP, size: int) -> dict[str, tuple[int, bytes]]:
    body = b"Subject: size\r\n\r\n" + (b"x" * 98 + b"\r\n") * (size // 100)
    return client.sendmail("alice@example.org", ["bob@example.net"], body)


def peer_certificate(edge: SmtpEdge) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with connect(edge) as client:
        client.starttls(context=context)
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


async def test_new_limits_for_new_connections_and_open_ones_carry_on(edge: SmtpEdge) -> None:
    port = edge.port
    old = await asyncio.to_thread(connect, edge)
    assert old.esmtp_features["size"] == "1000"
    edge.reconfigure(replace(edge.config, max_message_size=100_000, host="0.0.0.0", port=1))
    assert edge.port == port  # host and port are not changed
    new = await asyncio.to_thread(connect, edge)
    assert new.esmtp_features["size"] == "100000"
    assert await asyncio.to_thread(send, new, 5000) == {}
    # The session opened before keeps its limits, and is not dropped.
    with pytest.raises(smtplib.SMTPSenderRefused) as big:
        await asyncio.to_thread(send, old, 5000)
    assert big.value.smtp_code == 552
    assert await asyncio.to_thread(send, old, 100) == {}
    for client in (old, new):
        await asyncio.to_thread(client.quit)


async def test_a_renewed_certificate_is_read_again(edge: SmtpEdge, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    assert await asyncio.to_thread(peer_certificate, edge) == der(cert)
    make_certificate(cert, key, "renewed")  # the same paths, as a renewal writes them
    edge.reconfigure(edge.config)
    assert await asyncio.to_thread(peer_certificate, edge) == der(cert)


async def test_a_new_credentials_file_is_read(edge: SmtpEdge, tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text(f"carol:{hash_password('s3cret')}\n")
    edge.reconfigure(replace(edge.config, credentials_file=str(passwd)))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    def login() -> tuple[int, bytes]:
        with connect(edge) as client:
            client.starttls(context=context)
            client.ehlo()
            return client.login("carol", "s3cret")

    code, _ = await asyncio.to_thread(login)
    assert code == 235


async def test_a_config_that_cannot_be_applied_changes_nothing(
    edge: SmtpEdge, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate\n")
    before = edge.config
    with pytest.raises(ssl.SSLError):
        edge.reconfigure(replace(before, tls_cert=str(broken), max_message_size=5))
    with pytest.raises(ValueError, match="auth_required needs credentials_file"):
        edge.reconfigure(replace(before, auth_required=True, max_message_size=5))
    assert edge.config == before
    client = await asyncio.to_thread(connect, edge)
    assert client.esmtp_features["size"] == "1000"
    await asyncio.to_thread(client.quit)
