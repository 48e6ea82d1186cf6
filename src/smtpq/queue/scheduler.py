"""The asyncio side of scheduling per destination: relay slots, permits, attempts, timers.

:class:`DestinationScheduler` runs the pure :class:`~smtpq.queue.dispatch.Dispatcher`: it holds
the Queue's ``relay_pool`` slots and hands them out as the dispatcher decides (round robin
over the destinations with waiting work), asks the destination store for each attempt's permit
(:mod:`smtpq.queue.shared`: dead marks, shared concurrency and rates), runs
:meth:`Relay.attempt <smtpq.relay.base.Relay.attempt>` with the part's recipients, tells the
dispatcher what the attempt taught about its destination, and shares what changed (a
destination found dead, or answering again) through the store. Time-based work — a destination
blocked until a time, messages that waited too long — is done by one timer task on the
Queue's clock.

What an attempt means for its message (recording, retries, DSNs) is the Queue's: the scheduler
reports each part back (:attr:`~DestinationScheduler.on_attempted`, ``on_deferred``,
``on_released``) and knows nothing of storage.

A part waiting for a connection permit (a connection rate limit) gives its relay slot back
while it waits, and takes one again, before any new start, when it may connect: a rate-limited
destination does not hold the slots others could use.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from smtpq.clock import Clock, first_of
from smtpq.envelope import Envelope
from smtpq.queue.destinations import (
    DestinationPolicy,
    DestinationView,
    Outcome,
    Transition,
    outcome_of,
)
from smtpq.queue.dispatch import Defer, Dispatcher, Release, Start
from smtpq.queue.rules import Judgement, judge
from smtpq.queue.shared import DestinationStore, Permit
from smtpq.relay.base import ConnectGate, Relay, RelayError, RelayResult, connect_gate
from smtpq.reply import Reply

__all__ = ["DestinationScheduler", "PartLike"]

log = logging.getLogger("smtpq.queue")

#: Seconds before asking again after the destination store failed.
STORE_RETRY = 1.0


class PartLike(Protocol):
    """What the scheduler needs of one (message, destination) attempt."""

    #: Whether it may be given back unattempted (:attr:`DestinationScheduler.on_released`).
    postponable: bool

    @property
    def destination(self) -> str:
        """Its destination's name."""
        ...

    @property
    def envelope(self) -> Envelope:
        """The message, with this destination's recipients only."""
        ...

    @property
    def indexes(self) -> Sequence[int]:
        """The original index of each of those recipients."""
        ...

    @property
    def attempts(self) -> int:
        """Attempts the message made before this one."""
        ...


P = TypeVar("P", bound=PartLike)


class DestinationScheduler(Generic[P]):
    """Runs attempts per destination within ``capacity`` relay slots.

    :param on_attempted: ``(part, judgement, seconds)`` when an attempt ended: its
        recipients judged (:func:`~smtpq.queue.rules.judge`) from what the relay returned or
        raised.
    :param on_deferred: ``(part, reply, probe_at)`` for a part deferred without connecting
        (dead); with ``probe_at``, the part to keep for the probe (see :class:`Defer`).
    :param on_released: ``(part)`` for a postponable part that waited ``max_wait``.
    :param on_cancelled: ``(part)`` for a part whose attempt was cancelled (stopping).
    """

    def __init__(
        self,
        relay: Relay,
        clock: Clock,
        store: DestinationStore,
        policy: DestinationPolicy,
        capacity: int,
        *,
        on_attempted: Callable[[P, Judgement, float], None],
        on_deferred: Callable[[P, Reply, float | None], None],
        on_released: Callable[[P], None],
        on_cancelled: Callable[[P], None],
    ) -> None:
        self.relay = relay
        self.clock = clock
        self.store = store
        self.policy = policy
        self.capacity = capacity
        self.dispatcher: Dispatcher[P] = Dispatcher(policy)
        self.on_attempted = on_attempted
        self.on_deferred = on_deferred
        self.on_released = on_released
        self.on_cancelled = on_cancelled
        self._busy = 0  # relay slots in use
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._leases: dict[str, str] = {}  # token -> destination, of running attempts
        # Attempt tokens: unique among every scheduler sharing a store (a random prefix per
        # scheduler) without a call for random bytes per attempt.
        self._token_prefix = secrets.token_hex(8) + "-"
        self._serial = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()  # running attempts
        self._background: set[asyncio.Task[None]] = set()  # store updates
        # Deferrals held while the shared store is asked about their destination; the
        # destinations whose death this scheduler is telling the store (not to be asked
        # meanwhile: it would not know yet, and that would look like a revival).
        self._checking: dict[str, list[Defer[P]]] = {}
        self._marking: Counter[str] = Counter()
        self._timer: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self._open = False

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start handing out slots (and the timer)."""
        self._open = True
        self._timer = asyncio.create_task(self._timer_loop(), name="smtpq-destinations")

    async def end_cool_downs(self) -> None:
        """The queue was flushed: dead destinations are probed now; the store's dead marks
        are rewritten to end now, so that it lets the probes through."""
        now = self.clock.time()
        ended = set(self.dispatcher.end_cool_downs(now))
        try:  # every worker's, with a shared store: the others see it before they defer
            ended.update(await self.store.end_cool_downs(now))
        except Exception as exc:
            log.warning("ending the cool-downs in the destination store failed (%s)", exc)
        for name in sorted(ended):
            log.info("destination %s: cool-down ended by a flush, probing it now", name)
        self._kick.set()

    def close(self) -> list[P]:
        """Start nothing more; the parts that were waiting, taken out."""
        self._open = False
        self._kick.set()
        held = [d.item for deferrals in self._checking.values() for d in deferrals]
        self._checking.clear()
        return [part for _, part in self.dispatcher.withdraw()] + held

    @property
    def running(self) -> set[asyncio.Task[None]]:
        """The attempts under way."""
        return self._tasks

    async def aclose(self) -> None:
        """After the attempts ended: stop the timer, finish the store updates."""
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
            self._timer = None
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def set_policy(self, policy: DestinationPolicy) -> None:
        """New destination limits, from now on (see :meth:`Dispatcher.set_policy`)."""
        self.policy = policy
        self.dispatcher.set_policy(policy)
        self.dispatch()

    # -- feeding -------------------------------------------------------------------------------

    def submit(self, part: P, now: float) -> bool:
        """Queue ``part`` for its destination and start what can start; False when it is
        postponable and its destination has too much waiting (the caller postpones it)."""
        if not self.dispatcher.push(part.destination, part, now, postponable=part.postponable):
            return False
        self.dispatch()
        return True

    def resubmit(self, part: P, now: float) -> None:
        """Queue a released part again, at the front, no longer postponable."""
        part.postponable = False
        self.dispatcher.push(part.destination, part, now, front=True)
        self.dispatch()

    def dispatch(self) -> None:
        """Give free slots: first to attempts that waited for a connection permit, then to new
        starts as the dispatcher decides; carry out the deferrals it decides."""
        while self._slot_waiters and self._busy < self.capacity:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                self._busy += 1
                waiter.set_result(None)
        if not self._open:
            return
        decisions = self.dispatcher.take(self.clock.time(), self.capacity - self._busy)
        for decision in decisions:
            if isinstance(decision, Start):
                self._busy += 1
                task = asyncio.create_task(self._run(decision.item, decision.probe))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(decision, Defer):
                self._defer(decision)

    def _defer(self, decision: Defer[P]) -> None:
        """Defer a part whose destination is dead here; with a shared store, first ask it
        whether the destination is still dead: another worker's probe may have revived it, or
        an operator's flush through another worker ended its cool-down, and its messages must
        not wait out ours. One question for every deferral that comes while it is asked (one
        read per batch of deferrals, each of which writes its message's new time anyway)."""
        name = decision.destination
        held = self._checking.get(name)
        if held is not None:
            held.append(decision)
        elif self.store.shared and not self._marking[name]:
            self._checking[name] = [decision]
            task = asyncio.create_task(self._check_store(name))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            self.on_deferred(decision.item, decision.reply, decision.probe_at)

    async def _check_store(self, name: str) -> None:
        try:
            marks = await self.store.dead_marks([name])
        except Exception as exc:  # Redis away: defer as decided
            log.warning("the destination store failed for %s (%s)", name, exc)
            marks = None
        now = self.clock.time()
        held = self._checking.pop(name, None)
        if held is None:
            return  # closed meanwhile: given back by close()
        if marks is not None and self.dispatcher.reconcile(name, marks.get(name), now):
            log.info("destination %s: no longer dead in the shared store, probing it now", name)
            for d in held:
                self.dispatcher.take_back(name, d.item, now, postponable=d.item.postponable)
            self.dispatch()
            return
        for d in held:
            self.on_deferred(d.item, d.reply, d.probe_at)

    # -- attempts ------------------------------------------------------------------------------

    async def _run(self, part: P, probe: bool) -> None:
        name = part.destination
        token = f"{self._token_prefix}{next(self._serial):x}"
        result: RelayResult | BaseException
        try:
            permit = await self._permit(part, token, probe)
            if not permit.granted:
                self._busy -= 1
                self.dispatcher.unstart(
                    name, part, self.clock.time(), probe=probe, postponable=part.postponable,
                    until=permit.retry_at, mark=permit.mark,
                )  # fmt: skip
                self._kick.set()
                self.dispatch()
                return
            self._leases[token] = name
            rate = self.dispatcher.destination(name).limits.connection_rate
            gate = self._gate(name, rate) if rate is not None else None
            started = time.perf_counter()
            try:
                with connect_gate(gate):
                    result = await self.relay.attempt(part.envelope, part.attempts)
            except RelayError as exc:
                result = exc
            except Exception as exc:
                log.exception("relay raised an unexpected error for %s; will retry", name)
                result = exc
        except asyncio.CancelledError:
            self._busy -= 1
            self._finished(part, token, probe, Outcome.NEUTRAL, None)
            self.on_cancelled(part)
            raise
        took = time.perf_counter() - started
        self._busy -= 1
        judgement = judge(part.envelope.recipients, part.indexes, result)
        verdicts = judgement.delivered + judgement.permanent + judgement.transient
        outcome, error = outcome_of(v.reply for v in verdicts)
        self._finished(part, token, probe, outcome, error)
        self.on_attempted(part, judgement, took)
        self.dispatch()

    async def _permit(self, part: P, token: str, probe: bool) -> Permit:
        name = part.destination
        limits = self.dispatcher.destination(name).limits
        now = self.clock.time()
        try:
            return await self.store.acquire(name, limits, token, now, probe=probe)
        except Exception as exc:  # Redis away: the storage says so too; one line, no trace
            log.warning(
                "the destination store failed for %s (%s); trying again in %.0fs",
                name, exc, STORE_RETRY,
            )  # fmt: skip
            return Permit(False, retry_at=now + STORE_RETRY)

    def _finished(
        self, part: P, token: str, probe: bool, outcome: Outcome, error: Reply | None
    ) -> None:
        name = part.destination
        self._leases.pop(token, None)
        change = self.dispatcher.finished(name, outcome, error, self.clock.time(), probe)
        if change is Transition.DIED:
            dest = self.dispatcher.destination(name)
            log.warning(
                "destination %s is dead until %s (%s): %s",
                name, _utc(dest.dead_until),
                "probe failed" if probe else f"{dest.failures} connection failures in a row",
                dest.last_error,
            )  # fmt: skip
        elif change is Transition.REVIVED:
            log.info("destination %s answers again", name)
        self._share(name, token, change)

    def _share(self, name: str, token: str, change: Transition | None) -> None:
        """Tell the store what changed, then end the lease: in that order, so that no other
        worker sees a dead destination without a probe between the two."""
        if change is None and self.store.release_now(name, token):
            return  # a local store, nothing to tell: no task for it
        if change is Transition.DIED:
            self._marking[name] += 1

        async def update() -> None:
            try:
                if change is Transition.DIED:
                    await self.store.mark_dead(name, self.dispatcher.destination(name).mark())
                elif change is Transition.REVIVED:
                    await self.store.clear_dead(name)
            except Exception as exc:
                log.warning("sharing the state of destination %s failed (%s)", name, exc)
            finally:
                if change is Transition.DIED:
                    self._marking[name] -= 1
                    if not self._marking[name]:
                        del self._marking[name]
            try:
                await self.store.release(name, token)
            except Exception as exc:  # the lease runs out by itself
                log.warning("ending a lease on destination %s failed (%s)", name, exc)

        task = asyncio.create_task(update())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _gate(self, name: str, rate: float) -> ConnectGate:
        """Wait for a connection permit, giving the relay slot back meanwhile."""

        async def gate() -> None:
            now = self.clock.time()
            start = await self.store.reserve_connection(name, rate, now)
            delay = start - self.clock.time()
            if delay <= 0:
                return
            self._busy -= 1
            self.dispatch()
            try:
                await self.clock.sleep(delay)
            except asyncio.CancelledError:
                self._busy += 1  # the attempt's own accounting gives it back
                raise
            await self._take_slot()

        return gate

    async def _take_slot(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        self.dispatch()
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.done() or waiter.cancelled():
                self._busy += 1
            raise

    # -- time ----------------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        """Unblock destinations when their time comes; hand back parts that waited too long."""
        every = max(0.5, min(5.0, self.policy.max_wait / 4))
        next_sweep = self.clock.time() + every
        while self._open:
            now = self.clock.time()
            if now >= next_sweep:
                for released in self.dispatcher.sweep(now):
                    self._release(released)
                next_sweep = now + every
            self.dispatch()
            wake = self.dispatcher.next_wakeup()
            at = next_sweep if wake is None else min(wake, next_sweep)
            self._kick.clear()
            await first_of(self._kick.wait(), self.clock.sleep(max(0.0, at - self.clock.time())))

    def _release(self, released: Release[P]) -> None:
        self.on_released(released.item)

    # -- leases and views ----------------------------------------------------------------------

    async def renew(self, now: float) -> None:
        """Extend the store leases of the running attempts."""
        held: dict[str, list[str]] = {}
        for token, name in self._leases.items():
            held.setdefault(name, []).append(token)
        if held:
            with contextlib.suppress(Exception):
                await self.store.renew(held, now)

    def views(self) -> list[DestinationView]:
        """Every destination this scheduler knows, as operators see it."""
        return self.dispatcher.views(self.clock.time())


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
