"""Prometheus metrics of a running queue, fed by the Queue's events.

Counters count recipients where the event is about recipients (delivered, deferred, bounced,
expired) and messages where it is about messages (accepted, operator actions). Gauges are read
from the storage at scrape time, the edges' refusals from the edges (:meth:`Metrics.add_edge`),
and the destinations' from the queue's scheduler: the ``smtpq_destination_*`` gauges have a
``destination`` label for the :data:`TOP_DESTINATIONS` busiest destinations (dead ones first)
and ``other`` for the rest, so that delivering to a million domains does not make a million
series. docs/grafana/smtpq.json is a dashboard of these metrics (a test checks that every
metric it queries is served here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from smtpq.clock import Clock
from smtpq.edge.server import REFUSALS, SmtpEdge
from smtpq.queue import QueueEvent
from smtpq.queue.destinations import DestinationView
from smtpq.storage.base import QueueStorage

__all__ = ["TOP_DESTINATIONS", "Metrics"]

#: Destinations with a label of their own; the others are summed as ``other``.
TOP_DESTINATIONS = 20

#: The operators' actions, counted per message (see :mod:`smtpq.daemon.ops`).
OPERATOR_ACTIONS = ("flushed", "held", "released", "deleted", "requeued", "bounced")

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _QueueGauges(Collector):
    """Queue size by state and the oldest message's age, read when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = self.metrics.last_info
        size = GaugeMetricFamily(
            "smtpq_queue_messages", "Messages in the queue, by state.", labels=["state"]
        )
        total = int(info.get("size") or 0)
        held = int(info.get("held") or 0)
        active = int(info.get("active") or 0)
        size.add_metric(["active"], active)
        size.add_metric(["held"], held)
        size.add_metric(["deferred"], max(0, total - held - active))
        yield size
        oldest = info.get("oldest")
        age = GaugeMetricFamily(
            "smtpq_oldest_message_age_seconds", "Age of the oldest queued message."
        )
        age.add_metric([], max(0.0, self.metrics.clock.time() - oldest) if oldest else 0.0)
        yield age


class _EdgeCounters(Collector):
    """What the edges refused, by reason (a fixed set of labels), their connections open, and
    how often accepting paused for want of descriptors; read from the edges when scraped."""

    def __init__(self, edges: list[SmtpEdge]) -> None:
        self.edges = edges

    def collect(self) -> Iterator[Metric]:
        refusals = CounterMetricFamily(
            "smtpq_edge_refusals",
            "Connections, sessions and commands the SMTP edge refused, by reason.",
            labels=["reason"],
        )
        for reason in REFUSALS:
            refusals.add_metric([reason], sum(edge.refusals[reason] for edge in self.edges))
        yield refusals
        pauses = CounterMetricFamily(
            "smtpq_edge_accept_pauses",
            "Times the SMTP edge stopped accepting because file descriptors ran out.",
        )
        pauses.add_metric([], sum(edge.accept_pauses for edge in self.edges))
        yield pauses
        connections = GaugeMetricFamily(
            "smtpq_edge_connections", "SMTP connections open at the edge."
        )
        connections.add_metric([], sum(edge.connections for edge in self.edges))
        yield connections


class _DestinationGauges(Collector):
    """Per destination: waiting, in flight, window, limit, dead, recent attempt rate."""

    def __init__(self, views: Callable[[], Sequence[DestinationView]]) -> None:
        self.views = views

    def collect(self) -> Iterator[GaugeMetricFamily]:
        views = sorted(
            self.views(), key=lambda v: (v.state == "active", -(v.waiting + v.in_flight), v.name)
        )
        top, rest = views[:TOP_DESTINATIONS], views[TOP_DESTINATIONS:]

        def family(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"smtpq_destination_{name}", text, labels=["destination"])

        waiting = family("waiting", "Messages waiting for a relay slot.")
        in_flight = family("in_flight", "Delivery attempts running.")
        window = family("window", "Attempts the concurrency window allows now.")
        limit = family("limit", "The concurrency limit.")
        dead = family("dead", "1 while dead (or probed), else 0; for other: how many are.")
        rate = family("attempts_per_second", "Attempts per second over the last minute.")
        for v in top:
            waiting.add_metric([v.name], v.waiting)
            in_flight.add_metric([v.name], v.in_flight)
            window.add_metric([v.name], v.window)
            limit.add_metric([v.name], v.limit)
            dead.add_metric([v.name], 0 if v.state == "active" else 1)
            rate.add_metric([v.name], v.rate)
        if rest:
            waiting.add_metric(["other"], sum(v.waiting for v in rest))
            in_flight.add_metric(["other"], sum(v.in_flight for v in rest))
            dead.add_metric(["other"], sum(v.state != "active" for v in rest))
            rate.add_metric(["other"], sum(v.rate for v in rest))
        yield from (waiting, in_flight, window, limit, dead, rate)
        known = GaugeMetricFamily(
            "smtpq_destinations", "Destinations the scheduler knows, by state.", labels=["state"]
        )
        for state in ("active", "dead", "probing"):
            known.add_metric([state], sum(v.state == state for v in views))
        yield known


class Metrics:
    """The daemon's metrics registry. Call :meth:`observe` with each QueueEvent.

    :param destinations: the queue's destinations (:meth:`smtpq.queue.Queue.destination_views`)
        for the ``smtpq_destination_*`` gauges.
    """

    def __init__(
        self,
        storage: QueueStorage,
        clock: Clock,
        *,
        destinations: Callable[[], Sequence[DestinationView]] | None = None,
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.last_info: dict[str, float | int | None] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = Counter("smtpq_messages_accepted", "Messages stored.", registry=r)
        self.delivered = Counter("smtpq_recipients_delivered", "Recipients delivered.", registry=r)
        self.deferred = Counter("smtpq_recipients_deferred", "Recipients deferred.", registry=r)
        self.bounced = Counter("smtpq_recipients_bounced", "Recipients bounced.", registry=r)
        self.expired = Counter(
            "smtpq_recipients_expired", "Recipients given up on after retries.", registry=r
        )
        self.attempts = Histogram(
            "smtpq_delivery_attempt_seconds", "Duration of delivery attempts.",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.writes = Histogram(
            "smtpq_storage_write_seconds", "Duration of durable message writes.",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.operator_actions = Counter(
            "smtpq_operator_actions",
            "Messages an operator named and changed, by action (a bare flush is not counted).",
            labelnames=["action"], registry=r,
        )  # fmt: skip
        for action in OPERATOR_ACTIONS:  # every series exists from the start, at 0
            self.operator_actions.labels(action)
        r.register(_QueueGauges(self))
        self.edges: list[SmtpEdge] = []
        r.register(_EdgeCounters(self.edges))
        if destinations is not None:
            r.register(_DestinationGauges(destinations))

    def add_edge(self, edge: SmtpEdge) -> None:
        """Serve ``edge``'s refusals and connections too."""
        self.edges.append(edge)

    def observe(self, event: QueueEvent) -> None:
        """Count one queue event."""
        n = len(event.recipients)
        seconds = event.detail.get("seconds")
        if event.kind == "accepted":
            self.accepted.inc()
            if isinstance(seconds, float):
                self.writes.observe(seconds)
        elif event.kind == "attempted" and isinstance(seconds, float):
            self.attempts.observe(seconds)
        elif event.kind == "delivered":
            self.delivered.inc(n)
        elif event.kind == "deferred":
            self.deferred.inc(n)
        elif event.kind == "bounced":
            self.bounced.inc(n)
            if "by" in event.detail:  # an operator's bounce
                self.operator_actions.labels("bounced").inc()
        elif event.kind in ("expired", "failed"):
            self.expired.inc(n)
        elif event.kind in OPERATOR_ACTIONS:  # bounced is matched above
            self.operator_actions.labels(event.kind).inc()

    async def render(self) -> bytes:
        """The text exposition format, with gauges fresh from the storage."""
        self.last_info = await self.storage.get_info()
        return generate_latest(self.registry)
