"""Queue policies: rules applied to each envelope as it is enqueued, before it is stored.

A policy's :meth:`QueuePolicy.apply` may change the envelope in place (add headers) and may
split it into several envelopes (one per recipient, one per domain), each stored and delivered
on its own.
"""

from __future__ import annotations

import abc
import functools
import socket
import time
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime

from smtpq.envelope import Envelope

__all__ = [
    "AddMissingHeaders",
    "AddReceivedHeader",
    "QueuePolicy",
    "RecipientDomainSplit",
    "RecipientSplit",
]


class QueuePolicy(abc.ABC):
    """A rule applied to every envelope the queue accepts."""

    @abc.abstractmethod
    def apply(self, envelope: Envelope) -> list[Envelope] | None:
        """Change ``envelope`` in place, and return None, or return the envelopes to store."""


class RecipientSplit(QueuePolicy):
    """One envelope per recipient, so that each is retried and bounced on its own."""

    def apply(self, envelope: Envelope) -> list[Envelope] | None:
        """Split when there is more than one recipient."""
        if len(envelope.recipients) <= 1:
            return None
        return [envelope.copy([rcpt]) for rcpt in envelope.recipients]


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class RecipientDomainSplit(QueuePolicy):
    """One envelope per recipient domain: one delivery transaction per destination."""

    def apply(self, envelope: Envelope) -> list[Envelope] | None:
        """Split when the recipients are in more than one domain."""
        groups: dict[str, list[str]] = {}
        for rcpt in envelope.recipients:
            groups.setdefault(_domain(rcpt), []).append(rcpt)
        if len(groups) <= 1:
            return None
        return [envelope.copy(rcpts) for rcpts in groups.values()]


def _date(ts: float | None) -> str:
    return _date_of_second(int(ts if ts is not None else time.time()))


@functools.lru_cache(maxsize=8)
def _date_of_second(second: int) -> str:
    # Messages arrive many to the second: formatting the same date again is wasted work.
    return format_datetime(datetime.fromtimestamp(second, UTC))


class AddReceivedHeader(QueuePolicy):
    """Prepend the Received trace field (RFC 5321 §4.4) from the envelope's client details."""

    def __init__(self, hostname: str | None = None) -> None:
        self.hostname = hostname

    def apply(self, envelope: Envelope) -> list[Envelope] | None:
        """Add ``Received: from HELO (host [ip]) by us with PROTOCOL for <rcpt>; date``."""
        client = envelope.client
        parts: list[str] = []
        helo = client.get("name")
        ip, host = client.get("ip"), client.get("host")
        if helo or ip:
            tcp = " ".join(p for p in (host, f"[{ip}]" if ip else None) if p)
            parts.append(f"from {_clean(helo or 'unknown')}" + (f" ({tcp})" if tcp else ""))
        parts.append(f"by {_clean(envelope.receiver or self.hostname or socket.getfqdn())}")
        parts.append(f"(smtpq) with {_clean(client.get('protocol') or 'SMTP')}")
        if len(envelope.recipients) == 1:
            parts.append(f"for <{_clean(envelope.recipients[0])}>")
        envelope.prepend_header("Received", " ".join(parts) + f"; {_date(envelope.timestamp)}")
        return None


_UNSAFE_IN_COMMENT = str.maketrans("", "", "()\\;")
_UNSAFE_CHARS = frozenset("()\\;")


def _clean(text: str) -> str:
    """Text from the client, safe inside a header: no line breaks, no parentheses games."""
    text = " ".join(text.split())
    # translate looks every character up in its table: only text that needs it goes through.
    return text if _UNSAFE_CHARS.isdisjoint(text) else text.translate(_UNSAFE_IN_COMMENT)


class AddMissingHeaders(QueuePolicy):
    """Add Date and Message-ID where the message has none (RFC 5322 §3.6, RFC 6409 §8)."""

    def __init__(self, hostname: str | None = None) -> None:
        self.hostname = hostname

    def apply(self, envelope: Envelope) -> list[Envelope] | None:
        """Append the missing fields at the end of the header block."""
        if not envelope.has_header("Date"):
            envelope.append_header("Date", _date(envelope.timestamp))
        if not envelope.has_header("Message-ID"):
            host = self.hostname or envelope.receiver or socket.getfqdn()
            envelope.append_header("Message-ID", f"<{uuid.uuid4().hex}@{host}>")
        return None
