"""``smtpq queue ...`` without a daemon: every change is stored and honoured at the next start;
a queue that is not there is reported, never created; and who asked is logged."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.e2e.conftest import DaemonFactory
from tests.e2e.daemon import DaemonProcess, write_config
from tests.helpers import until
from tests.integration.smtp.sink import Received, Sink
from tests.redis_server import RedisServer

BY = f"by=uid:{os.getuid()}"


async def send(daemon: DaemonProcess, tag: str) -> None:
    message = (
        f"From: <alice@origin.example>\r\nSubject: {tag}\r\nMessage-ID: <{tag}@origin.example>"
        "\r\n\r\nbody\r\n"
    ).encode()
    await aiosmtplib.send(
        message, sender="alice@origin.example", recipients=["stuck@dest.example"],
        hostname="127.0.0.1", port=daemon.port, start_tls=False,
    )  # fmt: skip


async def smtpq(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str, str]:
    """Run the ``smtpq`` command as a process (in a thread: a sink may share this loop)."""

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "smtpq.daemon.cli", *args],
            capture_output=True, text=True, timeout=60, cwd=cwd,
            env={**os.environ, **(env or {})},
        )  # fmt: skip

    done = await asyncio.to_thread(run)
    return done.returncode, done.stdout, done.stderr


async def listing(daemon: DaemonProcess) -> list[dict[str, Any]]:
    code, out, err = await daemon.cli("queue", "list", "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def subjects(received: list[Received]) -> list[str]:
    """The Subject of each message the sink received, "DSN of X" for a bounce of X."""
    found = []
    for r in received:
        subject = r.data.split(b"Subject: ")[-1].split(b"\r\n")[0].decode()
        found.append(f"DSN of {subject}" if r.sender in ("", "<>") else subject)
    return found


async def deferred_queue(
    daemon_factory: DaemonFactory, sink: Sink, n: int, workers: int = 1, storage: str = "disk"
) -> DaemonProcess:
    """A daemon whose next hop defers ``n`` messages ``m1``..: retried only in an hour."""
    sink.behaviour.rcpt["stuck"] = "451 4.2.1 Mailbox busy"
    daemon = await daemon_factory(
        {
            "workers": workers,
            "storage": {"type": storage},
            "routes": {
                "dest.example": f"[127.0.0.1]:{sink.port}",
                "origin.example": f"[127.0.0.1]:{sink.port}",  # bounces reach the sink too
            },
            "retry": {"initial": 3600.0, "maximum": 3600.0},
        }
    )
    await until(lambda: daemon.logs().count("smtpq ready") == workers, timeout=30)
    for i in range(1, n + 1):
        await send(daemon, f"m{i}")
    for _ in range(300):
        queued = await listing(daemon)
        if len(queued) == n and all(m["attempts"] == 1 for m in queued):
            return daemon
    raise AssertionError(f"not all {n} messages were deferred: {queued}")


@pytest.mark.parametrize("storage", ["disk", "journal"])
async def test_offline_actions_are_honoured_at_the_next_start(
    daemon_factory: DaemonFactory, sink: Sink, storage: str
) -> None:
    daemon = await deferred_queue(daemon_factory, sink, 6, storage=storage)
    m1, m2, m3, m4, m5, m6 = (m["id"] for m in await listing(daemon))
    assert (await daemon.stop()) == 0
    del sink.behaviour.rcpt["stuck"]  # the next hop takes everything from now on

    code, out, err = await daemon.cli("queue", "flush", m1)
    assert (code, out) == (0, "flush: 1 message\n")
    assert f"flushed id={m1} {BY}" in err
    code, out, err = await daemon.cli("queue", "hold", m2)
    assert (code, out) == (0, "hold: 1 message\n")
    assert f"held id={m2} {BY}" in err
    code, out, err = await daemon.cli("queue", "delete", m3)
    assert (code, out) == (0, "delete: 1 message\n")
    assert f"deleted id={m3} to=<stuck@dest.example> {BY}" in err
    code, out, err = await daemon.cli("queue", "requeue", m4)
    assert code == 0
    assert out.startswith("requeue: 1 message\n  new id ")
    new4 = out.split()[-1]
    assert f"requeued id={m4} to=<stuck@dest.example> new={new4} {BY}" in err
    code, out, err = await daemon.cli("queue", "bounce", m5)
    assert (code, out) == (0, "bounce: 1 message\n")
    assert f"bounced id={m5} to=<stuck@dest.example>" in err
    assert BY in err.split(f"bounced id={m5}")[1]

    # What is stored says so before any daemon runs again.
    now = time.time()
    stored = {m["id"]: m for m in await listing(daemon)}
    assert stored[m1]["next_attempt"] <= now
    assert stored[m2]["held"]
    assert not {m3, m4, m5} & set(stored)
    assert stored[new4]["attempts"] == 0
    [dsn] = [m for m in stored.values() if m["sender"] == ""]
    assert dsn["recipients"] == ["alice@origin.example"]
    assert stored[m6]["next_attempt"] > now + 3000  # untouched: an hour away

    # The next start attempts the flushed, the requeued message and the DSN at once, and
    # nothing else: the held and the untouched messages stay, the deleted one is gone.
    await daemon.start()
    await until(lambda: len(sink.received) == 3, timeout=30)
    assert sorted(subjects(sink.received)) == ["DSN of m5", "m1", "m4"]
    assert {m["id"] for m in await listing(daemon)} == {m2, m6}
    assert (await daemon.stop()) == 0

    # Released offline, then a bare flush (every message) offline: both go at the next start.
    code, _, err = await daemon.cli("queue", "release", m2)
    assert code == 0
    assert f"released id={m2} {BY}" in err
    code, out, err = await daemon.cli("queue", "flush")
    assert (code, out) == (0, "flush: 2 messages\n")
    assert f"flushed all: 2 messages {BY}" in err
    await daemon.start()
    await until(lambda: len(sink.received) == 5, timeout=30)
    assert sorted(subjects(sink.received)[3:]) == ["m2", "m6"]
    assert await listing(daemon) == []
    assert "m3" not in subjects(sink.received)


async def test_actions_through_the_daemon_are_logged_with_who_asked(
    daemon_factory: DaemonFactory, sink: Sink, tmp_path: Path
) -> None:
    daemon = await deferred_queue(daemon_factory, sink, 3)
    m1, m2, m3 = (m["id"] for m in await listing(daemon))
    # The accepted line leads from the sender's Message-ID and address to the queue id.
    assert f"accepted id={m1} to=<stuck@dest.example> sender=<alice@origin.example>" in (
        daemon.logs()
    )
    assert "client=[127.0.0.1] message-id=<m1@origin.example>" in daemon.logs()

    # No -c: the default configuration path ($SMTPQ_CONFIG here) finds the running daemon.
    env = {"SMTPQ_CONFIG": str(daemon.config)}
    for args in (("hold", m1), ("release", m1), ("requeue", m2), ("delete", m3)):
        code, out, err = await smtpq("queue", *args, env=env, cwd=tmp_path)
        assert (code, err) == (0, ""), err  # the daemon logs it, not the command
        assert out.startswith(f"{args[0]}: 1 message")
    logs = daemon.logs()
    assert f"held id={m1} {BY}" in logs
    assert f"released id={m1} {BY}" in logs
    assert f"requeued id={m2} to=<stuck@dest.example> new=" in logs
    assert f"deleted id={m3} to=<stuck@dest.example> {BY}" in logs

    code, out, _ = await smtpq("queue", "bounce", m1, env=env)
    assert code == 0
    bounced = [line for line in daemon.logs().splitlines() if f"bounced id={m1}" in line]
    assert len(bounced) == 1
    assert "to=<stuck@dest.example>" in bounced[0]
    assert 'reply="550 5.0.0 Delivery cancelled by the administrator"' in bounced[0]
    assert bounced[0].endswith(BY)
    await until(lambda: len(sink.received) == 1, timeout=30)  # the DSN, to origin.example

    del sink.behaviour.rcpt["stuck"]
    code, out, _ = await smtpq("queue", "flush", env=env)  # no argument: everything
    assert code == 0
    assert out == "flush: 1 message\n"  # the requeued message, due in an hour
    assert f"flushed all: 1 message {BY}" in daemon.logs()
    await until(lambda: len(sink.received) == 2, timeout=30)
    assert subjects(sink.received) == ["DSN of m1", "m2"]


async def test_serve_and_queue_read_the_default_configuration(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    daemon = await daemon_factory(start=False)
    env = {"SMTPQ_CONFIG": str(daemon.config), "PYTHONUNBUFFERED": "1"}
    with open(daemon.log, "ab") as log:  # noqa: ASYNC230 - a one-off spawn
        daemon.proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "smtpq.daemon.cli", "serve"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, **env},
        )  # fmt: skip
    await daemon.wait_ready()
    code, out, err = await smtpq("queue", "list", env=env, cwd=tmp_path)
    assert (code, out, err) == (0, "Mail queue is empty\n", "")
    assert daemon.queue_dir.is_dir()  # the configured queue, not ./smtpq-queue
    assert not (tmp_path / "smtpq-queue").exists()

    # A named file that is not there is an error, not a silent fall-back to the defaults.
    code, _, err = await smtpq("queue", "list", env={"SMTPQ_CONFIG": str(tmp_path / "no.toml")})
    assert code == 2
    assert "no.toml not found" in err


COMMANDS = [
    ("list",),
    ("list", "--json"),
    ("show", "0" * 32),
    ("shape",),
    ("flush",),
    ("flush", "0" * 32),
    ("hold", "0" * 32),
    ("release", "--all"),
    ("delete", "0" * 32),
    ("requeue", "0" * 32),
    ("bounce", "--all", "--yes"),
]


async def test_no_queue_is_reported_and_none_is_created(tmp_path: Path) -> None:
    missing = tmp_path / "queue"
    config = tmp_path / "smtpq.toml"
    write_config(config, {"storage": {"path": str(missing)}})
    for args in COMMANDS:
        code, out, err = await smtpq("queue", *args, "-c", str(config), cwd=tmp_path)
        assert (code, out) == (2, ""), (args, out, err)
        assert err == f"smtpq: no queue in {missing}: no daemon has stored mail there (give" \
            " the daemon's -c FILE or --queue-dir)\n", args  # fmt: skip
    # A directory that holds no queue is no queue either, and stays as it was.
    code, _, err = await smtpq("queue", "hold", "--all", "--queue-dir", str(tmp_path))
    assert code == 2
    assert f"no queue in {tmp_path}" in err
    assert sorted(os.listdir(tmp_path)) == ["smtpq.toml"]


@pytest.mark.parametrize("running", [True, False], ids=["daemon", "offline"])
async def test_what_an_empty_queue_answers(daemon_factory: DaemonFactory, running: bool) -> None:
    daemon = await daemon_factory()
    if not running:
        assert (await daemon.stop()) == 0
    assert await daemon.cli("queue", "list") == (0, "Mail queue is empty\n", "")
    assert await daemon.cli("queue", "list", "--json") == (0, "", "")
    assert await daemon.cli("queue", "flush") == (
        0, "flush: 0 messages\n", "" if running else f"smtpq: flushed all: 0 messages {BY}\n"
    )  # fmt: skip
    assert await daemon.cli("queue", "hold", "0" * 32) == (1, "hold: 0 messages\n", "")
    assert await daemon.cli("queue", "delete", "--all", "--yes") == (0, "delete: 0 messages\n", "")
    code, out, _ = await daemon.cli("queue", "shape", "--json")
    assert code == 0
    assert json.loads(out)["rows"] == []
    code, _, err = await daemon.cli("queue", "show", "0" * 32)
    assert code == 1
    assert f"no message '{'0' * 32}' in the queue" in err


async def test_redis_commands_create_nothing_in_the_working_directory(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    config = tmp_path / "smtpq.toml"
    write_config(config, {"storage": {"type": "redis", "url": redis_server.url,
                                      "prefix": redis_prefix}})  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    for args in (("list",), ("flush",), ("hold", "--all"), ("shape",)):
        code, _, err = await smtpq("queue", *args, "-c", str(config), cwd=work)
        assert code == 0, err
    assert os.listdir(work) == []


async def test_offline_actions_on_every_shard(daemon_factory: DaemonFactory, sink: Sink) -> None:
    daemon = await deferred_queue(daemon_factory, sink, 20, workers=2)
    assert (await daemon.stop()) == 0
    per_shard = [len(os.listdir(daemon.queue_dir / f"shard-{k}" / "env")) for k in (0, 1)]
    assert sum(per_shard) == 20
    assert all(per_shard)  # the kernel spread the connections over both workers

    code, out, err = await daemon.cli("queue", "hold", "--all")
    assert (code, out) == (0, "hold: 20 messages\n")
    held = [line for line in err.splitlines() if line.startswith("smtpq: held id=")]
    assert len(held) == len(set(held)) == 20  # each message once, from both shards
    await daemon.start()
    await until(lambda: daemon.logs().count("smtpq ready") == 4, timeout=30)
    code, out, _ = await daemon.cli("queue", "list", "--json", "--state", "held")
    assert code == 0
    assert len(out.splitlines()) == 20
