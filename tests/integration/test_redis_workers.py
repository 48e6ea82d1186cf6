"""Many Queue processes over one Redis (or a Redis Cluster): exactly-once delivery, take-over
after SIGKILL, restart.

Each process is ``tests/integration/redis_worker.py`` (see ``redis_processes.py``); deliveries
are counted at a recording relay that appends one line per delivery to a file shared by all
processes. Processes are stopped by their pid only.
"""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

import pytest

from tests.integration.redis_processes import Processes, delivered, lines, queue_size, until
from tests.redis_server import RedisClusterServers, RedisServer


@pytest.mark.parametrize("where", ["server", "cluster"])
def test_four_workers_and_an_edge_deliver_each_message_exactly_once(
    procs: Processes, request: pytest.FixtureRequest, where: str, redis_prefix: str, tmp_path: Path
) -> None:
    """Edge-only and delivery processes apart: the topology that scales out (docs/redis.md)."""
    cluster = where == "cluster"
    redis: RedisServer | RedisClusterServers = request.getfixturevalue(
        "redis_cluster" if cluster else "redis_server"
    )
    url, record, accepted = redis.url, tmp_path / "delivered", tmp_path / "accepted"
    flags = ["--cluster"] if cluster else []
    workers = [procs.start("worker", url, redis_prefix, str(record), *flags) for _ in range(4)]
    edge = procs.start(
        "edge", url, redis_prefix, str(accepted), "--count", "2000", "--batch", "20", *flags
    )
    assert edge.wait(timeout=60) == 0
    ok = [line for line in lines(accepted) if line.startswith("ok ")]
    assert len(ok) == 2000
    until(lambda: len(lines(record)) >= 2000, 60, "2,000 deliveries")
    until(lambda: queue_size(url, redis_prefix, cluster) == 0, 30, "an empty queue")
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
