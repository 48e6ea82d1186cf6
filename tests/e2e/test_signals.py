"""SIGHUP reloads the configuration (validated first; live where it can be), systemd hears of
readiness, reloads and shutdown, and SIGTERM stops gracefully."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

from tests.e2e.conftest import DaemonFactory
from tests.e2e.daemon import DaemonProcess
from tests.helpers import until
from tests.integration.smtp.conftest import SinkFactory


def message(tag: str) -> bytes:
    return f"Subject: {tag}\r\nMessage-ID: <{tag}@origin.example>\r\n\r\nbody\r\n".encode()


async def send(daemon: DaemonProcess, tag: str) -> None:
    errors, _ = await aiosmtplib.send(
        message(tag), sender="alice@origin.example", recipients=[f"{tag}@dest.example"],
        hostname="127.0.0.1", port=daemon.port, start_tls=False, timeout=30,
    )  # fmt: skip
    assert errors == {}


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_applies_a_new_route_without_dropping_a_connection(
    daemon_factory: DaemonFactory, sink_factory: SinkFactory, workers: int
) -> None:
    old, new = await sink_factory(), await sink_factory()
    daemon = await daemon_factory(
        {"workers": workers, "routes": {"dest.example": f"[127.0.0.1]:{old.port}"}}
    )
    await daemon.logged("smtpq ready", count=workers)
    await send(daemon, "before")
    await until(lambda: len(old.received) == 1, timeout=30)
    # A client connected before the reload keeps its session through it.
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, start_tls=False)
    await client.connect()
    await client.ehlo(hostname="client.test.example")
    daemon.rewrite(
        {
            "routes": {"dest.example": f"[127.0.0.1]:{new.port}"},
            "edge": {"listen": ["127.0.0.1:1"]},  # not live: named, and kept as it runs
        }
    )
    os.kill(daemon.pid, signal.SIGHUP)
    await daemon.logged("configuration reloaded: routes", count=workers)
    await daemon.logged("listen changed; that needs a restart", count=workers)
    errors, _ = await client.sendmail(
        "alice@origin.example", ["kept@dest.example"], message("kept")
    )
    assert errors == {}
    await client.quit()
    await send(daemon, "after")
    await until(lambda: len(new.received) == 2, timeout=30)
    assert sorted(r.recipients[0] for r in new.received) == ["after@dest.example",
                                                            "kept@dest.example"]  # fmt: skip
    assert len(old.received) == 1
    assert daemon.proc is not None
    assert daemon.proc.poll() is None
    assert await daemon.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_with_a_broken_file_keeps_the_running_configuration(
    daemon_factory: DaemonFactory, sink_factory: SinkFactory, workers: int
) -> None:
    sink = await sink_factory()
    daemon = await daemon_factory(
        {"workers": workers, "routes": {"dest.example": f"[127.0.0.1]:{sink.port}"}}
    )
    await daemon.logged("smtpq ready", count=workers)
    daemon.config.write_text("[edge\n")
    os.kill(daemon.pid, signal.SIGHUP)
    # The supervisor validates first, and passes nothing broken on (one line each).
    await daemon.logged("reload failed: configuration error", count=1)
    daemon.rewrite({"storage": {"type": "tape"}})
    os.kill(daemon.pid, signal.SIGHUP)
    await daemon.logged("reload failed: configuration error", count=2)
    logs = daemon.logs()
    assert "storage.type must be one of disk, journal, redis, memory, not 'tape'" in logs
    assert "Traceback" not in logs
    await send(daemon, "still")
    await until(lambda: len(sink.received) == 1, timeout=30)
    assert daemon.proc is not None
    assert daemon.proc.poll() is None
    # A file that is good again is taken.
    daemon.rewrite({"storage": {"type": "disk"}, "log_level": "debug"})
    os.kill(daemon.pid, signal.SIGHUP)
    await daemon.logged("configuration reloaded: log_level", count=workers)
    assert daemon.logs().count("reload failed") == 2
    assert await daemon.stop(signal.SIGTERM) == 0


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A service manager's notification socket, as systemd passes in $NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


async def notification(sock: socket.socket) -> str:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(30):
        return (await loop.sock_recv(sock, 4096)).decode()


@pytest.mark.parametrize("workers", [1, 2])
async def test_systemd_hears_ready_reloading_and_stopping(
    daemon_factory: DaemonFactory,
    notify_socket: socket.socket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    daemon = await daemon_factory({"workers": workers}, start=False)
    await daemon.start()
    assert await notification(notify_socket) == "READY=1"
    await daemon.logged("smtpq ready", count=workers)  # READY=1 once every worker is
    os.kill(daemon.pid, signal.SIGHUP)
    assert (await notification(notify_socket)).startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert await notification(notify_socket) == "READY=1"
    await daemon.logged("configuration reloaded", count=workers)
    daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert await notification(notify_socket) == "STOPPING=1"
    assert await daemon.stop() == 0
