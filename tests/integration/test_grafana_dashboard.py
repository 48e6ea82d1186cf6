"""docs/grafana/smtpq.json queries only what ``/metrics`` serves: each metric name and label in
its PromQL is checked against a real Metrics registry, scraped after real queue traffic."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtpq import DictStorage, ManualClock, Queue, Reply
from smtpq.daemon.metrics import Metrics
from tests.helpers import ScriptedRelay, make_envelope, until

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "smtpq.json"
_METRIC = re.compile(r"\bsmtpq_[a-z0-9_]+")
_SELECTOR = re.compile(r"\b(smtpq_[a-z0-9_]+)\{([^}]*)\}")
_BY = re.compile(r"\bby \(([^)]*)\)")
#: Labels Prometheus adds when it scrapes, and the histogram's own.
_SCRAPE_LABELS = {"instance", "job", "le"}


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside rows."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every panel target and of the template variables."""
    found = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append(query["query"])
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


async def scrape() -> dict[str, set[str]]:
    """Metric sample names served after real traffic, each with the label names it has."""
    clock = ManualClock()
    relay = ScriptedRelay(
        lambda rcpt, n: Reply("451", "4.7.1 Later") if rcpt.startswith("slow") else None
    )
    store = DictStorage()
    metrics = Metrics(store, clock)
    queue = Queue(store, relay, clock=clock, hostname="mx.test")
    queue.observers.append(metrics.observe)
    async with queue:
        await queue.enqueue(make_envelope(recipients=["slow@example.com", "fast@example.com"]))
        await until(lambda: queue.inflight == 0)
        text = (await metrics.render()).decode()
    served: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            served.setdefault(sample.name, set()).update(sample.labels)
    return served


async def test_every_metric_the_dashboard_queries_is_served(dashboard: dict[str, Any]) -> None:
    served = await scrape()
    queries = expressions(dashboard)
    used = {name for expr in queries for name in _METRIC.findall(expr)}
    assert used, "the dashboard queries no smtpq metric"
    assert used <= set(served), f"not served: {sorted(used - set(served))}"
    for expr in queries:
        names = set(_METRIC.findall(expr))
        for name, matchers in _SELECTOR.findall(expr):
            labels = {m.split("=")[0].rstrip("!~").strip() for m in matchers.split(",") if m}
            assert labels - _SCRAPE_LABELS <= served[name], (name, expr)
        for group in _BY.findall(expr):
            for label in {g.strip() for g in group.split(",")} - _SCRAPE_LABELS:
                assert any(label in served[n] for n in names), (label, expr)


def test_what_the_issue_asks_for_is_on_it(dashboard: dict[str, Any]) -> None:
    used = {name for expr in expressions(dashboard) for name in _METRIC.findall(expr)}
    assert {
        "smtpq_queue_messages",  # queue size by state
        "smtpq_messages_accepted_total",
        "smtpq_recipients_delivered_total",
        "smtpq_recipients_deferred_total",
        "smtpq_recipients_bounced_total",
        "smtpq_oldest_message_age_seconds",
        "smtpq_delivery_attempt_seconds_bucket",  # attempt latency
    } <= used
    assert any("by (state)" in expr for expr in expressions(dashboard))


def test_the_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    every = list(panels(dashboard["panels"]))
    assert len({p["id"] for p in every}) == len(every)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    text = json.dumps(dashboard)
    assert set(re.findall(r"\$\{?([a-z_]+)", text)) - {"__rate_interval"} <= variables
    for p in every:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["title"]
        assert p["description"]
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        for target in p["targets"]:
            # Every selector is narrowed to the chosen instances.
            for _, matchers in _SELECTOR.findall(target["expr"]):
                assert 'instance=~"$instance"' in matchers, target["expr"]
