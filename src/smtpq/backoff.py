"""Backoff functions: how long to wait before the next attempt, or None to give up.

A backoff is any callable ``backoff(envelope, attempts) -> float | None`` (python-slimta's form);
``attempts`` counts the attempts made so far (1 after the first failure). That is all the queue
asks of it. How long a message may stay queued is the queue's own limit (``Queue(lifetime=...)``,
as Postfix's ``maximal_queue_lifetime`` is its queue manager's): when the lifetime is over the
queue gives up with status 4.4.7 whatever the backoff says; when the backoff gives up first,
retries are exhausted.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from smtpq.clock import Clock, SystemClock
from smtpq.envelope import Envelope

__all__ = ["DEFAULT_LIFETIME", "Backoff", "DefaultBackoff", "exponential_backoff"]

#: Five days, as Postfix's ``maximal_queue_lifetime`` (RFC 5321 §4.5.4.1: 4-5 days).
DEFAULT_LIFETIME = 5 * 86400.0


class Backoff(Protocol):
    """What the queue asks of a backoff: ``backoff(envelope, attempts) -> seconds | None``.

    ``envelope`` has the recipients still to be tried; ``attempts`` the count including the
    attempt that just failed. None gives up: the recipients are bounced (retries exhausted).
    """

    def __call__(self, envelope: Envelope, attempts: int) -> float | None:
        """Seconds until the next attempt, or None to give up."""
        ...


def exponential_backoff(envelope: Envelope, attempts: int) -> float | None:
    """The example of python-slimta's documentation: 60 s, 300 s, ... then give up after 5."""
    if attempts <= 5:
        return 12.0 * (5.0**attempts)
    return None


@dataclass
class DefaultBackoff:
    """Retry as RFC 5321 §4.5.4.1 asks: for days, with spacing that grows, with jitter.

    The n-th wait is ``initial * factor ** (n - 1)``, at most ``maximum``, spread by ±``jitter``
    (a fraction) so that a queue restarted with many deferred messages does not retry them all at
    once. The last attempt is made when ``lifetime`` runs out (5 days by default, as in Postfix's
    maximal_queue_lifetime); after it the backoff gives up. A :class:`~smtpq.queue.Queue` has a
    lifetime of its own (the same default): give it the same value, since it is the queue that
    reports an expiry (status 4.4.7) and announces it in delay warnings (Will-Retry-Until).
    """

    initial: float = 300.0
    factor: float = 2.0
    maximum: float = 4 * 3600.0
    lifetime: float = DEFAULT_LIFETIME
    jitter: float = 0.1
    clock: Clock = field(default_factory=SystemClock)
    random: Callable[[], float] = field(default=random.random, repr=False)

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.factor < 1 or self.maximum < self.initial:
            raise ValueError("backoff needs initial > 0, factor >= 1 and maximum >= initial")
        if self.lifetime <= 0 or not 0 <= self.jitter < 1:
            raise ValueError("backoff needs lifetime > 0 and 0 <= jitter < 1")

    def __call__(self, envelope: Envelope, attempts: int) -> float | None:
        """Seconds until the next attempt, or None once the lifetime has run out."""
        now = self.clock.time()
        received = envelope.timestamp if envelope.timestamp is not None else now
        remaining = received + self.lifetime - now
        if remaining <= 0:
            return None
        exponent = max(0, attempts - 1)
        # Compare in the log domain so that a huge attempt count cannot overflow a float.
        if exponent * math.log(self.factor) >= math.log(self.maximum / self.initial):
            delay = self.maximum
        else:
            delay = min(self.maximum, self.initial * self.factor**exponent)
        delay *= 1.0 + self.jitter * (2.0 * self.random() - 1.0)
        return min(delay, remaining)
