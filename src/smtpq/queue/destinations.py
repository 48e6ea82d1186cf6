"""Scheduling per destination, the pure rules: limits, windows, dead destinations, rates.

No I/O, no event loop, no clock reads: time is passed in. The round-robin dispatcher over
per-destination ready queues (:mod:`smtpq.queue.dispatch`) keeps one :class:`Destination`
per next hop and asks it what may start; the driver (:mod:`smtpq.queue.driver`) carries the
decisions out. docs/scheduling.md tells the whole story; in short (DESIGN §4):

**Destinations.** A delivery's destination is its next hop, as the relay names it
(:meth:`smtpq.relay.base.Relay.destinations`): the smarthost, a route, or the recipient
domain for MX delivery. :class:`DestinationPolicy` gives each its :class:`DestinationLimits`:
the defaults, or those of the most specific pattern that matches its name. A relay that names
no destinations puts everything in :data:`~smtpq.relay.base.DEFAULT_DESTINATION`, whose next
hops the queue cannot know: it is :data:`UNLIMITED` (only ``relay_pool`` bounds it, as before
destinations existed) unless a pattern names it exactly.

**Windows** (Postfix's feedback scheduler, simplified). At most ``window`` attempts run at
once. The window starts at ``initial_window`` (5), grows by one after a full window of
attempts the host answered (Postfix's positive feedback of ``1/concurrency``), shrinks by one
per connection failure, and stays within ``[1, concurrency]`` (20).

**Dead destinations.** ``dead_after`` (5) connection failures in a row
(:func:`~smtpq.relay.base.is_connection_failure`: refused, timed out, no greeting, 421 at the
greeting, a temporary DNS failure) make a destination dead for its cool-down (5 min); a
message-level 4xx never counts, and any answer from the host resets the count. While dead,
its messages are deferred without connecting (:func:`unreachable_reply`, counted as their
attempt: see the driver) — all but one, the *probe candidate*, which is given back to the
schedule for the end of the cool-down (:attr:`Destination.probe_wanted`), unattempted and not
counted, so that the probe comes when it is due however the messages' own retries are spaced.
When the cool-down is over one attempt, the probe, starts while the others wait for it: a
probe the host answers revives the destination (window back to its initial size); a failed
probe makes it dead again with the cool-down doubled, up to ``max_cool_down`` (1 h). So a
dead destination gets at most one probe per cool-down, and one that comes back is used again
within one.

**Rates** (Postfix's ``*_destination_rate_delay``, KumoMTA's traffic shaping). Optional limits
on attempts and on new connections per second, enforced by the destination store
(:mod:`smtpq.queue.shared`) with the generic cell rate algorithm (:func:`gcra`): starts are
spaced by ``1 / rate``; one may come up to half an interval early, so that a late wake-up
does not lower the rate over time, and none comes in a burst after an idle spell.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import heapq
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from smtpq.relay.base import DEFAULT_DESTINATION, is_connection_failure
from smtpq.reply import Reply, missing_recipient_reply, unexpected_error_reply

__all__ = [
    "RATE_TOLERANCE",
    "UNLIMITED",
    "DeadMark",
    "Destination",
    "DestinationLimits",
    "DestinationPolicy",
    "DestinationView",
    "Outcome",
    "StartKind",
    "State",
    "Transition",
    "format_rate",
    "gcra",
    "outcome_of",
    "parse_rate",
    "unreachable_reply",
]

#: How early (a fraction of the interval) a rate-limited start may come: see :func:`gcra`.
RATE_TOLERANCE = 0.5
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_PER |= {"h": 3600.0, "hour": 3600.0}
# Buckets of the recent attempt rate: 12 of 5 s, the last minute.
_BUCKET = 5.0
_BUCKETS = 12
#: Seconds of waiting in a ready queue that a destination working through it makes harmless:
#: a destination that keeps up may hold more than its backlog (see the dispatcher).
KEEP_UP = 1.0
_POLICY_CACHE = 10_000


def parse_rate(value: str | float) -> float:
    """A rate as events per second: ``"10/s"``, ``"30/min"``, ``"100/h"``, or a number (per
    second). :class:`ValueError` for anything else, or a rate that is not positive."""
    if isinstance(value, bool):
        raise ValueError(f"not a rate: {value!r}")
    if isinstance(value, int | float):
        rate = float(value)
    else:
        count, slash, unit = value.strip().partition("/")
        per = _PER.get(unit.strip().lower()) if slash else 1.0
        if per is None:
            raise ValueError(f"rate {value!r}: the unit must be /s, /min or /h")
        try:
            rate = float(count) / per
        except ValueError:
            raise ValueError(f"not a rate: {value!r} (say 10/s or 30/min)") from None
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate {value!r} must be positive")
    return rate


def format_rate(per_second: float | None) -> str:
    """A rate as people write it: ``10/s``, or ``30/min`` for less than one per second."""
    if per_second is None:
        return "-"
    if per_second >= 1:
        return f"{per_second:g}/s"
    return f"{per_second * 60:.3g}/min"


@dataclass(frozen=True)
class DestinationLimits:
    """The limits and the dead-destination rule of one destination.

    :ivar concurrency: most attempts at once (Postfix's ``default_destination_concurrency_limit``).
    :ivar initial_window: attempts at once to begin with, and after a revival.
    :ivar dead_after: connection failures in a row that make the destination dead (0: never).
    :ivar cool_down: seconds a destination stays dead before the probe.
    :ivar max_cool_down: the longest cool-down, which doubles after each failed probe.
    :ivar message_rate: most attempts per second (None: no limit).
    :ivar connection_rate: most new connections per second (None: no limit); relays that open
        connections through :class:`~smtpq.relay.pool.SmtpPool` honour it.
    """

    concurrency: int = 20
    initial_window: int = 5
    dead_after: int = 5
    cool_down: float = 300.0
    max_cool_down: float = 3600.0
    message_rate: float | None = None
    connection_rate: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.initial_window < 1:
            raise ValueError("concurrency and initial_window must be at least 1")
        if self.dead_after < 0:
            raise ValueError("dead_after must not be negative (0: never dead)")
        if not 0 < self.cool_down <= self.max_cool_down:
            raise ValueError("cool_down must be positive and at most max_cool_down")
        for rate in (self.message_rate, self.connection_rate):
            if rate is not None and not (rate > 0 and math.isfinite(rate)):
                raise ValueError("rates must be positive (per second)")

    @property
    def window(self) -> int:
        """The initial window within the limit."""
        return min(self.initial_window, self.concurrency)

    def share(self, workers: int) -> DestinationLimits:
        """This worker's share when ``workers`` processes deliver without a shared store:
        the concurrency and the initial window divided (at least 1 each), and the rates."""
        if workers <= 1:
            return self

        def split(rate: float | None) -> float | None:
            return None if rate is None else rate / workers

        return dataclasses.replace(
            self,
            concurrency=max(1, self.concurrency // workers),
            initial_window=max(1, self.initial_window // workers),
            message_rate=split(self.message_rate),
            connection_rate=split(self.connection_rate),
        )


#: The limits of a relay's default destination: none but the queue's ``relay_pool``, and never
#: dead (the queue does not know what is behind it).
UNLIMITED = DestinationLimits(concurrency=1 << 31, initial_window=1 << 31, dead_after=0)


@dataclass(frozen=True)
class DestinationPolicy:
    """The limits of every destination: defaults, and overrides per name pattern.

    :ivar default: the limits of a destination no pattern matches.
    :ivar patterns: ``(pattern, limits)`` pairs. A pattern is a destination name
        (``example.com``, ``smtp.example.net:587``) or a shell-style glob (``*.example.net``
        matches the subdomains, not ``example.net`` itself), compared in lower case. An exact
        name wins over globs; among globs, the longest pattern. Globs never match
        :data:`~smtpq.relay.base.DEFAULT_DESTINATION` (see :data:`UNLIMITED`).
    :ivar max_wait: seconds a message may wait in a destination's ready queue for a slot before
        it is postponed (given back to the schedule, not counted as an attempt).
    """

    default: DestinationLimits = field(default_factory=DestinationLimits)
    patterns: tuple[tuple[str, DestinationLimits], ...] = ()
    max_wait: float = 120.0
    _cache: dict[str, DestinationLimits] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        lowered = tuple((pattern.lower(), limits) for pattern, limits in self.patterns)
        object.__setattr__(self, "patterns", lowered)
        if not self.max_wait > 0:
            raise ValueError("max_wait must be positive")

    def limits_for(self, name: str) -> DestinationLimits:
        """The limits of destination ``name``."""
        found = self._cache.get(name)
        if found is not None:
            return found
        lowered = name.lower()
        exact = [limits for pattern, limits in self.patterns if pattern == lowered]
        if exact:
            found = exact[0]
        elif name == DEFAULT_DESTINATION:
            found = UNLIMITED
        else:
            globs = [(len(p), limits) for p, limits in self.patterns if _glob(p, lowered)]
            found = max(globs, key=lambda pair: pair[0])[1] if globs else self.default
        if len(self._cache) >= _POLICY_CACHE:
            self._cache.clear()
        self._cache[name] = found
        return found

    def share(self, workers: int) -> DestinationPolicy:
        """Each worker's share of every limit, for ``workers`` processes without a shared
        destination store (disk storage): see :meth:`DestinationLimits.share`."""
        if workers <= 1:
            return self
        return dataclasses.replace(
            self,
            default=self.default.share(workers),
            patterns=tuple((p, limits.share(workers)) for p, limits in self.patterns),
        )


def _glob(pattern: str, name: str) -> bool:
    return any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern)


def gcra(tat: float, now: float, interval: float, tolerance: float) -> tuple[float, float]:
    """The generic cell rate algorithm: ``(start, new_tat)``.

    ``tat`` is the theoretical arrival time so far (0 at first). The next event may start at
    ``start`` (``now`` or later: ``tat - tolerance``); once it does, the state is ``new_tat``.
    Events never start closer than ``interval`` apart on average, and at most ``tolerance``
    early: a start that comes a little late does not lose its time, and an idle spell does not
    save up a burst.
    """
    start = max(now, tat - tolerance)
    return start, max(tat, start) + interval


class Outcome(enum.Enum):
    """What one attempt taught about its destination."""

    #: The host answered: delivered, or a reply about the message (a 4xx or 5xx included).
    SUCCESS = "success"
    #: The destination could not be reached at all (every recipient got a connection failure).
    FAILURE = "failure"
    #: Nothing: smtpq's own error (an exception in the relay, a result missing).
    NEUTRAL = "neutral"


_OWN_ERRORS = frozenset({unexpected_error_reply(), missing_recipient_reply()})


def outcome_of(replies: Iterable[Reply | None]) -> tuple[Outcome, Reply | None]:
    """The outcome of an attempt from its replies (None: delivered), and the failure's reply."""
    failure: Reply | None = None
    for reply in replies:
        if reply is None:
            return Outcome.SUCCESS, None
        if reply in _OWN_ERRORS:
            continue
        if not is_connection_failure(reply):
            return Outcome.SUCCESS, None
        failure = failure or reply
    return (Outcome.FAILURE, failure) if failure is not None else (Outcome.NEUTRAL, None)


@dataclass(frozen=True)
class DeadMark:
    """A dead destination: until when, why (the last error, as a reply's text), and the
    cool-down that made it (doubled at the next failed probe)."""

    until: float
    error: str
    cool_down: float


def unreachable_reply(name: str, error: str | None) -> Reply:
    """``451 4.4.1``: a message deferred without connecting, its destination being dead."""
    why = error or "connection failures"
    return Reply("451", f"4.4.1 destination {name} unreachable: {why}")


class State(enum.StrEnum):
    """A destination's state."""

    ACTIVE = "active"
    #: Dead until :attr:`Destination.dead_until`; a probe may start after it.
    DEAD = "dead"
    #: The probe is running; the other messages wait for its outcome.
    PROBING = "probing"


class Transition(enum.Enum):
    """A change that the other workers must learn (through the destination store)."""

    DIED = "died"
    REVIVED = "revived"


class StartKind(enum.Enum):
    """What a destination allows now."""

    START = "start"
    PROBE = "probe"
    #: Dead: defer its messages without connecting.
    DEFER = "defer"


@dataclass
class Destination:
    """The scheduling state of one destination; every change is a method with the time."""

    name: str
    limits: DestinationLimits
    window: int = 0
    in_flight: int = 0
    #: Connection failures in a row.
    failures: int = 0
    state: State = State.ACTIVE
    dead_until: float = 0.0
    cool_down: float = 0.0
    last_error: str | None = None
    #: Totals since the worker started: attempts finished, connection failures, messages
    #: deferred while dead, messages postponed (waited too long or too many waiting).
    attempts: int = 0
    connection_failures: int = 0
    deferred: int = 0
    postponed: int = 0
    last_used: float = 0.0
    #: When the postponed messages that are not back yet come back (a heap of times).
    _returns: list[float] = field(default_factory=list, repr=False)
    #: Since when messages are postponed with no attempt finished (the rate is unknown).
    _unknown_since: float | None = None
    #: When the attempts counted in the recent buckets began to be counted.
    _counting_since: float = 0.0
    _last_count: float = -math.inf
    #: Dead, and no message is kept for the probe yet: the next one deferred is.
    probe_wanted: bool = False
    #: Successes since the window last changed.
    _credit: int = 0
    _recent: deque[list[float]] = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        self.window = self.limits.window
        self.cool_down = self.limits.cool_down

    @property
    def slots(self) -> int:
        """The attempts the window allows at once."""
        return self.window

    def start_kind(self, now: float) -> StartKind | None:
        """What may start now: an attempt, the probe, nothing but deferrals, or nothing."""
        if self.state is State.ACTIVE:
            return StartKind.START if self.in_flight < self.slots else None
        if self.state is State.DEAD:
            if now < self.dead_until:
                return StartKind.DEFER
            # The probe; attempts from before the death may still run, within the limit.
            return StartKind.PROBE if self.in_flight < self.limits.concurrency else None
        return None  # probing: wait for the probe's outcome

    def started(self, now: float, probe: bool) -> None:
        """An attempt (the probe) began."""
        self.in_flight += 1
        self.last_used = now
        if probe:
            self.state = State.PROBING
            self._unknown_since = None  # its time without a result starts with the probe

    def unstarted(self, probe: bool) -> None:
        """An attempt that began was given back before connecting (the store refused it)."""
        self.in_flight -= 1
        if probe and self.state is State.PROBING:
            self.state = State.DEAD

    def finished(
        self, outcome: Outcome, error: Reply | None, now: float, probe: bool
    ) -> Transition | None:
        """An attempt ended with ``outcome``; the transition others must learn, if any."""
        self.in_flight -= 1
        self.attempts += 1
        self.last_used = now
        self._count(now)
        if outcome is Outcome.SUCCESS:
            self.failures = 0
            if self.state is not State.ACTIVE:
                self.state = State.ACTIVE
                self.window, self._credit = self.limits.window, 0
                self.cool_down = self.limits.cool_down
                # Its failures say nothing of how fast it works now: the rate starts afresh
                # (else the mail postponed behind the probe would come back spread out).
                self._recent.clear()
                self._last_count = -math.inf
                self._count(now)
                return Transition.REVIVED
            self._credit += 1
            if self._credit >= self.window:
                self.window = min(self.limits.concurrency, self.window + 1)
                self._credit = 0
            return None
        if outcome is Outcome.FAILURE:
            self.connection_failures += 1
            self.last_error = str(error) if error is not None else None
            if probe:
                self.cool_down = min(self.limits.max_cool_down, self.cool_down * 2)
                return self._die(now)
            if self.state is not State.ACTIVE:
                return None  # an attempt from before the death: known already
            self.failures += 1
            self.window, self._credit = max(1, self.window - 1), 0
            dead_after = self.limits.dead_after
            return self._die(now) if dead_after and self.failures >= dead_after else None
        return self._die(now) if probe else None  # a probe that taught nothing: wait again

    def _die(self, now: float) -> Transition:
        self.state = State.DEAD
        self.dead_until = now + self.cool_down
        self.probe_wanted = True
        return Transition.DIED

    def mark(self) -> DeadMark:
        """The dead mark to share (meaningful while dead)."""
        return DeadMark(self.dead_until, self.last_error or "", self.cool_down)

    def end_cool_down(self, now: float) -> bool:
        """An operator flushed the queue (Postfix's flush forgets dead destinations): a dead
        destination's next attempt, now, is its probe; True if it was waiting out a cool-down.
        A probe that fails still doubles the cool-down."""
        if self.state is not State.DEAD or self.dead_until <= now:
            return False
        self.dead_until = now
        return True

    def reconcile(self, mark: DeadMark | None, now: float) -> bool:
        """What the shared store says of a destination dead here: no mark (another worker's
        probe revived it) or one that ends sooner (an operator's flush elsewhere) ends the
        cool-down here too, so that the next attempt is the probe; True if it did."""
        if self.state is not State.DEAD or self.dead_until <= now:
            return False
        if mark is not None and mark.until >= self.dead_until:
            return False
        self.dead_until = max(now, mark.until) if mark is not None else now
        return True

    def learn(self, mark: DeadMark, now: float) -> None:
        """The store says the destination is dead as ``mark`` says: found so by another worker,
        or past its cool-down (``until`` has passed: then the next attempt here is the
        probe)."""
        if self.state is State.PROBING:
            return
        dead = self.state is State.DEAD
        self.state = State.DEAD
        self.dead_until = max(self.dead_until, mark.until) if dead else mark.until
        self.probe_wanted = self.probe_wanted or not dead
        self.cool_down = max(self.limits.cool_down, min(self.limits.max_cool_down, mark.cool_down))
        self.last_error = mark.error or self.last_error

    def postpone_until(self, now: float, max_wait: float) -> float:
        """When a message postponed now should come back: a second from now, plus the time
        the destination needs, at its recent rate, for the postponed messages that come back
        before it; within ``max_wait``.

        A rate counted over less than a second is not trusted: until then every message
        comes back a second later, when the rate is known. With no attempt finished at all, or
        while its probe decides whether it lives (the rate of a dead destination says nothing),
        the destination is taken to finish at most its window of attempts in the time it has
        been without a result, so a black hole's messages come back ever more spread out
        (and each one is written back to the schedule no more often than that).
        """
        returns = self._returns
        while returns and returns[0] <= now:
            heapq.heappop(returns)
        count, span = self._recent_count(now)
        at = now + 1.0
        if count and self.state is State.ACTIVE:
            self._unknown_since = None
            if span >= 1.0:
                at += len(returns) * span / count
        elif self._unknown_since is None:
            self._unknown_since = now
        elif (waited := now - self._unknown_since) >= 1.0:
            at += len(returns) * waited / self.window
        at = min(at, now + max_wait)
        heapq.heappush(returns, at)
        self.postponed += 1
        return at

    def _recent_count(self, now: float) -> tuple[float, float]:
        """Attempts finished over the last minute, and the seconds they were counted over
        (the minute, or less if counting began since)."""
        oldest = math.floor(now / _BUCKET) - _BUCKETS + 1
        count = sum(count for bucket, count in self._recent if bucket >= oldest)
        return count, now - max(self._counting_since, oldest * _BUCKET)

    def keeps_up(self, waiting: int, now: float) -> bool:
        """Whether ``waiting`` messages ahead would start within :data:`KEEP_UP` seconds at
        the destination's current rate (never when no attempt finished lately)."""
        count, span = self._recent_count(now)
        return count > 0 and waiting * max(0.1, span) <= count * KEEP_UP

    def _count(self, now: float) -> None:
        if now - self._last_count > _BUCKET * _BUCKETS:
            self._counting_since = now
        self._last_count = now
        bucket = math.floor(now / _BUCKET)
        recent = self._recent
        if recent and recent[-1][0] == bucket:
            recent[-1][1] += 1
        else:
            recent.append([bucket, 1.0])
            while len(recent) > _BUCKETS:
                recent.popleft()

    def rate(self, now: float) -> float:
        """Attempts finished per second over the last minute."""
        count, _ = self._recent_count(now)
        return count / (_BUCKET * _BUCKETS)

    def view(self, now: float, waiting: int) -> DestinationView:
        """What operators see of it."""
        dead = self.state is not State.ACTIVE
        return DestinationView(
            name=self.name,
            waiting=waiting,
            in_flight=self.in_flight,
            window=self.slots,
            limit=self.limits.concurrency,
            state=str(self.state),
            dead_until=self.dead_until if dead else None,
            last_error=self.last_error,
            failures=self.failures,
            rate=self.rate(now),
            attempts=self.attempts,
            connection_failures=self.connection_failures,
            deferred=self.deferred,
            postponed=self.postponed,
            message_rate=self.limits.message_rate,
            connection_rate=self.limits.connection_rate,
        )


@dataclass(frozen=True)
class DestinationView:
    """One destination as ``smtpq queue destinations`` shows it (values of one worker).

    :ivar waiting: messages in its ready queue (claimed, waiting for a slot).
    :ivar rate: attempts per second over the last minute.
    :ivar dead_until: while dead or probing, when the cool-down ends (ended).
    """

    name: str
    waiting: int
    in_flight: int
    window: int
    limit: int
    state: str
    dead_until: float | None
    last_error: str | None
    failures: int
    rate: float
    attempts: int
    connection_failures: int
    deferred: int
    postponed: int
    message_rate: float | None
    connection_rate: float | None

    def to_dict(self) -> dict[str, object]:
        """Plain values, for the admin API."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> DestinationView:
        """The inverse of :meth:`to_dict` (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})  # type: ignore[arg-type]
