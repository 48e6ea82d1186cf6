"""The Queue: the asyncio driver where clock, storage and relay meet.

It stores what it accepts, makes the first attempt at once from the envelope in memory, claims
due messages from the storage's schedule, renews the leases of running attempts, and carries out
the decisions of :mod:`smtpq.queue.rules`. Bookkeeping after an attempt runs shielded from
cancellation, so that stopping never loses what an attempt achieved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

from smtpq.backoff import Backoff, DefaultBackoff
from smtpq.bounce import BounceFactory
from smtpq.clock import Clock, SystemClock
from smtpq.envelope import Envelope
from smtpq.errors import EnvelopeFormatError, QueueError
from smtpq.policy import QueuePolicy
from smtpq.queue.rules import Judgement, delay_warning_due, exhausted_reply, is_expired, judge
from smtpq.relay.base import Relay, RelayError, RelayResult
from smtpq.reply import Reply
from smtpq.storage.base import QueueStorage

__all__ = ["Queue", "QueueEvent"]

log = logging.getLogger("smtpq.queue")
T = TypeVar("T")

#: Events logged at DEBUG only.
_DETAIL_EVENTS = frozenset({"attempted", "removed"})

#: Seconds before a message whose bounce could not be enqueued is tried again.
BOUNCE_RETRY_DELAY = 60.0


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


class BounceFactoryType(Protocol):
    """``bounce_factory(envelope, reply) -> Envelope | None``."""

    def __call__(self, envelope: Envelope, reply: Reply) -> Envelope | None:
        """The bounce to send, or None to send none."""
        ...


class QueueEvent:
    """One thing that happened to a message, for logs and metrics observers."""

    __slots__ = ("detail", "id", "kind", "recipients", "reply")

    def __init__(
        self,
        kind: str,
        id: str,
        recipients: Sequence[str] = (),
        reply: Reply | None = None,
        **detail: Any,
    ) -> None:
        #: accepted, attempted, delivered, deferred, bounced, expired, failed, removed; and the
        #: operators' flushed, held, released, deleted, requeued (see smtpq.daemon.ops).
        self.kind = kind
        self.id = id
        self.recipients = tuple(recipients)
        self.reply = reply
        self.detail = detail

    def __str__(self) -> str:
        parts = [self.kind, f"id={self.id}"]
        if self.recipients:
            parts.append("to=" + ",".join(f"<{r}>" for r in self.recipients))
        if self.reply is not None:
            if self.reply.remote_host:
                parts.append(f"relay={self.reply.remote_host}")
            parts.append(f'reply="{self.reply}"')
        for key, value in self.detail.items():
            parts.append(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")
        return " ".join(parts)


@dataclass(slots=True)
class _Attempt:
    """One delivery attempt of a stored message: what the driver carries from start to record.

    :ivar pending: the original index of each recipient of :attr:`envelope`.
    :ivar scheduled: when the attempt was due (for delay warnings).
    """

    id: str
    envelope: Envelope
    attempts: int
    pending: tuple[int, ...]
    scheduled: float

    def recipients(self, indexes: Sequence[int]) -> list[str]:
        """The recipients at these original indexes."""
        if tuple(indexes) == self.pending:  # the usual case: all of them
            return list(self.envelope.recipients)
        position = {orig: k for k, orig in enumerate(self.pending)}
        return [self.envelope.recipients[position[i]] for i in indexes]

    def subset(self, indexes: Sequence[int]) -> Envelope:
        """A copy of the envelope for the recipients at these original indexes."""
        return self.envelope.copy(self.recipients(indexes))


class Queue:
    """A mail queue over a storage, delivering through a relay.

    :param store: the storage; the Queue does not own it (``await store.close()`` yourself).
    :param relay: delivers messages; None makes an edge-only queue that only stores.
    :param backoff: ``backoff(envelope, attempts) -> seconds | None``; the default retries for
        5 days with growing spacing (:class:`~smtpq.backoff.DefaultBackoff`).
    :param bounce_factory: ``bounce_factory(envelope, reply) -> Envelope | None``.
    :param bounce_queue: where bounces are enqueued (default: this queue).
    :param store_pool: at most this many storage operations at once (None: no bound).
    :param relay_pool: at most this many delivery attempts at once (default 100).
    :param clock: time source (:class:`~smtpq.clock.SystemClock`); tests inject a ManualClock.
    :param grace_period: seconds that stopping waits for running attempts.
    :param poll_interval: longest idle wait before the schedule is looked at again anyway.
    :param delay_warnings: message ages (seconds) at which the sender is sent a "delayed" DSN
        (RFC 3464 Action: delayed), honouring NOTIFY; none by default, like Postfix.
    """

    def __init__(
        self,
        store: QueueStorage,
        relay: Relay | None = None,
        backoff: Backoff | None = None,
        bounce_factory: BounceFactoryType | None = None,
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
    ) -> None:
        self.store = store
        self.relay = relay
        self.clock: Clock = clock or SystemClock()
        self.backoff: Backoff = backoff or DefaultBackoff(clock=self.clock)
        self.hostname = hostname or socket.getfqdn()
        self.bounce_factory: BounceFactoryType = bounce_factory or BounceFactory(self.hostname)
        self.bounce_queue = bounce_queue if bounce_queue is not None else self
        self.policies: list[QueuePolicy] = list(policies)
        self.grace_period = grace_period
        self.poll_interval = poll_interval
        self.delay_warnings = tuple(delay_warnings)
        self.capacity = relay_pool or 100
        self._relay_sem = asyncio.Semaphore(self.capacity)
        self._store_sem = asyncio.Semaphore(store_pool) if store_pool else None
        self._inflight: dict[str, asyncio.Task[None]] = {}
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
        self._emit(QueueEvent("accepted", id, env.recipients, None, **_origin(env), seconds=took))
        if deliver:
            pending = tuple(range(len(env.recipients)))
            self._spawn(id, self._attempt(_Attempt(id, env.copy(), 0, pending, now)))
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
                    if id in self._inflight:  # our own lease ran out under a slow attempt
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
            ids = list(self._inflight)
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
            _Attempt(id, entry.envelope, entry.attempts, entry.pending, entry.timestamp)
        )

    async def _attempt(self, a: _Attempt) -> None:
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
                    "attempted", a.id, a.envelope.recipients, attempt=a.attempts + 1, seconds=took
                )
            )
        judgement = judge(a.envelope.recipients, a.pending, result)
        settle = asyncio.create_task(self._settle(a, judgement))
        self._settling.add(settle)
        settle.add_done_callback(self._settling.discard)
        await asyncio.shield(settle)

    async def _settle(self, a: _Attempt, judgement: Judgement) -> None:
        """Record an attempt's outcome: delivered first, then bounces, then the retry."""
        try:
            await self._record(a, judgement)
        except Exception:
            # The lease runs out and the message is attempted again: duplicates are bounded by
            # what was in flight, nothing is lost.
            log.exception("recording the outcome of %s failed; it will be attempted again", a.id)

    async def _record(self, a: _Attempt, judgement: Judgement) -> None:
        id, envelope = a.id, a.envelope
        now = self.clock.time()
        done: set[int] = set()
        if judgement.delivered:
            # When every recipient was delivered, removing the message records it: the usual
            # case costs no meta update. Otherwise the delivered ones are persisted first.
            if judgement.permanent or judgement.transient:
                await self._store(self.store.set_recipients_delivered(id, judgement.delivered))
            done.update(judgement.delivered)
            delivered = a.recipients(judgement.delivered)
            self._emit(QueueEvent("delivered", id, delivered, judgement.success))
        retry_soon = False
        for reply, idx in judgement.permanent:
            if await self._bounce(id, a.subset(idx), reply):
                await self._store(self.store.set_recipients_delivered(id, idx))
                done.update(idx)
            else:
                retry_soon = True
        transient = judgement.transient_indexes
        if transient:
            attempts = await self._store(self.store.increment_attempts(id))
            retry_env = a.subset(transient)
            wait = self.backoff(retry_env, attempts)
            if wait is None:
                lifetime = getattr(self.backoff, "lifetime", None)
                expired = is_expired(lifetime, envelope.timestamp, now)
                for reply, idx in judgement.transient:
                    final, why = exhausted_reply(reply, attempts, expired)
                    sub = a.subset(idx)
                    self._emit(
                        QueueEvent("expired" if expired else "failed", id, sub.recipients, reply)
                    )
                    if await self._bounce(id, sub, final, why):
                        await self._store(self.store.set_recipients_delivered(id, idx))
                        done.update(idx)
                    else:
                        retry_soon = True
            else:
                at = now + max(0.0, wait)
                await self._store(self.store.set_timestamp(id, at, last_reply=judgement.last_reply))
                await self._warn_delay(id, retry_env, judgement, a.scheduled, now)
                self._emit(
                    QueueEvent(
                        "deferred",
                        id,
                        retry_env.recipients,
                        judgement.last_reply,
                        attempts=attempts,
                        delay=f"{wait:.0f}s",
                    )
                )
                return
        if done.issuperset(a.pending):
            await self._store(self.store.remove(id))
            self._emit(QueueEvent("removed", id))
        elif retry_soon:
            await self._store(self.store.set_timestamp(id, now + BOUNCE_RETRY_DELAY))

    async def _warn_delay(
        self, id: str, envelope: Envelope, judgement: Judgement, scheduled: float, now: float
    ) -> None:
        """Send an RFC 3464 "delayed" notice when the message's age passed a warning time."""
        due = delay_warning_due(self.delay_warnings, envelope.timestamp, scheduled, now)
        factory = self.bounce_factory
        if due is None or not isinstance(factory, BounceFactory) or judgement.last_reply is None:
            return
        hours = due / 3600
        why = f"delayed for more than {hours:g} hours; delivery will be retried"
        notice = factory(envelope, judgement.last_reply, now=now, diagnostic=why, action="delayed")
        if notice is None:
            return
        results = await self.bounce_queue.enqueue(notice)
        ids = ",".join(r for _, r in results if isinstance(r, str))
        self._emit(
            QueueEvent("delay-warned", id, envelope.recipients, judgement.last_reply, dsn=ids)
        )

    async def send_bounce(
        self, envelope: Envelope, reply: Reply, why: str | None = None
    ) -> list[str] | None:
        """Enqueue a bounce for ``envelope``'s recipients into the bounce queue.

        Returns the bounce's queue ids (empty when none is due: a null sender, NOTIFY=NEVER),
        or None when it could not be stored.
        """
        factory = self.bounce_factory
        bounce: Envelope | None
        if isinstance(factory, BounceFactory):
            bounce = factory(envelope, reply, now=self.clock.time(), diagnostic=why)
        else:
            bounce = factory(envelope, reply)
        if bounce is None:
            return []
        results = await self.bounce_queue.enqueue(bounce)
        errors = [r for _, r in results if isinstance(r, QueueError)]
        if errors:
            log.error("a bounce could not be queued: %s", errors[0])
            return None
        return [r for _, r in results if isinstance(r, str)]

    async def _bounce(
        self, id: str, envelope: Envelope, reply: Reply, why: str | None = None
    ) -> bool:
        """Bounce and log; False if the bounce could not be stored (retry later)."""
        ids = await self.send_bounce(envelope, reply, why)
        if ids is None:
            return False
        dsn = ",".join(ids) or "none"
        self._emit(QueueEvent("bounced", id, envelope.recipients, reply, dsn=dsn))
        return True

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
