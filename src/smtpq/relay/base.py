"""The relay interface: how the queue hands a message on, and how a relay reports the outcome."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TypeAlias

from smtpq.envelope import Envelope
from smtpq.errors import SmtpqError
from smtpq.reply import Reply

__all__ = [
    "PermanentRelayError",
    "RecipientResult",
    "Relay",
    "RelayError",
    "RelayResult",
    "TransientRelayError",
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


class Relay(abc.ABC):
    """Delivers messages for the queue. A subclass implements only :meth:`attempt`."""

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
