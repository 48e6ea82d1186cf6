"""smtpq: the queue service of a mail transfer agent, on asyncio.

The names of python-slimta's queue documentation, rebuilt on asyncio: :class:`Envelope`,
:class:`Reply`, :class:`Relay`, :class:`Queue`, the storages, :class:`Bounce` and backoff functions.
"""

from smtpq.backoff import Backoff, DefaultBackoff, exponential_backoff
from smtpq.bounce import Bounce, BounceFactory
from smtpq.clock import Clock, ManualClock, SystemClock
from smtpq.edge import EdgeConfig, SmtpEdge
from smtpq.envelope import Envelope
from smtpq.errors import EnvelopeFormatError, MessageGone, QueueError, SmtpqError
from smtpq.policy import (
    AddMissingHeaders,
    AddReceivedHeader,
    QueuePolicy,
    RecipientDomainSplit,
    RecipientSplit,
)
from smtpq.queue import Queue, QueueEvent
from smtpq.relay import (
    MxRelayConfig,
    MxSmtpRelay,
    PermanentRelayError,
    Relay,
    RelayError,
    RelayResult,
    SmtpRelayConfig,
    StaticSmtpRelay,
    TransientRelayError,
)
from smtpq.reply import Reply
from smtpq.storage import (
    DictStorage,
    DiskStorage,
    JournalStorage,
    QueueStorage,
    RedisStorage,
    StoredMessage,
)

__all__ = [
    "AddMissingHeaders",
    "AddReceivedHeader",
    "Backoff",
    "Bounce",
    "BounceFactory",
    "Clock",
    "DefaultBackoff",
    "DictStorage",
    "DiskStorage",
    "EdgeConfig",
    "Envelope",
    "EnvelopeFormatError",
    "JournalStorage",
    "ManualClock",
    "MessageGone",
    "MxRelayConfig",
    "MxSmtpRelay",
    "PermanentRelayError",
    "Queue",
    "QueueError",
    "QueueEvent",
    "QueuePolicy",
    "QueueStorage",
    "RecipientDomainSplit",
    "RecipientSplit",
    "RedisStorage",
    "Relay",
    "RelayError",
    "RelayResult",
    "Reply",
    "SmtpEdge",
    "SmtpRelayConfig",
    "SmtpqError",
    "StaticSmtpRelay",
    "StoredMessage",
    "SystemClock",
    "TransientRelayError",
    "exponential_backoff",
]
