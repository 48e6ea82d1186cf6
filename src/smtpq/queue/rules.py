"""The pure rules of the queue: what an attempt's result means, and what to do next.

No I/O, no event loop, no clock: the asyncio driver (:mod:`smtpq.queue.driver`) feeds these
functions plain values and carries out what they decide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from smtpq.relay.base import RelayError, RelayResult
from smtpq.reply import Reply, ReplyClass, missing_recipient_reply, unexpected_error_reply

__all__ = [
    "Judgement",
    "delay_warning_due",
    "exhausted_reply",
    "group_by_reply",
    "is_expired",
    "judge",
]

ReplyGroups = tuple[tuple[Reply, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Judgement:
    """The outcome of one attempt, per recipient (by index into the list as first written)."""

    delivered: tuple[int, ...] = ()
    #: One group per distinct 5xx reply: one bounce each.
    permanent: ReplyGroups = ()
    #: One group per distinct 4xx reply.
    transient: ReplyGroups = ()
    #: What the relay said for the delivered ones (first success reply), for the log.
    success: Reply | None = None

    @property
    def transient_indexes(self) -> tuple[int, ...]:
        """Every recipient to retry."""
        return tuple(i for _, idx in self.transient for i in idx)

    @property
    def last_reply(self) -> Reply | None:
        """The reply to remember for the next attempt (first transient one)."""
        return self.transient[0][0] if self.transient else None


def group_by_reply(pairs: Sequence[tuple[int, Reply]]) -> ReplyGroups:
    """Group recipients by equal replies, in order of first appearance."""
    groups: dict[Reply, list[int]] = {}
    for index, reply in pairs:
        groups.setdefault(reply, []).append(index)
    return tuple((reply, tuple(idx)) for reply, idx in groups.items())


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
    per_rcpt: dict[str, Reply | None]
    if isinstance(result, Mapping):
        per_rcpt = {}
        missing = missing_recipient_reply()
        for rcpt in recipients:
            per_rcpt[rcpt] = _as_reply(result[rcpt]) if rcpt in result else missing
    else:
        whole = _as_reply(result)
        per_rcpt = dict.fromkeys(recipients, whole)
    delivered: list[int] = []
    permanent: list[tuple[int, Reply]] = []
    transient: list[tuple[int, Reply]] = []
    success: Reply | None = None
    for rcpt, index in zip(recipients, indexes, strict=True):
        reply = per_rcpt[rcpt]
        klass = ReplyClass.SUCCESS if reply is None else reply.reply_class
        if klass is ReplyClass.SUCCESS:
            delivered.append(index)
            success = success or reply
        elif klass is ReplyClass.PERMANENT:
            permanent.append((index, reply))  # type: ignore[arg-type]
        else:
            bad = reply if klass is ReplyClass.TRANSIENT else _unclassifiable(reply)
            transient.append((index, bad))  # type: ignore[arg-type]
    return Judgement(
        delivered=tuple(delivered),
        permanent=group_by_reply(permanent),
        transient=group_by_reply(transient),
        success=success,
    )


def _unclassifiable(reply: Reply | None) -> Reply:
    return Reply("450", f"4.0.0 Unexpected reply from relay: {reply}")


def exhausted_reply(last: Reply, attempts: int, expired: bool) -> tuple[Reply, str]:
    """The reply and explanation a bounce gives when the queue stops retrying.

    The status is the last reply's (a 4.x.x with Action: failed is right, RFC 3464), or 4.4.7
    when the message's lifetime ran out.
    """
    reply = last
    if expired:
        reply = last.replace(enhanced_status_code="4.4.7")
        why = f"message expired in the queue after {attempts} attempts; giving up"
    else:
        why = f"retries exhausted after {attempts} attempts; giving up"
    return reply, why


def delay_warning_due(
    thresholds: Sequence[float], received: float | None, scheduled: float, now: float
) -> float | None:
    """The delay-warning threshold first crossed by an attempt scheduled at ``scheduled`` that
    failed transiently at ``now``, or None.

    A warning is due for a threshold the message's age reached between the time the attempt was
    scheduled and its failure. The next attempt is scheduled after that failure, so each
    threshold is reported once, with no stored state (RFC 3464 Action: delayed). Several
    thresholds crossed at once give one warning.
    """
    if received is None:
        return None
    before, after = scheduled - received, now - received
    crossed = [t for t in thresholds if before <= t <= after]
    return max(crossed) if crossed else None


def is_expired(lifetime: float | None, received: float | None, now: float) -> bool:
    """Whether a message received at ``received`` has outlived ``lifetime`` at ``now``."""
    return lifetime is not None and received is not None and now >= received + lifetime
