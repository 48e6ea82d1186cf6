"""The round-robin dispatcher: per-destination ready queues sharing the relay slots. Pure.

Claimed messages wait here, one FIFO ready queue per destination, until :meth:`Dispatcher.take`
hands them out. Each call gives at most ``free`` starts (the relay slots the driver has free),
visiting the destinations with waiting work in a ring: one start per destination per visit,
and a destination that got one goes to the back. So with ``k`` destinations that can start,
none waits more than one round of ``k`` starts, and no destination takes the slots another
could use. A destination leaves the ring while it cannot start (at its window, probing, or
blocked by the destination store until a time) and comes back when that changes.

Dead destinations use no slots: their waiting messages come out of :meth:`~Dispatcher.take`
as :class:`Defer` decisions at once, with the reply to record; the first postponable one of
each dead spell carries the time of the probe (``probe_at``), to be kept for it.

A ready queue holds at most :data:`BACKLOG_FACTOR` times its destination's concurrency limit
(:meth:`~Dispatcher.push` refuses more *postponable* messages) unless the destination works
through it within a second at its current rate (a fast smarthost with a backlog then takes all
the room the driver gives, instead of having its mail given back and claimed again), and
:meth:`~Dispatcher.sweep` hands back the postponable ones that waited longer than the policy's
``max_wait`` (:class:`Release`): the driver gives those back to the schedule for later, so
that a slow destination's backlog neither fills memory nor keeps the schedule from reaching
other destinations' mail.

Times are given, never read.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from smtpq.queue.destinations import (
    DeadMark,
    Destination,
    DestinationPolicy,
    DestinationView,
    Outcome,
    StartKind,
    State,
    Transition,
    unreachable_reply,
)
from smtpq.reply import Reply

__all__ = ["BACKLOG_FACTOR", "IDLE_FORGET", "Decision", "Defer", "Dispatcher", "Release", "Start"]

T = TypeVar("T")

#: Postponable messages a ready queue holds, per unit of its concurrency limit.
BACKLOG_FACTOR = 4
#: Seconds after which an idle destination's state is forgotten (a dead one: after this long
#: past its cool-down).
IDLE_FORGET = 900.0


@dataclass(frozen=True, slots=True)
class Start(Generic[T]):
    """Attempt ``item`` now (``probe``: the one attempt that decides a dead destination)."""

    destination: str
    item: T
    probe: bool = False


@dataclass(frozen=True, slots=True)
class Defer(Generic[T]):
    """Defer ``item`` without connecting: its destination is dead; ``reply`` says so.

    With ``probe_at``, it is the probe candidate: give it back for that time, unattempted
    (or, if it may not wait, defer it and :meth:`Dispatcher.want_probe` another).
    """

    destination: str
    item: T
    reply: Reply
    probe_at: float | None = None


@dataclass(frozen=True, slots=True)
class Release(Generic[T]):
    """``item`` waited too long for a slot: give it back to the schedule for later."""

    destination: str
    item: T


#: What :meth:`Dispatcher.take` decides about one waiting item.
Decision = Start[T] | Defer[T]


@dataclass(slots=True)
class _Waiting(Generic[T]):
    item: T
    since: float
    postponable: bool


class Dispatcher(Generic[T]):
    """Ready queues per destination and the ring that shares the relay slots among them."""

    def __init__(self, policy: DestinationPolicy | None = None) -> None:
        self.policy = policy or DestinationPolicy()
        self._dests: dict[str, Destination] = {}
        self._queues: dict[str, deque[_Waiting[T]]] = {}
        #: Destinations with waiting items that may be able to start, in round-robin order.
        self._ring: OrderedDict[str, None] = OrderedDict()
        #: Dead destinations with waiting items: deferred at the next take, slots or not.
        self._doomed: set[str] = set()
        #: Destinations the store told to wait, until when; with a heap of the times.
        self._blocked: dict[str, float] = {}
        self._timers: list[tuple[float, str]] = []
        #: Items waiting in all ready queues, and attempts running.
        self.waiting = 0
        self.running = 0

    # -- state ---------------------------------------------------------------------------------

    def destination(self, name: str) -> Destination:
        """The state of destination ``name`` (made with its limits on first use)."""
        found = self._dests.get(name)
        if found is None:
            found = self._dests[name] = Destination(name, self.policy.limits_for(name))
        return found

    def set_policy(self, policy: DestinationPolicy) -> None:
        """New limits (a reload): each known destination takes its own at once, its window
        within the new limit; attempts beyond it run on, and no more start."""
        self.policy = policy
        for name, dest in self._dests.items():
            dest.limits = policy.limits_for(name)
            dest.window = min(dest.window, dest.limits.concurrency)
        for name in self._queues:
            self._ring[name] = None  # some may have more room now

    def __contains__(self, name: object) -> bool:
        return name in self._dests

    def waiting_for(self, name: str) -> int:
        """Items waiting for destination ``name``."""
        queue = self._queues.get(name)
        return len(queue) if queue else 0

    def _queue(self, name: str) -> deque[_Waiting[T]]:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = deque()
        return queue

    def _visit(self, name: str, now: float) -> None:
        """Put a destination with waiting items where :meth:`take` will look at it."""
        if not self._queues.get(name) or name in self._blocked:
            return
        if self._dests[name].start_kind(now) is StartKind.DEFER:
            self._doomed.add(name)
        else:
            self._ring[name] = None

    # -- feeding -------------------------------------------------------------------------------

    def push(
        self, name: str, item: T, now: float, *, postponable: bool = False, front: bool = False
    ) -> bool:
        """Queue ``item`` for destination ``name``; False (not queued) when it is postponable
        and the ready queue already holds its backlog. ``front``: an item given back."""
        dest = self.destination(name)
        queue = self._queue(name)
        if (
            postponable
            and not front
            and len(queue) >= BACKLOG_FACTOR * dest.limits.concurrency
            and not dest.keeps_up(len(queue), now)
        ):
            return False
        waiting = _Waiting(item, now, postponable)
        if front:
            queue.appendleft(waiting)
        else:
            queue.append(waiting)
        self.waiting += 1
        self._visit(name, now)
        return True

    def take(self, now: float, free: int) -> list[Decision[T]]:
        """What to do now: up to ``free`` starts, round robin, and every deferral due."""
        out: list[Decision[T]] = []
        self._unblock(now)
        for name in list(self._doomed):
            out.extend(self._defer_all(name, now))
        ring = self._ring
        paced: list[str] = []
        while free > 0 and ring:
            name, _ = ring.popitem(last=False)
            queue = self._queues.get(name)
            if not queue:
                continue
            dest = self._dests[name]
            kind = dest.start_kind(now)
            if kind is StartKind.DEFER:
                out.extend(self._defer_all(name, now))
                continue
            if kind is None:
                continue  # at its window, or probing: back when an attempt ends
            waiting = queue.popleft()
            self.waiting -= 1
            probe = kind is StartKind.PROBE
            dest.started(now, probe)
            self.running += 1
            out.append(Start(name, waiting.item, probe))
            free -= 1
            if queue and dest.limits.message_rate is not None:
                paced.append(name)  # one start per take: the store paces the next
            elif queue:
                ring[name] = None  # to the back of the ring
        for name in paced:
            ring[name] = None
        return out

    def _defer_all(self, name: str, now: float) -> list[Decision[T]]:
        self._doomed.discard(name)
        dest = self._dests[name]
        queue = self._queues.get(name)
        if not queue or dest.start_kind(now) is not StartKind.DEFER:
            self._visit(name, now)
            return []
        reply = unreachable_reply(name, dest.last_error)
        out: list[Decision[T]] = []
        for w in queue:
            if dest.probe_wanted and w.postponable:
                dest.probe_wanted = False
                out.append(Defer(name, w.item, reply, dest.dead_until))
            else:
                out.append(Defer(name, w.item, reply))
        dest.deferred += len(queue)
        self.waiting -= len(queue)
        queue.clear()
        return out

    # -- outcomes ------------------------------------------------------------------------------

    def finished(
        self, name: str, outcome: Outcome, error: Reply | None, now: float, probe: bool
    ) -> Transition | None:
        """An attempt that :meth:`take` started has ended; the transition to share, if any."""
        dest = self._dests[name]
        self.running -= 1
        change = dest.finished(outcome, error, now, probe)
        self._visit(name, now)
        return change

    def unstart(
        self,
        name: str,
        item: T,
        now: float,
        *,
        probe: bool,
        postponable: bool,
        until: float | None = None,
        mark: DeadMark | None = None,
    ) -> None:
        """A started item was refused by the destination store before connecting: back to
        the front of its queue; the destination waits ``until`` then, or is dead (``mark``)."""
        dest = self._dests[name]
        self.running -= 1
        dest.unstarted(probe)
        if mark is not None:
            dest.learn(mark, now)
        if until is not None and until > now:
            self._blocked[name] = until
            heapq.heappush(self._timers, (until, name))
        self.push(name, item, now, postponable=postponable, front=True)

    def want_probe(self, name: str) -> None:
        """The probe candidate could not be kept: the next message deferred is."""
        self.destination(name).probe_wanted = True

    def end_cool_downs(self, now: float) -> list[str]:
        """Every dead destination probed now (see :meth:`Destination.end_cool_down`); the
        names of those that were waiting out a cool-down."""
        ended = [name for name, dest in self._dests.items() if dest.end_cool_down(now)]
        for name in ended:
            self._doomed.discard(name)
            self._visit(name, now)
        return ended

    def reconcile(self, name: str, mark: DeadMark | None, now: float) -> bool:
        """The shared store's view of a destination dead here (see
        :meth:`Destination.reconcile`); True if its cool-down ended."""
        if not self.destination(name).reconcile(mark, now):
            return False
        self._doomed.discard(name)
        self._visit(name, now)
        return True

    def take_back(self, name: str, item: T, now: float, *, postponable: bool) -> None:
        """An item :meth:`take` deferred that is not to be deferred after all (its
        destination's cool-down ended meanwhile): to the front of its queue again."""
        dest = self.destination(name)
        dest.deferred = max(0, dest.deferred - 1)
        self.push(name, item, now, postponable=postponable, front=True)

    def learn(self, name: str, mark: DeadMark, now: float) -> None:
        """Another worker marked the destination dead."""
        self.destination(name).learn(mark, now)
        self._visit(name, now)

    def _unblock(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            until, name = heapq.heappop(timers)
            if self._blocked.get(name) == until:
                del self._blocked[name]
                self._visit(name, now)

    def next_wakeup(self) -> float | None:
        """When a blocked destination may start again (None: none is blocked)."""
        timers = self._timers
        while timers and self._blocked.get(timers[0][1]) != timers[0][0]:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    # -- housekeeping --------------------------------------------------------------------------

    def sweep(self, now: float) -> list[Release[T]]:
        """The postponable items that waited ``max_wait``; forget long-idle destinations."""
        out: list[Release[T]] = []
        limit = now - self.policy.max_wait
        for name, queue in self._queues.items():
            if any(w.postponable and w.since <= limit for w in queue):
                kept: deque[_Waiting[T]] = deque()
                for w in queue:
                    if w.postponable and w.since <= limit:
                        out.append(Release(name, w.item))
                    else:
                        kept.append(w)
                self.waiting -= len(queue) - len(kept)
                self._queues[name] = kept
        for name in [n for n, d in self._dests.items() if self._forgettable(d, now)]:
            del self._dests[name]
            self._queues.pop(name, None)
            self._ring.pop(name, None)
            self._blocked.pop(name, None)
        return out

    def _forgettable(self, dest: Destination, now: float) -> bool:
        if dest.in_flight or self._queues.get(dest.name):
            return False
        idle = now - dest.last_used >= IDLE_FORGET
        if dest.state is State.ACTIVE:
            return idle and dest.failures == 0
        return dest.state is State.DEAD and now - dest.dead_until >= IDLE_FORGET

    def withdraw(self) -> list[tuple[str, T]]:
        """Every waiting item, taken out (stopping)."""
        queues, self._queues = self._queues, {}
        self._ring.clear()
        self._doomed.clear()
        self.waiting = 0
        return [(name, waiting.item) for name, queue in queues.items() for waiting in queue]

    def views(self, now: float) -> list[DestinationView]:
        """Every known destination, for operators."""
        return [d.view(now, self.waiting_for(name)) for name, d in self._dests.items()]
