"""The in-memory schedule of the local backends (dict and disk storage).

One process owns a local queue, so its schedule is a heap in memory, rebuilt from the stored
records by ``load()``. Each message has a *score*: its next attempt time, or, while it is leased,
the lease's expiry — so a lease that is never renewed makes the message claimable again, just as
in the shared backends. Heap entries are invalidated lazily (the score map is the truth).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections.abc import Iterable

from smtpq.storage.base import id_time

__all__ = ["LocalSchedule"]


class LocalSchedule:
    """Due times, leases and holds of the messages of one local storage."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._score: dict[str, float] = {}
        self._timestamp: dict[str, float] = {}
        self._leased: set[str] = set()
        self._held: set[str] = set()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._timestamp)

    def __contains__(self, id: object) -> bool:
        return id in self._timestamp

    def _push(self, id: str, score: float) -> None:
        # While _score[id] == score, an entry (score, id) is in the heap (claim deletes the
        # score of an entry it consumes), so a second one is never pushed: a duplicate would be
        # claimed twice, and flushes would grow the heap.
        if self._score.get(id) == score:
            return
        self._score[id] = score
        heapq.heappush(self._heap, (score, id))

    def notify(self) -> None:
        """Wake a waiter: something was written or rescheduled."""
        self._changed.set()

    async def wait(self, timeout: float) -> None:
        """Return at the next (or an already pending) change, or after ``timeout`` seconds."""
        if not self._changed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        self._changed.clear()

    def clear(self) -> None:
        """Forget everything (before a reload)."""
        self._heap.clear()
        self._score.clear()
        self._timestamp.clear()
        self._leased.clear()
        self._held.clear()

    def add(
        self, id: str, timestamp: float, *, held: bool = False, lease_until: float | None = None
    ) -> None:
        """Schedule a message at ``timestamp`` (held, and/or leased until ``lease_until``).

        A message held while leased stays leased, as :meth:`hold` leaves it: a reload must not
        drop the lease of an attempt under way.
        """
        self._timestamp[id] = timestamp
        self._leased.discard(id)
        if held:
            self._held.add(id)
        if lease_until is not None:
            self._leased.add(id)
            self._push(id, lease_until)
        elif held:
            self._score.pop(id, None)
        else:
            self._push(id, timestamp)
            self.notify()

    def timestamp(self, id: str) -> float:
        """The next attempt time of a scheduled message (KeyError when unknown)."""
        return self._timestamp[id]

    def is_held(self, id: str) -> bool:
        """Whether the message is held."""
        return id in self._held

    def reschedule(self, id: str, timestamp: float) -> None:
        """Set the next attempt time; ends any lease. Unknown ids are ignored."""
        if id not in self._timestamp:
            return
        self._timestamp[id] = timestamp
        self._leased.discard(id)
        if id in self._held:
            self._score.pop(id, None)  # held while leased: out of the schedule once it ends
        else:
            self._push(id, timestamp)
            self.notify()

    def release(self, id: str) -> None:
        """End a lease; the message is due again at its next attempt time."""
        if id in self._leased and id in self._timestamp:
            self.reschedule(id, self._timestamp[id])

    def discard(self, id: str) -> None:
        """Forget a message."""
        self._timestamp.pop(id, None)
        self._score.pop(id, None)
        self._leased.discard(id)
        self._held.discard(id)

    def hold(self, id: str, held: bool) -> None:
        """Hold or release a message; a leased message stays leased until its attempt ends."""
        if id not in self._timestamp:
            raise KeyError(id)
        if held:
            self._held.add(id)
            if id not in self._leased:
                self._score.pop(id, None)
        elif id in self._held:
            self._held.discard(id)
            if id not in self._leased:
                self._push(id, self._timestamp[id])
                self.notify()

    def claim(self, now: float, limit: int, lease_until: float) -> list[str]:
        """Lease up to ``limit`` due messages until ``lease_until``."""
        claimed: list[str] = []
        heap = self._heap
        while heap and len(claimed) < limit and heap[0][0] <= now:
            score, id = heapq.heappop(heap)
            if self._score.get(id) != score:
                continue  # stale entry
            del self._score[id]  # consumed: a duplicate entry is stale now
            if id in self._held:  # held while leased: its attempt has ended
                self._leased.discard(id)
                continue
            claimed.append(id)
        for id in claimed:
            self._leased.add(id)
            self._push(id, lease_until)
        return claimed

    def renew(self, ids: Iterable[str], lease_until: float) -> None:
        """Extend leases."""
        for id in ids:
            if id in self._leased:
                self._push(id, lease_until)

    def next_due(self) -> float | None:
        """The earliest score (next attempt or lease expiry), or None when nothing is scheduled."""
        heap = self._heap
        while heap and self._score.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def flush(self, now: float, ids: Iterable[str] | None = None) -> list[str]:
        """Make unleased, unheld messages due at ``now``; return those rescheduled."""
        chosen = list(self._timestamp) if ids is None else [i for i in ids if i in self._timestamp]
        done = [i for i in chosen if i not in self._leased and i not in self._held]
        for id in done:
            self.reschedule(id, now)
        return done

    def leases(self) -> dict[str, float]:
        """The leased messages and when their leases expire."""
        return {id: self._score[id] for id in self._leased if id in self._score}

    def stats(self) -> dict[str, float | int | None]:
        """Counts for operators: ``held``, ``active`` (leased), ``oldest`` arrival time."""
        oldest = min(self._timestamp, default=None)
        return {
            "held": len(self._held),
            "active": len(self._leased),
            "oldest": id_time(oldest) if oldest is not None else None,
        }

    def ids(self) -> list[str]:
        """Every scheduled message id."""
        return list(self._timestamp)
