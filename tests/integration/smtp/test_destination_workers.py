"""Two Queue processes over one Redis share a destination's limits and its dead mark.

Each worker is ``tests/integration/destination_worker.py``, relaying to one destination served
here over loopback (a sink, or a black hole); each enqueues its own messages, so that both have
work for the destination at once. Processes are stopped by their pid only.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from smtpq.storage import RedisStorage
from tests.helpers import until
from tests.integration.smtp.conftest import SinkFactory
from tests.integration.smtp.sink import RawServer
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[3]


class Worker:
    """One worker process: started, told to send, stopped by its pid."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(30):
            return (await self.proc.stdout.readline()).decode().strip()

    async def send(self, count: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"send {count}\n".encode())
        await self.proc.stdin.drain()
        assert await self.line() == "sent"

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def worker(redis_server: RedisServer, redis_prefix: str) -> AsyncIterator[WorkerFactory]:
    started: list[Worker] = []

    async def start(port: int, *options: str) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.integration.destination_worker",
            redis_server.url, redis_prefix, "127.0.0.1", str(port), *options,
            cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        w = Worker(proc)
        started.append(w)
        assert await w.line() == "ready"
        return w

    yield start
    for w in started:
        await w.stop()


async def test_two_workers_share_a_destinations_concurrency_limit(
    worker: WorkerFactory, sink_factory: SinkFactory
) -> None:
    slow = await sink_factory()
    slow.behaviour.rcpt_delay = 0.2
    a = await worker(slow.port, "--concurrency", "2")
    b = await worker(slow.port, "--concurrency", "2")
    await asyncio.gather(a.send(6), b.send(6))  # each alone would use 2 connections
    await until(lambda: len(slow.received) == 12, timeout=60)
    assert slow.most_transactions == 2  # together: 2
    senders = {r.sender.split(".")[0] for r in slow.received}
    assert len(senders) == 2  # both delivered


async def test_two_workers_share_a_destinations_rate(
    worker: WorkerFactory, sink_factory: SinkFactory
) -> None:
    sink = await sink_factory()
    rate = 5.0
    a = await worker(sink.port, "--rate", str(rate))
    b = await worker(sink.port, "--rate", str(rate))
    await asyncio.gather(a.send(15), b.send(15))
    await until(lambda: len(sink.received) == 30, timeout=60)
    times = sink.arrived_at
    measured = (len(times) - 1) / (times[-1] - times[0])
    assert rate * 0.9 <= measured <= rate * 1.1  # one limit for both, not 2 x 5/s
    assert len({r.sender.split(".")[0] for r in sink.received}) == 2


async def test_a_dead_mark_found_by_one_worker_defers_the_others_mail(
    worker: WorkerFactory, redis_server: RedisServer, redis_prefix: str
) -> None:
    hole = await RawServer(None).start()
    try:
        a = await worker(hole.port, "--timeout", "1", "--concurrency", "5")
        b = await worker(hole.port, "--timeout", "1", "--concurrency", "5")
        await a.send(10)
        store = RedisStorage.from_url(redis_server.url, prefix=redis_prefix)
        try:

            async def replies() -> list[str]:
                entries = [await store.get_entry(id) for id in await store.message_ids()]
                return [str(e.last_reply) for e in entries if e.last_reply is not None]

            for _ in range(300):  # the greetings time out: dead after 5 failures
                if len(await replies()) >= 5:
                    break
                await asyncio.sleep(0.05)
            assert hole.connections == 5
            await b.send(10)
            for _ in range(300):
                found = await replies()
                if sum("unreachable" in r for r in found) >= 10:
                    break
                await asyncio.sleep(0.05)
            assert sum("unreachable" in r for r in found) >= 10
            assert hole.connections == 5  # the other worker never connected
        finally:
            await store.close()
    finally:
        await hole.stop()
