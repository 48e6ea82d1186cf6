"""Scheduling per destination against real servers on loopback: a black hole (accepts, never
answers), a refusing port, slow and healthy sinks. The queue's clock is a ManualClock; the
network's timeouts are real (a few seconds), and tests compare counts and orderings, not times.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from smtpq import DictStorage, Envelope, ManualClock, Queue, QueueEvent
from smtpq.queue.destinations import DestinationLimits, DestinationPolicy, DestinationView
from smtpq.queue.event import EventKind
from smtpq.relay import MxRelayConfig, MxSmtpRelay, Route, SmtpRelayConfig
from tests.helpers import until
from tests.integration.smtp.conftest import SinkFactory, free_port
from tests.integration.smtp.sink import RawServer, Sink

CONNECT_TIMEOUT = 3.0


def message(domain: str, n: int) -> Envelope:
    env = Envelope("sender@example.org", [f"r{n}@{domain}"])
    env.parse(b"From: <sender@example.org>\r\nSubject: %d\r\n\r\nbody\r\n" % n)
    return env


@dataclass
class Harness:
    """A queue over DictStorage, relaying by MxSmtpRelay with static routes to loopback."""

    queue: Queue
    clock: ManualClock
    store: DictStorage
    routes: dict[str, int]
    events: list[QueueEvent] = field(default_factory=list)

    def view(self, domain: str) -> DestinationView:
        name = f"127.0.0.1:{self.routes[domain]}"
        [found] = [v for v in self.queue.destination_views() if v.name == name]
        return found

    def count(self, kind: EventKind, domain: str) -> int:
        return sum(
            1 for e in self.events if e.kind is kind and e.recipients[0].endswith("@" + domain)
        )

    async def send(self, domain: str, n: int) -> None:
        for i in range(n):
            [(_, id)] = await self.queue.enqueue(message(domain, i))
            assert isinstance(id, str)

    async def settled(self) -> None:
        """Wait until nothing is in memory and nothing is due."""
        async with asyncio.timeout(60):
            while True:
                due = self.store._schedule.next_due()
                if self.queue.inflight == 0 and (due is None or due > self.clock.time()):
                    return
                await asyncio.sleep(0.01)

    async def last_replies(self) -> list[str]:
        out = []
        for _, id in await self.store.load():
            entry = await self.store.get_entry(id)
            out.append(str(entry.last_reply))
        return out


@pytest.fixture
async def harness() -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[Queue, MxSmtpRelay]] = []

    async def make(routes: dict[str, int], **options: Any) -> Harness:
        clock = ManualClock()
        relay = MxSmtpRelay(
            MxRelayConfig(routes={d: Route("127.0.0.1", port) for d, port in routes.items()}),
            SmtpRelayConfig(helo_name="relay.smtpq.test", connect_timeout=CONNECT_TIMEOUT),
        )
        store = DictStorage()
        options.setdefault("backoff", lambda env, attempts: 60.0)
        queue = Queue(store, relay, clock=clock, hostname="mx.test", **options)
        h = Harness(queue, clock, store, routes)
        queue.observers.append(h.events.append)
        await queue.start()
        made.append((queue, relay))
        return h

    yield make
    for queue, relay in made:
        await queue.stop(grace_period=0)
        await relay.close()


async def test_dead_destinations_do_not_hold_the_slots_of_a_healthy_one(
    harness: Callable[..., Any], sink: Sink
) -> None:
    hole = await RawServer(None).start()  # accepts and never says a word
    try:
        refused = free_port()
        h: Harness = await harness(
            {"hole.test": hole.port, "refused.test": refused, "ok.test": sink.port},
            relay_pool=20,
        )
        await h.send("hole.test", 200)
        await h.send("refused.test", 200)
        await h.send("ok.test", 100)  # sent after the others, behind them in every queue

        await until(lambda: len(sink.received) == 100, timeout=60)
        # All delivered while the black hole's first attempts still wait for a greeting.
        hole_view = h.view("hole.test")
        assert (hole_view.attempts, hole_view.in_flight) == (0, 5)
        assert hole.connections == 5  # its window, no more
        assert h.view("refused.test").state == "dead"
        assert h.count(EventKind.ATTEMPTED, "refused.test") == 5  # the rest: not connected for

        # The greeting times out: dead, and everything waiting is deferred without connecting
        # (or, beyond what a ready queue holds, postponed: not attempted, not counted).
        await until(lambda: h.view("hole.test").state == "dead", timeout=60)
        await h.settled()
        for domain in ("hole.test", "refused.test"):
            handled = h.count(EventKind.DEFERRED, domain) + h.count(EventKind.POSTPONED, domain)
            assert handled == 200
        assert hole.connections == 5
        replies = [r for r in await h.last_replies() if r != "None"]  # None: postponed
        assert all("451 4.4.1" in r for r in replies)
        assert sum("unreachable" in r for r in replies) == len(replies) - 10
        assert f"destination 127.0.0.1:{hole.port} unreachable: 451 4.4.1 No answer" in (
            next(r for r in replies if f":{hole.port} unreachable" in r)
        )

        # A cool-down later everything is due again: one probe each, the rest wait for it.
        await h.clock.advance(300)
        await until(lambda: h.view("refused.test").attempts == 6, timeout=60)
        await until(lambda: hole.connections == 6, timeout=60)
        await until(lambda: h.view("hole.test").attempts == 6, timeout=60)  # failed too
        for _ in range(4):  # the postponed ones come back, and are deferred
            await h.clock.advance(60)
            await h.settled()
        assert (hole.connections, h.view("hole.test").attempts) == (6, 6)
        assert h.count(EventKind.ATTEMPTED, "refused.test") == 6
        assert len(await h.store.load()) == 400  # nothing lost
    finally:
        await hole.stop()


async def test_a_slow_destination_holds_no_more_than_its_limit(
    harness: Callable[..., Any], sink_factory: SinkFactory
) -> None:
    slow = await sink_factory()
    slow.behaviour.rcpt_delay = 0.3
    fast = await sink_factory()
    policy = DestinationPolicy(
        patterns=((f"127.0.0.1:{slow.port}", DestinationLimits(concurrency=3, initial_window=3)),)
    )
    h: Harness = await harness(
        {"slow.test": slow.port, "fast.test": fast.port}, destinations=policy, relay_pool=10
    )
    await h.send("slow.test", 30)
    await h.send("fast.test", 30)
    await until(lambda: len(fast.received) == 30, timeout=60)
    assert len(slow.received) < 30  # the slow one is still at it...
    assert h.view("slow.test").in_flight <= 3  # ...within its limit
    postponed = h.count(EventKind.POSTPONED, "slow.test")
    assert postponed == 30 - 3 - 4 * 3  # beyond 3 running and its backlog: given back for later
    for _ in range(100):  # their time comes
        if len(slow.received) == 30:
            break
        await h.clock.advance(5)
        await asyncio.sleep(0.2)
    assert len(slow.received) == 30
    assert slow.most_transactions == 3
    assert h.view("slow.test").window == 3


async def test_a_destination_that_comes_back_is_used_within_one_cool_down(
    harness: Callable[..., Any],
) -> None:
    port = free_port()
    h: Harness = await harness({"back.test": port})
    await h.send("back.test", 10)
    await until(lambda: h.count(EventKind.DEFERRED, "back.test") == 9)
    assert h.view("back.test").state == "dead"
    sink = await Sink(port=port).start()  # it comes back
    try:
        await h.send("back.test", 1)
        await until(lambda: h.count(EventKind.DEFERRED, "back.test") == 10)
        assert sink.connections == 0  # dead: deferred without connecting
        await h.clock.advance(299)
        await asyncio.sleep(0.2)
        assert sink.connections == 0
        await h.clock.advance(1)  # the cool-down is over: the message kept for it probes
        await until(lambda: h.view("back.test").state == "active", timeout=30)
        assert len(sink.received) == 1
        assert h.count(EventKind.POSTPONED, "back.test") == 1  # the one kept for the probe
        await h.clock.advance(60)  # the others, when their retries are due
        await until(lambda: h.count(EventKind.DELIVERED, "back.test") == 11, timeout=30)
        await h.settled()
        assert len(sink.received) == 11
        assert await h.store.load() == []
    finally:
        await sink.stop()


async def test_a_flush_probes_a_dead_destination_at_once_and_delivers_its_backlog(
    harness: Callable[..., Any],
) -> None:
    """An operator repairs the next hop and flushes (Postfix's flush forgets dead destinations
    likewise): no waiting out the cool-down, and the backlog, more than a ready queue holds,
    goes out without waiting for any clock."""
    port = free_port()
    h: Harness = await harness(
        {"fixed.test": port}, destinations=DestinationPolicy(DestinationLimits(concurrency=2))
    )
    await h.send("fixed.test", 40)
    await until(lambda: h.view("fixed.test").state == "dead")
    await h.settled()  # deferred, or postponed beyond the ready queue: nothing due on this clock
    assert h.count(EventKind.DELIVERED, "fixed.test") == 0
    sink = await Sink(port=port).start()
    try:
        assert await h.queue.flush() == 40
        await until(lambda: h.count(EventKind.DELIVERED, "fixed.test") == 40, timeout=30)
        assert h.view("fixed.test").state == "active"
        assert len(sink.received) == 40
        await h.settled()
        assert await h.store.load() == []
    finally:
        await sink.stop()


async def test_a_rate_limit_is_honoured_at_the_sink(
    harness: Callable[..., Any], sink: Sink
) -> None:
    rate = 10.0
    policy = DestinationPolicy(
        patterns=((f"127.0.0.1:{sink.port}", DestinationLimits(message_rate=rate)),)
    )
    h: Harness = await harness({"rate.test": sink.port}, destinations=policy)
    await h.send("rate.test", 40)
    arrivals: list[float] = []  # the queue's (manual) time of each delivery
    step = 0.01
    for _ in range(2000):
        if len(arrivals) == 40:
            break
        await h.clock.advance(step)
        await until(lambda: h.view("rate.test").in_flight == 0)
        arrivals.extend([h.clock.time()] * (len(sink.received) - len(arrivals)))
    assert len(arrivals) == 40
    # Never ahead of the limit (half an interval early at most) ...
    start = arrivals[0]
    for n, at in enumerate(arrivals):
        assert n <= (at - start) * rate + 1.5
    # ... and, backlogged, at it: the measured rate within 10 % of the limit.
    measured = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    assert rate * 0.9 <= measured <= rate * 1.1
