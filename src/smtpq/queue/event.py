"""Queue events: one line of the log, and one observation for metrics."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from smtpq.reply import Reply

__all__ = ["EventKind", "QueueEvent"]


class EventKind(StrEnum):
    """What happened to a message (or to some of its recipients)."""

    ACCEPTED = "accepted"
    ATTEMPTED = "attempted"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    #: Given back to the schedule unattempted: its destination had too much waiting for it.
    POSTPONED = "postponed"
    #: A DSN reported recipients as failed (or, with ``dsn=none``, none was due).
    BOUNCED = "bounced"
    #: Given up: the message's lifetime ran out.
    EXPIRED = "expired"
    #: Given up: the backoff gave up (retries exhausted).
    FAILED = "failed"
    DELAY_WARNED = "delay-warned"
    #: A success DSN (Action: relayed) went to the sender (NOTIFY=SUCCESS).
    SUCCESS_NOTIFIED = "success-notified"
    REMOVED = "removed"
    # The operators' actions (smtpq.daemon.ops), logged with who asked.
    FLUSHED = "flushed"
    HELD = "held"
    RELEASED = "released"
    DELETED = "deleted"
    REQUEUED = "requeued"


class QueueEvent:
    """One thing that happened to a message, for logs and metrics observers.

    :ivar recipients: exactly the recipients the event is about.
    :ivar reply: the reply they got (its host is logged as ``relay=``).
    :ivar detail: more ``key=value`` pairs for the log line.
    """

    __slots__ = ("detail", "id", "kind", "recipients", "reply")

    def __init__(
        self,
        kind: EventKind | str,
        id: str,
        recipients: Sequence[str] = (),
        reply: Reply | None = None,
        **detail: Any,
    ) -> None:
        self.kind = kind if type(kind) is EventKind else EventKind(kind)
        self.id = id
        self.recipients = tuple(recipients)
        self.reply = reply
        self.detail = detail

    def with_detail(self, **detail: Any) -> QueueEvent:
        """A copy with more detail (a DSN's queue ids, known once it is stored)."""
        return QueueEvent(self.kind, self.id, self.recipients, self.reply, **self.detail, **detail)

    def __str__(self) -> str:
        parts = [str(self.kind), f"id={self.id}"]
        if self.recipients:
            parts.append("to=" + ",".join(f"<{r}>" for r in self.recipients))
        if self.reply is not None:
            host, ip = self.reply.remote_host, self.reply.remote_ip
            if host:
                parts.append(f"relay={host}[{ip}]" if ip else f"relay={host}")
            parts.append(f'reply="{self.reply}"')
        for key, value in self.detail.items():
            parts.append(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")
        return " ".join(parts)

    def __repr__(self) -> str:
        return f"<QueueEvent {self}>"
