"""The storage contract every queue backend implements.

Two sides:

* **Records** — ``write``, ``set_timestamp``, ``increment_attempts``, ``set_recipients_delivered``,
  ``load``, ``get``/``get_entry``, ``remove``, ``get_info``, ``close``: the durable state of each
  message (envelope, next attempt time, attempts, delivered recipients, held flag, last reply).
* **Schedule** — ``claim``, ``renew``, ``release``, ``next_due``, ``wait``, ``flush``, ``set_held``:
  which message is due, and which worker attempts it. A claim is a *lease* that lasts
  :attr:`QueueStorage.lease_timeout` seconds unless renewed; a worker that dies loses it and another
  worker takes the message over. Local backends keep the schedule in memory (rebuilt by ``load``);
  shared backends keep it in the shared store.

Recipient indexes always refer to the recipient list *as first written*. ``get`` returns only the
pending recipients; :attr:`StoredMessage.pending` gives the original index of each of them.

A record method or ``set_held`` given the id of a message that is not stored (removed,
quarantined, never written) raises :class:`~smtpq.errors.MessageGone`, a :class:`KeyError`;
``remove`` (idempotent) and the lease methods (``renew``, ``release``) do not.

Times are Unix epoch seconds as floats, given by the caller (the Queue's clock), never read here
from the event loop, so that they mean the same after a restart or on another host.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from smtpq.envelope import Envelope
from smtpq.errors import EnvelopeFormatError
from smtpq.reply import Reply

__all__ = ["MessageInfo", "QueueStorage", "StoredMessage", "id_time", "is_valid_id", "new_id"]

_ID_CHARS = frozenset("0123456789abcdef")


def new_id(timestamp: float) -> str:
    """A new queue id: 32 hex digits, the first 13 the time in microseconds, then random.

    Ids sort by arrival, so listings come out oldest first and the oldest message is the
    smallest id, as with Postfix's long queue ids.
    """
    return f"{int(timestamp * 1_000_000) & 0xFFFFFFFFFFFFF:013x}{secrets.randbits(76):019x}"


def is_valid_id(id: str) -> bool:
    """Whether ``id`` has the form :func:`new_id` makes (safe as a file name, for one)."""
    return len(id) == 32 and _ID_CHARS.issuperset(id)


def id_time(id: str) -> float:
    """The arrival time encoded in an id made by :func:`new_id`."""
    return int(id[:13], 16) / 1_000_000


@dataclass(slots=True)
class StoredMessage:
    """Everything stored about one message.

    :ivar envelope: the envelope with only the pending recipients.
    :ivar pending: for each recipient of :attr:`envelope`, its index in the list as written.
    """

    id: str
    envelope: Envelope
    attempts: int
    timestamp: float
    pending: tuple[int, ...]
    held: bool = False
    last_reply: Reply | None = None
    #: Every recipient as first written (delivered ones included), when the backend has them.
    original_recipients: tuple[str, ...] = ()

    @classmethod
    def from_written(
        cls,
        id: str,
        envelope: Envelope,
        delivered: Iterable[int],
        *,
        attempts: int,
        timestamp: float,
        held: bool = False,
        last_reply: Reply | None = None,
    ) -> StoredMessage:
        """The record of a message whose ``envelope`` is as first written and whose recipients
        ``delivered`` (indexes) are done: the envelope is changed to keep the pending ones."""
        done = set(delivered)
        everyone = tuple(envelope.recipients)
        pending = tuple(i for i in range(len(everyone)) if i not in done)
        envelope.recipients = [everyone[i] for i in pending]
        return cls(
            id=id,
            envelope=envelope,
            attempts=attempts,
            timestamp=timestamp,
            pending=pending,
            held=held,
            last_reply=last_reply,
            original_recipients=everyone,
        )


@dataclass(slots=True)
class MessageInfo:
    """What a listing shows of a stored message: everything but its content.

    :ivar recipients: the pending recipients.
    :ivar size: bytes of the message (header block and body).
    :ivar arrival: when the message was received (the envelope's timestamp), if known.
    :ivar timestamp: the next attempt time.
    """

    id: str
    sender: str
    recipients: tuple[str, ...]
    size: int
    arrival: float | None
    attempts: int
    timestamp: float
    held: bool = False
    last_reply: Reply | None = None

    @classmethod
    def from_head(
        cls,
        id: str,
        head: bytes,
        delivered: Iterable[int],
        *,
        attempts: int,
        timestamp: float,
        held: bool = False,
        last_reply: Reply | None = None,
    ) -> MessageInfo:
        """The listing record of a message from the head of its stored envelope (see
        :meth:`~smtpq.envelope.Envelope.from_head`) and the indexes of its recipients done.

        :raises EnvelopeFormatError: when the head is damaged.
        """
        envelope, size = Envelope.from_head(head)
        done = set(delivered)
        return cls(
            id=id,
            sender=envelope.sender,
            recipients=tuple(r for i, r in enumerate(envelope.recipients) if i not in done),
            size=size,
            arrival=envelope.timestamp,
            attempts=attempts,
            timestamp=timestamp,
            held=held,
            last_reply=last_reply,
        )

    @classmethod
    def from_entry(cls, entry: StoredMessage) -> MessageInfo:
        """The listing record of a whole stored message."""
        env = entry.envelope
        return cls(
            id=entry.id,
            sender=env.sender,
            recipients=tuple(env.recipients),
            size=len(env),
            arrival=env.timestamp,
            attempts=entry.attempts,
            timestamp=entry.timestamp,
            held=entry.held,
            last_reply=entry.last_reply,
        )


class QueueStorage(abc.ABC):
    """Abstract queue storage; every method is a coroutine and safe to call concurrently."""

    #: Seconds a claim lasts unless renewed.
    lease_timeout: float = 60.0

    # -- records -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def write(self, envelope: Envelope, timestamp: float, *, claimed: bool = False) -> str:
        """Store a new message due at ``timestamp`` with 0 attempts; return its new id.

        Durable when it returns (for durable backends). With ``claimed=True`` the writer holds
        the lease at once (until ``timestamp + lease_timeout``), so that it can make the first
        attempt from the envelope in memory while no other worker takes the message.
        Raises :class:`~smtpq.errors.QueueError` when the message could not be stored.
        """

    @abc.abstractmethod
    async def set_timestamp(
        self, id: str, timestamp: float, *, last_reply: Reply | None = None
    ) -> None:
        """Set the next attempt time (and remember the reply that deferred it).

        This ends the attempt: the lease, if any, is released, and the message is due again at
        ``timestamp``. Waiters are woken. :class:`~smtpq.errors.MessageGone` when it is gone.
        """

    @abc.abstractmethod
    async def increment_attempts(self, id: str) -> int:
        """Add one to the attempt count and return the new count; MessageGone when gone."""

    @abc.abstractmethod
    async def set_recipients_delivered(self, id: str, indexes: Iterable[int]) -> None:
        """Mark recipients (indexes into the list as first written) as done; idempotent.

        :class:`~smtpq.errors.MessageGone` when the message is gone.
        """

    @abc.abstractmethod
    async def load(self) -> list[tuple[float, str]]:
        """Every stored message as ``(timestamp, id)``; rebuilds a local schedule.

        Safe while another task or process removes messages.
        """

    async def message_ids(self) -> list[str]:
        """Every stored message id, oldest first (for listings).

        The default loads everything; local backends answer from their schedule in memory,
        without touching the disk.
        """
        return sorted(id for _, id in await self.load())

    async def iter_ids(self, page: int = 500) -> AsyncIterator[list[str]]:
        """Every stored message id, oldest first, ``page`` ids at a time (for listings).

        A message stored for the whole iteration is listed exactly once; one written or
        removed meanwhile may or may not be. The default pages through :meth:`message_ids`;
        backends override it to avoid holding every id (as strings) at once.
        """
        ids = await self.message_ids()
        for start in range(0, len(ids), page):
            yield ids[start : start + page]

    async def get_infos(self, ids: Sequence[str]) -> list[MessageInfo]:
        """Listing records of the messages ``ids``, in that order; ids that are not stored
        (or whose record cannot be read) are left out.

        The default reads each whole message with :meth:`get_entry`; backends override it to
        read many records per round trip and no message bodies.
        """
        infos: list[MessageInfo] = []
        for id in ids:
            try:
                infos.append(MessageInfo.from_entry(await self.get_entry(id)))
            except (KeyError, EnvelopeFormatError):
                continue
        return infos

    @abc.abstractmethod
    async def get_entry(self, id: str) -> StoredMessage:
        """Everything stored about a message; :class:`~smtpq.errors.MessageGone` when it is
        gone."""

    async def get(self, id: str) -> tuple[Envelope, int]:
        """The envelope (pending recipients only) and the attempt count; MessageGone when
        gone."""
        entry = await self.get_entry(id)
        return entry.envelope, entry.attempts

    @abc.abstractmethod
    async def remove(self, id: str) -> None:
        """Forget a message; idempotent."""

    @abc.abstractmethod
    async def get_info(self) -> dict[str, Any]:
        """Facts about the storage; at least ``size``, the number of messages stored."""

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections and threads. The default has nothing to release."""

    # -- schedule ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def claim(self, now: float, limit: int) -> list[str]:
        """Lease up to ``limit`` messages that are due at ``now`` and not held.

        A message is claimable when its next attempt time has come and it has no live lease
        (or its lease expired: its holder died). Each claimed message is leased to this storage
        object until ``now + lease_timeout``.
        """

    @abc.abstractmethod
    async def renew(self, ids: Sequence[str], now: float) -> None:
        """Extend the leases this storage object holds on ``ids`` to ``now + lease_timeout``."""

    @abc.abstractmethod
    async def release(self, id: str) -> None:
        """Give up a lease without changing the next attempt time (an interrupted attempt)."""

    @abc.abstractmethod
    async def next_due(self) -> float | None:
        """When the schedule next has something to claim (an attempt or a lease expiry)."""

    @abc.abstractmethod
    async def wait(self, timeout: float) -> None:
        """Return when a message is written or rescheduled (by anyone), or after ``timeout``.

        A lease running out (its holder died) is not announced: never wait past
        :meth:`next_due`, which includes lease expiries.
        """

    @abc.abstractmethod
    async def flush(self, now: float, ids: Sequence[str] | None = None) -> int:
        """Make messages (all, or ``ids``) due at ``now``; leased and held ones are left alone.

        Returns how many were rescheduled.
        """

    @abc.abstractmethod
    async def set_held(self, id: str, held: bool) -> None:
        """Hold a message (never claimed, across restarts) or release it (due at its time).

        :class:`~smtpq.errors.MessageGone` when the message is gone.
        """
