"""The queue's event counters expose what prometheus_client's own Counter and Histogram would."""

from __future__ import annotations

import asyncio
import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from smtpq.clock import ManualClock
from smtpq.daemon.metrics import Metrics
from smtpq.queue import QueueEvent
from smtpq.queue.event import EventKind
from smtpq.storage.dict import DictStorage

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
WRITES = (0.003, 0.0025, 0.0, 200.0, 0.001, 60.0)
ATTEMPTS = (0.04, 0.5)


def without_times(text: bytes) -> list[str]:
    """The exposition's lines, the ``_created`` time stamps left out."""
    created = re.compile(r"(_created(\{[^}]*\})?) \S+$")
    return [created.sub(r"\1", line) for line in text.decode().splitlines()]


def reference() -> list[str]:
    r = CollectorRegistry()
    accepted = Counter("smtpq_messages_accepted", "Messages stored.", registry=r)
    delivered = Counter("smtpq_recipients_delivered", "Recipients delivered.", registry=r)
    deferred = Counter("smtpq_recipients_deferred", "Recipients deferred.", registry=r)
    bounced = Counter("smtpq_recipients_bounced", "Recipients bounced.", registry=r)
    Counter("smtpq_recipients_expired", "Recipients given up on after retries.", registry=r)
    attempts = Histogram(
        "smtpq_delivery_attempt_seconds", "Duration of delivery attempts.",
        buckets=LATENCY, registry=r,
    )  # fmt: skip
    writes = Histogram(
        "smtpq_storage_write_seconds", "Duration of durable message writes.",
        buckets=LATENCY, registry=r,
    )  # fmt: skip
    for seconds in WRITES:
        accepted.inc()
        writes.observe(seconds)
    for seconds in ATTEMPTS:
        attempts.observe(seconds)
    delivered.inc(2)
    deferred.inc(1)
    bounced.inc(3)
    return without_times(generate_latest(r))


def test_event_counters_and_histograms_are_exposed_as_prometheus_client_does() -> None:
    metrics = Metrics(DictStorage(), ManualClock())
    for seconds in WRITES:
        metrics.observe(QueueEvent(EventKind.ACCEPTED, "a" * 32, ["x@y"], seconds=seconds))
    for seconds in ATTEMPTS:
        metrics.observe(QueueEvent(EventKind.ATTEMPTED, "a" * 32, ["x@y"], seconds=seconds))
    metrics.observe(QueueEvent(EventKind.DELIVERED, "a" * 32, ["x@y", "z@y"]))
    metrics.observe(QueueEvent(EventKind.DEFERRED, "a" * 32, ["x@y"]))
    metrics.observe(QueueEvent(EventKind.BOUNCED, "a" * 32, ["x@y", "z@y", "w@y"], dsn="none"))
    served = without_times(asyncio.run(metrics.render()))
    expected = reference()
    start = served.index(expected[0])
    assert served[start : start + len(expected)] == expected
