"""The storage under test: every backend runs the same contract suite.

A backend joins by adding a factory to ``BACKENDS``: an async context manager that yields a
fresh, empty storage and a way to open a second storage object on the same data (another
worker, or the same process after a restart).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from smtpq.storage import DictStorage, DiskStorage, JournalStorage, QueueStorage, RedisStorage
from tests.redis_server import RedisClusterServers, RedisServer


@dataclass
class Backend:
    """A storage under test and how to reopen it."""

    storage: QueueStorage
    reopen: Callable[[], Awaitable[QueueStorage]]
    durable: bool


@asynccontextmanager
async def dict_backend(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    env_db: dict[str, Any] = {}
    meta_db: dict[str, Any] = {}

    async def reopen() -> QueueStorage:
        return DictStorage(env_db, meta_db, lease_timeout=5.0)

    storage = DictStorage(env_db, meta_db, lease_timeout=5.0)
    yield Backend(storage, reopen, durable=False)
    await storage.close()


@asynccontextmanager
async def disk_backend(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    env_dir, meta_dir = tmp_path / "env", tmp_path / "meta"
    opened: list[DiskStorage] = []

    async def reopen() -> QueueStorage:
        other = DiskStorage(env_dir, meta_dir, lease_timeout=5.0)
        opened.append(other)
        return other

    storage = DiskStorage(env_dir, meta_dir, lease_timeout=5.0)
    yield Backend(storage, reopen, durable=True)
    for other in opened:
        await other.close()  # idempotent: the test may have closed it already
    await storage.close()


@asynccontextmanager
async def journal_backend(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    # Small segments, so that the suite also runs over rolls, deletions and compaction.
    path = tmp_path / "journal"
    opened: list[JournalStorage] = []

    async def reopen() -> QueueStorage:
        other = JournalStorage(path, lease_timeout=5.0, segment_size=16384)
        opened.append(other)
        return other

    storage = JournalStorage(path, lease_timeout=5.0, segment_size=16384)
    yield Backend(storage, reopen, durable=True)
    for other in opened:
        await other.close()
    await storage.close()


@asynccontextmanager
async def redis_backend(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    server: RedisServer = request.getfixturevalue("redis_server")
    async with _redis(server.url, cluster=False) as backend:
        yield backend


@asynccontextmanager
async def redis_cluster_backend(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Backend]:
    cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
    async with _redis(cluster.url, cluster=True) as backend:
        yield backend


@asynccontextmanager
async def _redis(url: str, cluster: bool) -> AsyncIterator[Backend]:
    prefix = f"contract-{uuid.uuid4().hex[:12]}:"
    opened: list[RedisStorage] = []

    def open_one() -> RedisStorage:
        return RedisStorage.from_url(url, prefix=prefix, cluster=cluster, lease_timeout=5.0)

    async def reopen() -> QueueStorage:
        opened.append(open_one())
        return opened[-1]

    storage = open_one()
    yield Backend(storage, reopen, durable=True)
    await storage.close()
    for other in opened:
        await other.close()


BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], Any]] = {
    "dict": dict_backend,
    "disk": disk_backend,
    "journal": journal_backend,
    "redis": redis_backend,
    "redis-cluster": redis_cluster_backend,
}


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each backend in turn, empty, with a lease timeout of 5 seconds."""
    async with BACKENDS[request.param](tmp_path, request) as b:
        yield b
