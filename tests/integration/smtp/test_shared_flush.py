"""Queues over one Redis sharing a destination's dead mark: an operator's flush through one of
them (the daemon's single admin API does so) sends every message, the others' too, without
waiting out any cool-down; and asking the store before deferring never mistakes a mark still
being written for a revival."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from smtpq.envelope import Envelope
from smtpq.queue import Queue
from smtpq.queue.destinations import DeadMark, DestinationLimits, DestinationPolicy
from smtpq.relay.smtp import SmtpRelayConfig, StaticSmtpRelay
from smtpq.storage import RedisStorage
from smtpq.storage.redis_destinations import RedisDestinationStore
from tests.helpers import until
from tests.integration.smtp.conftest import free_port
from tests.integration.smtp.sink import Sink
from tests.redis_server import RedisServer

PER_QUEUE = 15
COOL_DOWN = 600.0


def message(worker: str, n: int) -> Envelope:
    env = Envelope(f"{worker}.{n}@origin.example", [f"rcpt{n}@dest.example"])
    env.parse(f"Subject: {worker} {n}\r\n\r\nHello.\r\n".encode())
    return env


class Worker:
    """A Queue relaying to one smarthost, its storage and destination state in Redis."""

    def __init__(
        self, url: str, prefix: str, port: int, shared: type[RedisDestinationStore] | None = None
    ) -> None:
        self.port = port
        self.store = RedisStorage.from_url(url, prefix=prefix, lease_timeout=10.0)
        self.shared = (shared or RedisDestinationStore).from_url(url, prefix, lease_timeout=10.0)
        self.relay = StaticSmtpRelay(
            "127.0.0.1", port, config=SmtpRelayConfig(helo_name="w.smtpq.test", connect_timeout=2)
        )
        limits = DestinationLimits(dead_after=3, cool_down=COOL_DOWN, max_cool_down=4 * COOL_DOWN)
        self.queue = Queue(
            self.store,
            self.relay,
            backoff=lambda env, attempts: 3600.0,  # deferred: not due again within the test
            poll_interval=0.2,
            destinations=DestinationPolicy(default=limits),
            destination_store=self.shared,
        )

    def state(self) -> str | None:
        views = self.queue.destination_views()
        return views[0].state if views else None

    async def close(self) -> None:
        await self.queue.stop(grace_period=0)
        await self.relay.close()
        await self.shared.close()
        await self.store.close()


@pytest.fixture
async def workers(redis_server: RedisServer, redis_prefix: str) -> AsyncIterator[list[Worker]]:
    port = free_port()  # nothing listens yet: every connection is refused
    made = [Worker(redis_server.url, redis_prefix, port) for _ in range(2)]
    for w in made:
        await w.queue.start()
    yield made
    for w in made:
        await w.close()


async def test_a_flush_through_one_worker_sends_the_other_workers_mail_too(
    workers: list[Worker],
) -> None:
    a, b = workers
    for name, w in (("a", a), ("b", b)):
        for n in range(PER_QUEUE):
            [(_, result)] = await w.queue.enqueue(message(name, n))
            assert isinstance(result, str)
    # Both find the destination dead (by their own failures, or from the other's mark), and
    # every message is deferred for an hour.
    await until(lambda: a.state() == "dead" and b.state() == "dead", timeout=30)
    await until(lambda: a.queue.inflight == 0 and b.queue.inflight == 0, timeout=30)
    # Dead once, by the first failures: no worker took its own fresh mark, not yet in the
    # store, for a revival elsewhere and probed at once (which would double the cool-down).
    for w in (a, b):
        [view] = w.queue.destination_views()
        assert view.dead_until is not None
        assert view.dead_until <= time.time() + COOL_DOWN
    info = await a.store.get_info()
    assert info["size"] == 2 * PER_QUEUE

    sink = await Sink(port=a.port).start()
    try:
        assert await a.queue.flush() == 2 * PER_QUEUE
        # Whichever worker claims a message delivers it now: the one that was not asked
        # learns from the shared store that the cool-down is over before deferring anything.
        await until(lambda: len(sink.received) >= 2 * PER_QUEUE, timeout=30)
        senders = sorted(r.sender for r in sink.received)
        assert senders == sorted(f"{w}.{n}@origin.example" for w in "ab" for n in range(PER_QUEUE))
        name = a.queue.destination_views()[0].name
        assert await a.shared.dead_marks([name]) == {}
        # A worker that had none of the flushed mail may still take the destination for dead:
        # its next message asks the store, finds it revived, and goes out.
        for w in (a, b):
            [(_, result)] = await w.queue.enqueue(message("late", 0))
            assert isinstance(result, str)
        await until(lambda: len(sink.received) == 2 * PER_QUEUE + 2, timeout=30)
    finally:
        await sink.stop()


class SlowToMark(RedisDestinationStore):
    """A shared store whose dead marks take a while to be written (a script loaded anew, a
    slow link): the worker that found the destination dead must not ask the store meanwhile
    and take the missing mark for a revival elsewhere."""

    async def mark_dead(self, name: str, mark: DeadMark) -> None:
        await asyncio.sleep(0.3)
        await super().mark_dead(name, mark)


async def test_a_worker_waits_for_its_own_dead_mark_before_asking_the_store(
    redis_server: RedisServer, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    w = Worker(redis_server.url, redis_prefix, free_port(), SlowToMark)
    await w.queue.start()
    try:
        for n in range(PER_QUEUE):
            [(_, result)] = await w.queue.enqueue(message("a", n))
            assert isinstance(result, str)
        await until(lambda: w.state() == "dead" and w.queue.inflight == 0, timeout=30)
        await asyncio.sleep(0.5)  # the mark is written by now
        [view] = w.queue.destination_views()
        assert view.dead_until is not None
        assert view.dead_until <= time.time() + COOL_DOWN  # not doubled by a needless probe
        assert not [r for r in caplog.records if "probe failed" in r.getMessage()]
        assert set((await w.shared.dead_marks([view.name])).keys()) == {view.name}
    finally:
        await w.close()
