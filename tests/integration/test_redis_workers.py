"""Many Queue processes over one Redis: exactly-once delivery, take-over after SIGKILL, restart.

Each process is ``tests/integration/redis_worker.py``; deliveries are counted at a recording
relay that appends one line per delivery to a file shared by all processes. Processes are
stopped by their pid only.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]


class Processes:
    """The processes a test started, stopped by pid at the end whatever happens."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Run ``redis_worker`` with ``args``; a worker is returned once it says ``ready``."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.redis_worker", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.started.append(proc)
        if args[0] == "worker":
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        return proc

    def stop(self, proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
        """Signal ``proc`` by its pid and wait for it; its exit status."""
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout=30)

    def stop_all(self) -> None:
        """Stop whatever still runs (SIGTERM, then SIGKILL)."""
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Start processes; all are stopped by pid when the test ends."""
    p = Processes()
    yield p
    p.stop_all()


def lines(path: Path) -> list[str]:
    """The complete lines of a file that other processes append to."""
    if not path.exists():
        return []
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines()


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (other processes do the work) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def queue_size(url: str, prefix: str) -> int:
    """Messages still stored under ``prefix``."""
    with redis.Redis.from_url(url) as client:
        return int(client.zcard(f"{prefix}{{q}}:index"))


def delivered(record: Path) -> collections.Counter[str]:
    """How many times each sender's message was delivered."""
    return collections.Counter(line.split()[0] for line in lines(record))


def test_four_workers_and_an_edge_deliver_each_message_exactly_once(
    procs: Processes, redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    url, record, accepted = redis_server.url, tmp_path / "delivered", tmp_path / "accepted"
    workers = [procs.start("worker", url, redis_prefix, str(record)) for _ in range(4)]
    edge = procs.start("edge", url, redis_prefix, str(accepted), "--count", "2000", "--batch", "20")
    assert edge.wait(timeout=60) == 0
    ok = [line for line in lines(accepted) if line.startswith("ok ")]
    assert len(ok) == 2000
    until(lambda: len(lines(record)) >= 2000, 60, "2,000 deliveries")
    until(lambda: queue_size(url, redis_prefix) == 0, 30, "an empty queue")
    for worker in workers:
        assert procs.stop(worker) == 0
    counts = delivered(record)
    assert len(counts) == 2000
    assert set(counts.values()) == {1}
    # The work was shared: the edge delivered nothing itself, every worker delivered some.
    pids = collections.Counter(line.split()[1] for line in lines(record))
    assert set(pids) == {str(w.pid) for w in workers}


def test_a_killed_workers_messages_are_taken_over_after_the_lease(
    procs: Processes, redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    url, record, accepted = redis_server.url, tmp_path / "delivered", tmp_path / "accepted"
    victim_record = tmp_path / "victim"
    victim = procs.start("worker", url, redis_prefix, str(victim_record), "--hang")
    edge = procs.start("edge", url, redis_prefix, str(accepted), "--count", "60", "--batch", "10")
    assert edge.wait(timeout=60) == 0
    # The victim has claimed every message and is in the middle of attempting each of them.
    until(lambda: len(lines(Path(str(victim_record) + ".started"))) == 60, 30, "60 attempts")
    assert procs.stop(victim, signal.SIGKILL) == -signal.SIGKILL
    others = [procs.start("worker", url, redis_prefix, str(record)) for _ in range(2)]
    until(lambda: len(lines(record)) >= 60, 30, "the others to deliver")
    until(lambda: queue_size(url, redis_prefix) == 0, 30, "an empty queue")
    for worker in others:
        assert procs.stop(worker) == 0
    counts = delivered(record)
    assert set(counts) == {f"m{seq}@example.org" for seq in range(60)}
    assert set(counts.values()) == {1}
    assert lines(victim_record) == []


def test_redis_restart_loses_no_acknowledged_message(
    procs: Processes, tmp_path: Path, redis_prefix: str
) -> None:
    server = RedisServer(tmp_path / "aof", appendfsync="always")
    server.start()
    try:
        url, record, accepted = server.url, tmp_path / "delivered", tmp_path / "accepted"
        workers = [procs.start("worker", url, redis_prefix, str(record)) for _ in range(2)]
        # 10 enqueues at a time share their fsyncs: the test is not slowed by a busy disk.
        edge = procs.start(
            "edge", url, redis_prefix, str(accepted), "--count", "1200", "--batch", "10"
        )
        until(lambda: len(lines(accepted)) >= 300, 30, "300 enqueues")
        server.kill()  # a crash: only what the AOF has fsynced survives
        until(
            lambda: sum(line.startswith("err ") for line in lines(accepted)) >= 2,
            30,
            "enqueues to fail while Redis is down",
        )
        server.start()
        assert edge.wait(timeout=60) == 0
        results = {int(line.split()[1]): line.split()[0] for line in lines(accepted)}
        assert sorted(results) == list(range(1200))
        ok = {f"m{seq}@example.org" for seq, status in results.items() if status == "ok"}
        failed = {f"m{seq}@example.org" for seq, status in results.items() if status == "err"}
        assert failed
        assert max(int(s[1:].split("@")[0]) for s in ok) > max(
            int(s[1:].split("@")[0]) for s in failed
        ), "enqueues succeed again after the restart"
        until(lambda: ok <= set(delivered(record)), 60, "every acknowledged message")
        until(lambda: queue_size(url, redis_prefix) == 0, 30, "an empty queue")
        for worker in workers:
            assert procs.stop(worker) == 0
        # An enqueue that failed may still have been stored (its reply was lost with the
        # crash): then it is delivered too, and the client's retry makes a duplicate.
        assert set(delivered(record)) <= ok | failed
    finally:
        procs.stop_all()
        server.close()
    assert os.path.exists(tmp_path / "aof" / "appendonlydir")
