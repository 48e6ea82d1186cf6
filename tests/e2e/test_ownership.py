"""One owner per queue: a second daemon or a changing offline command on a locked queue refuses
at once (one line, exit 2) and leaves the running daemon exactly as it was."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiosmtplib
import pytest

from smtpq.daemon.client import AdminClient
from smtpq.storage.lock import ShardLock
from tests.e2e.conftest import DaemonFactory
from tests.e2e.daemon import DaemonProcess
from tests.integration.smtp.conftest import free_port
from tests.integration.smtp.sink import Sink


async def send(daemon: DaemonProcess, rcpt: str) -> None:
    errors, _ = await aiosmtplib.send(
        b"Subject: hello\r\n\r\nbody\r\n", sender="alice@origin.example", recipients=[rcpt],
        hostname="127.0.0.1", port=daemon.port, start_tls=False,
    )  # fmt: skip
    assert errors == {}


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def files(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory`` with its inode and modification time."""
    return {
        str(p.relative_to(directory)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
    }


@pytest.mark.parametrize("workers", [1, 2])
async def test_second_daemon_on_one_queue_refuses_and_the_first_serves_on(
    daemon_factory: DaemonFactory, sink: Sink, tmp_path: Path, workers: int
) -> None:
    routes = {"dest.example": f"[127.0.0.1]:{sink.port}"}
    first = await daemon_factory({"workers": workers, "routes": routes})
    await first.logged("smtpq ready", count=workers)
    await first.logged(" loaded: ", count=workers)  # the queues' directories are all made
    admin = first.queue_dir / "shard-0" / "admin.sock"
    before = files(first.queue_dir)
    # The same queue, on the same port and on another one: the lock answers first either way.
    for port in (first.port, free_port()):
        where = tmp_path / f"second-{port}"
        where.mkdir()
        second = await daemon_factory(
            {"workers": workers, "storage": {"path": str(first.queue_dir)},
             "edge": {"listen": [f"127.0.0.1:{port}"]}},
            start=False, where=where,
        )  # fmt: skip
        code, _, err = await second.cli("serve")
        assert code == 2
        shard = first.queue_dir / "shard-0"
        assert one_line(err) == f"smtpq: queue directory {shard} is in use by process {first.pid}"
    # Nothing of the first daemon's was touched: its admin socket still answers, its files
    # are the same files, and it still takes and delivers mail.
    assert files(first.queue_dir) == before
    assert await AdminClient(admin).available()
    await send(first, "after@dest.example")
    await sink_wait(sink, 1)


async def sink_wait(sink: Sink, count: int) -> None:
    async with asyncio.timeout(30):
        while len(sink.received) < count:  # noqa: ASYNC110 - polls the sink
            await asyncio.sleep(0.01)


async def test_second_daemon_on_a_busy_port_or_admin_socket_leaves_the_first_alone(
    daemon_factory: DaemonFactory, sink: Sink, tmp_path: Path
) -> None:
    shared = tmp_path / "run" / "admin.sock"
    first = await daemon_factory({"admin": {"socket": str(shared)}})
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    busy_port = await daemon_factory(
        {"storage": {"path": str(elsewhere / "queue")},
         "edge": {"listen": [f"127.0.0.1:{first.port}"]}},
        start=False, where=elsewhere,
    )  # fmt: skip
    code, _, err = await busy_port.cli("serve")
    assert code == 2
    assert one_line(err) == (
        f"smtpq: cannot listen on 127.0.0.1:{first.port}: Address already in use"
    )
    busy_socket = await daemon_factory(
        {"storage": {"path": str(elsewhere / "queue2")}, "admin": {"socket": str(shared)}},
        start=False, where=elsewhere,
    )  # fmt: skip
    code, _, err = await busy_socket.cli("serve")
    assert code == 2
    assert one_line(err) == f"smtpq: admin socket {shared} is in use by a running daemon"
    assert await AdminClient(shared).available()
    assert first.proc is not None
    assert first.proc.poll() is None


async def test_offline_commands_respect_the_lock_and_never_create_a_queue(
    daemon_factory: DaemonFactory, sink: Sink, tmp_path: Path
) -> None:
    sink.behaviour.rcpt["later"] = "451 4.2.1 Not now"
    daemon = await daemon_factory(
        {"routes": {"dest.example": f"[127.0.0.1]:{sink.port}"},
         "retry": {"initial": 3600.0, "maximum": 3600.0}}
    )  # fmt: skip
    await send(daemon, "later@dest.example")
    await daemon.logged("deferred id=")
    assert await daemon.stop() == 0
    shard = daemon.queue_dir / "shard-0"
    # Another process holds the queue (as a daemon starting up would, before its admin socket
    # answers): a command that would change the queue refuses, naming the holder.
    with ShardLock(shard):
        code, _, err = await daemon.cli("queue", "delete", "--all", "-y")
        assert code == 2
        assert one_line(err) == f"smtpq: queue directory {shard} is in use by process {os.getpid()}"
    code, out, err = await daemon.cli("queue", "delete", "--all", "-y")
    assert (code, out) == (0, "delete: 1 message\n"), err
    # A directory that holds no queue is said to, and is not created.
    missing = tmp_path / "nothing-here"
    code, _, err = await daemon.cli("queue", "flush", "--all", "--queue-dir", str(missing))
    assert code == 2
    assert one_line(err).startswith(f"smtpq: no queue in {missing}")
    assert not missing.exists()
    # A shard directory with nothing in it is no queue either, and nothing is made in it.
    empty = tmp_path / "empty"
    (empty / "shard-0").mkdir(parents=True)
    for command in (["list"], ["flush", "--all"]):
        code, _, err = await daemon.cli("queue", *command, "--queue-dir", str(empty))
        assert code == 2
        assert one_line(err) == f"smtpq: no queue in {empty}"
    assert list(empty.rglob("*")) == [empty / "shard-0"]
