"""Where a Redis queue's keys live: shards, their hash tags, and ids that name their shard.

Pure: no I/O. A queue named ``tag`` under ``prefix`` is spread over *shards*; every key of shard
``k`` starts with ``<prefix>{<shard tag>}:``, so that all of a shard's keys hash to one Redis
Cluster slot and every script touches one slot. Keys that belong to the queue as a whole (its
layout record, a migration's bookkeeping, and the single-tag layout of format 1) start with
``<prefix>{<tag>}:``.

Shard tags are chosen so that the shards spread evenly over the 16384 slots whatever their
number: shard ``k`` aims at the point ``bitreverse14(k)`` of the slot space (a van der Corput
sequence: the first ``2^n`` points are evenly spaced for every ``n``), and its tag is the first of
``<tag>.<k>``, ``<tag>.<k>.1``, ``<tag>.<k>.2``, ... whose slot lies within 64 slots after that
point. A cluster whose masters hold equal ranges of slots (as ``redis-cli --cluster create``
makes them) thus serves equal numbers of shards, give or take one; and shard ``k``'s tag does not
depend on how many shards there are, so that the count can grow.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from redis.crc import key_slot

from smtpq.storage.base import new_id

__all__ = [
    "DEFAULT_SHARDS",
    "MAX_SHARDS",
    "QueueKeys",
    "ShardKeys",
    "shard_id",
    "shard_of",
    "shard_tag",
]

#: Shards of a queue unless configured: see docs/redis.md, "Shards".
DEFAULT_SHARDS = 16
#: An id names its shard in its last two hex digits.
MAX_SHARDS = 256
_SLOTS = 16384
_CELL = _SLOTS // MAX_SHARDS  # the width of the slot range a shard's tag must fall in


def _target(shard: int) -> int:
    """The first slot of shard ``shard``'s cell: its index bit-reversed over 14 bits."""
    return int(f"{shard:014b}"[::-1], 2)


@functools.lru_cache(maxsize=4096)
def shard_tag(tag: str, shard: int) -> str:
    """The hash tag of shard ``shard`` of the queue ``tag`` (see the module docstring)."""
    if not 0 <= shard < MAX_SHARDS:
        raise ValueError(f"shard {shard} out of range 0..{MAX_SHARDS - 1}")
    low = _target(shard)
    candidate, n = f"{tag}.{shard}", 0
    while not low <= key_slot(candidate.encode()) < low + _CELL:
        n += 1
        candidate = f"{tag}.{shard}.{n}"
    return candidate


def shard_id(timestamp: float, shard: int) -> str:
    """A new queue id (:func:`~smtpq.storage.base.new_id` form) that names ``shard``."""
    return new_id(timestamp)[:30] + f"{shard:02x}"


def shard_of(id: str) -> int:
    """The shard an id names (its last two hex digits).

    :raises ValueError: when ``id`` does not end in two hex digits.
    """
    if len(id) < 2:
        raise ValueError(f"not a queue id: {id!r}")
    return int(id[-2:], 16)


@dataclass(frozen=True, slots=True)
class ShardKeys:
    """The keys of one shard: all in the slot of its hash tag."""

    shard: int
    base: str  # "<prefix>{<shard tag>}:"

    @classmethod
    def of(cls, prefix: str, tag: str, shard: int) -> ShardKeys:
        """The keys of shard ``shard`` of queue ``tag``."""
        return cls(shard, f"{prefix}{{{shard_tag(tag, shard)}}}:")

    def msg(self, id: str) -> str:
        """The record of message ``id`` (a hash)."""
        return f"{self.base}msg:{id}"

    @property
    def index(self) -> str:
        """Every message id of the shard, score 0: ordered by id, that is by arrival."""
        return self.base + "index"

    @property
    def schedule(self) -> str:
        """id -> next attempt time, or lease expiry while leased; held messages are absent."""
        return self.base + "schedule"

    @property
    def leases(self) -> str:
        """id -> owner token of the lease."""
        return self.base + "leases"

    @property
    def held(self) -> str:
        """The held ids."""
        return self.base + "held"

    @property
    def channel(self) -> str:
        """The shard's wake-up channel on a cluster (sharded pub/sub, in the shard's slot)."""
        return self.base + "wake"

    def migrated(self, id: str) -> str:
        """Marks that a message of the format-1 layout was copied here as ``id``."""
        return f"{self.base}migrated:{id}"

    @property
    def slot(self) -> int:
        """The Redis Cluster slot of every key of the shard."""
        return key_slot(self.index.encode())


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The keys of the queue as a whole, in the slot of ``{<tag>}``.

    ``legacy`` is the single shard of the format-1 layout (every message under this one tag),
    read only to move its messages into the shards.
    """

    base: str  # "<prefix>{<tag>}:"
    legacy: ShardKeys

    @classmethod
    def of(cls, prefix: str, tag: str) -> QueueKeys:
        """The queue-wide keys of queue ``tag``."""
        base = f"{prefix}{{{tag}}}:"
        return cls(base, ShardKeys(-1, base))

    @property
    def layout(self) -> str:
        """A hash: ``shards``, the most shards any writer has used (claims cover them all)."""
        return self.base + "layout"

    @property
    def moving(self) -> str:
        """Format-1 messages being moved into the shards: id -> end of the mover's lease."""
        return self.base + "moving"

    def moving_msg(self, id: str) -> str:
        """The format-1 record of ``id`` while it is moved, with its new id in ``to``."""
        return f"{self.base}moving:{id}"

    @property
    def channel(self) -> str:
        """The wake-up channel on a single server (classic pub/sub)."""
        return self.base + "wake"

    @property
    def slot(self) -> int:
        """The Redis Cluster slot of the queue-wide keys."""
        return key_slot(self.layout.encode())
