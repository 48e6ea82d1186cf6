"""The Queue: the asyncio driver where clock, storage and relay meet.

It stores what it accepts, makes the first attempt at once from the envelope in memory, claims
due messages from the storage's schedule, renews the leases of running attempts, and carries out
the steps that :func:`smtpq.queue.rules.plan` decides, in their order. Bookkeeping after an
attempt runs shielded from cancellation, so that stopping never loses what an attempt achieved.

When a step fails (the storage, or a DSN that could not be queued), the steps left are kept in
memory with the message's lease and carried out again :data:`RECORD_RETRY_DELAY` seconds later:
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
from smtpq.clock import Clock, SystemClock
from smtpq.envelope import Envelope
from smtpq.errors import EnvelopeFormatError, QueueError
from smtpq.notice import Action, Notice, outcomes_for
from smtpq.policy import QueuePolicy
from smtpq.queue.event import EventKind, QueueEvent
from smtpq.queue.rules import (
    Attempt,
    CountAttempt,
    MarkDone,
    Reschedule,
    RetryRules,
    SendNotice,
    Step,
    judge,
    plan,
)
from smtpq.relay.base import Relay, RelayError, RelayResult
from smtpq.reply import Reply
from smtpq.storage.base import QueueStorage

__all__ = ["RECORD_RETRY_DELAY", "Queue", "QueueEvent"]

log = logging.getLogger("smtpq.queue")
T = TypeVar("T")

#: Events logged at DEBUG only.
_DETAIL_EVENTS = frozenset({EventKind.ATTEMPTED, EventKind.REMOVED})

#: Seconds before the steps left of a failed recording are tried again.
RECORD_RETRY_DELAY = 60.0

_MESSAGE_ID = re.compile(rb"(?:^|\n)message-id[ \t]*:[ \t]*((?:[^\r\n]|\r?\n[ \t])*)", re.I)
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
    match = _MESSAGE_ID.search(head)
    if match is not None:
        # The first word of the unfolded value, printable ASCII only: one key=value in the line.
        words = match.group(1).decode("ascii", "replace").split()
        value = "".join(c for c in words[0] if c.isprintable() and c.isascii()) if words else ""
        if value:
            origin["message-id"] = value[:_MESSAGE_ID_MAX]
    return origin


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
    :param relay_pool: at most this many delivery attempts at once (default 100).
    :param clock: time source (:class:`~smtpq.clock.SystemClock`); tests inject a ManualClock.
    :param grace_period: seconds that stopping waits for running attempts.
    :param poll_interval: longest idle wait before the schedule is looked at again anyway.
    :param delay_warnings: message ages (seconds) at which the sender is sent a "delayed" DSN
        (RFC 3464 Action: delayed), once each, honouring NOTIFY; none by default, like Postfix.
    :param lifetime: seconds after arrival when the queue gives up on a message (status 4.4.7),
        after a last attempt then; None: only the backoff gives up. Default 5 days.
    :param notifier: makes the DSNs (:class:`~smtpq.bounce.Notifier`; default
        :class:`~smtpq.bounce.BounceFactory` with ``hostname``).
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
        self._relay_sem = asyncio.Semaphore(self.capacity)
        self._store_sem = asyncio.Semaphore(store_pool) if store_pool else None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        #: Messages whose recording failed: the steps left wait here, with the lease kept.
        self._parked: dict[str, asyncio.Task[None]] = {}
        self._settling: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._running = False
        #: Callables given every :class:`QueueEvent` (metrics); exceptions in them are logged.
        self.observers: list[Callable[[QueueEvent], None]] = []

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start claiming due messages (a queue without a relay only stores)."""
        if self._running:
            return
        self._running = True
        if self.relay is not None:
            self._tasks = [
                asyncio.create_task(self._schedule_loop(), name="smtpq-scheduler"),
                asyncio.create_task(self._renew_loop(), name="smtpq-lease-renewal"),
            ]

    async def stop(self, grace_period: float | None = None) -> None:
        """Stop claiming; let running attempts finish within the grace period; keep the rest.

        Attempts still running after the grace period are cancelled and their leases released,
        so that they are attempted again (here after a restart, or by another worker).
        """
        if not self._running:
            return
        self._running = False
        self._wake.set()
        grace = self.grace_period if grace_period is None else grace_period
        scheduler = self._tasks[:1]
        if scheduler:
            await asyncio.gather(*scheduler, return_exceptions=True)
        running = list(self._inflight.values())
        if running:
            _, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)
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
        """Delivery attempts running now."""
        return len(self._inflight)

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
        """Store ``envelope`` (after the policies) and start its first attempt at once.

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
        return list(zip(envelopes, results, strict=True))

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
        if deliver:
            pending = tuple(range(len(env.recipients)))
            self._spawn(id, self._attempt(Attempt(id, env.copy(), 0, pending, now)))
        return id

    async def flush(self, ids: Sequence[str] | None = None) -> int:
        """Attempt deferred messages (all, or ``ids``) now; returns how many were made due."""
        count = await self._store(self.store.flush(self.clock.time(), ids))
        self._wake.set()
        return count

    # -- scheduling ----------------------------------------------------------------------------

    async def _store(self, op: Awaitable[T]) -> T:
        if self._store_sem is None:
            return await op
        async with self._store_sem:
            return await op

    def _spawn(self, id: str, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                log.exception("attempt of %s failed unexpectedly; it stays queued", id)
            finally:
                self._inflight.pop(id, None)
                self._wake.set()

        self._inflight[id] = asyncio.create_task(run(), name=f"smtpq-attempt-{id}")

    async def _schedule_loop(self) -> None:
        """Claim due messages while there is room, else sleep until something may be due."""
        failures = 0
        while self._running:
            free = self.capacity - len(self._inflight)
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
                    if id in self._inflight or id in self._parked:
                        continue
                    self._spawn(id, self._attempt_stored(id))
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
        waits = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self.clock.sleep(delay)),
        ]
        if free > 0 and not failures:
            # A real-time bound even under a manual clock: a store wake-up is not a due time.
            waits.append(asyncio.ensure_future(self.store.wait(max(delay, 0.05))))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        self._wake.clear()

    async def _renew_loop(self) -> None:
        """Renew the leases of running attempts a few times per lease period."""
        interval = max(0.05, self.store.lease_timeout / 3)
        while True:
            await self.clock.sleep(interval)
            ids = [*self._inflight, *self._parked]
            if ids:
                try:
                    await self._store(self.store.renew(ids, self.clock.time()))
                except Exception:
                    log.exception("renewing %d leases failed", len(ids))

    # -- attempting ----------------------------------------------------------------------------

    async def _attempt_stored(self, id: str) -> None:
        try:
            entry = await self._store(self.store.get_entry(id))
        except KeyError:
            return  # removed meanwhile (delivered elsewhere, or deleted by an operator)
        except EnvelopeFormatError:
            log.exception("message %s is unreadable; holding it for an operator", id)
            with contextlib.suppress(Exception):
                await self._store(self.store.set_held(id, True))
            return
        except Exception:
            log.exception("reading message %s failed; it stays queued", id)
            with contextlib.suppress(Exception):
                await self._store(self.store.release(id))
            return
        if entry.held:
            await self._store(self.store.release(id))
            return
        await self._attempt(
            Attempt(id, entry.envelope, entry.attempts, entry.pending, entry.timestamp)
        )

    async def _attempt(self, a: Attempt) -> None:
        assert self.relay is not None
        result: RelayResult | BaseException
        if not a.envelope.recipients:
            result = None
        else:
            started = 0.0
            try:
                async with self._relay_sem:
                    started = time.perf_counter()
                    result = await self.relay.attempt(a.envelope, a.attempts)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.release(a.id))
                raise
            except RelayError as exc:
                result = exc
            except Exception as exc:
                log.exception("relay raised an unexpected error for %s; will retry", a.id)
                result = exc
            took = time.perf_counter() - started
            self._emit(
                QueueEvent(
                    EventKind.ATTEMPTED,
                    a.id,
                    a.envelope.recipients,
                    attempt=a.attempts + 1,
                    seconds=took,
                )
            )
        judgement = judge(a.envelope.recipients, a.pending, result)
        retry = a.subset(judgement.transient) if judgement.transient else None
        wait = self._ask_backoff(a, retry)
        steps = plan(judgement, a, wait, self.rules, self.clock.time())
        settle = asyncio.create_task(self._carry_out(a, steps))
        self._settling.add(settle)
        settle.add_done_callback(self._settling.discard)
        await asyncio.shield(settle)

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
        if isinstance(exc, QueueError | OSError):
            log.error(
                "recording the outcome of %s failed at %s (%s); trying again in %.0fs",
                a.id, what, exc, RECORD_RETRY_DELAY,
            )  # fmt: skip
        else:  # a bug: the traceback helps
            log.exception("recording the outcome of %s failed at %s", a.id, what)

        async def resume() -> None:
            await self.clock.sleep(RECORD_RETRY_DELAY)
            await self._carry_out(a, steps)  # parks again (replacing this task) if it fails
            if self._parked.get(a.id) is asyncio.current_task():
                del self._parked[a.id]

        self._parked[a.id] = asyncio.create_task(resume(), name=f"smtpq-record-{a.id}")

    async def _unpark(self) -> None:
        """On stop: give up the parked recordings and their leases; the messages are attempted
        again (here after a restart, or by another worker)."""
        parked, self._parked = self._parked, {}
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
