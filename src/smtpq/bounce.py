"""Bounces: delivery status notifications as messages, and what makes them for the queue.

A :class:`Bounce` is an :class:`~smtpq.envelope.Envelope` from the null sender to the original
sender, whose message is a ``multipart/report`` (RFC 3464, :mod:`smtpq.notice`). The queue asks
a :class:`Notifier` for the DSNs of an event (a :class:`~smtpq.notice.Notice`): the default is
:class:`BounceFactory`; a python-slimta style ``bounce_factory(envelope, reply)`` function is
wrapped in a :class:`FunctionNotifier`, which it serves for failures.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from smtpq.envelope import Envelope
from smtpq.notice import Action, Notice, Outcome, outcomes_for, render
from smtpq.reply import Reply

__all__ = [
    "Bounce",
    "BounceFactory",
    "BounceFunction",
    "FunctionNotifier",
    "Notifier",
    "notify_wants",
]


class Bounce(Envelope):
    """A DSN for the recipients of ``envelope``, all of which got ``reply``.

    :param envelope: the original message, with only the recipients this notice is about.
    :param reply: the reply that failed them (or delayed them, with ``action='delayed'``).
    :param headers_only: return only the original's header (RET=HDRS), not the whole message.
    :param reporting_mta: our host name, for Reporting-MTA and the From address.
    :param now: when the notice is made (Last-Attempt-Date, Date), epoch seconds.
    :param action: RFC 3464 §2.3.3 (``'failed'``, ``'delayed'``, ``'relayed'``...).
    :param diagnostic: a line for the explanation (for example, that retries ran out).

    :meth:`of` builds one from a :class:`~smtpq.notice.Notice`, with a reply per recipient.
    """

    def __init__(
        self,
        envelope: Envelope,
        reply: Reply,
        headers_only: bool = False,
        *,
        reporting_mta: str | None = None,
        now: float | None = None,
        action: str = Action.FAILED,
        diagnostic: str | None = None,
    ) -> None:
        notice = Notice(
            Action(action),
            envelope,
            outcomes_for(envelope.recipients, reply),
            now=now if now is not None else (envelope.timestamp or 0.0),
            note=diagnostic,
        )
        self._fill(notice, reporting_mta or socket.getfqdn(), headers_only)

    @classmethod
    def of(cls, notice: Notice, reporting_mta: str, *, headers_only: bool = False) -> Bounce:
        """The DSN of ``notice``, from ``MAILER-DAEMON@reporting_mta``."""
        bounce = cls.__new__(cls)
        bounce._fill(notice, reporting_mta, headers_only)
        return bounce

    def _fill(self, notice: Notice, host: str, headers_only: bool) -> None:
        Envelope.__init__(self, "", [notice.envelope.sender])
        self.timestamp = notice.now
        self.receiver = host
        data = render(notice, host, headers_only=headers_only)
        self.parse(data)
        # A global DSN needs SMTPUTF8 where the next hop offers it (the relay asks for it);
        # 8-bit content needs 8BITMIME.
        self.smtputf8 = notice.envelope.smtputf8
        if not data.isascii():
            self.body_type = "8BITMIME"


def notify_wants(envelope: Envelope, recipient: str, kind: str) -> bool:
    """Whether RFC 3461 NOTIFY for ``recipient`` asks for ``kind`` (``SUCCESS``, ``FAILURE``,
    ``DELAY``).

    Without NOTIFY, failures and delays are reported (RFC 3461 §4.1: the MTA decides whether
    it sends delay warnings at all), successes are not.
    """
    notify = envelope.rcpt_params.get(recipient, {}).get("NOTIFY")
    if notify is None:
        return kind in ("FAILURE", "DELAY")
    values = {v.strip().upper() for v in notify.split(",")}
    return "NEVER" not in values and kind in values


#: The NOTIFY keyword (RFC 3461 §4.1) that asks for each kind of notice.
_NOTIFY_KIND = {
    Action.FAILED: "FAILURE",
    Action.DELAYED: "DELAY",
    Action.RELAYED: "SUCCESS",
    Action.DELIVERED: "SUCCESS",
}


class Notifier(Protocol):
    """What the queue asks for: the DSNs reporting one event of one message."""

    def notify(self, notice: Notice) -> Sequence[Envelope]:
        """The messages to send to ``notice.envelope.sender`` (none where none is due).

        The queue has already left out the recipients whose NOTIFY declines the notice, and
        asks nothing for a message from the null sender.
        """
        ...


class BounceFunction(Protocol):
    """python-slimta's ``bounce_factory(envelope, reply) -> Envelope | None``."""

    def __call__(self, envelope: Envelope, reply: Reply) -> Envelope | None:
        """The bounce for ``envelope``'s recipients, which all got ``reply``; None for none."""
        ...


@dataclass
class BounceFactory:
    """The default :class:`Notifier`: one DSN per notice, from ``MAILER-DAEMON@reporting_mta``.

    A failure returns the whole message, or its header with RET=HDRS; other notices (delay
    warnings, success reports) return the header only, as Postfix does. Also callable as
    python-slimta's ``bounce_factory(envelope, reply)``, honouring NOTIFY there itself.
    """

    reporting_mta: str | None = None

    def notify(self, notice: Notice) -> list[Envelope]:
        """The DSN of ``notice``, or none for the null sender or no recipient."""
        env = notice.envelope
        if not env.sender or not notice.outcomes:
            return []
        full = notice.action is Action.FAILED and (env.dsn_ret or "").upper() != "HDRS"
        host = self.reporting_mta or socket.getfqdn()
        return [Bounce.of(notice, host, headers_only=not full)]

    def __call__(
        self,
        envelope: Envelope,
        reply: Reply,
        *,
        now: float | None = None,
        diagnostic: str | None = None,
        action: str = Action.FAILED,
    ) -> Bounce | None:
        """The bounce of ``envelope``'s recipients that want one (NOTIFY), or None."""
        if not envelope.sender:
            return None
        kind = _NOTIFY_KIND[Action(action)]
        wanted = [r for r in envelope.recipients if notify_wants(envelope, r, kind)]
        if not wanted:
            return None
        return Bounce(
            envelope.copy(wanted),
            reply,
            headers_only=(envelope.dsn_ret or "").upper() == "HDRS",
            reporting_mta=self.reporting_mta,
            now=now,
            action=action,
            diagnostic=diagnostic,
        )


@dataclass(frozen=True)
class FunctionNotifier:
    """A python-slimta ``bounce_factory(envelope, reply)`` as a :class:`Notifier`.

    The function makes the failure bounces: it is called once per distinct reply of the event
    (it can describe only one), with the recipients that got it; a recipient whose lifetime ran
    out is given its last reply with status 4.4.7. Other notices (delay warnings, success
    reports) come from ``others``.
    """

    function: BounceFunction
    others: Notifier

    def notify(self, notice: Notice) -> list[Envelope]:
        """The function's bounces for a failure; ``others``' notices otherwise."""
        if notice.action is not Action.FAILED:
            return list(self.others.notify(notice))
        groups: dict[Reply, list[str]] = {}
        for outcome in notice.outcomes:
            groups.setdefault(_final_reply(outcome), []).append(outcome.recipient)
        bounces = (self.function(notice.envelope.copy(rcpts), r) for r, rcpts in groups.items())
        return [b for b in bounces if b is not None]


def _final_reply(outcome: Outcome) -> Reply:
    reply = outcome.reply or Reply("550", "5.0.0 Delivery failed")
    return reply.replace(enhanced_status_code="4.4.7") if outcome.expired else reply
