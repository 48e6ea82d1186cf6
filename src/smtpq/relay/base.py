"""The relay interface: how the queue hands a message on, and how a relay reports the outcome.

Besides delivering (:meth:`Relay.attempt`), a relay names each recipient's *destination*, its
next hop (:meth:`Relay.destinations`), so that the queue schedules per destination (DESIGN §4)
before it takes a delivery slot. What the queue learns back from the replies is said here
once: whether a destination could not be reached at all (:func:`is_connection_failure`).
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TypeAlias

from smtpq.envelope import Envelope
from smtpq.errors import SmtpqError
from smtpq.reply import Reply

__all__ = [
    "DEFAULT_DESTINATION",
    "ConnectGate",
    "PermanentRelayError",
    "RecipientResult",
    "Relay",
    "RelayError",
    "RelayResult",
    "TransientRelayError",
    "before_connect",
    "connect_gate",
    "is_connection_failure",
    "next_hop_name",
]

#: The outcome for one recipient: None (delivered), a Reply judged by its code, or an error.
RecipientResult: TypeAlias = "Reply | RelayError | None"
#: What ``attempt`` returns: None or a Reply for the whole message, or results per recipient.
RelayResult: TypeAlias = "Reply | Mapping[str, RecipientResult] | None"


class RelayError(SmtpqError):
    """A delivery attempt failed; :attr:`reply` says how."""

    def __init__(self, msg: str = "", reply: Reply | None = None) -> None:
        self.msg = msg
        super().__init__(msg, reply)


class TransientRelayError(RelayError):
    """The attempt failed for now; try again later. Default reply ``450 4.0.0``."""

    def default_reply(self) -> Reply:
        """``450 4.0.0`` with the error message."""
        return Reply("450", f"4.0.0 {self.msg}" if self.msg else "4.0.0 Delivery failed")


class PermanentRelayError(RelayError):
    """The attempt failed for good; bounce. Default reply ``550 5.0.0``."""

    def default_reply(self) -> Reply:
        """``550 5.0.0`` with the error message."""
        return Reply("550", f"5.0.0 {self.msg}" if self.msg else "5.0.0 Delivery failed")


#: The destination of every recipient of a relay that does not say otherwise.
DEFAULT_DESTINATION = "default"


class Relay(abc.ABC):
    """Delivers messages for the queue. A subclass implements only :meth:`attempt`; one that
    delivers to several next hops also says which (:meth:`destinations`)."""

    def destinations(self, envelope: Envelope) -> Mapping[str, list[str]]:
        """How ``envelope``'s recipients split into destinations: name -> recipients.

        A destination is a next hop whose limits and state the queue keeps (DESIGN §4): a
        smarthost, a route, a recipient domain for MX delivery. The queue makes one attempt per
        destination, with that destination's recipients only. It is asked before any slot is
        taken, so it must not do I/O. The default puts every recipient in one destination,
        :data:`DEFAULT_DESTINATION`: a relay that implements only :meth:`attempt` is one next
        hop. A recipient left out goes to that destination too.
        """
        return {DEFAULT_DESTINATION: list(envelope.recipients)}

    @abc.abstractmethod
    async def attempt(self, envelope: Envelope, attempts: int) -> RelayResult:
        """Try to deliver ``envelope`` (its recipients are the ones still pending).

        ``attempts`` is the number of attempts already made. Return None or a 2xx Reply when all
        recipients were delivered, or a dict from recipient to its result: None is delivered, a
        Reply is judged by its code (2xx delivered, 4xx transient, 5xx permanent), a RelayError by
        its class; a recipient missing from the dict is a transient failure. Raise
        :class:`PermanentRelayError` or :class:`TransientRelayError` when the whole attempt
        failed; any other exception is a transient failure, logged with its traceback.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections; the default has none."""


def next_hop_name(host: str, port: int) -> str:
    """A host and port as a destination's name: ``mail.example.net:25``, ``[2001:db8::1]:25``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Set-up commands: a failure there means the session never began.
_SESSION_SETUP = frozenset({"CONNECT", "EHLO", "HELO"})
#: RFC 3463 X.4.1 no answer from host, X.4.3 directory (DNS) server failure.
_UNREACHABLE_CODES = frozenset({"4.4.1", "4.4.3"})


def is_connection_failure(reply: Reply) -> bool:
    """Whether ``reply`` says that its destination could not be reached at all.

    That is a transient failure before any SMTP transaction began: refused, unreachable, timed
    out, no greeting, a greeting other than 220 (421 included), a session dropped or refused at
    EHLO/HELO (the ``command`` is ``CONNECT``, ``EHLO`` or ``HELO``); or a reply that says so by
    its enhanced code, whoever made it: ``4.4.1`` (no answer from host) and ``4.4.3`` (a
    temporary DNS failure: the destination cannot even be found now). A reply to MAIL, RCPT or
    the content, a 4xx included, is the host answering for the message: never a connection
    failure. This is the one place where the queue's scheduler learns a destination's health
    (see :mod:`smtpq.queue.destinations`).
    """
    if not reply.is_transient():
        return False
    return reply.command in _SESSION_SETUP or reply.enhanced_status_code in _UNREACHABLE_CODES


#: What a relay awaits before it opens a connection: the queue's per-destination connection
#: rate limit, when one applies to the attempt under way.
ConnectGate: TypeAlias = "Callable[[], Awaitable[None]]"

_gate: contextvars.ContextVar[ConnectGate | None] = contextvars.ContextVar(
    "smtpq_connect_gate", default=None
)


@contextlib.contextmanager
def connect_gate(gate: ConnectGate | None) -> Iterator[None]:
    """Within this block (and the tasks it starts), :func:`before_connect` awaits ``gate``.

    The queue sets it around :meth:`Relay.attempt` for a destination with a connection rate
    limit; a context variable, so that :meth:`Relay.attempt`'s signature stays slimta's.
    """
    token = _gate.set(gate)
    try:
        yield
    finally:
        _gate.reset(token)


async def before_connect() -> None:
    """Wait until the attempt under way may open a new connection (at once without a limit).

    Relays that open connections call it first (:class:`~smtpq.relay.pool.SmtpPool` does);
    a relay that does not simply has no connection rate limit.
    """
    gate = _gate.get()
    if gate is not None:
        await gate()
