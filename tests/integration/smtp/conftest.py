"""Fixtures for the SMTP tests: a self-signed certificate, TLS contexts, sinks, a DNS server."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.smtp.dnsserver import DnsServer, Zone
from tests.integration.smtp.sink import Sink


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for localhost / 127.0.0.1 and its key."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Made once per session with openssl, at test time (nothing secret is committed)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return TlsFiles(cert, key)


@pytest.fixture
def client_tls() -> ssl.SSLContext:
    """A client context that accepts the self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


SinkFactory = Callable[..., Awaitable[Sink]]


@pytest.fixture
async def sink_factory() -> AsyncIterator[SinkFactory]:
    """Start sinks (:class:`Sink` arguments); all are stopped after the test."""
    sinks: list[Sink] = []

    async def make(*args: Any, **kwargs: Any) -> Sink:
        sink = await Sink(*args, **kwargs).start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        await sink.stop()


@pytest.fixture
async def sink(sink_factory: SinkFactory) -> Sink:
    """A plain sink on 127.0.0.1."""
    return await sink_factory()


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    """A DNS server with an empty zone; tests fill ``dns_server.zone``."""
    server = await DnsServer(Zone()).start()
    yield server
    await server.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
