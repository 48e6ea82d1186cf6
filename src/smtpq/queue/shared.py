"""What the workers of one queue share about destinations: dead marks, rates, a concurrency cap.

Each Queue keeps its own windows and ready queues (:mod:`smtpq.queue.dispatch`). Before an
attempt connects it asks its :class:`DestinationStore` (:meth:`~DestinationStore.acquire`),
which answers for every worker that shares the store:

* the destination's **concurrency limit** holds over all of them (one lease per attempt);
* its **message rate** holds over all of them (one rate state, :func:`~.destinations.gcra`),
  and so does its **connection rate** (:meth:`~DestinationStore.reserve_connection`);
* a **dead mark** set by one worker defers every worker's messages, and only one of them
  probes when the cool-down ends.

:class:`LocalDestinationStore` shares them between the Queues of one process (a daemon worker
that owns several disk shards); :class:`~smtpq.storage.redis_destinations.RedisDestinationStore`
between every worker and node of a Redis queue. Several processes on disk storage have no
store in common: the daemon gives each worker its share of every limit instead
(:meth:`~.destinations.DestinationPolicy.share`).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from smtpq.queue.destinations import RATE_TOLERANCE, DeadMark, DestinationLimits, gcra

__all__ = ["BUSY_RETRY", "GRANTED", "DestinationStore", "LocalDestinationStore", "Permit"]

#: Seconds before a destination at its shared concurrency limit is asked again.
BUSY_RETRY = 0.2


@dataclass(frozen=True)
class Permit:
    """The store's answer to :meth:`DestinationStore.acquire`.

    :ivar granted: the attempt may connect (and holds a lease until released).
    :ivar retry_at: refused for now (the limit is reached, the rate, or another worker's probe
        runs): ask again then.
    :ivar mark: refused: the destination is dead — or its cool-down is over and only a probe
        may ask (``probe=True``).
    """

    granted: bool
    retry_at: float | None = None
    mark: DeadMark | None = None


#: The answer that lets an attempt start.
GRANTED = Permit(True)


class DestinationStore(abc.ABC):
    """Destination state shared by the Queues that use one store; every method is a coroutine.

    ``token`` names one attempt (unique per attempt); times are the Queue's clock, given.
    """

    #: Seconds an attempt's lease lasts unless renewed (a dead worker's leases run out).
    lease_timeout: float = 60.0
    #: Whether other processes share it: then a destination dead here is checked against the
    #: store before its messages are deferred (another worker may have revived it, or an
    #: operator flushed the queue through another worker).
    shared: bool = False

    @abc.abstractmethod
    async def acquire(
        self, name: str, limits: DestinationLimits, token: str, now: float, *, probe: bool
    ) -> Permit:
        """May attempt ``token`` to ``name`` start now? Granted, it holds a lease.

        Refused when the destination is dead (``mark``), when ``limits.concurrency`` attempts
        hold leases, or when ``limits.message_rate`` allows the next start only later
        (``retry_at``). After a dead destination's cool-down only a ``probe`` is granted, and
        only one at a time.
        """

    @abc.abstractmethod
    async def release(self, name: str, token: str) -> None:
        """The attempt ``token`` ended: its lease (and its probe, if it was one) ends."""

    def release_now(self, name: str, token: str) -> bool:
        """:meth:`release` at once, where the store needs no I/O for it (a local store):
        True when done; False (the default) when :meth:`release` must be awaited."""
        return False

    async def renew(self, held: Mapping[str, Sequence[str]], now: float) -> None:  # noqa: B027
        """Extend the leases of running attempts (destination -> tokens); local stores have
        nothing to renew."""

    @abc.abstractmethod
    async def reserve_connection(self, name: str, rate: float, now: float) -> float:
        """Reserve the next new connection to ``name`` (``rate`` per second); when it may open."""

    @abc.abstractmethod
    async def mark_dead(self, name: str, mark: DeadMark) -> None:
        """``name`` is dead as ``mark`` says (its probe, if any, is over)."""

    @abc.abstractmethod
    async def clear_dead(self, name: str) -> None:
        """``name`` answered again."""

    @abc.abstractmethod
    async def dead_marks(self, names: Sequence[str]) -> dict[str, DeadMark]:
        """The marks of those of ``names`` that are marked dead (for listings)."""

    @abc.abstractmethod
    async def end_cool_downs(self, now: float) -> list[str]:
        """An operator flushed the queue: every destination marked dead and waiting out a
        cool-down has it end ``now`` (its next attempt, by any worker, is the probe); their
        names."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; local stores have none."""


class LocalDestinationStore(DestinationStore):
    """The destination store of one process, in memory."""

    def __init__(self) -> None:
        self._leases: dict[str, set[str]] = {}
        self._tat: dict[str, float] = {}
        self._connect_tat: dict[str, float] = {}
        self._marks: dict[str, DeadMark] = {}
        self._probes: dict[str, str] = {}

    async def acquire(
        self, name: str, limits: DestinationLimits, token: str, now: float, *, probe: bool
    ) -> Permit:
        """See :meth:`DestinationStore.acquire`."""
        mark = self._marks.get(name)
        probing = mark is not None
        if mark is not None:
            holder = self._probes.get(name)
            if now < mark.until or not probe:
                return Permit(False, mark=mark)
            if holder is not None and holder != token:
                # Another Queue's probe is running: wait for what it finds (its messages are
                # not deferred meanwhile, as they are not behind a probe of this Queue's own).
                return Permit(False, retry_at=now + BUSY_RETRY)
        held = self._leases.setdefault(name, set())
        if len(held) >= limits.concurrency:
            return Permit(False, retry_at=now + BUSY_RETRY)
        if limits.message_rate is not None:
            interval = 1.0 / limits.message_rate
            start, tat = gcra(self._tat.get(name, 0.0), now, interval, interval * RATE_TOLERANCE)
            if start > now:
                return Permit(False, retry_at=start)
            self._tat[name] = tat
        if probing:
            self._probes[name] = token
        held.add(token)
        return GRANTED

    async def release(self, name: str, token: str) -> None:
        """See :meth:`DestinationStore.release`."""
        self.release_now(name, token)

    def release_now(self, name: str, token: str) -> bool:
        """See :meth:`DestinationStore.release_now`: always done at once."""
        held = self._leases.get(name)
        if held is not None:
            held.discard(token)
            if not held:
                del self._leases[name]
        if self._probes.get(name) == token:
            del self._probes[name]
        return True

    async def reserve_connection(self, name: str, rate: float, now: float) -> float:
        """See :meth:`DestinationStore.reserve_connection`."""
        interval = 1.0 / rate
        tat = self._connect_tat.get(name, 0.0)
        start, self._connect_tat[name] = gcra(tat, now, interval, interval * RATE_TOLERANCE)
        return start

    async def mark_dead(self, name: str, mark: DeadMark) -> None:
        """See :meth:`DestinationStore.mark_dead`."""
        self._marks[name] = mark
        self._probes.pop(name, None)

    async def clear_dead(self, name: str) -> None:
        """See :meth:`DestinationStore.clear_dead`."""
        self._marks.pop(name, None)
        self._probes.pop(name, None)

    async def dead_marks(self, names: Sequence[str]) -> dict[str, DeadMark]:
        """See :meth:`DestinationStore.dead_marks`."""
        return {name: self._marks[name] for name in names if name in self._marks}

    async def end_cool_downs(self, now: float) -> list[str]:
        """See :meth:`DestinationStore.end_cool_downs`."""
        ended = [name for name, mark in self._marks.items() if mark.until > now]
        for name in ended:
            self._marks[name] = replace(self._marks[name], until=now)
        return ended
