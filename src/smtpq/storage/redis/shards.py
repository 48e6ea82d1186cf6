"""What one storage object knows of its queue's shards: their keys, how many there are (the
queue's layout record), whether format-1 messages wait to be moved, and each shard's due time
(:class:`~smtpq.storage.redis.due.DueTimes`), kept up to date from script replies, the other
workers' announcements and a periodic read."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Any

from redis.typing import EncodableT

from smtpq.errors import MessageGone, QueueError
from smtpq.storage.redis.due import DueTimes
from smtpq.storage.redis.layout import MAX_SHARDS, QueueKeys, ShardKeys, shard_of
from smtpq.storage.redis.pipeline import PATIENCE, READ_PATIENCE, Pipeline
from smtpq.storage.redis.scripts import DUE, LAYOUT, Script

__all__ = ["ShardView"]

log = logging.getLogger(__name__)


def _due(raw: Any) -> float | None:
    """A due time as a script returns it (a score, or nil/false when the schedule is empty)."""
    return float(raw) if raw else None


class ShardView:
    """The shards of the queue ``tag`` under ``prefix``, as one storage object sees them.

    :param shards: how many shards this storage writes to (claims and listings cover every
        shard any writer used: :attr:`known`).
    :param token: marks this object's own announcements, which it ignores.
    :param wake: set when something may have become due (this object's waiters wait on it).
    """

    def __init__(
        self,
        pipe: Pipeline,
        prefix: str,
        tag: str,
        shards: int,
        lease_timeout: float,
        token: bytes,
        wake: asyncio.Event,
    ) -> None:
        self._pipe = pipe
        self._prefix = prefix
        self._tag = tag
        self._token = token
        self._wake = wake
        self._keys: dict[int, ShardKeys] = {}
        #: The queue-wide keys (layout, format 1).
        self.queue = QueueKeys.of(prefix, tag)
        self.writing = shards
        #: Shards that claims and listings cover: the most any writer used.
        self.known = shards
        self.due = DueTimes(shards, random.randrange(shards))
        #: Format-1 messages still to move, as last read.
        self.legacy = 0
        self.registered = False  # this writer's shard count is in the layout
        #: The latest time a claim was made at (the caller's clock).
        self.now = -math.inf
        self._refreshed: float | None = None  # monotonic time the due times were last read
        self._refresh_every = min(5.0, lease_timeout / 4)

    # -- keys ----------------------------------------------------------------------------------

    def keys(self, shard: int) -> ShardKeys:
        """The keys of shard ``shard``."""
        keys = self._keys.get(shard)
        if keys is None:
            keys = self._keys[shard] = ShardKeys.of(self._prefix, self._tag, shard)
        return keys

    def locate(self, id: str) -> ShardKeys | None:
        """The keys of the shard an id names; None for a string that is no id of ours."""
        try:
            return self.keys(shard_of(id))
        except ValueError:
            return None

    def found(self, id: str) -> ShardKeys:
        """The keys of the shard an id names; MessageGone for an id not of ours."""
        keys = self.locate(id)
        if keys is None:
            raise MessageGone(id)
        return keys

    def all(self) -> list[ShardKeys]:
        """The keys of every shard claims and listings cover."""
        return [self.keys(k) for k in range(self.known)]

    def run(
        self,
        script: Script,
        keys: ShardKeys,
        names: Sequence[str],
        args: Sequence[EncodableT],
        *,
        replicate: bool = False,
        patience: float = PATIENCE,
        notice: float | None = None,
    ) -> asyncio.Future[Any]:
        """Run ``script`` on the shard ``keys``; with ``notice``, tell the other workers that
        the shard may be due at that time (``-inf``: something changed there, look)."""
        return self._pipe.run(
            script,
            keys.slot,
            names,
            args,
            replicate=replicate,
            patience=patience,
            notice=None if notice is None else (keys.shard, notice),
        )

    # -- due times -----------------------------------------------------------------------------

    def learn(self, keys: ShardKeys, raw: Any, *, changed: bool = False) -> None:
        """What a script answered about its shard's due time; with ``changed`` (it may have
        made work due), our own waiters are woken (the others by the call's notice)."""
        if keys.shard >= len(self.due):
            self.due.resize(keys.shard + 1)
            self.known = max(self.known, keys.shard + 1)
        self.due.learn(keys.shard, _due(raw))
        if changed:
            self._wake.set()

    def claimed(self, shard: int, now: float, got: int, dropped: int, raw: Any) -> None:
        """What a claim on ``shard`` gave (see :meth:`DueTimes.claimed`)."""
        self.due.claimed(shard, now, got, dropped, _due(raw))

    def heard(self, data: bytes) -> None:
        """An announcement from another worker: bring the shards' due times forward."""
        sender, _, items = data.partition(b" ")
        if sender == self._token:
            return  # our own changes are known from their replies
        if not items:
            self._refreshed = None  # a format-1 writer: look at the layout (and move) soon
        for item in items.split():
            shard, _, due = item.partition(b":")
            with contextlib.suppress(ValueError):
                self.due.hint(int(shard), float(due))
        self._wake.set()

    def missed(self) -> None:
        """(Re)subscribed: announcements may have been missed; read the due times again."""
        self._refreshed = None
        self._wake.set()

    def stale(self) -> bool:
        """Whether the due times should be read again (unknown, or a few seconds old)."""
        return (
            self._refreshed is None
            or self.due.unknown
            or time.monotonic() - self._refreshed > self._refresh_every
        )

    async def refresh(self) -> None:
        """Read the layout and every shard's due time (one round trip per node).

        A shard that cannot be read is backed off; QueueError only when none could be.
        """
        self._refreshed = time.monotonic()
        try:
            await self.layout(register=False)
        except QueueError as exc:
            log.warning("reading the queue layout failed: %s", exc)
        shards = self.all()
        replies = await asyncio.gather(
            *(self.run(DUE, k, [k.schedule], [], patience=READ_PATIENCE) for k in shards),
            return_exceptions=True,
        )
        failures = []
        for keys, reply in zip(shards, replies, strict=True):
            if isinstance(reply, QueueError):
                self.due.failed(keys.shard, self.now)
                failures.append(reply)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                self.learn(keys, reply)
        if failures and len(failures) == len(shards):
            raise failures[0]

    # -- the layout record ---------------------------------------------------------------------

    async def layout(self, register: bool) -> None:
        """Read the queue's layout (and, as a writer, record this storage's shard count)."""
        q = self.queue
        mine = self.writing if register else 0
        known, legacy = await self._pipe.run(
            LAYOUT, q.slot, [q.layout, q.legacy.index, q.moving], [mine], patience=READ_PATIENCE
        )
        if register:
            self.registered = True
        if int(known) > self.known:
            self.known = min(int(known), MAX_SHARDS)
            self.due.resize(self.known)
        self.legacy = int(legacy)
