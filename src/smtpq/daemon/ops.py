"""Operator actions on a queue: list, show, flush, delete, hold, bounce, requeue, shape.

These work on any storage, with or without a running daemon: the daemon's admin API calls them on
its own storage and queue (so that its schedule sees each change at once), and the ``smtpq queue``
command calls them directly when no daemon is running.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from smtpq.queue import Queue, QueueEvent
from smtpq.queue.event import EventKind
from smtpq.reply import Reply
from smtpq.storage.base import MessageInfo, QueueStorage, id_time, is_valid_id

__all__ = [
    "CANCELLED",
    "MessageFilter",
    "Shape",
    "bounce_now",
    "delete",
    "flush",
    "hold",
    "iter_messages",
    "merge_shapes",
    "message_summary",
    "render_shape",
    "requeue",
    "select_ids",
    "shape",
]

log = logging.getLogger("smtpq.admin")


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


def message_summary(info: MessageInfo, now: float) -> dict[str, Any]:
    """One message as plain values, the way ``smtpq queue list --json`` prints it."""
    arrival = info.arrival if info.arrival is not None else id_time(info.id)
    if info.held:
        state = "held"
    elif info.timestamp <= now:
        state = "active"
    else:
        state = "deferred"
    return {
        "id": info.id,
        "arrival": arrival,
        "size": info.size,
        "sender": info.sender,
        "recipients": list(info.recipients),
        "attempts": info.attempts,
        "next_attempt": info.timestamp,
        "last_reply": str(info.last_reply) if info.last_reply else None,
        "held": info.held,
        "state": state,
    }


@dataclass(frozen=True)
class MessageFilter:
    """Which messages an operator means: by domain, age or state (all when empty)."""

    sender_domain: str | None = None
    recipient_domain: str | None = None
    min_age: float | None = None
    max_age: float | None = None
    state: str | None = None

    def matches(self, summary: dict[str, Any], now: float) -> bool:
        """Whether a message summary passes this filter."""
        if self.sender_domain and _domain(summary["sender"]) != self.sender_domain.lower():
            return False
        if self.recipient_domain and not any(
            _domain(r) == self.recipient_domain.lower() for r in summary["recipients"]
        ):
            return False
        age = now - summary["arrival"]
        if self.min_age is not None and age < self.min_age:
            return False
        if self.max_age is not None and age > self.max_age:
            return False
        return not (self.state and summary["state"] != self.state)


async def iter_messages(
    storage: QueueStorage,
    now: float,
    selector: MessageFilter | None = None,
    ids: Sequence[str] | None = None,
    batch: int = 500,
) -> AsyncIterator[dict[str, Any]]:
    """Summaries of the stored messages, oldest first, read a batch at a time.

    Ids come a page at a time (:meth:`~smtpq.storage.base.QueueStorage.iter_ids`) and their
    records a batch per round trip, without the messages' content
    (:meth:`~smtpq.storage.base.QueueStorage.get_infos`), so that a queue of a million messages
    lists in bounded memory, and its first page at once. Messages delivered or deleted since
    the listing began are left out.
    """
    selector = selector or MessageFilter()
    pages = storage.iter_ids(batch) if ids is None else _pages(ids, batch)
    async for page in pages:
        for info in await storage.get_infos(page):
            summary = message_summary(info, now)
            if selector.matches(summary, now):
                yield summary


async def _pages(ids: Sequence[str], size: int) -> AsyncIterator[list[str]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


async def select_ids(
    storage: QueueStorage, now: float, selector: MessageFilter | None, ids: Sequence[str] | None
) -> list[str]:
    """The ids of the messages an operator's arguments name."""
    if ids is not None and selector is None:
        return [i for i in ids if is_valid_id(i)]
    return [m["id"] async for m in iter_messages(storage, now, selector, ids)]


# The actions below log one queue event per message they changed, with who asked (``by``), as
# Postfix's postsuper logs each message it deletes, holds or requeues; a message they left alone
# (gone, held, in flight) is not logged and not counted.


async def flush(queue: Queue, ids: Sequence[str] | None, by: str, *, stored: bool = False) -> int:
    """Make messages (all when ``ids`` is None) due now; returns how many were made due.

    A running queue keeps a disk queue's schedule in memory, and is woken. With ``stored``
    (a disk queue that no daemon runs) the new time is written to each message instead, so
    that the next start attempts them at once. Held and in-flight messages are left alone.
    """
    now = queue.clock.time()
    if ids is None:
        if stored:
            count = 0
            async for page in queue.store.iter_ids():
                count += await _flush_stored(queue.store, page, now)
        else:
            count = await queue.flush()
        log.info("flushed all: %d message%s by=%s", count, "s" if count != 1 else "", by)
        return count
    count = 0
    for id in ids:
        done = await (_flush_stored(queue.store, [id], now) if stored else queue.flush([id]))
        if done:
            count += done
            queue.emit(QueueEvent(EventKind.FLUSHED, id, by=by))
    return count


async def _flush_stored(storage: QueueStorage, ids: Sequence[str], now: float) -> int:
    count = 0
    for info in await storage.get_infos(ids):
        if info.held:
            continue
        if info.timestamp > now:
            try:
                await storage.set_timestamp(info.id, now)
            except KeyError:
                continue
        count += 1
    return count


async def delete(queue: Queue, ids: Iterable[str], by: str) -> int:
    """Remove messages without bouncing them (like ``postsuper -d``); returns how many."""
    count = 0
    for id in ids:
        try:
            entry = await queue.store.get_entry(id)
        except KeyError:
            continue
        await queue.store.remove(id)
        queue.emit(QueueEvent(EventKind.DELETED, id, entry.envelope.recipients, by=by))
        count += 1
    return count


async def hold(queue: Queue, ids: Iterable[str], held: bool, by: str) -> int:
    """Hold (never attempt) or release messages; returns how many changed."""
    count = 0
    for id in ids:
        try:
            await queue.store.set_held(id, held)
        except KeyError:
            continue
        queue.emit(QueueEvent(EventKind.HELD if held else EventKind.RELEASED, id, by=by))
        count += 1
    return count


#: The reply of a bounce an operator asked for.
CANCELLED = Reply("550", "5.0.0 Delivery cancelled by the administrator")


async def bounce_now(queue: Queue, ids: Iterable[str], by: str) -> int:
    """Give up on messages now (like Exim's ``-Mg``): bounce what is pending, then remove them.

    Logged as ``bounced`` for the original message, with its pending recipients and the DSN's
    id, as when its delivery failed.
    """
    count = 0
    for id in ids:
        try:
            entry = await queue.store.get_entry(id)
        except KeyError:
            continue
        last = f"last reply: {entry.last_reply}" if entry.last_reply else None
        dsn = await queue.send_bounce(entry.envelope, CANCELLED, last)
        if dsn is None:
            continue  # the bounce could not be stored: keep the message
        await queue.store.remove(id)
        queue.emit(
            QueueEvent(
                EventKind.BOUNCED, id, entry.envelope.recipients, CANCELLED,
                dsn=",".join(dsn) or "none", by=by,
            )
        )  # fmt: skip
        count += 1
    return count


async def requeue(queue: Queue, ids: Iterable[str], by: str) -> list[str]:
    """Store each message again as new (fresh id, no attempts, due now); returns the new ids."""
    new_ids: list[str] = []
    for id in ids:
        try:
            entry = await queue.store.get_entry(id)
        except KeyError:
            continue
        new = await queue.store.write(entry.envelope, queue.clock.time())
        await queue.store.remove(id)
        queue.emit(QueueEvent(EventKind.REQUEUED, id, entry.envelope.recipients, new=new, by=by))
        new_ids.append(new)
    return new_ids


#: Age buckets in minutes, as Postfix's qshape prints them (geometric, doubling).
BUCKETS: tuple[int, ...] = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


@dataclass
class Shape:
    """Message counts per domain and age bucket, plus the commonest last replies per domain."""

    buckets: tuple[int, ...] = BUCKETS
    rows: dict[str, list[int]] = field(default_factory=dict)
    replies: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def add(self, domain: str, age_minutes: float, reply: str | None) -> None:
        """Count one message (or recipient) of ``domain`` that is ``age_minutes`` old."""
        row = self.rows.setdefault(domain, [0] * (len(self.buckets) + 2))
        row[0] += 1
        index = next((i for i, b in enumerate(self.buckets) if age_minutes < b), len(self.buckets))
        row[1 + index] += 1
        if reply:
            self.replies[domain][reply] += 1

    def to_dict(self, top: int = 3) -> dict[str, Any]:
        """Plain values: header, rows sorted by count, totals and top replies."""
        ordered = sorted(self.rows.items(), key=lambda kv: (-kv[1][0], kv[0]))
        total = [sum(col) for col in zip(*self.rows.values(), strict=True)] if self.rows else []
        return {
            "buckets": list(self.buckets),
            "total": total or [0] * (len(self.buckets) + 2),
            "rows": [{"domain": d, "counts": c} for d, c in ordered],
            "replies": {
                d: self.replies[d].most_common(top) for d, _ in ordered if d in self.replies
            },
        }


def merge_shapes(shapes: Sequence[dict[str, Any]], top: int = 3) -> dict[str, Any]:
    """One shape from the shapes of several queues (the shards of a daemon)."""
    merged = Shape()
    for data in shapes:
        merged.buckets = tuple(data["buckets"])
        for row in data["rows"]:
            counts = merged.rows.setdefault(row["domain"], [0] * len(row["counts"]))
            merged.rows[row["domain"]] = [a + b for a, b in zip(counts, row["counts"], strict=True)]
        for domain, replies in data["replies"].items():
            for reply, count in replies:
                merged.replies[domain][reply] += count
    return merged.to_dict(top)


def render_shape(data: dict[str, Any]) -> str:
    """A qshape-like table from :meth:`Shape.to_dict`, then the top replies of each domain."""
    buckets = data["buckets"]
    labels = ["T", *[str(b) for b in buckets], f"{buckets[-1]}+"]
    rows = [("TOTAL", data["total"])] + [(r["domain"], r["counts"]) for r in data["rows"]]
    width = max(len(name) for name, _ in rows)
    lines = [" " * width + " " + " ".join(f"{label:>6}" for label in labels)]
    for name, counts in rows:
        lines.append(f"{name:>{width}} " + " ".join(f"{c:>6}" for c in counts))
    if data["replies"]:
        lines.append("")
        for domain, replies in data["replies"].items():
            for reply, count in replies:
                lines.append(f"{domain}: {count} x {reply}")
    return "\n".join(lines)


async def shape(
    messages: AsyncIterator[dict[str, Any]], now: float, by: str = "recipient"
) -> Shape:
    """The age histogram per destination (or sender) domain, counted per recipient like qshape."""
    result = Shape()
    async for m in messages:
        age = max(0.0, (now - m["arrival"]) / 60.0)
        domains: list[str] = (
            [_domain(m["sender"]) or "MAILER-DAEMON"]
            if by == "sender"
            else [_domain(r) for r in m["recipients"]]
        )
        for domain in domains:
            result.add(domain, age, m["last_reply"])
    return result


def parse_age(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``3d`` -> seconds."""
    units: dict[str, Callable[[float], float]] = {
        "s": lambda v: v,
        "m": lambda v: v * 60,
        "h": lambda v: v * 3600,
        "d": lambda v: v * 86400,
    }
    text = text.strip().lower()
    unit = text[-1] if text and text[-1] in units else "s"
    number = text[:-1] if text and text[-1] in units else text
    value = float(number)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"bad age {text!r}")
    return units[unit](value)
