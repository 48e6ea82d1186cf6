"""A message in memory for one attempt, in parts: one per destination (DESIGN §4).

:func:`split` says which recipients go to which destination, as the relay names them; the
Queue (:mod:`smtpq.queue.driver`) makes a :class:`Part` of each group for the scheduler and
gathers their verdicts in the :class:`MessageAttempt`, which the last part to end records
(:func:`~smtpq.queue.rules.plan`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from smtpq.envelope import Envelope
from smtpq.queue.rules import Attempt, Judgement, Verdict
from smtpq.relay.base import DEFAULT_DESTINATION

__all__ = ["MessageAttempt", "Part", "split"]


def split(
    recipients: Sequence[str], indexes: Sequence[int], named: Mapping[str, Sequence[str]]
) -> dict[str, tuple[list[str], list[int]]]:
    """``recipients`` (``indexes[k]`` the original index of ``recipients[k]``) by destination,
    as ``named`` (what :meth:`~smtpq.relay.base.Relay.destinations` returned) places them, in
    their order; a recipient named twice goes to the first destination that names it, one
    named nowhere to :data:`~smtpq.relay.base.DEFAULT_DESTINATION`."""
    destination: dict[str, str] = {}
    for name, rcpts in named.items():
        for rcpt in rcpts:
            destination.setdefault(rcpt, name)
    groups: dict[str, tuple[list[str], list[int]]] = {}
    for rcpt, index in zip(recipients, indexes, strict=True):
        rcpts, where = groups.setdefault(destination.get(rcpt, DEFAULT_DESTINATION), ([], []))
        rcpts.append(rcpt)
        where.append(index)
    return groups


@dataclass(eq=False)
class MessageAttempt:
    """A message in memory for one attempt: its parts, one per destination, and their verdicts
    so far. Its lease is renewed until its outcome is recorded."""

    attempt: Attempt
    #: Parts not ended yet.
    parts: int
    delivered: list[Verdict] = field(default_factory=list)
    permanent: list[Verdict] = field(default_factory=list)
    transient: list[Verdict] = field(default_factory=list)
    #: Indexes of delivered recipients already stored (by a part that ended before the last).
    recorded: set[int] = field(default_factory=set)
    #: A part was taken back unattempted (stopping): record what was delivered, then release.
    withdrawn: bool = False
    #: Recordings of this message run one at a time, in order.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def add(self, judgement: Judgement) -> None:
        """A part's verdicts."""
        self.delivered += judgement.delivered
        self.permanent += judgement.permanent
        self.transient += judgement.transient

    def judgement(self) -> Judgement:
        """Every part's verdicts, in the order of the recipients as written."""

        def ordered(verdicts: list[Verdict]) -> tuple[Verdict, ...]:
            return tuple(sorted(verdicts, key=lambda v: v.index))

        return Judgement(ordered(self.delivered), ordered(self.permanent), ordered(self.transient))


@dataclass(eq=False)
class Part:
    """One (message, destination) attempt, as the scheduler runs it."""

    message: MessageAttempt
    destination: str
    envelope: Envelope
    indexes: tuple[int, ...]
    postponable: bool

    @property
    def attempts(self) -> int:
        """Attempts the message made before this one."""
        return self.message.attempt.attempts
