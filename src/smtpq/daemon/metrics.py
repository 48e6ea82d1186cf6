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

import bisect
import math
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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


class _EventCounter:
    """A counter of queue events, a plain number until scraped: the events of every message
    count it (prometheus_client's Counter takes a lock and several calls per increment)."""

    __slots__ = ("created", "doc", "name", "value")

    def __init__(self, name: str, doc: str, created: float) -> None:
        self.name, self.doc = name, doc
        self.value = 0.0
        self.created = created

    def family(self) -> CounterMetricFamily:
        """The counter as prometheus_client's Counter would expose it."""
        return CounterMetricFamily(self.name, self.doc, value=self.value, created=self.created)


class _EventHistogram:
    """A histogram of durations, plain numbers until scraped (see :class:`_EventCounter`)."""

    __slots__ = ("bounds", "counts", "created", "doc", "name", "sum")

    def __init__(self, name: str, doc: str, buckets: Sequence[float], created: float) -> None:
        self.name, self.doc = name, doc
        self.bounds = (*(float(b) for b in buckets), math.inf)
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self.sum = 0.0
        self.created = created

    def observe(self, seconds: float) -> None:
        """Count one duration in the first bucket whose upper bound holds it."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def family(self) -> HistogramMetricFamily:
        """The histogram as prometheus_client's Histogram would expose it."""
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds, self.counts, strict=True):
            cumulative += count
            buckets.append((_bound_text(bound), float(cumulative)))
        family = HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.sum)
        family.add_sample(f"{self.name}_created", {}, self.created)
        return family


def _bound_text(bound: float) -> str:
    """A bucket's ``le`` label, written as prometheus_client writes it."""
    return "+Inf" if bound == math.inf else repr(bound)


class _EventCounts(Collector):
    """The counters and histograms that queue events feed, exposed when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        for counter in (m.accepted, m.delivered, m.deferred, m.bounced, m.expired):
            yield counter.family()
        yield m.attempts.family()
        yield m.writes.family()


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
        now = clock.time()
        self.accepted = _EventCounter("smtpq_messages_accepted", "Messages stored.", now)
        self.delivered = _EventCounter("smtpq_recipients_delivered", "Recipients delivered.", now)
        self.deferred = _EventCounter("smtpq_recipients_deferred", "Recipients deferred.", now)
        self.bounced = _EventCounter("smtpq_recipients_bounced", "Recipients bounced.", now)
        self.expired = _EventCounter(
            "smtpq_recipients_expired", "Recipients given up on after retries.", now
        )
        self.attempts = _EventHistogram(
            "smtpq_delivery_attempt_seconds", "Duration of delivery attempts.", _LATENCY, now
        )
        self.writes = _EventHistogram(
            "smtpq_storage_write_seconds", "Duration of durable message writes.", _LATENCY, now
        )
        r.register(_EventCounts(self))
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
        kind = event.kind
        if kind == "accepted":
            self.accepted.value += 1
            seconds = event.detail.get("seconds")
            if isinstance(seconds, float):
                self.writes.observe(seconds)
        elif kind == "attempted":
            seconds = event.detail.get("seconds")
            if isinstance(seconds, float):
                self.attempts.observe(seconds)
        elif kind == "delivered":
            self.delivered.value += len(event.recipients)
        elif kind == "deferred":
            self.deferred.value += len(event.recipients)
        elif kind == "bounced":
            self.bounced.value += len(event.recipients)
            if "by" in event.detail:  # an operator's bounce
                self.operator_actions.labels("bounced").inc()
        elif kind in ("expired", "failed"):
            self.expired.value += len(event.recipients)
        elif kind in OPERATOR_ACTIONS:  # bounced is matched above
            self.operator_actions.labels(kind).inc()

    async def render(self) -> bytes:
        """The text exposition format, with gauges fresh from the storage."""
        self.last_info = await self.storage.get_info()
        return generate_latest(self.registry)
