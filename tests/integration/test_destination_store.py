"""One suite over both destination stores: the local one and Redis (a real redis-server)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from smtpq.queue.destinations import DeadMark, DestinationLimits
from smtpq.queue.shared import BUSY_RETRY, DestinationStore, LocalDestinationStore, Permit
from smtpq.storage.redis_destinations import RedisDestinationStore
from tests.redis_server import RedisServer

T0 = 1_800_000_000.0
LIMITS = DestinationLimits(concurrency=2)


@pytest.fixture(params=["local", "redis", "cluster"])
async def store(
    request: pytest.FixtureRequest, redis_prefix: str
) -> AsyncIterator[DestinationStore]:
    if request.param == "local":
        yield LocalDestinationStore()
        return
    cluster = request.param == "cluster"
    server = request.getfixturevalue("redis_cluster" if cluster else "redis_server")
    made = RedisDestinationStore.from_url(
        server.url, redis_prefix, cluster=cluster, lease_timeout=30
    )
    yield made
    await made.close()


async def test_the_concurrency_limit_holds_and_releases(store: DestinationStore) -> None:
    assert (await store.acquire("d", LIMITS, "t1", T0, probe=False)).granted
    assert (await store.acquire("d", LIMITS, "t2", T0, probe=False)).granted
    third = await store.acquire("d", LIMITS, "t3", T0, probe=False)
    assert (third.granted, third.retry_at) == (False, T0 + BUSY_RETRY)
    assert (await store.acquire("other", LIMITS, "t4", T0, probe=False)).granted
    await store.release("d", "t1")
    assert (await store.acquire("d", LIMITS, "t3", T0, probe=False)).granted


async def test_a_local_store_releases_at_once(store: DestinationStore) -> None:
    assert (await store.acquire("d", LIMITS, "t1", T0, probe=False)).granted
    assert (await store.acquire("d", LIMITS, "t2", T0, probe=False)).granted
    local = isinstance(store, LocalDestinationStore)
    # Only a store without I/O releases without being awaited; another says it did not.
    assert store.release_now("d", "t1") is local
    if not local:
        await store.release("d", "t1")
    assert (await store.acquire("d", LIMITS, "t3", T0, probe=False)).granted


async def test_the_message_rate_spaces_the_starts(store: DestinationStore) -> None:
    limits = DestinationLimits(concurrency=100, message_rate=2.0)  # every 0.5 s
    assert (await store.acquire("d", limits, "a", T0, probe=False)).granted
    early = await store.acquire("d", limits, "b", T0 + 0.1, probe=False)
    assert early.granted is False
    assert early.retry_at == pytest.approx(T0 + 0.25)  # half an interval early at most
    assert (await store.acquire("d", limits, "b", T0 + 0.25, probe=False)).granted
    assert not (await store.acquire("d", limits, "c", T0 + 0.5, probe=False)).granted
    assert (await store.acquire("d", limits, "c", T0 + 0.75, probe=False)).granted


async def test_connections_are_reserved_at_the_rate(store: DestinationStore) -> None:
    starts = [await store.reserve_connection("d", 4.0, T0) for _ in range(4)]
    assert starts == pytest.approx([T0, T0 + 0.125, T0 + 0.375, T0 + 0.625])


async def test_a_dead_mark_refuses_then_admits_one_probe(store: DestinationStore) -> None:
    mark = DeadMark(T0 + 300, "451 4.4.1 No answer from host", 300.0)
    await store.mark_dead("d", mark)
    refused = await store.acquire("d", LIMITS, "a", T0 + 10, probe=False)
    assert (refused.granted, refused.mark) == (False, mark)
    assert await store.dead_marks(["d", "x"]) == {"d": mark}
    # After the cool-down only a probe is let through, and one at a time.
    late = await store.acquire("d", LIMITS, "a", T0 + 301, probe=False)
    assert late.mark is not None
    assert late.mark.until == T0 + 300  # past: ask again as a probe
    assert (await store.acquire("d", LIMITS, "p1", T0 + 301, probe=True)).granted
    other = await store.acquire("d", LIMITS, "p2", T0 + 302, probe=True)
    # Another probe runs: ask again soon (waiting for its finding, not deferring).
    assert other == Permit(False, retry_at=T0 + 302 + BUSY_RETRY)
    # The probe failed: dead again, longer; its end lets a new probe through.
    await store.mark_dead("d", DeadMark(T0 + 902, "451 4.4.1 again", 600.0))
    await store.release("d", "p1")
    assert not (await store.acquire("d", LIMITS, "p2", T0 + 900, probe=True)).granted
    assert (await store.acquire("d", LIMITS, "p2", T0 + 903, probe=True)).granted
    await store.clear_dead("d")
    await store.release("d", "p2")
    assert await store.dead_marks(["d"]) == {}
    assert (await store.acquire("d", LIMITS, "n", T0 + 904, probe=False)).granted


async def test_redis_keys_one_slot_per_destination_and_leases_run_out(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    store = RedisDestinationStore.from_url(redis_server.url, redis_prefix, lease_timeout=30)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert (await store.acquire("ex{am}ple", LIMITS, "t1", T0, probe=False)).granted
        await store.mark_dead("mx.example.com", DeadMark(T0 + 60, "e", 300.0))
        keys = sorted([k.decode() async for k in raw.scan_iter(match=f"{redis_prefix}*")])
        assert f"{redis_prefix}dest:{{mx.example.com}}" in keys
        [leases] = [k for k in keys if k.endswith(":leases")]
        assert leases.startswith(f"{redis_prefix}dest:{{")
        assert "am" not in leases  # braces in a name: hashed, a hash tag of its own
        assert all([await raw.ttl(k) > 0 for k in keys])  # nothing stays forever
        # A worker that died holds its lease until it runs out; a renewed one holds on.
        assert (await store.acquire("d", LIMITS, "dead", T0, probe=False)).granted
        assert (await store.acquire("d", LIMITS, "live", T0, probe=False)).granted
        await store.renew({"d": ["live"]}, T0 + 20)
        assert (await store.acquire("d", LIMITS, "new", T0 + 31, probe=False)).granted
        assert not (await store.acquire("d", LIMITS, "more", T0 + 31, probe=False)).granted
        await store.release("d", "live")
        assert (await store.acquire("d", LIMITS, "more", T0 + 31, probe=False)).granted
    finally:
        await raw.aclose()
        await store.close()


async def test_a_flush_ends_every_cool_down_under_way(store: DestinationStore) -> None:
    await store.mark_dead("a", DeadMark(T0 + 300, "451 4.4.1 refused", 300.0))
    await store.mark_dead("b", DeadMark(T0 + 5, "451 4.4.1 refused", 300.0))  # over at T0 + 10
    await store.mark_dead("c", DeadMark(T0 + 300, "451 4.4.1 refused", 300.0))
    await store.clear_dead("c")  # answered again
    assert await store.end_cool_downs(T0 + 10) == ["a"]
    marks = await store.dead_marks(["a", "b"])
    assert marks["a"] == DeadMark(T0 + 10, "451 4.4.1 refused", 300.0)
    assert marks["b"].until == T0 + 5
    assert not (await store.acquire("a", LIMITS, "n", T0 + 11, probe=False)).granted
    assert (await store.acquire("a", LIMITS, "p", T0 + 11, probe=True)).granted  # the probe
    assert await store.end_cool_downs(T0 + 12) == []
