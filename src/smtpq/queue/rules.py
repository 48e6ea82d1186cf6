"""The pure rules of the queue: what an attempt's result means, and what to do next, in order.

No I/O, no event loop, no clock: the asyncio driver (:mod:`smtpq.queue.driver`) feeds these
functions plain values — the relay's result, the attempt, the backoff's answer, the time — and
carries out the steps :func:`plan` returns, one after the other (DESIGN §2, §3):

1. :class:`MarkDone` the delivered recipients (persisted before anything else);
2. :class:`SendNotice` the success report (NOTIFY=SUCCESS, next hop without DSN), then the one
   failure DSN of the event: every recipient refused now, and every one given up now;
3. :class:`MarkDone` the bounced ones — after their DSN is stored, so that a crash may
   duplicate a bounce but never lose one;
4. :class:`CountAttempt`, then :class:`SendNotice` a due delay warning, then
   :class:`Reschedule` the recipients left; or, with none left, :class:`Remove`.

When every recipient is delivered in one attempt (and no notice is due), the removal records it:
the usual case costs no update first.

**Several destinations.** The driver attempts a message once per destination
(:mod:`smtpq.queue.dispatch`), and the parts end at different times. A part that ends while
others run records only its delivered recipients, at once (:func:`record_delivered`); the last
one plans the whole attempt from every part's verdicts (:func:`plan` with ``recorded``, the
ones stored already): one DSN per attempt, one attempt counted, one next-attempt time.

**Postponed, not attempted.** A message given back to the schedule unattempted — its
destination had too many messages waiting for it, or it is kept for the probe at the end of a
dead destination's cool-down — is rescheduled without counting an attempt
(:func:`postpone`), and only when that cannot skip what an attempt now would do: it is not
expired, and no delay warning is due in its window (:func:`may_postpone`). So the scheduler's
own congestion never uses up a message's retries, nor loses a warning.

**Delay warnings.** A threshold ``T`` (seconds since arrival ``A``) is reported by the attempt
whose window — from the time it was due, ``s``, to its failure, ``now`` — contains ``A + T``
(:func:`delay_warning_due`). The windows of successive attempts never overlap, because every
next attempt is due strictly after the failure that schedules it; and they leave no gap,
because :func:`next_attempt_time` never schedules past the next threshold: the message wakes
up at ``A + T`` at the latest, is attempted, and that attempt (the first one at or after the
threshold) sends the warning. So each threshold is reported exactly once per message, with no
stored state, whatever the backoff, a restart or a flush (which only makes ``s`` earlier) do.
What can repeat one: a crash between storing the warning and rescheduling (as with bounces),
or the wall clock stepping back.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from smtpq.backoff import DEFAULT_LIFETIME
from smtpq.bounce import notify_wants
from smtpq.envelope import Envelope
from smtpq.notice import Action, Notice, Outcome
from smtpq.queue.event import EventKind, QueueEvent
from smtpq.relay.base import RecipientResult, RelayError, RelayResult
from smtpq.reply import Reply, ReplyClass, missing_recipient_reply, unexpected_error_reply

__all__ = [
    "Attempt",
    "CountAttempt",
    "Judgement",
    "MarkDone",
    "Remove",
    "Reschedule",
    "RetryRules",
    "SendNotice",
    "Step",
    "Verdict",
    "delay_warning_due",
    "is_expired",
    "judge",
    "may_postpone",
    "next_attempt_time",
    "plan",
    "postpone",
    "record_delivered",
]


# -- judging an attempt ----------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One recipient's outcome: its index in the list as first written, and its reply (None:
    delivered by a relay that gave no reply)."""

    index: int
    recipient: str
    reply: Reply | None


@dataclass(frozen=True)
class Judgement:
    """The outcome of one attempt, per recipient, each with its own reply."""

    delivered: tuple[Verdict, ...] = ()
    permanent: tuple[Verdict, ...] = ()
    transient: tuple[Verdict, ...] = ()

    @property
    def last_reply(self) -> Reply | None:
        """The reply to remember for the next attempt (the first transient one)."""
        return self.transient[0].reply if self.transient else None


def _as_reply(result: Reply | RelayError | BaseException | None) -> Reply | None:
    """None for delivered; otherwise the failure as a reply judged by its code or class."""
    if result is None:
        return None
    if isinstance(result, RelayError):
        return result.reply
    if isinstance(result, BaseException):
        return unexpected_error_reply()
    return result


def judge(
    recipients: Sequence[str],
    indexes: Sequence[int],
    result: RelayResult | BaseException,
) -> Judgement:
    """Sort the recipients of an attempt into delivered, permanent and transient failures.

    ``recipients[k]`` has original index ``indexes[k]``. ``result`` is what ``Relay.attempt``
    returned, or the exception it raised. A recipient missing from a per-recipient dict is a
    transient failure (``450 4.0.0``); so is a reply that is neither 2xx, 4xx nor 5xx, and any
    exception that is not a RelayError.
    """
    per_rcpt: Mapping[str, RecipientResult] | None = None
    whole: Reply | None = None
    if isinstance(result, Mapping):
        per_rcpt = result
    else:
        whole = _as_reply(result)
    missing = missing_recipient_reply()
    delivered: list[Verdict] = []
    permanent: list[Verdict] = []
    transient: list[Verdict] = []
    for rcpt, index in zip(recipients, indexes, strict=True):
        if per_rcpt is None:
            reply = whole
        else:
            reply = _as_reply(per_rcpt[rcpt]) if rcpt in per_rcpt else missing
        klass = ReplyClass.SUCCESS if reply is None else reply.reply_class
        if klass is ReplyClass.SUCCESS:
            delivered.append(Verdict(index, rcpt, reply))
        elif klass is ReplyClass.PERMANENT:
            permanent.append(Verdict(index, rcpt, reply))
        elif klass is ReplyClass.TRANSIENT:
            transient.append(Verdict(index, rcpt, reply))
        else:
            transient.append(Verdict(index, rcpt, _unclassifiable(reply)))
    return Judgement(tuple(delivered), tuple(permanent), tuple(transient))


def _unclassifiable(reply: Reply | None) -> Reply:
    return Reply("450", f"4.0.0 Unexpected reply from relay: {reply}")


# -- time rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryRules:
    """The queue's own limits on retrying (as Postfix's queue manager has them).

    :ivar delay_warnings: message ages (seconds) at which the sender is warned (Action:
        delayed), ascending; none by default, like Postfix's ``delay_warning_time``.
    :ivar lifetime: seconds after arrival when the queue gives up (status 4.4.7), with a last
        attempt then; the Will-Retry-Until of warnings. None: only the backoff gives up.
    """

    delay_warnings: tuple[float, ...] = ()
    lifetime: float | None = DEFAULT_LIFETIME

    def __post_init__(self) -> None:
        thresholds = tuple(sorted(set(float(t) for t in self.delay_warnings)))
        if any(t <= 0 or not math.isfinite(t) for t in thresholds):
            raise ValueError("delay warnings must be positive numbers of seconds")
        if self.lifetime is not None and not self.lifetime > 0:
            raise ValueError("lifetime must be positive (or None)")
        object.__setattr__(self, "delay_warnings", thresholds)


def is_expired(lifetime: float | None, received: float | None, now: float) -> bool:
    """Whether a message received at ``received`` has outlived ``lifetime`` at ``now``."""
    return lifetime is not None and received is not None and now >= received + lifetime


def delay_warning_due(
    thresholds: Sequence[float], received: float | None, scheduled: float, now: float
) -> float | None:
    """The delay-warning threshold that an attempt due at ``scheduled``, failing at ``now``,
    reports, or None.

    That is a threshold whose time (``received + threshold``) lies in ``[scheduled, now]``;
    with several, the largest (one warning). Exactly once per threshold when the attempts are
    scheduled by :func:`next_attempt_time` (see the module docstring).
    """
    if received is None:
        return None
    crossed = [t for t in thresholds if scheduled <= received + t <= now]
    return max(crossed) if crossed else None


def next_attempt_time(rules: RetryRules, received: float, now: float, wait: float) -> float:
    """When to attempt again after a transient failure at ``now``, ``wait`` being the
    backoff's answer: no later than the end of the lifetime (a last attempt) nor than the
    next delay-warning threshold, and strictly after ``now``."""
    at = now + max(0.0, wait)
    if rules.lifetime is not None:
        at = min(at, received + rules.lifetime)
    for threshold in rules.delay_warnings:
        if received + threshold > now:
            at = min(at, received + threshold)
            break
    return max(at, math.nextafter(now, math.inf))


# -- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt of a stored message.

    :ivar envelope: the message with its pending recipients only.
    :ivar pending: the original index of each recipient of :attr:`envelope`.
    :ivar attempts: attempts made before this one.
    :ivar scheduled: when this attempt was due (the start of its delay-warning window).
    """

    id: str
    envelope: Envelope
    attempts: int
    pending: tuple[int, ...]
    scheduled: float

    def subset(self, verdicts: Sequence[Verdict]) -> Envelope:
        """A copy of the envelope for these recipients."""
        return self.envelope.copy([v.recipient for v in verdicts])


@dataclass(frozen=True)
class MarkDone:
    """``set_recipients_delivered``: these recipients are done (delivered or bounced)."""

    indexes: tuple[int, ...]
    events: tuple[QueueEvent, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class SendNotice:
    """Build the DSNs of ``notice`` and enqueue them into the bounce queue; its events are
    logged with the DSNs' queue ids (``dsn=``)."""

    notice: Notice
    events: tuple[QueueEvent, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class CountAttempt:
    """``increment_attempts``."""

    events: tuple[QueueEvent, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Reschedule:
    """``set_timestamp``: attempt the recipients left at ``at``, remembering ``last_reply``."""

    at: float
    last_reply: Reply | None
    events: tuple[QueueEvent, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Remove:
    """``remove``: no recipient is left."""

    events: tuple[QueueEvent, ...] = field(default=(), compare=False)


#: One thing the driver does, in the order :func:`plan` gives.
Step = MarkDone | SendNotice | CountAttempt | Reschedule | Remove


def _events(
    kind: EventKind, id: str, verdicts: Sequence[Verdict], **detail: object
) -> list[QueueEvent]:
    """One event per relay host and reply, naming exactly the recipients that got it."""
    if len(verdicts) == 1:  # the usual case: nothing to group
        v = verdicts[0]
        return [QueueEvent(kind, id, (v.recipient,), v.reply, **detail)]
    groups: dict[tuple[str | None, str | None, Reply | None], list[str]] = {}
    for v in verdicts:
        host = v.reply.remote_host if v.reply is not None else None
        ip = v.reply.remote_ip if v.reply is not None else None
        groups.setdefault((host, ip, v.reply), []).append(v.recipient)
    return [QueueEvent(kind, id, rcpts, key[2], **detail) for key, rcpts in groups.items()]


def _wants_success_notice(envelope: Envelope, verdict: Verdict) -> bool:
    """NOTIFY=SUCCESS, and the next hop did not take the DSN duty on (RFC 3461 §6.2.2.2).

    A next hop that advertised DSN got the parameters and reports itself (``remote_dsn``
    True). Without DSN there (False), and where it is unknown (None: a relay that is not
    SMTP, or gave no reply), the sender is told that the message was relayed: "delivered"
    would claim a final delivery that smtpq cannot know of.
    """
    reply = verdict.reply
    dsn_passed_on = reply is not None and reply.remote_dsn is True
    return not dsn_passed_on and notify_wants(envelope, verdict.recipient, "SUCCESS")


def _indexes(verdicts: Sequence[Verdict]) -> tuple[int, ...]:
    return tuple(v.index for v in verdicts)


def record_delivered(id: str, verdicts: Sequence[Verdict]) -> MarkDone:
    """Record the delivered recipients of a part that ended before the attempt's last."""
    return MarkDone(_indexes(verdicts), tuple(_events(EventKind.DELIVERED, id, verdicts)))


def plan(
    judgement: Judgement,
    attempt: Attempt,
    wait: float | None,
    rules: RetryRules,
    now: float,
    *,
    recorded: Collection[int] = (),
) -> list[Step]:
    """The steps that record ``judgement``, in the order they must be carried out.

    :param wait: the backoff's answer for the transient recipients (asked with the attempt
        count this attempt makes), None to give up; ignored when there are none.
    :param now: when the attempt ended.
    :param recorded: indexes of delivered recipients stored already (by
        :func:`record_delivered`): not marked, nor logged, again.
    """
    env, id = attempt.envelope, attempt.id
    received = env.timestamp if env.timestamp is not None else attempt.scheduled
    made = attempt.attempts + 1
    expired = is_expired(rules.lifetime, received, now)
    give_up = bool(judgement.transient) and (wait is None or expired)
    left = () if give_up else judgement.transient
    quit = judgement.transient if give_up else ()
    failed = judgement.permanent + quit
    steps: list[Step] = []
    recorded_by_removal: list[QueueEvent] = []

    fresh = [v for v in judgement.delivered if v.index not in recorded]
    delivered = _events(EventKind.DELIVERED, id, fresh)
    relayed = [v for v in judgement.delivered if env.sender and _wants_success_notice(env, v)]
    if fresh and (failed or left or relayed):
        steps.append(MarkDone(_indexes(fresh), tuple(delivered)))
    else:
        recorded_by_removal += delivered
    if relayed:
        outcomes = tuple(Outcome(v.recipient, v.reply) for v in relayed)
        notice = Notice(Action.RELAYED, env, outcomes, now, id, made)
        steps.append(SendNotice(notice, tuple(_events(EventKind.SUCCESS_NOTIFIED, id, relayed))))

    if failed:
        told = [v for v in failed if env.sender and notify_wants(env, v.recipient, "FAILURE")]
        untold = [v for v in failed if v not in told]
        gave_up = EventKind.EXPIRED if expired else EventKind.FAILED
        if told:
            outcomes = tuple(
                Outcome(v.recipient, v.reply, gave_up=v in quit, expired=expired and v in quit)
                for v in told
            )
            events = _events(gave_up, id, [v for v in told if v in quit])
            events += _events(EventKind.BOUNCED, id, told)
            notice = Notice(Action.FAILED, env, outcomes, now, id, made)
            steps.append(SendNotice(notice, tuple(events)))
        silent = _events(gave_up, id, [v for v in untold if v in quit])
        silent += _events(EventKind.BOUNCED, id, untold, dsn="none")
        if left:
            steps.append(MarkDone(_indexes(failed), tuple(silent)))
        else:
            recorded_by_removal += silent

    if not left:
        steps.append(Remove((*recorded_by_removal, QueueEvent(EventKind.REMOVED, id))))
        return steps
    assert wait is not None  # not giving up
    steps.append(CountAttempt())
    threshold = delay_warning_due(rules.delay_warnings, received, attempt.scheduled, now)
    warned = [v for v in left if env.sender and notify_wants(env, v.recipient, "DELAY")]
    if threshold is not None and warned:
        until = received + rules.lifetime if rules.lifetime is not None else None
        outcomes = tuple(Outcome(v.recipient, v.reply) for v in warned)
        notice = Notice(
            Action.DELAYED, env, outcomes, now, id, made, retry_until=until, delayed_for=threshold
        )
        steps.append(SendNotice(notice, tuple(_events(EventKind.DELAY_WARNED, id, warned))))
    at = next_attempt_time(rules, received, now, wait)
    deferred = _events(EventKind.DEFERRED, id, left, attempts=made, delay=f"{at - now:.0f}s")
    steps.append(Reschedule(at, left[0].reply, tuple(deferred)))
    return steps


def may_postpone(rules: RetryRules, attempt: Attempt, now: float) -> bool:
    """Whether a message due now may be given back unattempted (see the module docstring):
    not when it has expired (its last attempt is due), nor when a delay warning is."""
    env = attempt.envelope
    received = env.timestamp if env.timestamp is not None else attempt.scheduled
    if is_expired(rules.lifetime, received, now):
        return False
    return delay_warning_due(rules.delay_warnings, received, attempt.scheduled, now) is None


def postpone(
    rules: RetryRules,
    attempt: Attempt,
    destination: str,
    now: float,
    at: float,
    reason: str = "destination busy",
) -> list[Step]:
    """Give a message back unattempted, due again at ``at`` (or sooner, as
    :func:`next_attempt_time` bounds it); its attempt count and last reply stay."""
    env = attempt.envelope
    received = env.timestamp if env.timestamp is not None else attempt.scheduled
    when = next_attempt_time(rules, received, now, at - now)
    event = QueueEvent(
        EventKind.POSTPONED,
        attempt.id,
        env.recipients,
        destination=destination,
        delay=f"{when - now:.0f}s",
        reason=f'"{reason}"' if " " in reason else reason,
    )
    return [Reschedule(when, None, (event,))]
