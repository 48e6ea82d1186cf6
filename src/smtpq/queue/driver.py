"""The Queue: the asyncio driver where clock, storage and relay meet.

It stores what it accepts, makes the first attempt at once from the envelope in memory, claims
due messages from the storage's schedule, renews the leases of running attempts, and carries out
the steps that :func:`smtpq.queue.rules.plan` decides, in their order. Bookkeeping after an
attempt runs shielded from cancellation, so that stopping never loses what an attempt achieved.

Attempts are scheduled per destination (DESIGN §4, docs/scheduling.md): a message's recipients
split into destinations (:meth:`Relay.destinations <smtpq.relay.base.Relay.destinations>`)
before any relay slot is taken, and each (message, destination) part waits in its
destination's ready queue for a slot, within the destination's window
(:mod:`smtpq.queue.scheduler`). A part for a dead destination is deferred without connecting,
with the reply that says so; that deferral counts as the message's attempt, because it happens
when the message is due and spaces the next one by the backoff, as a real attempt would: the
message's retries last exactly as long as its retry policy says, and it waits on a dead
destination no longer. Claims are bounded by what can run soon (:data:`READY_FACTOR`); a
message that cannot be attempted soon — its destination has too much waiting for it, or it
waited ``max_wait`` — is given back to the schedule for later, without counting an attempt
(:func:`~smtpq.queue.rules.postpone`). The lease of every message in memory is renewed.

When a step fails (the storage, or a DSN that could not be queued), the steps left are kept in
memory with the message's lease and carried out again a little later (1 s, doubling up to
:data:`RECORD_RETRY_DELAY`):
what the attempt achieved is neither lost nor repeated (no second delivery, no second bounce),
and the failure is one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TypeVar

from smtpq.backoff import DEFAULT_LIFETIME, Backoff, DefaultBackoff
from smtpq.bounce import BounceFactory, BounceFunction, FunctionNotifier, Notifier, notify_wants
from smtpq.clock import Clock, SystemClock, first_of
from smtpq.envelope import Envelope
from smtpq.errors import EnvelopeFormatError, QueueError
from smtpq.notice import Action, Notice, outcomes_for
from smtpq.policy import QueuePolicy
from smtpq.queue.destinations import DestinationPolicy, DestinationView
from smtpq.queue.event import EventKind, QueueEvent
from smtpq.queue.parts import MessageAttempt, Part, split
from smtpq.queue.rules import (
    Attempt,
    CountAttempt,
    Judgement,
    MarkDone,
    Reschedule,
    RetryRules,
    SendNotice,
    Step,
    Verdict,
    judge,
    may_postpone,
    plan,
    postpone,
    record_delivered,
)
from smtpq.queue.scheduler import DestinationScheduler
from smtpq.queue.shared import DestinationStore, LocalDestinationStore
from smtpq.relay.base import Relay
from smtpq.reply import Reply
from smtpq.storage.base import QueueStorage

__all__ = ["READY_FACTOR", "RECORD_RETRY_DELAY", "RECORD_RETRY_FIRST", "Queue", "QueueEvent"]

log = logging.getLogger("smtpq.queue")
T = TypeVar("T")

#: Events logged at DEBUG only.
_DETAIL_EVENTS = frozenset({EventKind.ATTEMPTED, EventKind.REMOVED})

#: Seconds before the steps left of a failed recording are tried again at the most; the first
#: retry comes after :data:`RECORD_RETRY_FIRST`, each next one after twice as long, so that a
#: storage back after a short outage (a Redis restart) is used again within seconds.
RECORD_RETRY_DELAY = 60.0
RECORD_RETRY_FIRST = 1.0
#: Messages held in memory (claimed, waiting for a slot or attempted), per relay slot.
READY_FACTOR = 4

# The value of a Message-ID field, from just after its name (found by _message_id).
_MESSAGE_ID_VALUE = re.compile(rb"[ \t]*:[ \t]*((?:[^\r\n]|\r?\n[ \t])*)")
#: The longest Message-ID logged: a sender's header must not make a log line of any length.
_MESSAGE_ID_MAX = 250


def _origin(env: Envelope) -> dict[str, str]:
    """Where a message came from, for its ``accepted`` line: the sender, the client's address
    and the Message-ID (Postfix's ``client=`` and ``message-id=``), so that a sender's
    Message-ID leads to the queue id. The header is found in the raw block, not parsed."""
    origin = {"sender": f"<{env.sender}>"}
    ip = env.client.get("ip")
    if ip:
        origin["client"] = f"[{ip}]"
    head, _ = env.flatten()
    found = _message_id(head)
    if found is not None:
        # The first word of the unfolded value, printable ASCII only: one key=value in the line.
        words = found.decode("ascii", "replace").split()
        value = words[0] if words else ""
        if not (value.isascii() and value.isprintable()):  # the usual word is kept whole
            value = "".join(c for c in value if c.isprintable() and c.isascii())
        if value:
            origin["message-id"] = value[:_MESSAGE_ID_MAX]
    return origin


def _message_id(head: bytes) -> bytes | None:
    """The raw value of the first Message-ID field of a header block, or None. The name is
    looked for with ``find`` in a lowered copy (a regex tried at every offset costs more)."""
    lowered = head.lower()
    at = lowered.find(b"message-id")
    while at >= 0:
        if at == 0 or lowered[at - 1] == 10:  # 10: LF, a field's name starts a line
            match = _MESSAGE_ID_VALUE.match(head, at + 10)
            if match is not None:
                return match.group(1)
        at = lowered.find(b"message-id", at + 1)
    return None


class Queue:
    """A mail queue over a storage, delivering through a relay.

    :param store: the storage; the Queue does not own it (``await store.close()`` yourself).
    :param relay: delivers messages; None makes an edge-only queue that only stores.
    :param backoff: ``backoff(envelope, attempts) -> seconds | None``; the default retries for
        5 days with growing spacing (:class:`~smtpq.backoff.DefaultBackoff`).
    :param bounce_factory: python-slimta's ``bounce_factory(envelope, reply) -> Envelope |
        None``: when given, it makes the failure bounces (once per distinct reply; see
        :class:`~smtpq.bounce.FunctionNotifier`), and ``notifier`` the other notices.
    :param bounce_queue: where bounces are enqueued (default: this queue).
    :param store_pool: at most this many storage operations at once (None: no bound).
    :param relay_pool: at most this many delivery attempts at once (default 100), shared round
        robin among the destinations with due work.
    :param clock: time source (:class:`~smtpq.clock.SystemClock`); tests inject a ManualClock.
    :param grace_period: seconds that stopping waits for running attempts.
    :param poll_interval: longest idle wait before the schedule is looked at again anyway.
    :param delay_warnings: message ages (seconds) at which the sender is sent a "delayed" DSN
        (RFC 3464 Action: delayed), once each, honouring NOTIFY; none by default, like Postfix.
    :param lifetime: seconds after arrival when the queue gives up on a message (status 4.4.7),
        after a last attempt then; None: only the backoff gives up. Default 5 days.
    :param notifier: makes the DSNs (:class:`~smtpq.bounce.Notifier`; default
        :class:`~smtpq.bounce.BounceFactory` with ``hostname``).
    :param destinations: the limits per destination
        (:class:`~smtpq.queue.destinations.DestinationPolicy`; default: concurrency 20,
        initial window 5, dead after 5 connection failures for 5 minutes, no rate limits).
    :param destination_store: what this queue shares with others about destinations
        (:mod:`smtpq.queue.shared`; default: a store of its own). Give every Queue on one
        Redis a :class:`~smtpq.storage.redis_destinations.RedisDestinationStore`.
    """

    def __init__(
        self,
        store: QueueStorage,
        relay: Relay | None = None,
        backoff: Backoff | None = None,
        bounce_factory: BounceFunction | None = None,
        bounce_queue: Queue | None = None,
        store_pool: int | None = None,
        relay_pool: int | None = None,
        *,
        clock: Clock | None = None,
        policies: Sequence[QueuePolicy] = (),
        grace_period: float = 30.0,
        poll_interval: float = 5.0,
        hostname: str | None = None,
        delay_warnings: Sequence[float] = (),
        lifetime: float | None = DEFAULT_LIFETIME,
        notifier: Notifier | None = None,
        destinations: DestinationPolicy | None = None,
        destination_store: DestinationStore | None = None,
    ) -> None:
        self.store = store
        self.relay = relay
        self.clock: Clock = clock or SystemClock()
        self.backoff: Backoff = backoff or DefaultBackoff(clock=self.clock)
        self.hostname = hostname or socket.getfqdn()
        self.notifier: Notifier = notifier or BounceFactory(self.hostname)
        if bounce_factory is not None:
            self.notifier = FunctionNotifier(bounce_factory, self.notifier)
        self.bounce_queue = bounce_queue if bounce_queue is not None else self
        self.policies: list[QueuePolicy] = list(policies)
        self.grace_period = grace_period
        self.poll_interval = poll_interval
        self.rules = RetryRules(tuple(delay_warnings), lifetime)
        self.capacity = relay_pool or 100
        self.destination_policy = destinations or DestinationPolicy()
        self.destination_store = destination_store or LocalDestinationStore()
        self._scheduler: DestinationScheduler[Part] | None = None
        if relay is not None:
            self._scheduler = DestinationScheduler(
                relay, self.clock, self.destination_store, self.destination_policy,
                self.capacity, on_attempted=self._attempted, on_deferred=self._deferred,
                on_released=self._released, on_cancelled=self._withdraw,
            )  # fmt: skip
        self._store_sem = asyncio.Semaphore(store_pool) if store_pool else None
        #: Messages leased by this queue and in memory: reading or just stored (None), waiting,
        #: attempted.
        self._messages: dict[str, MessageAttempt | None] = {}
        #: Messages whose recording failed: the steps left wait here, with the lease kept.
        self._parked: dict[str, asyncio.Task[None]] = {}
        # How many times in a row each parked recording failed (its retry delay doubles).
        self._park_failures: dict[str, int] = {}
        self._settling: set[asyncio.Task[None]] = set()
        self._reading: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        # Whether the schedule loop waits for room (a settled message wakes it only then).
        self._starved = False
        self._running = False
        #: Callables given every :class:`QueueEvent` (metrics); exceptions in them are logged.
        self.observers: list[Callable[[QueueEvent], None]] = []

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start claiming due messages (a queue without a relay only stores)."""
        if self._running:
            return
        self._running = True
        if self._scheduler is not None:
            self._scheduler.start()
            self._tasks = [
                asyncio.create_task(self._schedule_loop(), name="smtpq-scheduler"),
                asyncio.create_task(self._renew_loop(), name="smtpq-lease-renewal"),
            ]

    async def stop(self, grace_period: float | None = None) -> None:
        """Stop claiming; let running attempts finish within the grace period; keep the rest.

        Messages waiting for a slot are given back at once. Attempts still running after the
        grace period are cancelled and their leases released, so that they are attempted again
        (here after a restart, or by another worker).
        """
        if not self._running:
            return
        self._running = False
        self._wake.set()
        grace = self.grace_period if grace_period is None else grace_period
        scheduler = self._tasks[:1]
        if scheduler:
            await asyncio.gather(*scheduler, return_exceptions=True)
        while self._reading:
            await asyncio.gather(*list(self._reading), return_exceptions=True)
        if self._scheduler is not None:
            for part in self._scheduler.close():
                self._withdraw(part)
            running = list(self._scheduler.running)
            if running:
                _, late = await asyncio.wait(running, timeout=grace)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)
        if self._scheduler is not None:
            await self._scheduler.aclose()
        await self._unpark()
        for task in self._tasks[1:]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def __aenter__(self) -> Queue:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        """Whether the queue has been started and not stopped."""
        return self._running

    @property
    def inflight(self) -> int:
        """Messages being attempted now: claimed, waiting for a slot or in an attempt, until
        their outcome is recorded."""
        return len(self._messages)

    def destination_views(self) -> list[DestinationView]:
        """Every destination this queue knows, with its state (empty without a relay)."""
        return self._scheduler.views() if self._scheduler is not None else []

    def set_destination_policy(self, policy: DestinationPolicy) -> None:
        """Schedule with new destination limits from now on (a configuration reload)."""
        self.destination_policy = policy
        if self._scheduler is not None:
            self._scheduler.set_policy(policy)

    def add_policy(self, policy: QueuePolicy) -> None:
        """Apply ``policy`` to every envelope enqueued from now on, after the earlier ones."""
        self.policies.append(policy)

    # -- accepting -----------------------------------------------------------------------------

    def _apply_policies(self, envelope: Envelope) -> list[Envelope]:
        envelopes = [envelope]
        for policy in self.policies:
            out: list[Envelope] = []
            for env in envelopes:
                result = policy.apply(env)
                out.extend([env] if result is None else result)
            envelopes = out
        return envelopes

    async def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str | QueueError]]:
        """Store ``envelope`` (after the policies) and start its first attempt at once: on the
        event loop's next turn, once the caller has the ids.

        Returns each resulting envelope with its queue id, or with the :class:`QueueError` that
        kept it from being stored (a storage failure, or an unexpected error in a policy).
        """
        now = self.clock.time()
        if envelope.timestamp is None:
            envelope.timestamp = now
        try:
            envelopes = self._apply_policies(envelope)
        except Exception as exc:
            log.exception("queue policy failed for message from <%s>", envelope.sender)
            return [(envelope, QueueError(f"queue policy failed: {exc!r}"))]
        deliver = self.relay is not None and self._running
        results = await asyncio.gather(*(self._write(env, now, deliver) for env in envelopes))
        stored = list(zip(envelopes, results, strict=True))
        if deliver:
            # Begun on the loop's next turn rather than here, so that our caller answers first:
            # the edge's 250 leaves before the first attempt's work, not after its first round
            # trips to the next hop (the client waits for it; the attempt does not).
            attempts = [
                Attempt(id, env.copy(), 0, tuple(range(len(env.recipients))), now)
                for env, id in stored
                if isinstance(id, str)
            ]
            for a in attempts:
                self._messages[a.id] = None  # leased by us: in flight from now on
            asyncio.get_running_loop().call_soon(self._admit_stored, attempts)
        return stored

    async def _write(self, env: Envelope, now: float, deliver: bool) -> str | QueueError:
        started = time.perf_counter()
        try:
            id = await self._store(self.store.write(env, now, claimed=deliver))
        except QueueError as exc:
            log.error("store failed for message from <%s>: %s", env.sender, exc)
            return exc
        except Exception as exc:
            log.exception("store failed for message from <%s>", env.sender)
            return QueueError(f"storage failure: {exc!r}")
        took = time.perf_counter() - started
        self._emit(
            QueueEvent(EventKind.ACCEPTED, id, env.recipients, None, **_origin(env), seconds=took)
        )
        return id

    def _admit_stored(self, attempts: list[Attempt]) -> None:
        """First attempts of messages just enqueued (stored claimed by us)."""
        for a in attempts:
            self._admit(a)

    async def flush(self, ids: Sequence[str] | None = None) -> int:
        """Attempt deferred messages (all, or ``ids``) now; returns how many were made due.
        Dead destinations are probed at once rather than after their cool-down, so that a
        flush after a repair delivers (Postfix's flush likewise forgets dead destinations)."""
        # Cool-downs first: a worker that shares the store and claims a flushed message must
        # find its destination's mark already ended.
        if self._scheduler is not None:
            await self._scheduler.end_cool_downs()
        count = await self._store(self.store.flush(self.clock.time(), ids))
        self._wake.set()
        return count

    # -- claiming ------------------------------------------------------------------------------

    async def _store(self, op: Awaitable[T]) -> T:
        if self._store_sem is None:
            return await op
        async with self._store_sem:
            return await op

    def _room(self) -> int:
        """How many more messages to claim now: no more than can be attempted soon."""
        return min(self.capacity, READY_FACTOR * self.capacity - len(self._messages))

    async def _schedule_loop(self) -> None:
        """Claim due messages while there is room, else sleep until something may be due."""
        failures = 0
        while self._running:
            free = self._room()
            self._starved = free <= 0
            claimed: list[str] = []
            if free > 0:
                try:
                    claimed = await self._store(self.store.claim(self.clock.time(), free))
                    failures = 0
                except Exception:
                    failures += 1
                    log.exception("claiming due messages failed (%d in a row)", failures)
                for id in claimed:
                    # Our own lease ran out under a slow attempt or a parked recording.
                    if id in self._messages or id in self._parked:
                        continue
                    self._messages[id] = None
                    task = asyncio.create_task(self._read(id), name=f"smtpq-read-{id}")
                    self._reading.add(task)
                    task.add_done_callback(self._reading.discard)
                if claimed and len(claimed) == free:
                    continue
            await self._idle(free, failures)

    async def _idle(self, free: int, failures: int) -> None:
        """Wait for a wake-up: a write, a reschedule, a free slot, or the next due time."""
        delay = self.poll_interval
        if failures:
            delay = min(self.poll_interval, 0.1 * 2**failures)
        elif free > 0:
            try:
                due = await self._store(self.store.next_due())
            except Exception:
                log.exception("reading the schedule failed")
                due = None
            if due is not None:
                delay = max(0.0, min(delay, due - self.clock.time()))
        if self._wake.is_set():
            self._wake.clear()
            return
        waits = [self._wake.wait(), self.clock.sleep(delay)]
        if free > 0 and not failures:
            # A real-time bound even under a manual clock: a store wake-up is not a due time.
            waits.append(self.store.wait(max(delay, 0.05)))
        await first_of(*waits)
        self._wake.clear()

    async def _renew_loop(self) -> None:
        """Renew the leases of the messages in memory a few times per lease period (and the
        destination store's leases of the running attempts)."""
        interval = max(
            0.05, min(self.store.lease_timeout, self.destination_store.lease_timeout) / 3
        )
        while True:
            await self.clock.sleep(interval)
            ids = [*self._messages, *self._parked]
            now = self.clock.time()
            if ids:
                try:
                    await self._store(self.store.renew(ids, now))
                except Exception:
                    log.exception("renewing %d leases failed", len(ids))
            if self._scheduler is not None:
                await self._scheduler.renew(now)

    # -- attempting ----------------------------------------------------------------------------

    async def _read(self, id: str) -> None:
        """Read a claimed message and admit it for its attempt."""
        try:
            entry = await self._store(self.store.get_entry(id))
        except KeyError:
            self._messages.pop(id, None)
            return  # removed meanwhile (delivered elsewhere, or deleted by an operator)
        except EnvelopeFormatError:
            log.exception("message %s is unreadable; holding it for an operator", id)
            self._messages.pop(id, None)
            with contextlib.suppress(Exception):
                await self._store(self.store.set_held(id, True))
            return
        except Exception:
            log.exception("reading message %s failed; it stays queued", id)
            self._messages.pop(id, None)
            with contextlib.suppress(Exception):
                await self._store(self.store.release(id))
            return
        if entry.held or not self._running:
            self._messages.pop(id, None)
            with contextlib.suppress(Exception):
                await self._store(self.store.release(id))
            return
        self._admit(Attempt(id, entry.envelope, entry.attempts, entry.pending, entry.timestamp))

    def _admit(self, a: Attempt) -> None:
        """Split a leased message into its destinations and hand the parts to the scheduler."""
        assert self._scheduler is not None
        groups = self._split(a)
        message = MessageAttempt(a, len(groups))
        self._messages[a.id] = message
        if not groups:  # nothing pending: the plan removes it
            self._conclude(message)
            return
        now = self.clock.time()
        postponable = len(groups) == 1 and may_postpone(self.rules, a, now)
        for name, (rcpts, indexes) in groups.items():
            env = a.envelope if len(groups) == 1 else a.envelope.copy(rcpts)
            part = Part(message, name, env, tuple(indexes), postponable)
            if not self._scheduler.submit(part, now):
                self._postpone_busy(part, now)

    def _split(self, a: Attempt) -> dict[str, tuple[list[str], list[int]]]:
        """The message's recipients (and their original indexes) by destination; when the
        relay fails to name them, every one goes to the default destination."""
        assert self.relay is not None
        try:
            named = self.relay.destinations(a.envelope)
        except Exception:
            log.exception("the relay could not name the destinations of %s", a.id)
            named = {}
        return split(a.envelope.recipients, a.pending, named)

    def _attempted(self, part: Part, judgement: Judgement, seconds: float) -> None:
        """A part's attempt ended (the scheduler's report)."""
        a = part.message.attempt
        self._emit(
            QueueEvent(
                EventKind.ATTEMPTED,
                a.id,
                part.envelope.recipients,
                attempt=a.attempts + 1,
                destination=part.destination,
                seconds=seconds,
            )
        )
        self._judged(part, judgement)

    def _deferred(self, part: Part, reply: Reply, probe_at: float | None) -> None:
        """A part deferred without connecting: its destination is dead. The probe candidate is
        given back for the end of the cool-down instead, if it may wait that long."""
        assert self._scheduler is not None
        if probe_at is not None:
            if may_postpone(self.rules, part.message.attempt, self.clock.time()):
                self._postpone(part, probe_at, reason="the probe")
                return
            self._scheduler.dispatcher.want_probe(part.destination)
        self._judged(part, judge(part.envelope.recipients, part.indexes, reply))

    def _released(self, part: Part) -> None:
        """A postponable part waited ``max_wait``: postpone it, unless it may not be."""
        assert self._scheduler is not None
        now = self.clock.time()
        if may_postpone(self.rules, part.message.attempt, now):
            self._postpone_busy(part, now)
        else:
            self._scheduler.resubmit(part, now)

    def _postpone_busy(self, part: Part, now: float) -> None:
        """Give back a message its destination cannot take soon (too much waits for it)."""
        assert self._scheduler is not None
        dest = self._scheduler.dispatcher.destination(part.destination)
        at = dest.postpone_until(now, self.destination_policy.max_wait)
        self._postpone(part, at, reason="destination busy")

    def _postpone(self, part: Part, at: float, *, reason: str) -> None:
        """Give a (single-destination) message back to the schedule, unattempted."""
        now = self.clock.time()
        steps = postpone(self.rules, part.message.attempt, part.destination, now, at, reason)
        self._settle(part.message, steps)

    def _withdraw(self, part: Part) -> None:
        """A part taken back unattempted, or cancelled (stopping)."""
        message = part.message
        message.withdrawn = True
        message.parts -= 1
        if not message.parts:
            self._conclude(message)

    def _judged(self, part: Part, judgement: Judgement) -> None:
        """Add a part's verdicts to its message; the last part concludes the attempt, an
        earlier one records its deliveries at once."""
        message = part.message
        message.add(judgement)
        message.parts -= 1
        if not message.parts:
            self._conclude(message)
        elif judgement.delivered:
            self._record_early(message, judgement.delivered)

    def _record_early(self, message: MessageAttempt, verdicts: Sequence[Verdict]) -> None:
        """Store a part's deliveries while the message's other parts run: a crash later must
        not deliver them twice. A failure is left to the attempt's own recording."""
        a = message.attempt

        async def record() -> None:
            async with message.lock:
                try:
                    await self._step(a.id, record_delivered(a.id, verdicts))
                except Exception as exc:
                    log.warning("recording deliveries of %s early failed (%s)", a.id, exc)
                    return
                message.recorded.update(v.index for v in verdicts)

        self._track(asyncio.create_task(record()))

    def _conclude(self, message: MessageAttempt) -> None:
        """Every part has ended: record the attempt (or, withdrawn, what it delivered)."""
        a = message.attempt
        if message.withdrawn:
            fresh = [v for v in message.delivered if v.index not in message.recorded]
            steps: list[Step] = [record_delivered(a.id, fresh)] if fresh else []
            self._settle(message, steps, release=True)
            return

        def steps_now() -> list[Step]:
            judgement = message.judgement()
            retry = a.subset(judgement.transient) if judgement.transient else None
            wait = self._ask_backoff(a, retry)
            now = self.clock.time()
            return plan(judgement, a, wait, self.rules, now, recorded=message.recorded)

        self._settle(message, steps_now)

    def _settle(
        self,
        message: MessageAttempt,
        steps: Sequence[Step] | Callable[[], Sequence[Step]],
        *,
        release: bool = False,
    ) -> None:
        """Carry the steps out (made once the earlier recordings ended, when a function),
        shielded from cancellation; then forget the message (``release``: and its lease)."""
        a = message.attempt

        async def settle() -> None:
            try:
                async with message.lock:
                    await self._carry_out(a, steps if isinstance(steps, Sequence) else steps())
                    if release:
                        with contextlib.suppress(Exception):
                            await self._store(self.store.release(a.id))
            finally:
                if self._messages.get(a.id) is message:
                    del self._messages[a.id]
                if self._starved:
                    # With room to spare, a freed slot changes nothing: the loop waits for a
                    # write or a due time. Waking it for each message costs its timers.
                    self._wake.set()

        self._track(asyncio.create_task(settle(), name=f"smtpq-record-{a.id}"))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _ask_backoff(self, a: Attempt, retry: Envelope | None) -> float | None:
        """The backoff's answer for the recipients to retry (None when there are none).

        A backoff that raises is a bug: logged, and the message is tried again soon rather
        than bounced.
        """
        if retry is None:
            return None
        try:
            return self.backoff(retry, a.attempts + 1)
        except Exception:
            log.exception("the backoff failed for %s; retrying in %.0fs", a.id, RECORD_RETRY_DELAY)
            return RECORD_RETRY_DELAY

    # -- recording -----------------------------------------------------------------------------

    async def _carry_out(self, a: Attempt, steps: Sequence[Step]) -> None:
        """Carry out ``steps`` in order; park the ones left when one fails."""
        for i, step in enumerate(steps):
            try:
                await self._step(a.id, step)
            except KeyError:
                log.info("message %s is gone; the rest of its outcome is not recorded", a.id)
                return
            except Exception as exc:
                self._park(a, steps[i:], exc)
                return

    async def _step(self, id: str, step: Step) -> None:
        events = step.events
        if isinstance(step, MarkDone):
            await self._store(self.store.set_recipients_delivered(id, step.indexes))
        elif isinstance(step, SendNotice):
            dsn = ",".join(await self._send(step.notice)) or "none"
            events = tuple(e.with_detail(dsn=dsn) for e in events)
        elif isinstance(step, CountAttempt):
            await self._store(self.store.increment_attempts(id))
        elif isinstance(step, Reschedule):
            await self._store(self.store.set_timestamp(id, step.at, last_reply=step.last_reply))
        else:
            await self._store(self.store.remove(id))
        for event in events:
            self._emit(event)

    def _park(self, a: Attempt, steps: Sequence[Step], exc: Exception) -> None:
        """Keep the steps left, and the lease, and carry them out again later."""
        what = type(steps[0]).__name__
        failures = self._park_failures.get(a.id, 0)
        self._park_failures[a.id] = failures + 1
        delay = min(RECORD_RETRY_DELAY, RECORD_RETRY_FIRST * 2**failures)
        if isinstance(exc, QueueError | OSError):
            log.error(
                "recording the outcome of %s failed at %s (%s); trying again in %.0fs",
                a.id, what, exc, delay,
            )  # fmt: skip
        else:  # a bug: the traceback helps
            log.exception("recording the outcome of %s failed at %s", a.id, what)

        async def resume() -> None:
            await self.clock.sleep(delay)
            await self._carry_out(a, steps)  # parks again (replacing this task) if it fails
            if self._parked.get(a.id) is asyncio.current_task():
                del self._parked[a.id]
                self._park_failures.pop(a.id, None)

        self._parked[a.id] = asyncio.create_task(resume(), name=f"smtpq-record-{a.id}")

    async def _unpark(self) -> None:
        """On stop: give up the parked recordings and their leases; the messages are attempted
        again (here after a restart, or by another worker)."""
        parked, self._parked = self._parked, {}
        self._park_failures.clear()
        for task in parked.values():
            task.cancel()
        await asyncio.gather(*parked.values(), return_exceptions=True)
        for id in parked:
            with contextlib.suppress(Exception):
                await self.store.release(id)

    async def _send(self, notice: Notice) -> list[str]:
        """Enqueue the DSNs of ``notice`` into the bounce queue; their queue ids.

        Raises :class:`QueueError` when one could not be stored.
        """
        ids: list[str] = []
        for dsn in self.notifier.notify(notice):
            for _, result in await self.bounce_queue.enqueue(dsn):
                if isinstance(result, QueueError):
                    raise QueueError(f"a DSN could not be queued: {result}")
                ids.append(result)
        return ids

    async def send_bounce(
        self, envelope: Envelope, reply: Reply, why: str | None = None
    ) -> list[str] | None:
        """Bounce ``envelope``'s recipients with ``reply`` now (an operator's bounce).

        Returns the bounce's queue ids (empty when none is due: a null sender, NOTIFY=NEVER),
        or None when it could not be stored.
        """
        wanted = [r for r in envelope.recipients if notify_wants(envelope, r, "FAILURE")]
        if not envelope.sender or not wanted:
            return []
        notice = Notice(
            Action.FAILED, envelope, outcomes_for(wanted, reply), self.clock.time(), note=why
        )
        try:
            return await self._send(notice)
        except QueueError as exc:
            log.error("%s", exc)
            return None

    def emit(self, event: QueueEvent) -> None:
        """Log an event and pass it to the observers: for what others do to the queue (the
        operators' actions), so that one log and one set of metrics tell all of it."""
        self._emit(event)

    def _emit(self, event: QueueEvent) -> None:
        # One INFO line per message outcome; the attempt itself and the removal that follows
        # every final outcome are detail (metrics still count them).
        if event.kind in _DETAIL_EVENTS:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s", event)
        else:
            log.info("%s", event)
        for observer in self.observers:
            try:
                observer(event)
            except Exception:
                log.exception("queue event observer failed")
