"""The in-memory schedule of the local backends (dict and disk storage).

One process owns a local queue, so its schedule is a heap in memory, rebuilt from the stored
records by ``load()``. Each message has a *score*: its next attempt time, or, while it is leased,
the lease's expiry — so a lease that is never renewed makes the message claimable again, just as
in the shared backends. Heap entries are invalidated lazily (the score map is the truth).

Sized for a million deferred messages: an id is kept as the integer of its 128 bits (44 bytes
instead of an 81-byte string), shared by the score map and the heap entry, and a message's next
attempt time is stored once — as its score, unless it is leased or held. About 195 bytes per
deferred message in all (see bench/RESULTS.md, "Scale (issue 7)").
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Iterable, Sequence

from smtpq.storage.base import QueueStorage, id_time, is_valid_id

__all__ = ["LocalSchedule", "id_key", "key_id"]

# Stale heap entries (rescheduled or removed messages) are dropped when they reach the top; a
# rebuild drops them all when they outnumber the live ones, so the heap stays O(messages).
_COMPACT_MIN = 1024
# Keys sorted at a time for a listing: each sort blocks the event loop for about 30 ms.
_SORT_SLICE = 50_000


def id_key(id: str) -> int:
    """The schedule's compact form of a queue id (:func:`~smtpq.storage.base.new_id` form).

    :raises ValueError: for any other string, which could not be turned back into itself.
    """
    if not is_valid_id(id):
        raise ValueError(f"not a queue id: {id!r}")
    return int(id, 16)


def key_id(key: int) -> str:
    """The queue id of a compact key."""
    return f"{key:032x}"


def _key_or_none(id: object) -> int | None:
    return int(id, 16) if isinstance(id, str) and is_valid_id(id) else None


class LocalSchedule:
    """Due times, leases and holds of the messages of one local storage.

    Ids must have the form :func:`~smtpq.storage.base.new_id` makes; others are unknown
    messages (ignored, or :class:`KeyError` where an unknown id is an error).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        # Every message with a live heap entry, and that entry's score: the unleased, unheld
        # messages (score = next attempt time) and the leased ones (score = lease expiry).
        self._score: dict[int, float] = {}
        # The next attempt time of the messages whose score is not it: leased or held.
        self._time: dict[int, float] = {}
        self._leased: set[int] = set()
        self._held: set[int] = set()
        # The smallest key (the oldest message), None until stats() looks for it again: found
        # once, not once per call, as long as the oldest message stays.
        self._oldest: int | None = None
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        # Only the leased messages are in both maps.
        return len(self._score) + len(self._time) - len(self._leased)

    def __contains__(self, id: object) -> bool:
        key = _key_or_none(id)
        return key is not None and (key in self._score or key in self._time)

    def _known(self, key: int) -> bool:
        return key in self._score or key in self._time

    def _push(self, key: int, score: float) -> None:
        # While _score[key] == score, an entry (score, key) is in the heap (claim deletes the
        # score of an entry it consumes), so a second one is never pushed: a duplicate would be
        # claimed twice, and flushes would grow the heap.
        if self._score.get(key) == score:
            return
        self._score[key] = score
        heap = self._heap
        heapq.heappush(heap, (score, key))
        if len(heap) > _COMPACT_MIN and len(heap) > 2 * len(self._score):
            self._compact()

    def _compact(self) -> None:
        """Rebuild the heap from the live scores, dropping the stale entries."""
        self._heap = [(score, key) for key, score in self._score.items()]
        heapq.heapify(self._heap)

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
        self._heap = []
        self._score = {}
        self._time = {}
        self._leased = set()
        self._held = set()
        self._oldest = None

    def add(
        self, id: str, timestamp: float, *, held: bool = False, lease_until: float | None = None
    ) -> None:
        """Schedule a message at ``timestamp`` (held, and/or leased until ``lease_until``).

        A message held while leased stays leased, as :meth:`hold` leaves it: a reload must not
        drop the lease of an attempt under way.

        :raises ValueError: when ``id`` is not a queue id.
        """
        self._add(id_key(id), timestamp, held, lease_until)
        if not held and lease_until is None:
            self.notify()

    def _add(self, key: int, timestamp: float, held: bool, lease_until: float | None) -> None:
        if self._oldest is not None and key < self._oldest:
            self._oldest = key
        self._leased.discard(key)
        if held:
            self._held.add(key)
        else:
            self._held.discard(key)
        if lease_until is not None:
            self._leased.add(key)
            self._time[key] = timestamp
            self._push(key, lease_until)
        elif held:
            self._score.pop(key, None)
            self._time[key] = timestamp
        else:
            self._time.pop(key, None)
            self._push(key, timestamp)

    def rebuild(
        self, times: dict[int, float], held: set[int], leases: dict[str, float] | None = None
    ) -> None:
        """Replace the whole schedule (a load): ``times`` maps :func:`id_key` keys to next
        attempt times, ``held`` the keys of held messages; ``leases`` (by id) are kept.

        ``times`` becomes the schedule's own map (the caller must not use it any more), so that
        a load of a million messages builds one map, not two.
        """
        time_map = {key: times.pop(key) for key in held if key in times}
        self._score, self._time, self._held, self._leased = times, time_map, set(time_map), set()
        self._oldest = None
        self._heap = [(score, key) for key, score in times.items()]
        heapq.heapify(self._heap)
        for id, until in (leases or {}).items():
            key = id_key(id)
            if key in times or key in time_map:  # a held message keeps its running attempt's lease
                self._leased.add(key)
                self._time.setdefault(key, times.get(key, 0.0))
                self._push(key, until)
        if times:
            self.notify()

    def timestamp(self, id: str) -> float:
        """The next attempt time of a scheduled message (KeyError when unknown)."""
        key = _key_or_none(id)
        if key is None:
            raise KeyError(id)
        found = self._time.get(key)
        return self._score[key] if found is None else found

    def is_held(self, id: str) -> bool:
        """Whether the message is held."""
        key = _key_or_none(id)
        return key is not None and key in self._held

    def reschedule(self, id: str, timestamp: float) -> None:
        """Set the next attempt time; ends any lease. Unknown ids are ignored."""
        key = _key_or_none(id)
        if key is not None and self._known(key):
            self._reschedule(key, timestamp)

    def _reschedule(self, key: int, timestamp: float) -> None:
        self._leased.discard(key)
        if key in self._held:
            self._score.pop(key, None)  # a lease's entry, if it was leased: the attempt ended
            self._time[key] = timestamp
        else:
            self._time.pop(key, None)
            self._push(key, timestamp)
            self.notify()

    def release(self, id: str) -> None:
        """End a lease; the message is due again at its next attempt time."""
        key = _key_or_none(id)
        if key is not None and key in self._leased:
            self._reschedule(key, self._time[key])

    def discard(self, id: str) -> None:
        """Forget a message."""
        key = _key_or_none(id)
        if key is None:
            return
        self._score.pop(key, None)
        self._time.pop(key, None)
        self._leased.discard(key)
        self._held.discard(key)
        if key == self._oldest:
            self._oldest = None

    def hold(self, id: str, held: bool) -> None:
        """Hold or release a message; a leased message stays leased until its attempt ends."""
        key = _key_or_none(id)
        if key is None or not self._known(key):
            raise KeyError(id)
        if held:
            if key not in self._held:
                self._held.add(key)
                if key not in self._leased:
                    self._time[key] = self._score.pop(key)
        elif key in self._held:
            self._held.discard(key)
            if key not in self._leased:
                self._push(key, self._time.pop(key))
                self.notify()

    def claim(self, now: float, limit: int, lease_until: float) -> list[str]:
        """Lease up to ``limit`` due messages until ``lease_until``."""
        claimed: list[int] = []
        heap, score_of = self._heap, self._score
        while heap and len(claimed) < limit and heap[0][0] <= now:
            score, key = heapq.heappop(heap)
            if score_of.get(key) != score:
                continue  # stale entry
            del score_of[key]  # consumed: a duplicate entry is stale now
            if key in self._held:  # held while leased: its attempt has ended
                self._leased.discard(key)
                continue
            if key not in self._leased:
                self._time[key] = score  # it was due at its attempt time
            claimed.append(key)
        for key in claimed:
            self._leased.add(key)
            self._push(key, lease_until)
        return [key_id(key) for key in claimed]

    def renew(self, ids: Iterable[str], lease_until: float) -> None:
        """Extend leases."""
        for id in ids:
            key = _key_or_none(id)
            if key is not None and key in self._leased:
                self._push(key, lease_until)

    def next_due(self) -> float | None:
        """The earliest score (next attempt or lease expiry), or None when nothing is scheduled."""
        heap = self._heap
        while heap and self._score.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def flush(self, now: float, ids: Iterable[str] | None = None) -> list[str]:
        """Make unleased, unheld messages due at ``now``; return those rescheduled."""
        if ids is None:
            # The unleased, unheld messages are those with a score and no lease.
            done = [key for key in self._score if key not in self._leased]
        else:
            keys = (_key_or_none(id) for id in ids)
            done = [k for k in keys if k is not None and k in self._score and k not in self._leased]
        for key in done:
            self._push(key, now)
        if done:
            self.notify()
        return [key_id(key) for key in done]

    def leases(self) -> dict[str, float]:
        """The leased messages and when their leases expire."""
        return {key_id(k): self._score[k] for k in self._leased if k in self._score}

    def stats(self) -> dict[str, float | int | None]:
        """Counts for operators: ``held``, ``active`` (leased), ``oldest`` arrival time."""
        # Ids grow with their arrival time: the oldest message has the smallest key.
        oldest = self._oldest
        if oldest is None:
            oldest = min(min(self._score, default=_NONE), min(self._time, default=_NONE))
            self._oldest = oldest if oldest != _NONE else None
        return {
            "held": len(self._held),
            "active": len(self._leased),
            "oldest": id_time(key_id(oldest)) if oldest != _NONE else None,
        }

    def entries(self) -> list[tuple[float, str]]:
        """Every scheduled message as ``(next attempt time, id)``."""
        out = [(score, key_id(key)) for key, score in self._score.items() if key not in self._time]
        out += [(when, key_id(key)) for key, when in self._time.items()]
        return out

    def ids(self) -> list[str]:
        """Every scheduled message id, oldest first."""
        return [key_id(key) for key in self._sorted_keys()]

    def _sorted_keys(self) -> list[int]:
        keys = list(self._score)
        keys += (key for key in self._time if key not in self._score)
        keys.sort()
        return keys

    async def pages(self, size: int) -> AsyncIterator[list[str]]:
        """Every scheduled message id, oldest first, ``size`` at a time.

        A snapshot of the keys (8 bytes per message) is sorted a slice at a time, yielding to
        the event loop in between, then merged lazily: listing a million messages never stalls
        the loop for long, and holds one id string per listed message only while it is listed.
        """
        keys = list(self._score)
        keys += [key for key in self._time if key not in self._score]
        runs: list[list[int]] = []
        for start in range(0, len(keys), _SORT_SLICE):
            runs.append(sorted(keys[start : start + _SORT_SLICE]))
            await asyncio.sleep(0)
        del keys
        merged = heapq.merge(*runs)
        while page := list(itertools.islice(merged, size)):
            yield [key_id(key) for key in page]


_NONE = 1 << 128  # greater than every key: "no message"


class LocallyScheduled(QueueStorage):
    """A storage owned by one process, whose schedule is a :class:`LocalSchedule` in memory
    (DictStorage, DiskStorage): the schedule side of the contract, shared by both."""

    _schedule: LocalSchedule

    @abc.abstractmethod
    async def _ensure_loaded(self) -> None:
        """Build the schedule from the stored records, once."""

    async def message_ids(self) -> list[str]:
        """Every stored message id, oldest first, from the schedule in memory."""
        await self._ensure_loaded()
        return self._schedule.ids()

    async def claim(self, now: float, limit: int) -> list[str]:
        """See :meth:`QueueStorage.claim`."""
        await self._ensure_loaded()
        return self._schedule.claim(now, limit, now + self.lease_timeout)

    async def renew(self, ids: Sequence[str], now: float) -> None:
        """See :meth:`QueueStorage.renew`."""
        self._schedule.renew(ids, now + self.lease_timeout)

    async def release(self, id: str) -> None:
        """See :meth:`QueueStorage.release`."""
        self._schedule.release(id)

    async def next_due(self) -> float | None:
        """See :meth:`QueueStorage.next_due`."""
        await self._ensure_loaded()
        return self._schedule.next_due()

    async def wait(self, timeout: float) -> None:
        """See :meth:`QueueStorage.wait`."""
        await self._schedule.wait(timeout)
