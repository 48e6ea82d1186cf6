"""RedisStorage while a Redis Cluster changes under it: a master fails over (SIGKILL, or a
controlled CLUSTER FAILOVER), slots move between masters (MIGRATING/IMPORTING, ASK).

Each test has a cluster of its own (3 masters, 3 replicas; ``cluster-node-timeout`` 1 s, so that
a replica takes over a killed master within a few seconds; ``cluster-require-full-coverage no``,
as docs/redis.md advises, so that the other masters keep serving meanwhile). What a failover
without ``wait_replicas`` loses is measured and reported (``-s`` shows it), not asserted: it
depends on what the replica had received when its master died.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from smtpq.envelope import Envelope
from smtpq.errors import QueueError
from smtpq.storage import RedisStorage
from smtpq.storage.redis.layout import ShardKeys, shard_of
from tests.helpers import make_envelope
from tests.integration.redis_processes import Processes, delivered, lines, queue_size, until
from tests.redis_server import RedisClusterServers, RedisServer

NOW = 1_800_000_000.0
PREFIX = "failover:"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A cluster of this test alone, quick to fail over."""
    servers = RedisClusterServers(
        tmp_path / "cluster",
        node_timeout=1000,
        extra_args=["--cluster-require-full-coverage", "no"],
    )
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


@pytest.fixture
async def store(cluster: RedisClusterServers) -> AsyncIterator[RedisStorage]:
    """A storage on the test's cluster."""
    s = RedisStorage.from_url(cluster.url, prefix=PREFIX, cluster=True, lease_timeout=60.0)
    yield s
    await s.close()


def slot_of(shard: int) -> int:
    return ShardKeys.of(PREFIX, "q", shard).slot


def serves(cluster: RedisClusterServers, shard: int, node: RedisServer) -> bool:
    """Whether ``node`` is the master of ``shard`` now (no master while a failover runs)."""
    try:
        return cluster.node_of_slot(slot_of(shard)) is node
    except RuntimeError:
        return False


def shards_of(cluster: RedisClusterServers, master: RedisServer) -> set[int]:
    """The shards (of 16) that ``master`` serves."""
    return {k for k in range(16) if cluster.node_of_slot(slot_of(k)) is master}


def big_envelope(n: int, size: int) -> Envelope:
    env = Envelope(f"m{n}@example.org", ["rcpt@example.com"])
    env.parse(b"Subject: %d\r\n\r\n" % n + b"x" * size)
    return env


async def eventually(what: str, timeout: float, check: object) -> None:
    """Await ``check()`` until it stops raising QueueError (a failover is under way)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await check()  # type: ignore[operator]
            return
        except QueueError:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}") from None
            await asyncio.sleep(0.1)


# -- a master dies -----------------------------------------------------------------------------


async def test_a_killed_master_is_451_until_its_replica_serves_then_recovers_by_itself(
    cluster: RedisClusterServers, store: RedisStorage
) -> None:
    # A queue of one shard: its writes have no other shard to go to.
    narrow = RedisStorage.from_url(cluster.url, prefix=PREFIX, cluster=True, shards=1)
    ids = [await store.write(make_envelope(), NOW) for _ in range(48)]
    await narrow.get_info()  # it knows the topology before its seed node may die
    victim = cluster.node_of_slot(slot_of(0))
    replica = cluster.replica_of(victim)
    lost = shards_of(cluster, victim)
    on_victim = [i for i in ids if shard_of(i) in lost]
    elsewhere = [i for i in ids if shard_of(i) not in lost]
    victim.kill()  # SIGKILL: no goodbye to the cluster
    try:
        answers = []
        while True:  # 451 until the replica serves; then the same object writes again
            try:
                written = [await narrow.write(make_envelope(), NOW)]
                break
            except QueueError as exc:
                answers.append(exc.reply.code)
        refused = len(answers)
        assert answers
        assert set(answers) == {"451"}
        assert serves(cluster, 0, replica)
    finally:
        await narrow.close()
    # Meanwhile the other masters served on: writes of the 16-shard queue went to them, and
    # their messages are claimed (the victim's too now that its replica serves).
    written += [await store.write(make_envelope(), NOW) for _ in range(20)]
    claimed = await store.claim(NOW, 1000)
    assert set(elsewhere) <= set(claimed)
    started = time.monotonic()
    while len(claimed) < len(ids) + len(written) and time.monotonic() < started + 30:
        # The clock goes on (a shard that failed is left alone for a moment of it).
        claimed += await store.claim(NOW + time.monotonic() - started, 1000)
        await asyncio.sleep(0.05)
    assert sorted(claimed) == sorted(ids + written)
    assert set(on_victim) <= set(claimed)
    print(f"\nkilled master: {refused} writes answered 451 before its replica served")


async def test_bookkeeping_waits_out_a_failover_and_reads_fail_fast(
    cluster: RedisClusterServers, store: RedisStorage
) -> None:
    """An attempt's bookkeeping (here a removal) rides out a short failover (patience 10 s),
    so that the Queue does not have to put it off; a listing fails fast (451) instead."""
    ids = [await store.write(make_envelope(), NOW) for _ in range(16)]
    victim = cluster.node_of_slot(slot_of(shard_of(ids[0])))
    victim.kill()
    with pytest.raises(QueueError) as failed:
        await store.get_infos([ids[0]])
    assert failed.value.reply.code == "451"
    await store.remove(ids[0])  # waits for the replica to take over, then succeeds
    with pytest.raises(KeyError):
        await store.get_entry(ids[0])
    assert sorted(await store.message_ids()) == sorted(ids[1:])


async def test_a_controlled_failover_under_load_loses_and_repeats_nothing(
    cluster: RedisClusterServers, store: RedisStorage
) -> None:
    acked: list[str] = []
    claimed: list[str] = []
    errors = 0
    stop = asyncio.Event()
    started = time.monotonic()

    def now() -> float:
        return NOW + time.monotonic() - started

    async def write() -> None:
        nonlocal errors
        n = 0
        while not stop.is_set():
            n += 1
            try:
                acked.append(await store.write(big_envelope(n, 200), NOW))
            except QueueError:
                errors += 1

    async def deliver() -> None:
        while not stop.is_set():
            for id in await store.claim(now(), 50):
                claimed.append(id)
                await store.remove(id)
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(write()) for _ in range(4)] + [asyncio.create_task(deliver())]
    await asyncio.sleep(0.5)
    master = cluster.node_of_slot(slot_of(0))
    replica = cluster.replica_of(master)
    with redis.Redis(replica.host, replica.port) as client:
        client.execute_command("CLUSTER", "FAILOVER")  # the replica and its master agree
    await asyncio.to_thread(until, lambda: serves(cluster, 0, replica), 30, "the manual failover")
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*tasks)
    claimed += await store.claim(now() + 10, 100_000)  # after any back-off
    assert len(claimed) == len(set(claimed))  # nothing delivered twice
    assert sorted(claimed) == sorted(acked)  # nothing acknowledged lost
    assert len(acked) > 100
    print(f"\ncontrolled failover: {len(acked)} writes acknowledged, {errors} refused (451)")


async def test_what_a_failover_loses_with_and_without_wait_replicas(
    cluster: RedisClusterServers,
) -> None:
    """A replica that lags its master (frozen here: SIGSTOP) is promoted when the master dies.

    Without ``wait_replicas``, the messages its master acknowledged and had not sent it are
    lost: measured and reported. With ``wait_replicas = 1`` a write the replica did not
    acknowledge is refused (and written to another shard), so none acknowledged is lost.
    """
    plain = RedisStorage.from_url(cluster.url, prefix=PREFIX, cluster=True)
    safe = RedisStorage.from_url(
        cluster.url, prefix=PREFIX, cluster=True, wait_replicas=1, wait_timeout=0.2
    )
    try:
        await safe.get_info()  # learns the topology while its seed node (the first) lives
        masters = [cluster.node_of_slot(slot_of(k)) for k in range(16)]
        first, second = masters[0], next(m for m in masters if m is not masters[0])
        # Without: enough data that it cannot all wait in the sockets' buffers meanwhile.
        acked, on_master, lost = await _fail_over_a_lagging_replica(cluster, plain, first, 2000)
        print(
            f"\nwithout wait_replicas: {len(acked)} writes acknowledged, {len(on_master)} of "
            f"them by the master that died; {len(lost)} of those lost in the failover"
        )
        # With: the replica of another master lags, and its master dies.
        acked, on_master, lost = await _fail_over_a_lagging_replica(cluster, safe, second, 200)
    finally:
        await plain.close()
        await safe.close()
    print(
        f"with wait_replicas=1: {len(acked)} writes acknowledged (those to the lagging "
        f"master's shards were refused and written to another), {len(lost)} lost"
    )
    assert acked
    assert on_master == []
    assert lost == []


async def _fail_over_a_lagging_replica(
    cluster: RedisClusterServers, store: RedisStorage, master: RedisServer, count: int
) -> tuple[list[str], list[str], list[str]]:
    """Freeze ``master``'s replica, write, kill ``master``, let the replica take over: the
    ids acknowledged, those of them on ``master``'s shards, and those that are gone."""
    replica = cluster.replica_of(master)
    shards = shards_of(cluster, master)
    replica.pause()
    acked: list[str] = []
    for start in range(0, count, 50):
        results = await asyncio.gather(
            *(store.write(big_envelope(n, 16_000), NOW) for n in range(start, start + 50)),
            return_exceptions=True,
        )
        acked += [r for r in results if isinstance(r, str)]
    master.kill()
    replica.resume()
    await asyncio.to_thread(
        until, lambda: serves(cluster, min(shards), replica), 30, "the lagging replica to serve"
    )
    lost = []
    for id in acked:
        try:
            await eventually("the new master", 30, lambda id=id: store.get_entry(id))
        except KeyError:
            lost.append(id)
    return acked, [i for i in acked if shard_of(i) in shards], lost


def test_a_killed_master_under_load_loses_nothing_acknowledged_with_wait_replicas(
    procs: Processes, cluster: RedisClusterServers, tmp_path: Path
) -> None:
    """An edge process and two workers; a master is SIGKILLed in the middle, and comes back
    later as a replica. Every enqueue answered with an id is delivered; the others were
    answered 451, never anything else."""
    url, record, accepted = cluster.url, tmp_path / "delivered", tmp_path / "accepted"
    wait = ["--cluster", "--wait-replicas", "1", "--wait-timeout", "0.2"]
    workers = [procs.start("worker", url, PREFIX, str(record), "--lease", "30", *wait)]
    workers += [procs.start("worker", url, PREFIX, str(record), "--lease", "30", *wait)]
    edge = procs.start(
        "edge", url, PREFIX, str(accepted), "--count", "3000", "--batch", "20",
        "--pause", "0.01", *wait,
    )  # fmt: skip
    until(lambda: len(lines(accepted)) >= 600, 60, "600 enqueues")
    victim = cluster.node_of_slot(slot_of(0))
    victim.kill()
    until(lambda: len(lines(accepted)) >= 1800, 120, "enqueues to go on meanwhile")
    victim.start()  # it comes back as a replica of the master that took its place
    assert edge.wait(timeout=180) == 0
    results = {int(line.split()[1]): line.split() for line in lines(accepted)}
    assert sorted(results) == list(range(3000))
    ok = {f"m{seq}@example.org" for seq, fields in results.items() if fields[0] == "ok"}
    codes = {fields[2] for fields in results.values() if fields[0] == "err"}
    assert codes <= {"451"}
    until(lambda: ok <= set(delivered(record)), 120, "every acknowledged message")
    until(lambda: queue_size(url, PREFIX, cluster=True) == 0, 60, "an empty queue")
    for worker in workers:
        assert procs.stop(worker) == 0
    print(f"\nkilled master: {len(ok)} acknowledged, {3000 - len(ok)} answered 451, all delivered")


# -- slots move --------------------------------------------------------------------------------


def migrate_slot(cluster: RedisClusterServers, slot: int, target: RedisServer) -> None:
    """Move ``slot`` to ``target`` by hand, a few keys at a time and slowly, so that the queue
    meets it half-moved (MIGRATING on the source, IMPORTING on the target: ASK, TRYAGAIN)."""
    source = cluster.node_of_slot(slot)
    with (
        redis.Redis(source.host, source.port, protocol=2) as src,
        redis.Redis(target.host, target.port, protocol=2) as dst,
    ):
        source_id = src.execute_command("CLUSTER", "MYID")
        target_id = dst.execute_command("CLUSTER", "MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 3):
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
            time.sleep(0.02)
        for node in cluster.running():
            with (
                contextlib.suppress(redis.ResponseError),
                redis.Redis(node.host, node.port) as client,
            ):
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


def redirections(cluster: RedisClusterServers) -> int:
    """ASK, TRYAGAIN and MOVED answers the masters have given."""
    total = 0
    for node in cluster.running():
        with redis.Redis(node.host, node.port, protocol=2) as client:
            stats = client.info("errorstats")
        total += sum(
            int(value["count"])
            for name, value in stats.items()
            if name in ("errorstat_ASK", "errorstat_TRYAGAIN", "errorstat_MOVED")
        )
    return total


def test_slots_moving_while_the_queue_runs_lose_and_repeat_nothing(
    procs: Processes, cluster: RedisClusterServers, tmp_path: Path
) -> None:
    url, record, accepted = cluster.url, tmp_path / "delivered", tmp_path / "accepted"
    workers = [
        procs.start("worker", url, PREFIX, str(record), "--lease", "30", "--cluster")
        for _ in range(2)
    ]
    edge = procs.start(
        "edge", url, PREFIX, str(accepted), "--count", "3000", "--batch", "20",
        "--pause", "0.01", "--cluster",
    )  # fmt: skip
    until(lambda: len(lines(accepted)) >= 300, 60, "300 enqueues")
    before = redirections(cluster)
    # Two shards move to another master, one after the other, while mail flows.
    for shard in (0, 1):
        source = cluster.node_of_slot(slot_of(shard))
        target = next(n for n in cluster.running() if n is not source and n in _masters(cluster))
        mover = threading.Thread(target=migrate_slot, args=(cluster, slot_of(shard), target))
        mover.start()
        mover.join(timeout=120)
        assert not mover.is_alive()
        assert cluster.node_of_slot(slot_of(shard)) is target
    assert edge.wait(timeout=120) == 0
    ok = {f"m{line.split()[1]}@example.org" for line in lines(accepted) if line[:2] == "ok"}
    until(lambda: ok <= set(delivered(record)), 60, "every acknowledged message")
    until(lambda: queue_size(url, PREFIX, cluster=True) == 0, 60, "an empty queue")
    for worker in workers:
        assert procs.stop(worker) == 0
    counts = delivered(record)
    assert set(counts) == ok
    assert set(counts.values()) == {1}
    assert redirections(cluster) > before  # the queue did meet the slots half-moved
    print(f"\nresharding: {len(ok)} of 3000 acknowledged, each delivered once")


def _masters(cluster: RedisClusterServers) -> list[RedisServer]:
    roles = cluster.topology()
    return [n for n in cluster.running() if roles.get(n.port, ("", None))[0] == "master"]
