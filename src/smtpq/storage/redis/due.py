"""Which shards a worker claims from, and when: pure rules over what it knows of each shard.

A worker on a sharded queue must not ask every shard for work on every turn: with W workers and S
shards that is W x S script calls per turn, most of them finding nothing. Instead each storage
object keeps, per shard, the shard's *due time* (the lowest score of its schedule: a next attempt
time, or a lease expiry), learnt

* exactly, from the reply of every script it runs on the shard (each returns the shard's due
  time after its change);
* as a hint, from the other workers' announcements on the wake channel (a change that may make
  something due: its shard and due time), which may only bring a due time forward;
* by reading every shard's due time when nothing is known yet, or when the knowledge is older
  than the refresh interval (a worker that died holding messages written claimed announced
  nothing; its leases are found that way).

It then claims only from shards that are due, starting from a cursor that moves on by one shard
per claim (a different start for every worker), so that every due shard is served in turn.

When many workers learn at once that one shard has a message due (an announcement, or a retry
time that every worker read), they would all ask for it and all but one find nothing. A worker
that finds a shard it believed due empty (someone else was faster) therefore leaves that shard
alone for a while — a randomised back-off that doubles with each such loss, up to a cap, and
ends when it claims something there or learns from its own change that work is due there. The
workers that keep winning a shard's races keep serving it; the others join only when their
back-off ends, so the number of calls per message stays near one while work flows, and a worker
that has spare capacity still takes over a busy shard within the cap.

Times are the caller's clock (the ``now`` given to claim): the same epoch seconds as the
schedule's scores.
"""

from __future__ import annotations

import math
import random

__all__ = ["DueTimes"]

_UNKNOWN = -math.inf  # never read: claimable at once, so the first claim learns it
_EMPTY = math.inf


class DueTimes:
    """One storage object's knowledge of its queue's shards.

    :param shards: how many shards there are (may grow, see :meth:`resize`).
    :param start: the shard this worker claims from first.
    :param backoff: the first and the longest back-off (seconds) after a lost race.
    :param rng: random numbers for the back-off (a seeded one in tests).
    """

    def __init__(
        self,
        shards: int,
        start: int = 0,
        *,
        backoff: tuple[float, float] = (0.05, 2.0),
        rng: random.Random | None = None,
    ) -> None:
        self._due: list[float] = []
        self._holdoff: list[float] = []
        self._backoff: list[float] = []
        self._first, self._cap = backoff
        self._rng = rng or random.Random()
        self.resize(shards)
        self._cursor = start % shards

    def __len__(self) -> int:
        return len(self._due)

    def resize(self, shards: int) -> None:
        """Know about ``shards`` shards (more than before: the new ones are unknown)."""
        grow = shards - len(self._due)
        if grow > 0:
            self._due += [_UNKNOWN] * grow
            self._holdoff += [0.0] * grow
            self._backoff += [0.0] * grow

    def forget(self) -> None:
        """Know nothing any more (after a reconnection: announcements may have been missed)."""
        self._due = [_UNKNOWN] * len(self._due)

    @property
    def unknown(self) -> bool:
        """Whether some shard's due time was never learnt (nor failed to be)."""
        pairs = zip(self._due, self._holdoff, strict=True)
        return any(d == _UNKNOWN and h == 0.0 for d, h in pairs)

    def due(self, shard: int) -> float | None:
        """What is known of a shard's due time: None when it is empty, -inf when unknown."""
        value = self._due[shard]
        return None if value == _EMPTY else value

    def learn(self, shard: int, due: float | None) -> None:
        """The shard's due time as a script on it just answered (exact).

        When it brings the due time forward, this worker's own change made work due there:
        any back-off on the shard ends.
        """
        value = _EMPTY if due is None else due
        if value < self._due[shard]:
            self._holdoff[shard] = 0.0
            self._backoff[shard] = 0.0
        self._due[shard] = value

    def hint(self, shard: int, due: float) -> None:
        """Another worker announced that the shard may be due at ``due``."""
        if 0 <= shard < len(self._due) and due < self._due[shard]:
            self._due[shard] = due

    def claimable(self, now: float) -> list[int]:
        """The shards to claim from at ``now``, in the order to try them.

        Those believed due and not backed off, starting at the cursor.
        """
        count = len(self._due)
        order = [(self._cursor + i) % count for i in range(count)]
        return [k for k in order if self._due[k] <= now and self._holdoff[k] <= now]

    def claimed(self, shard: int, now: float, got: int, dropped: int, due: float | None) -> None:
        """Record a claim on ``shard``: ``got`` messages taken, ``dropped`` held ones left the
        schedule, and the shard's due time afterwards.

        A shard believed due that had nothing due was taken by someone else: back off.
        """
        self.learn(shard, due)
        if got:
            self._backoff[shard] = 0.0
            self._holdoff[shard] = 0.0
        elif not dropped:
            self._lose(shard, now)

    def failed(self, shard: int, now: float) -> None:
        """Asking the shard failed (its Redis node is down): unknown, and backed off."""
        self._due[shard] = _UNKNOWN
        self._lose(shard, now)

    def _lose(self, shard: int, now: float) -> None:
        backoff = min(self._cap, max(self._first, 2 * self._backoff[shard]))
        self._backoff[shard] = backoff
        self._holdoff[shard] = now + backoff * self._rng.uniform(0.5, 1.0)

    def advance(self, shard: int) -> None:
        """The next claim starts after ``shard``: every due shard gets its turn."""
        self._cursor = (shard + 1) % len(self._due)

    def next_due(self) -> float | None:
        """When this worker should next claim: the earliest due time of a shard, or the end
        of its back-off if later; None when every shard is empty."""
        times = [max(d, h) for d, h in zip(self._due, self._holdoff, strict=True) if d != _EMPTY]
        return min(times) if times else None
