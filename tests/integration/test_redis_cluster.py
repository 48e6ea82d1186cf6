"""RedisStorage on a Redis Cluster and the sharded layout beyond the contract: shards spread over
the masters, wake-ups by sharded pub/sub, a queue of the format-1 layout moved into the shards,
writers with more shards than others, the daemon's ``[storage]`` settings.

The session's cluster (3 masters, 3 replicas) serves the cluster tests, each with its own key
prefix; failovers and slot migrations, which change the cluster, are in
``test_redis_failover.py`` on clusters of their own.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.typing import EncodableT

from smtpq.daemon.config import ConfigError, load_config
from smtpq.daemon.server import build_storage, shards
from smtpq.envelope import Envelope
from smtpq.reply import Reply
from smtpq.storage import RedisStorage
from smtpq.storage.redis.layout import QueueKeys, shard_of
from smtpq.storage.redis.scripts import MOVE_MARK
from tests.helpers import make_envelope
from tests.redis_server import RedisClusterServers, RedisServer

NOW = 1_800_000_000.0
LEASE = 30.0


@pytest.fixture
async def cluster_workers(
    redis_cluster: RedisClusterServers, redis_prefix: str
) -> AsyncIterator[list[RedisStorage]]:
    """Two storage objects on one queue on the cluster: two workers."""
    stores = [
        RedisStorage.from_url(
            redis_cluster.url, prefix=redis_prefix, cluster=True, lease_timeout=LEASE
        )
        for _ in range(2)
    ]
    yield stores
    for store in stores:
        await store.close()


async def test_the_shards_spread_over_every_master(
    cluster_workers: list[RedisStorage], redis_cluster: RedisClusterServers, redis_prefix: str
) -> None:
    a, _ = cluster_workers
    ids = await asyncio.gather(*(a.write(make_envelope(), NOW) for _ in range(160)))
    per_master: Counter[int] = Counter()
    for node in redis_cluster.nodes[: redis_cluster.masters]:
        with redis.Redis(node.host, node.port) as client:
            per_master[node.port] = sum(1 for _ in client.scan_iter(f"{redis_prefix}*msg:*"))
    # 16 shards over 3 equal slot ranges: 6, 5 and 5 shards, 10 messages each.
    assert sorted(per_master.values()) == [50, 50, 60]
    assert sorted(Counter(shard_of(i) for i in ids).values()) == [10] * 16


async def test_a_write_wakes_another_worker_through_sharded_pub_sub(
    cluster_workers: list[RedisStorage],
) -> None:
    a, b = cluster_workers
    assert await b.next_due() is None  # b subscribes to every shard's channel
    for _ in range(16):  # once per shard: every master's subscription carries wake-ups
        await b.wait(0.2)  # drain the wake-ups from subscribing
        waiter = asyncio.create_task(b.wait(30))
        await asyncio.sleep(0.02)
        assert not waiter.done()
        id = await a.write(make_envelope(), NOW)
        await asyncio.wait_for(waiter, 10)
        assert await b.next_due() == NOW  # the announcement told b where and when
        assert await b.claim(NOW, 10) == [id]


async def test_every_call_of_a_script_touches_one_slot(
    cluster_workers: list[RedisStorage], redis_cluster: RedisClusterServers, redis_prefix: str
) -> None:
    """Redis Cluster refuses (CROSSSLOT) any script whose keys are in several slots: every
    operation succeeding on the cluster shows it; here also the keys each message has."""
    a, b = cluster_workers
    first = await a.write(make_envelope(recipients=["x@a.example", "y@a.example"]), NOW)
    second = await a.write(make_envelope(), NOW + 60, claimed=True)
    await a.set_recipients_delivered(first, [1])
    assert await b.claim(NOW, 10) == [first]
    await b.renew([first], NOW)
    await b.set_timestamp(first, NOW + 5, last_reply=Reply("451", "4.3.0 later"))
    assert await a.increment_attempts(first) == 1
    await a.set_held(second, True)
    await a.set_held(second, False)
    await a.release(second)
    assert await a.flush(NOW) == 2
    assert await b.get_infos([second, first]) != []
    assert sorted(i for _, i in await b.load()) == sorted([first, second])
    slots: Counter[int] = Counter()
    for node in redis_cluster.nodes[: redis_cluster.masters]:
        with redis.Redis(node.host, node.port) as client:
            for key in client.scan_iter(f"{redis_prefix}*"):
                slots[key_slot(key)] += 1
    assert len(slots) == 3  # the two messages' shards and the queue's layout
    await a.remove(first)
    await a.remove(second)
    assert (await b.get_info())["size"] == 0


async def test_writers_with_more_shards_are_claimed_by_every_worker(
    redis_cluster: RedisClusterServers, redis_prefix: str
) -> None:
    wide = RedisStorage.from_url(redis_cluster.url, prefix=redis_prefix, cluster=True, shards=40)
    narrow = RedisStorage.from_url(redis_cluster.url, prefix=redis_prefix, cluster=True, shards=4)
    try:
        ids = await asyncio.gather(*(wide.write(make_envelope(), NOW) for _ in range(40)))
        assert {shard_of(i) for i in ids} == set(range(40))
        assert sorted(await narrow.claim(NOW, 100)) == sorted(ids)
        assert (await narrow.get_info())["shards"] == 40
        assert sorted(await narrow.message_ids()) == sorted(ids)
    finally:
        await wide.close()
        await narrow.close()


# -- a queue of the format-1 layout ------------------------------------------------------------


def write_format_1(
    client: redis.Redis,
    prefix: str,
    id: str,
    *,
    timestamp: float,
    score: float | None = None,
    owner: str | None = None,
    held: bool = False,
    attempts: int = 0,
    delivered: str = "",
    reply: Reply | None = None,
) -> Envelope:
    """Store a message as smtpq's format-1 RedisStorage did (every key under ``{q}``)."""
    env = make_envelope(recipients=["a@x.example", "b@x.example"])
    base = f"{prefix}{{q}}:"
    record: dict[EncodableT, EncodableT] = {"v": "1", "env": env.to_bytes()}
    record["ts"] = repr(timestamp)
    record |= {"attempts": str(attempts), "delivered": delivered}
    if reply is not None:
        record["reply"] = json.dumps(reply.to_dict())
    client.hset(base + "msg:" + id, mapping=record)
    client.zadd(base + "index", {id: 0})
    if held:
        client.sadd(base + "held", id)
    if not held or owner is not None:
        client.zadd(base + "schedule", {id: timestamp if score is None else score})
    if owner is not None:
        client.hset(base + "leases", id, owner)
    return env


def old_id(n: int) -> str:
    return f"{int(NOW * 1e6) + n:013x}" + "ab" * 9 + f"{n:x}"


@pytest.mark.parametrize("where", ["server", "cluster"])
async def test_a_format_1_queue_is_moved_into_the_shards_and_delivered(
    request: pytest.FixtureRequest, where: str, redis_prefix: str
) -> None:
    cluster = where == "cluster"
    servers: RedisServer | RedisClusterServers = request.getfixturevalue(
        "redis_cluster" if cluster else "redis_server"
    )
    node = (
        servers.node_of_slot(key_slot(b"q"))
        if isinstance(servers, RedisClusterServers)
        else servers
    )
    raw = redis.Redis(node.host, node.port)
    greylisted = Reply("451", "4.7.1 greylisted")
    ids = [old_id(n) for n in range(5)]
    due, deferred, held, running, orphaned = ids
    write_format_1(raw, redis_prefix, due, timestamp=NOW, attempts=2, delivered="1",
                   reply=greylisted)  # fmt: skip
    write_format_1(raw, redis_prefix, deferred, timestamp=NOW + 3600)
    write_format_1(raw, redis_prefix, held, timestamp=NOW, held=True)
    # Being attempted by a worker of the old version, and taken by one that died.
    write_format_1(raw, redis_prefix, running, timestamp=NOW, score=NOW + 60, owner="old")
    write_format_1(raw, redis_prefix, orphaned, timestamp=NOW, score=NOW - 1, owner="dead")
    store = RedisStorage.from_url(servers.url, prefix=redis_prefix, cluster=cluster)
    try:
        info = await store.get_info()
        assert (info["size"], info["moving"]) == (5, 5)
        claimed = await store.claim(NOW, 100)  # a worker moves the old layout as it claims
        moved = {i: i[:30] + f"{int(i[30:], 16) % 16:02x}" for i in ids if i != running}
        assert sorted(claimed) == sorted([moved[due], moved[orphaned]])
        entry = await store.get_entry(moved[due])
        assert (entry.attempts, entry.pending, entry.last_reply) == (2, (0,), greylisted)
        assert entry.envelope.recipients == ["a@x.example"]
        assert (await store.get_entry(moved[deferred])).timestamp == NOW + 3600
        assert (await store.get_entry(moved[held])).held
        info = await store.get_info()
        assert (info["size"], info["moving"]) == (5, 1)  # the running one stays for now
        # Its old worker ends the attempt (deferring it, as format-1 SET_TIMESTAMP did).
        raw.hdel(f"{redis_prefix}{{q}}:leases", running)
        raw.zadd(f"{redis_prefix}{{q}}:schedule", {running: NOW + 10})
        raw.hset(f"{redis_prefix}{{q}}:msg:{running}", "ts", repr(NOW + 10))
        assert await store.migrate(NOW) == 0
        new = running[:30] + f"{int(running[30:], 16) % 16:02x}"
        assert await store.claim(NOW + 10, 100) == [new]
        assert [k for k in raw.scan_iter(f"{redis_prefix}{{q}}:*") if b"layout" not in k] == []
        assert sorted(await store.message_ids()) == sorted([*moved.values(), new])
    finally:
        await store.close()
        raw.close()


async def test_a_move_interrupted_after_its_first_step_is_finished_once(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    raw = aioredis.Redis.from_url(redis_server.url)
    store = RedisStorage.from_url(redis_server.url, prefix=redis_prefix, lease_timeout=LEASE)
    try:
        sync = redis.Redis(redis_server.host, redis_server.port)
        write_format_1(sync, redis_prefix, old_id(7), timestamp=NOW)
        sync.close()
        q = QueueKeys.of(redis_prefix, "q")
        legacy, id = q.legacy, old_id(7)
        new = id[:30] + "07"
        # A mover marks the message (out of the old layout's reach) and dies.
        keys = [legacy.msg(id), legacy.index, legacy.schedule, legacy.leases, legacy.held,
                q.moving, q.moving_msg(id)]  # fmt: skip
        await raw.eval(MOVE_MARK.text, len(keys), *keys, id, new, NOW, NOW + LEASE)
        assert (await store.get_info())["moving"] == 1
        assert await store.migrate(NOW) == 1  # its lease still runs: waiting
        assert await store.migrate(NOW + LEASE + 1) == 0  # taken over and finished
        assert await store.migrate(NOW + 2 * LEASE) == 0
        assert await store.message_ids() == [new]
        assert await store.claim(NOW + 2 * LEASE, 10) == [new]
    finally:
        await store.close()
        await raw.aclose()


# -- the daemon's settings ---------------------------------------------------------------------


async def test_the_daemon_builds_a_cluster_storage_from_its_storage_section(
    redis_cluster: RedisClusterServers, redis_prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "smtpq.toml"
    path.write_text(
        "[storage]\n"
        'type = "redis"\n'
        f'url = "{redis_cluster.url}"\n'
        f'prefix = "{redis_prefix}"\n'
        "cluster = true\n"
        "shards = 6\n"
        "wait_replicas = 1\n"
        "wait_timeout = 2.5\n"
    )
    config = load_config(path)
    store = build_storage(config, shards(config)[0])
    assert isinstance(store, RedisStorage)
    try:
        assert (store.shards, store.wait_replicas, store.wait_timeout) == (6, 1, 2.5)
        ids = [await store.write(make_envelope(), NOW) for _ in range(6)]
        assert {shard_of(i) for i in ids} == set(range(6))
        assert sorted(await store.claim(NOW, 10)) == sorted(ids)
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ("shards = 0", "storage.shards must be from 1 to 256"),
        ("shards = 300", "storage.shards must be from 1 to 256"),
        ('cluster = "yes"', "storage.cluster must be true or false"),
        ("wait_replicas = -1", "storage.wait_replicas must not be negative"),
    ],
)
def test_bad_cluster_settings_are_one_line_errors(setting: str, error: str, tmp_path: Path) -> None:
    path = tmp_path / "smtpq.toml"
    path.write_text(f'[storage]\ntype = "redis"\n{setting}\n')
    with pytest.raises(ConfigError, match=error):
        load_config(path)


async def test_slimta_positional_arguments_and_a_ready_client_on_a_cluster(
    redis_cluster: RedisClusterServers, redis_prefix: str
) -> None:
    node = redis_cluster.nodes[1]  # any node seeds the topology
    store = RedisStorage(node.host, node.port, 0, None, 5.0, redis_prefix, cluster=True)
    other = RedisStorage(prefix=redis_prefix, client=RedisCluster.from_url(redis_cluster.url))
    try:
        id = await store.write(make_envelope(), NOW)
        assert await other.claim(NOW, 10) == [id]
        with pytest.raises(ValueError, match="database 0"):
            RedisStorage(node.host, node.port, 1, cluster=True)
    finally:
        await store.close()
        await other.close()
