"""Destinations as operators see them: the admin API's ``/queue/destinations``, ``/metrics``,
and the table of ``smtpq queue destinations``, on a live queue relaying to loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtpq import DictStorage, Envelope, ManualClock, Queue
from smtpq.daemon.admin import AdminServer
from smtpq.daemon.client import AdminClient
from smtpq.daemon.destinations import merge_destinations, render_destinations
from smtpq.daemon.metrics import TOP_DESTINATIONS, Metrics
from smtpq.queue.destinations import DestinationView
from smtpq.relay import MxRelayConfig, MxSmtpRelay, Route, SmtpRelayConfig
from tests.helpers import until
from tests.integration.smtp.conftest import free_port
from tests.integration.smtp.sink import Sink


def message(rcpt: str) -> Envelope:
    env = Envelope("sender@example.org", [rcpt])
    env.parse(b"From: <sender@example.org>\r\nSubject: x\r\n\r\nbody\r\n")
    return env


class Live:
    def __init__(self, queue: Queue, client: AdminClient, down: int, up: int) -> None:
        self.queue, self.client = queue, client
        self.down, self.up = f"127.0.0.1:{down}", f"127.0.0.1:{up}"


@pytest.fixture
async def live(tmp_path: Path, sink: Sink) -> AsyncIterator[Live]:
    down = free_port()
    routes = {"down.example": Route("127.0.0.1", down), "up.example": Route("127.0.0.1", sink.port)}
    relay = MxSmtpRelay(MxRelayConfig(routes=routes), SmtpRelayConfig(helo_name="relay.test"))
    clock = ManualClock()
    store = DictStorage()
    queue = Queue(store, relay, clock=clock, hostname="mx.test", backoff=lambda e, n: 600.0)
    metrics = Metrics(store, clock, destinations=queue.destination_views)
    server = AdminServer(queue, metrics, socket_path=tmp_path / "admin.sock")
    async with queue:
        await server.start()
        try:
            yield Live(queue, AdminClient(tmp_path / "admin.sock"), down, sink.port)
        finally:
            await server.stop()
            await relay.close()


async def test_destinations_through_the_admin_api_and_metrics(live: Live, sink: Sink) -> None:
    for i in range(7):
        await live.queue.enqueue(message(f"r{i}@down.example"))
    await live.queue.enqueue(message("a@up.example"))
    await until(lambda: len(sink.received) == 1)
    await until(lambda: live.queue.inflight == 0)
    data: dict[str, Any] = await live.client.get("/queue/destinations")
    rows = {r["name"]: r for r in data["destinations"]}
    down, up = rows[live.down], rows[live.up]
    assert down["state"] == "dead"
    assert down["queued"] == 7  # all still queued (one kept for the probe)
    assert (down["window"], down["limit"], down["in_flight"]) == (1, 20, 0)
    assert "connection refused" in down["last_error"]
    assert down["dead_until"] == live.queue.clock.time() + 300
    assert (up["state"], up["queued"], up["attempts"]) == ("active", 0, 1)
    quick: dict[str, Any] = await live.client.get("/queue/destinations?scan=0")
    counts = {r["name"]: r["queued"] for r in quick["destinations"]}
    assert counts == {live.down: None, live.up: None}

    table = render_destinations(merge_destinations([data]))
    lines = table.splitlines()
    heading = ["DESTINATION", "QUEUED", "WAITING", "ACTIVE", "WINDOW", "RATE", "STATE"]
    assert lines[0].split() == heading
    assert lines[1].startswith(live.down)  # the dead first
    assert "dead until" in lines[1]
    assert "connection refused" in lines[2]

    text = await live.client.get_text("/metrics")
    samples = {
        (s.name, s.labels.get("destination")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("smtpq_destination_dead", live.down)] == 1
    assert samples[("smtpq_destination_dead", live.up)] == 0
    assert samples[("smtpq_destination_limit", live.up)] == 20
    states = {
        s.labels["state"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "smtpq_destinations"
    }
    assert states == {"active": 1, "dead": 1, "probing": 0}


def test_metrics_cardinality_is_bounded() -> None:
    def view(i: int) -> DestinationView:
        return DestinationView(
            name=f"d{i}.example", waiting=i, in_flight=0, window=5, limit=20,
            state="dead" if i % 10 == 0 else "active", dead_until=None, last_error=None,
            failures=0, rate=1.0, attempts=1, connection_failures=0, deferred=0, postponed=0,
            message_rate=None, connection_rate=None,
        )  # fmt: skip

    views = [view(i) for i in range(200)]
    metrics = Metrics(DictStorage(), ManualClock(), destinations=lambda: views)
    families = {f.name: f for f in metrics.registry.collect()}
    waiting = families["smtpq_destination_waiting"].samples
    labels = {s.labels["destination"] for s in waiting}
    assert len(labels) == TOP_DESTINATIONS + 1
    assert "other" in labels
    assert "d0.example" in labels  # dead ones come first
    assert sum(s.value for s in waiting) == sum(range(200))  # nothing lost in "other"
    dead = {s.labels["destination"]: s.value for s in families["smtpq_destination_dead"].samples}
    assert sum(dead.values()) == 20
