"""Moving a queue of the format-1 layout (every message under the one tag ``{<tag>}``) into the
shards of format 2.

Each message moves in three idempotent steps (see the ``MOVE_*`` scripts): it is *marked* in the
old layout (its record renamed out of the old layout's reach, under a mover's lease), *copied*
into its shard under a new id — its old id with the last two hex digits replaced by the shard's,
so that it keeps its place in arrival order and stays recognisable — and the mark is *done*. A
mover that dies between steps leaves the message marked; the next mover finishes the move once
the lease has run out, and a copy is made at most once (a marker in the shard remembers it for a
week), so a move neither loses nor duplicates a message. A message whose attempt is running
(leased by a worker of the old version) is left where it is, for a later pass.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from smtpq.storage.redis.layout import QueueKeys, ShardKeys
from smtpq.storage.redis.pipeline import Pipeline
from smtpq.storage.redis.scripts import MOVE_COPY, MOVE_DONE, MOVE_MARK

__all__ = ["Moved", "Mover"]

log = logging.getLogger(__name__)


@dataclass
class Moved:
    """What one pass moved: ``moved`` messages, ``waiting`` left for later (their attempt runs,
    or another mover holds them), and each shard's due time after the copies."""

    moved: int = 0
    waiting: int = 0
    due: dict[int, Any] = field(default_factory=dict)


class Mover:
    """Moves format-1 messages of ``keys`` into the shards ``shard_keys(k)``, ``k < shards``."""

    def __init__(
        self,
        pipe: Pipeline,
        keys: QueueKeys,
        shard_keys: Callable[[int], ShardKeys],
        shards: int,
        lease: float,
    ) -> None:
        self._pipe = pipe
        self._keys = keys
        self._shard_keys = shard_keys
        self._shards = shards
        self._lease = lease
        self._cursor = "-"

    def restart(self) -> None:
        """The next step starts from the first message of the old layout."""
        self._cursor = "-"

    def new_id(self, id: str) -> str:
        """The id a format-1 message gets in its shard."""
        return id[:30] + f"{int(id[30:], 16) % self._shards:02x}"

    async def step(self, now: float, batch: int) -> tuple[Moved, bool]:
        """Move up to ``batch`` messages; also whether the old layout has been walked to its
        end (the next pass starts again from its first message)."""
        q, legacy = self._keys, self._keys.legacy
        page, moving = await asyncio.gather(
            self._pipe.command(q.slot, b"ZRANGEBYLEX", legacy.index, self._cursor, b"+",
                               b"LIMIT", 0, batch),
            self._pipe.command(q.slot, b"ZRANGE", q.moving, 0, batch - 1),
        )  # fmt: skip
        ids = [bytes(m).decode() for m in page]
        at_end = len(ids) < batch
        self._cursor = "-" if at_end else "(" + ids[-1]
        ids += [bytes(m).decode() for m in moving if bytes(m).decode() not in ids]
        return await self._move(ids, now), at_end

    async def _move(self, ids: list[str], now: float) -> Moved:
        q, legacy = self._keys, self._keys.legacy
        marks = await asyncio.gather(
            *(
                self._pipe.run(
                    MOVE_MARK,
                    q.slot,
                    [legacy.msg(id), legacy.index, legacy.schedule, legacy.leases, legacy.held,
                     q.moving, q.moving_msg(id)],
                    [id, self.new_id(id), now, now + self._lease],
                )
                for id in ids
            )
        )  # fmt: skip
        result = Moved()
        moving: list[tuple[str, list[Any]]] = []
        for id, mark in zip(ids, marks, strict=True):
            state = bytes(mark[0])
            if state == b"move":
                moving.append((id, mark))
            elif state in (b"leased", b"busy"):
                result.waiting += 1
        copies = await asyncio.gather(*(self._copy(mark) for _, mark in moving))
        done = []
        for (id, _), (copied, shard, due) in zip(moving, copies, strict=True):
            result.due[shard] = due
            if copied < 0:
                log.error("format-1 message %s not moved: another message has its new id", id)
                result.waiting += 1
                continue
            result.moved += copied
            done.append(self._pipe.run(MOVE_DONE, q.slot, [q.moving, q.moving_msg(id)], [id]))
        await asyncio.gather(*done)
        return result

    async def _copy(self, mark: list[Any]) -> tuple[int, int, Any]:
        new = bytes(mark[1]).decode()
        held, flat = bytes(mark[2]), list(mark[3])
        shard = int(new[30:], 16)
        s = self._shard_keys(shard)
        reply = await self._pipe.run(
            MOVE_COPY,
            s.slot,
            [s.msg(new), s.index, s.schedule, s.held, s.migrated(new)],
            [new, 1 if held == b"1" else 0, *flat],
            notice=(shard, -math.inf),  # the workers look at the shard
        )
        return int(reply[0]), shard, reply[1]
