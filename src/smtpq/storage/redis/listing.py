"""Listing a sharded queue: every shard's index merged in id order (oldest first), a page at a
time, and the records read per shard in batches. Reads only."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

from smtpq.envelope import Envelope
from smtpq.errors import EnvelopeFormatError
from smtpq.reply import Reply
from smtpq.storage.base import MessageInfo, id_time
from smtpq.storage.redis.layout import ShardKeys
from smtpq.storage.redis.pipeline import READ_PATIENCE, Pipeline
from smtpq.storage.redis.scripts import INFOS

__all__ = ["count", "iter_ids", "read_infos", "read_times"]

#: The record format version this storage reads and writes.
RECORD_VERSION = b"1"


async def iter_ids(
    pipe: Pipeline, shards: Sequence[ShardKeys], page: int
) -> AsyncIterator[list[str]]:
    """Every id of ``shards``, oldest first, ``page`` at a time.

    Each shard is paged through its index by id (ZRANGEBYLEX), the pages that run out read
    together; the shards' ids are merged as they come. A message stored for the whole listing is
    listed exactly once; one written or removed meanwhile may or may not be.
    """
    cursor = {s.shard: "-" for s in shards}
    buffered: dict[int, deque[str]] = {s.shard: deque() for s in shards}
    live = {s.shard: s for s in shards}  # shards whose index may have more
    out: list[str] = []
    while True:
        empty = [live[k] for k in live if not buffered[k]]
        if empty:
            pages = await asyncio.gather(
                *(pipe.command(s.slot, b"ZRANGEBYLEX", s.index, cursor[s.shard], b"+",
                               b"LIMIT", 0, page) for s in empty)
            )  # fmt: skip
            for s, members in zip(empty, pages, strict=True):
                ids = [bytes(m).decode() for m in members]
                buffered[s.shard].extend(ids)
                if ids:
                    cursor[s.shard] = "(" + ids[-1]
                if len(ids) < page:
                    del live[s.shard]
        heads = [k for k, ids in buffered.items() if ids]
        if not heads:
            break
        # Take ids while every shard that may have more has some buffered: the smallest is next.
        while heads and all(buffered[k] for k in live):
            best = min(heads, key=lambda k: buffered[k][0])
            out.append(buffered[best].popleft())
            if not buffered[best]:
                heads.remove(best)
            if len(out) == page:
                yield out
                out = []
    if out:
        yield out


async def read_times(pipe: Pipeline, ids: Sequence[str], keys: Sequence[ShardKeys]) -> list[Any]:
    """The stored next attempt time of each id (its shard's keys in ``keys``), None if gone."""
    pairs = zip(ids, keys, strict=True)
    reads = [pipe.command(k.slot, b"HGET", k.msg(i), b"ts") for i, k in pairs]
    return list(await asyncio.gather(*reads))


async def read_infos(
    pipe: Pipeline, ids: Sequence[str], keys: Sequence[ShardKeys | None], batch: int
) -> list[MessageInfo]:
    """Listing records of ``ids`` in that order (their shards' keys in ``keys``; None for an
    id that names no shard): one script call per shard and ``batch`` ids."""
    groups: dict[int, list[int]] = {}
    for position, k in enumerate(keys):
        if k is not None:
            groups.setdefault(k.shard, []).append(position)
    calls = []
    for positions in groups.values():
        shard = keys[positions[0]]
        assert shard is not None
        for start in range(0, len(positions), batch):
            chunk = positions[start : start + batch]
            names = [shard.held, *(shard.msg(ids[p]) for p in chunk)]
            args = [ids[p] for p in chunk]
            calls.append((chunk, pipe.run(INFOS, shard.slot, names, args, patience=READ_PATIENCE)))
    found: dict[int, MessageInfo] = {}
    for chunk, call in calls:
        for position, row in zip(chunk, await call, strict=True):
            info = _info(ids[position], row) if row else None
            if info is not None:
                found[position] = info
    return [found[p] for p in sorted(found)]


def _info(id: str, row: list[Any]) -> MessageInfo | None:
    version, ts, attempts, delivered, reply, head, held = row
    if version != RECORD_VERSION:
        return None  # another format: get_entry reports it when the message is attempted
    try:
        envelope, size = Envelope.from_head(head)
        done = {int(i) for i in delivered.split(b",") if i}
        return MessageInfo(
            id=id,
            sender=envelope.sender,
            recipients=tuple(r for i, r in enumerate(envelope.recipients) if i not in done),
            size=size,
            arrival=envelope.timestamp,
            attempts=int(attempts),
            timestamp=float(ts),
            held=bool(held),
            last_reply=Reply.from_dict(json.loads(reply)) if reply else None,
        )
    except (EnvelopeFormatError, ValueError, TypeError, KeyError):
        return None


async def count(pipe: Pipeline, shards: Sequence[ShardKeys]) -> dict[str, Any]:
    """``size``, ``held``, ``active`` (leases) and ``oldest`` (arrival) over ``shards``."""
    replies = await asyncio.gather(
        *(
            pipe.command(s.slot, *command)
            for s in shards
            for command in (
                (b"ZCARD", s.index),
                (b"SCARD", s.held),
                (b"HLEN", s.leases),
                (b"ZRANGE", s.index, 0, 0),
            )
        )
    )
    size = sum(replies[0::4])
    held = sum(replies[1::4])
    active = sum(replies[2::4])
    firsts = [bytes(first[0]).decode() for first in replies[3::4] if first]
    oldest = id_time(min(firsts)) if firsts else None
    return {"size": size, "held": held, "active": active, "oldest": oldest}
