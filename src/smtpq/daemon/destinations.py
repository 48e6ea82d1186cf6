"""Destinations for operators: ``smtpq queue destinations``, its admin route, and the daemon's
destination store.

A listing (like Postfix's ``qshape`` beside ``postqueue -j``'s delay reasons) has a row per
destination: messages queued for it (a scan of the stored queue, each message's pending
recipients mapped to their destinations by the relay), the worker's own view (waiting for a
slot, in flight, window and limit, recent attempt rate, counters), and its state: active, dead
until a time with the last error (probing: its probe runs), or idle — not attempted since the
daemon started, or no daemon runs — and not marked dead. A running daemon answers from its
scheduler and the stored queue; without one the command scans the stored queue, and reads the
dead marks where they are shared (Redis).

How the daemon shares destination limits (:func:`destination_setup`): with Redis storage every
worker and node uses one :class:`~smtpq.storage.redis_destinations.RedisDestinationStore`, so
each limit, rate and dead mark holds cluster-wide. With disk (or memory) storage the workers
share nothing: each gets an equal share of every concurrency limit, initial window and rate
(:meth:`~smtpq.queue.destinations.DestinationPolicy.share`), since the kernel spreads the
incoming connections evenly among them; a destination's totals then stay within its limits,
and each worker finds a dead destination on its own (at most ``dead_after`` connections each).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from smtpq.daemon import ops
from smtpq.daemon.config import Config, ConfigError, StorageType
from smtpq.envelope import Envelope
from smtpq.queue import Queue
from smtpq.queue.destinations import UNLIMITED, DestinationPolicy, format_rate
from smtpq.queue.shared import DestinationStore, LocalDestinationStore
from smtpq.relay.base import Relay
from smtpq.storage.redis_destinations import RedisDestinationStore

__all__ = [
    "describe_destinations",
    "destination_policy",
    "destination_setup",
    "merge_destinations",
    "render_destinations",
]


def destination_policy(config: Config, workers: int) -> DestinationPolicy:
    """The destination limits one worker enforces (see the module docstring)."""
    if config.storage.type == StorageType.REDIS:
        return config.destinations
    return config.destinations.share(workers)


def destination_setup(config: Config, workers: int) -> tuple[DestinationPolicy, DestinationStore]:
    """The policy and the store of one daemon worker (see the module docstring)."""
    store: DestinationStore = LocalDestinationStore()
    if config.storage.type == StorageType.REDIS:
        settings = config.storage
        try:
            store = RedisDestinationStore.from_url(
                settings.url,
                settings.prefix,
                cluster=settings.cluster,
                lease_timeout=settings.lease_timeout,
            )
        except ValueError as exc:
            raise ConfigError(f"storage.url: {exc}") from None
    return destination_policy(config, workers), store


async def describe_destinations(
    queue: Queue, relay: Relay | None, store: DestinationStore, *, scan: bool = True
) -> dict[str, Any]:
    """The destinations of one queue: ``{"now": t, "destinations": [row, ...]}``.

    ``relay`` maps the queued messages to destinations; ``store`` has the shared dead marks.
    ``scan``: count the queued messages per destination (reads every message's record, as a
    listing does); without, only the destinations the scheduler knows, with no counts.
    """
    now = queue.clock.time()
    rows: dict[str, dict[str, Any]] = {v.name: v.to_dict() for v in queue.destination_views()}
    if scan and relay is not None:
        queued = await _queued(ops.iter_messages(queue.store, now), relay)
        for name, count in queued.items():
            rows.setdefault(name, {"name": name})["queued"] = count
    marks = await store.dead_marks(sorted(rows))
    for name, mark in marks.items():
        row = rows[name]
        if mark.until > now and row.get("state", "idle") in ("active", "idle"):
            # Marked dead by another worker, not learnt here yet.
            row.update(state="dead", dead_until=mark.until, last_error=mark.error)
    for row in rows.values():
        row.setdefault("queued", 0 if scan else None)
        row.setdefault("state", "idle")
    return {"now": now, "destinations": list(rows.values())}


async def _queued(messages: Any, relay: Relay) -> Counter[str]:
    """Messages per destination: each message once per destination it has recipients for."""
    counts: Counter[str] = Counter()
    async for summary in messages:
        env = Envelope(summary["sender"], list(summary["recipients"]))
        counts.update(relay.destinations(env).keys())
    return counts


_SUMMED = (
    "queued", "waiting", "in_flight", "rate", "attempts", "connection_failures", "deferred",
    "postponed",
)  # fmt: skip


#: Which state a merged row shows: the gravest any queue reports.
_RANK = {"idle": 0, "active": 1, "probing": 2, "dead": 3}


def merge_destinations(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One listing from the listings of several queues (disk shards): counts added, a
    destination dead where any queue finds it dead."""
    merged: dict[str, dict[str, Any]] = {}
    now = 0.0
    for result in results:
        now = max(now, float(result.get("now") or 0.0))
        for row in result["destinations"]:
            have = merged.get(row["name"])
            if have is None:
                merged[row["name"]] = dict(row)
                continue
            for key in _SUMMED:
                if row.get(key) is not None:
                    have[key] = (have.get(key) or 0) + row[key]
            if _rank(row) > _rank(have):
                have.update({k: row.get(k) for k in ("state", "dead_until", "last_error")})
    rows = sorted(
        merged.values(),
        key=lambda r: (-(_rank(r) // 2), -_load(r), r["name"]),
    )
    return {"now": now, "destinations": rows}


def _rank(row: Mapping[str, Any]) -> int:
    return _RANK.get(str(row.get("state", "idle")), 0)


def _load(row: Mapping[str, Any]) -> int:
    return sum(int(row.get(key) or 0) for key in ("queued", "waiting", "in_flight"))


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def render_destinations(data: Mapping[str, Any]) -> str:
    """A table: a line per destination, then its last error when it is dead."""
    rows = data["destinations"]
    if not rows:
        return "No destinations."
    width = max(11, *(len(r["name"]) for r in rows))
    head = f"{'DESTINATION':<{width}} {'QUEUED':>7} {'WAITING':>7} {'ACTIVE':>6} {'WINDOW':>7}"
    lines = [f"{head} {'RATE':>8}  STATE"]
    for r in rows:
        queued = "-" if r.get("queued") is None else str(r["queued"])
        window = "-"
        if r.get("window") is not None:
            window = f"{r['window']}/{r['limit']}" if r["limit"] < UNLIMITED.concurrency else "-"
        rate = f"{r['rate']:.1f}/s" if r.get("rate") is not None else "-"
        state = r.get("state", "idle")
        if state in ("dead", "probing"):
            state = f"{state} until {_when(r.get('dead_until'))}"
        limits = [
            f"{what} {format_rate(r[key])}"
            for what, key in (("msgs", "message_rate"), ("conns", "connection_rate"))
            if r.get(key) is not None
        ]
        if limits:
            state += f" (limit {', '.join(limits)})"
        lines.append(
            f"{r['name']:<{width}} {queued:>7} {r.get('waiting', 0):>7} "
            f"{r.get('in_flight', 0):>6} {window:>7} {rate:>8}  {state}"
        )
        if r.get("state") in ("dead", "probing") and r.get("last_error"):
            lines.append(f"    ({r['last_error']})")
    return "\n".join(lines)
