"""``workers = 2``: workers die with their supervisor, and a worker that dies is restarted."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiosmtplib

from smtpq.daemon.client import AdminClient
from tests.e2e.conftest import DaemonFactory
from tests.e2e.daemon import DaemonProcess, alive, gone
from tests.helpers import until
from tests.integration.smtp.sink import Sink
from tests.redis_server import RedisServer


async def send(daemon: DaemonProcess, rcpt: str) -> None:
    message = f"Subject: {rcpt}\r\nMessage-ID: <{rcpt}>\r\n\r\nbody\r\n".encode()
    errors, _ = await aiosmtplib.send(
        message, sender="alice@origin.example", recipients=[rcpt],
        hostname="127.0.0.1", port=daemon.port, start_tls=False, timeout=30,
    )  # fmt: skip
    assert errors == {}


def listening_unix_sockets(path: Path) -> int:
    """How many listening Unix sockets were bound to ``path`` (even if since unlinked)."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    # Num RefCount Protocol Flags Type St Inode Path: Flags 00010000 is __SO_ACCEPTCON.
    return sum(
        1 for line in lines if line.split()[-1] == str(path) and line.split()[3] == "00010000"
    )


def delivered(sink: Sink) -> list[str]:
    return sorted(r.recipients[0] for r in sink.received)


async def test_sigkill_of_the_supervisor_takes_the_workers_and_a_restart_delivers_once(
    daemon_factory: DaemonFactory, sink: Sink
) -> None:
    sink.behaviour.rcpt["later"] = "451 4.2.1 Not now"
    daemon = await daemon_factory(
        {
            "workers": 2,
            "routes": {"dest.example": f"[127.0.0.1]:{sink.port}"},
            "retry": {"initial": 3600.0, "maximum": 3600.0},
        }
    )
    await daemon.logged("all 2 workers ready")
    later = [f"later{n}@dest.example" for n in range(10)]
    rcpts = [f"r{n}@dest.example" for n in range(10)] + later
    sink.behaviour.rcpt.update({r.split("@")[0]: "451 4.2.1 Not now" for r in later})
    for rcpt in rcpts:
        await send(daemon, rcpt)
    await until(lambda: len(sink.received) == 10, timeout=30)
    await daemon.logged("deferred id=", count=10)
    workers = daemon.workers()
    assert len(workers) == 2
    os.kill(daemon.pid, signal.SIGKILL)
    # The kernel kills each worker as its parent dies (PR_SET_PDEATHSIG): none serves on.
    await gone(workers, timeout=5)
    assert await daemon.stop() == -signal.SIGKILL
    sink.behaviour.rcpt.clear()
    await daemon.start()
    await daemon.logged("all 2 workers ready", count=2)
    code, _, err = await daemon.cli("queue", "flush", "--all")
    assert code == 0, err
    await until(lambda: len(sink.received) == 20, timeout=30)
    await asyncio.sleep(1)  # time for a second copy to arrive, were there one
    assert delivered(sink) == sorted(rcpts)


async def test_a_killed_worker_is_restarted_and_mail_is_still_served(
    daemon_factory: DaemonFactory, sink: Sink
) -> None:
    daemon = await daemon_factory(
        {"workers": 2, "routes": {"dest.example": f"[127.0.0.1]:{sink.port}"}}
    )
    await daemon.logged("all 2 workers ready")
    before = sorted(daemon.workers())
    victim = before[1]
    os.kill(victim, signal.SIGKILL)
    await daemon.logged(f"(pid {victim}) was killed by SIGKILL; restarting it in 0.5 s")
    await daemon.logged("smtpq ready", count=3)
    after = sorted(daemon.workers())
    assert len(after) == 2
    assert victim not in after
    assert before[0] in after
    rcpts = [f"r{n}@dest.example" for n in range(20)]
    await asyncio.gather(*(send(daemon, rcpt) for rcpt in rcpts))
    await until(lambda: len(sink.received) == 20, timeout=30)
    assert delivered(sink) == sorted(rcpts)
    assert await daemon.stop(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in after)


async def test_a_worker_that_cannot_start_stops_the_daemon_with_exit_2(
    daemon_factory: DaemonFactory, sink: Sink
) -> None:
    daemon = await daemon_factory(
        {"workers": 2, "routes": {"dest.example": f"[127.0.0.1]:{sink.port}"}},
        obey_permissions=True,
    )
    await daemon.logged("all 2 workers ready")
    shard = daemon.queue_dir / "shard-1"
    victim = [pid for pid in daemon.workers() if f"worker 1 started: pid {pid}" in daemon.logs()]
    # Its admin socket cannot be made again: the restarted worker fails at start-up.
    shard.chmod(0o500)
    try:
        os.kill(victim[0], signal.SIGKILL)
        async with asyncio.timeout(30):
            while daemon.proc is not None and daemon.proc.poll() is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        shard.chmod(0o700)
    assert daemon.proc is not None
    assert daemon.proc.returncode == 2
    logs = daemon.logs()
    assert (
        f"smtpq: cannot start the admin API on {Path(shard) / 'admin.sock'}: Permission denied"
        in logs
    )
    assert "worker 1 (pid" in logs
    assert "cannot start; stopping the daemon" in logs
    assert "Traceback" not in logs
    assert daemon.workers() == []


async def test_two_workers_on_one_redis_queue_share_it_with_one_admin_api(
    daemon_factory: DaemonFactory, sink: Sink, redis_server: RedisServer, redis_prefix: str
) -> None:
    daemon = await daemon_factory(
        {
            "workers": 2,
            "storage": {"type": "redis", "url": redis_server.url, "prefix": redis_prefix},
            "routes": {"dest.example": f"[127.0.0.1]:{sink.port}"},
        }
    )
    await daemon.logged("all 2 workers ready")
    rcpts = [f"r{n}@dest.example" for n in range(10)]
    await asyncio.gather(*(send(daemon, rcpt) for rcpt in rcpts))
    await until(lambda: len(sink.received) == 10, timeout=30)
    assert delivered(sink) == sorted(rcpts)
    # One admin API for the one queue: a second would have replaced the first one's socket.
    admin = daemon.queue_dir / "admin.sock"
    assert listening_unix_sockets(admin) == 1
    assert await AdminClient(admin).available()
    code, out, err = await daemon.cli("queue", "list")
    assert code == 0, err
    assert out == "Mail queue is empty\n"
    assert await daemon.stop(signal.SIGTERM) == 0
