"""RedisStorage held against DictStorage by the storage state machine, on one server and on a
Redis Cluster.

Every run of the machine has a key prefix of its own on the session's redis-server (or cluster).

Two things a shared store does differently from a local one, so the model here does them too:

* A restart of one worker does not end its leases: they are shared state (another worker must
  not take a message whose attempt may still be running elsewhere) and simply expire. The
  machine's ``reopen`` therefore keeps the model as it is, and the reopened storage object
  keeps the owner token, so that it may end the leases as the model does.
* ``flush`` is stored, not only scheduled in memory: every worker, and every later listing,
  sees the new time. The model stores it as well.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence

import pytest
import redis.asyncio as aioredis
from hypothesis.stateful import precondition, rule
from redis.asyncio.cluster import RedisCluster

from smtpq.storage import DictStorage, QueueStorage, RedisStorage
from tests.contract.state_machine import LEASE, MachineBackend, StorageMachine
from tests.redis_server import RedisClusterServers, RedisServer

# The machine's backend factory takes no fixtures: the session's servers are handed over here.
_servers: list[RedisServer] = []
_clusters: list[RedisClusterServers] = []


@pytest.fixture(autouse=True, scope="module")
def _session_redis(redis_server: RedisServer, redis_cluster: RedisClusterServers) -> Iterator[None]:
    _servers.append(redis_server)
    _clusters.append(redis_cluster)
    yield
    _servers.remove(redis_server)
    _clusters.remove(redis_cluster)


class RedisBackend:
    """One key prefix on the session's redis-server or cluster."""

    def __init__(self, url: str, cluster: bool) -> None:
        self.url = url
        self.cluster = cluster
        self.prefix = f"machine-{uuid.uuid4().hex[:12]}:"
        self.owner = f"machine-worker-{uuid.uuid4().hex[:8]}"

    async def open(self) -> QueueStorage:
        return RedisStorage.from_url(
            self.url,
            prefix=self.prefix,
            cluster=self.cluster,
            lease_timeout=LEASE,
            owner=self.owner,
        )

    async def destroy(self) -> None:
        client: aioredis.Redis | RedisCluster
        if self.cluster:
            client = RedisCluster.from_url(self.url)
        else:
            client = aioredis.Redis.from_url(self.url)
        try:
            async for key in client.scan_iter(match=self.prefix + "*"):
                await client.unlink(key)
        finally:
            await client.aclose()


async def redis_backend() -> MachineBackend:
    return RedisBackend(_servers[0].url, cluster=False)


async def redis_cluster_backend() -> MachineBackend:
    return RedisBackend(_clusters[0].url, cluster=True)


class SharedModel(DictStorage):
    """DictStorage whose flush is stored, as in a shared store."""

    async def flush(self, now: float, ids: Sequence[str] | None = None) -> int:
        """Reschedule as DictStorage does, and store the new times."""
        await self._ensure_loaded()
        done = self._schedule.flush(now, ids)
        for id in done:
            self._put_meta(id, {**self._meta(id), "timestamp": now})
        return len(done)


class RedisMachine(StorageMachine):
    """The storage state machine over RedisStorage."""

    backend_factory = redis_backend

    def _model(self) -> DictStorage:
        return SharedModel(self.env_db, self.meta_db, lease_timeout=LEASE)

    @precondition(lambda self: bool(self.to_model))
    @rule()
    def reopen(self) -> None:
        """This worker restarts: everything stored comes back, its leases still stand."""
        self.run(self.real.close())
        self.real = self.run(self.backend.open())
        self.load()


class RedisClusterMachine(RedisMachine):
    """The storage state machine over RedisStorage on a Redis Cluster."""

    backend_factory = redis_cluster_backend


TestRedisStorageMachine = RedisMachine.TestCase
TestRedisClusterStorageMachine = RedisClusterMachine.TestCase
