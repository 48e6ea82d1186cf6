"""smtpq's exceptions. Each says which SMTP reply the edge should give because of it."""

from __future__ import annotations

from smtpq.reply import Reply, queue_error_reply


class SmtpqError(Exception):
    """Base of smtpq's errors; :attr:`reply` is what an SMTP client should be told."""

    def __init__(self, msg: str = "", reply: Reply | None = None) -> None:
        super().__init__(msg)
        self.reply = reply if reply is not None else self.default_reply()

    def default_reply(self) -> Reply:
        """The reply used when none was given."""
        return queue_error_reply()


class QueueError(SmtpqError):
    """The queue could not store or update a message; the edge answers ``451 4.3.0``."""


class MessageGone(SmtpqError, KeyError):
    """No message with this id is stored (any more): removed, quarantined, or never written.

    A :class:`KeyError` (of the id), as storages raised before it existed, so that
    ``except KeyError`` keeps working.
    """

    def __init__(self, id: str) -> None:
        super().__init__(id)
        #: The id of the message that is gone.
        self.id = id


class EnvelopeFormatError(SmtpqError, ValueError):
    """Stored envelope bytes are damaged, truncated or of an unknown format version."""
