"""Every start-up failure is one line on standard error naming the path or address, and exit
code 2: never a traceback, and nothing logged as "stopped" first."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from smtpq.storage.lock import ShardLock
from tests.e2e.conftest import DaemonFactory
from tests.e2e.daemon import DaemonProcess
from tests.integration.smtp.conftest import free_port

# Each case: settings, and a function that sets the trap (given the daemon, the test's
# ExitStack) and returns the expected line.
Trap = Callable[[DaemonProcess, ExitStack], str]


def listening(port: int, stack: ExitStack) -> None:
    sock = stack.enter_context(socket.socket())
    sock.bind(("127.0.0.1", port))
    sock.listen()


def port_in_use(daemon: DaemonProcess, stack: ExitStack) -> str:
    listening(daemon.port, stack)
    return f"smtpq: cannot listen on 127.0.0.1:{daemon.port}: Address already in use"


def admin_port_in_use(daemon: DaemonProcess, stack: ExitStack) -> str:
    port = free_port()
    listening(port, stack)
    daemon.rewrite({"admin": {"listen": f"127.0.0.1:{port}", "token": "secret"}})
    return f"smtpq: cannot listen on 127.0.0.1:{port}: Address already in use"


def queue_dir_denied(daemon: DaemonProcess, stack: ExitStack) -> str:
    daemon.queue_dir.mkdir(mode=0o500)
    stack.callback(daemon.queue_dir.chmod, 0o700)
    return f"smtpq: cannot use queue directory {daemon.queue_dir / 'shard-0'}: Permission denied"


def admin_socket_denied(daemon: DaemonProcess, stack: ExitStack) -> str:
    where = daemon.tmp / "run"
    where.mkdir(mode=0o500)
    stack.callback(where.chmod, 0o700)
    daemon.rewrite({"admin": {"socket": str(where / "admin.sock")}})
    return f"smtpq: cannot create admin socket {where / 'admin.sock'}: Permission denied"


def lock_held(daemon: DaemonProcess, stack: ExitStack) -> str:
    shard = daemon.queue_dir / "shard-0"
    shard.mkdir(parents=True)
    stack.enter_context(ShardLock(shard))
    return f"smtpq: queue directory {shard} is in use by process {os.getpid()}"


def bad_config(daemon: DaemonProcess, stack: ExitStack) -> str:
    daemon.rewrite({"storage": {"type": "tape"}})
    why = "storage.type must be one of disk, journal, redis, memory, not 'tape'"
    return f"smtpq: configuration error: {why}"


def bad_certificate(daemon: DaemonProcess, stack: ExitStack) -> str:
    cert = daemon.tmp / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    daemon.rewrite({"edge": {"tls_cert": str(cert)}})
    why = "not a PEM certificate and key"
    return f"smtpq: configuration error: edge.tls_cert {cert}: cannot load: {why}"


def other_layout(daemon: DaemonProcess, stack: ExitStack) -> str:
    shard = daemon.queue_dir / "shard-0"
    (shard / "journal").mkdir(parents=True)
    (shard / "journal" / "00000001.log").write_bytes(b"smtpq-journal 1\n")
    return (
        f"smtpq: queue directory {shard} holds a journal queue, not storage.type = disk"
        " (deliver or move its mail first, or set storage.type = journal)"
    )


TRAPS: dict[str, Trap] = {
    "port in use": port_in_use,
    "admin port in use": admin_port_in_use,
    "queue directory denied": queue_dir_denied,
    "admin socket denied": admin_socket_denied,
    "lock held": lock_held,
    "bad config": bad_config,
    "bad certificate": bad_certificate,
    "a queue of the other type": other_layout,
}


@pytest.fixture
def traps() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", list(TRAPS))
async def test_start_up_error_is_one_line_and_exit_2(
    daemon_factory: DaemonFactory, traps: ExitStack, case: str, workers: int
) -> None:
    daemon = await daemon_factory({"workers": workers}, start=False, obey_permissions=True)
    expected = TRAPS[case](daemon, traps)
    code, out, err = await daemon.cli("serve")
    assert (code, out) == (2, "")
    assert err.splitlines() == [expected]


async def test_config_file_not_found(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    daemon = await daemon_factory({}, start=False)
    daemon.config.unlink()
    code, out, err = await daemon.cli("serve")
    assert (code, out) == (2, "")
    assert err == f"smtpq: configuration error: config file {daemon.config} not found\n"
