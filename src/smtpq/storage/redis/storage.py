"""RedisStorage: one queue shared by any number of Queue processes on any number of hosts.

Everything lives in Redis — records, schedule and leases — so workers need no local state and a
worker that dies loses nothing but its leases. Every change that touches more than one key is one
Lua script (atomic, one round trip, one slot); listing walks sorted sets a page at a time, never
``KEYS``. The same code serves one Redis server and a Redis Cluster: only the route differs
(:mod:`smtpq.storage.redis.route`).

Layout, format 2 (``S`` is ``<prefix>{<shard tag>}:``, see :mod:`smtpq.storage.redis.layout`;
``Q`` is ``<prefix>{<tag>}:``, e.g. ``smtpq:{q}:``)::

    S msg:<id>   hash   v          format version of this record ("1")
                        env        Envelope.to_bytes(): versioned, checksummed, never pickle
                        ts         next attempt time, Unix epoch seconds (a float's repr)
                        attempts   attempts made so far (integer)
                        delivered  comma-separated indexes (into the recipients as first
                                   written) that are done, ascending; "" when none
                        reply      the Reply that last deferred it, as JSON (absent if none)
    S index      zset   every message id of the shard, all with score 0: ordered by id, that is
                        by arrival (ids are time-ordered, see smtpq.storage.base.new_id)
    S schedule   zset   id -> what a worker waits for: the next attempt time, or the lease
                        expiry while leased. Held messages are absent (unless held while
                        leased: they leave when the attempt ends). claim() takes members whose
                        score is <= now, so a dead worker's lease simply falls due.
    S leases     hash   id -> owner token of the storage object holding the lease
    S held       set    ids that are held (never claimed until released)
    S wake       sharded pub/sub channel (on a cluster): announcements of the shard's changes
    Q layout     hash   shards: the most shards any writer of the queue has used
    Q wake       pub/sub channel (on one server): announcements of every shard's changes

A message's id names its shard (its last two hex digits): every operation on a message goes to
the one slot of its shard. A queue written in format 1 (all of it under ``Q``) is moved into the
shards by the workers (:mod:`smtpq.storage.redis.migrate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.typing import EncodableT

from smtpq.envelope import Envelope
from smtpq.errors import EnvelopeFormatError, MessageGone, QueueError
from smtpq.reply import Reply
from smtpq.storage.base import MessageInfo, QueueStorage, StoredMessage
from smtpq.storage.redis import listing
from smtpq.storage.redis.connect import route_for, route_from_url, route_of
from smtpq.storage.redis.layout import (
    DEFAULT_SHARDS,
    MAX_SHARDS,
    ShardKeys,
    shard_id,
)
from smtpq.storage.redis.migrate import Mover
from smtpq.storage.redis.pipeline import READ_PATIENCE, Pipeline, pack
from smtpq.storage.redis.route import ClusterRoute, Route, ServerRoute
from smtpq.storage.redis.scripts import (
    CLAIM,
    DELIVERED,
    FLUSH,
    GET,
    INCREMENT,
    RELEASE,
    REMOVE,
    RENEW,
    SET_HELD,
    SET_TIMESTAMP,
    WRITE,
)
from smtpq.storage.redis.shards import ShardView
from smtpq.storage.redis.wake import ClusterListener, Listener, ServerListener

__all__ = ["FORMAT_VERSION", "RedisStorage"]

log = logging.getLogger(__name__)

#: Version of the key layout described in the module docstring (records are version 1).
FORMAT_VERSION = 2

# Messages listed, flushed or renewed per script call: large enough to amortise the round
# trip, small enough that one call never blocks Redis for long.
_BATCH = 1000
# Format-1 messages moved per claim while any are left.
_MOVE_BATCH = 200
# A shard whose write failed is left alone by writers for this long (seconds).
_WRITE_HOLDOFF = 1.0
# A write keeps trying this long (a node failing, a slot being migrated), then goes to
# another shard: its client is waiting.
_WRITE_PATIENCE = 1.0


def _default_owner() -> str:
    """A lease owner token that tells an operator which process holds a lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class RedisStorage(QueueStorage):
    """A queue in Redis, safe to share between any number of Queue processes.

    :param host, port, db, password, socket_timeout: where Redis is (as in redis-py); with
        ``cluster``, any node of the cluster.
    :param prefix: the start of every key; must not contain ``{`` (see ``tag``).
    :param tag: the queue's name inside ``prefix``; each shard's hash tag is made from it.
    :param shards: how many shards new messages are spread over (1 to 256, default 16): on a
        cluster, the shards spread over the masters. Claims and listings cover every shard
        any writer of the queue has used, so the number may be changed at any time.
    :param cluster: talk to a Redis Cluster (redis-py's asyncio cluster client): commands go
        to the master serving their slot, ``MOVED``/``ASK`` and failovers are followed.
    :param lease_timeout: seconds a claim lasts unless renewed.
    :param wait_replicas: when > 0, ``write`` issues ``WAIT wait_replicas`` and raises
        :class:`~smtpq.errors.QueueError` unless that many replicas acknowledged the write
        within ``wait_timeout`` seconds.
    :param owner: the lease owner token of this storage object (default: host, pid, random).
    :param client: a ready ``redis.asyncio.Redis`` or ``RedisCluster`` to use instead of
        connecting (it is closed by :meth:`close`).
    :param redis_kwargs: connection options of redis-py (e.g. ``ssl=True``, ``username``,
        ``retry``, ``socket_connect_timeout``, ``unix_socket_path``, ``max_connections`` —
        default 64, per node on a cluster — and, on a server, ``timeout``, how long to wait
        for a free connection, default 10 s).

    A failed Redis operation raises :class:`~smtpq.errors.QueueError`. Connections are
    re-established on the next operation; each operation retries a broken connection (or, on a
    cluster, a failing node) for about a second with jittered exponential backoff, so that a
    Redis restart or failover costs a few 451s rather than a crash.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        password: str | None = None,
        socket_timeout: float | None = None,
        prefix: str = "smtpq:",
        *,
        tag: str = "q",
        shards: int = DEFAULT_SHARDS,
        cluster: bool = False,
        lease_timeout: float = 60.0,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        owner: str | None = None,
        client: aioredis.Redis | RedisCluster | None = None,
        **redis_kwargs: Any,
    ) -> None:
        self._check(prefix, tag, shards)
        if client is not None:
            route = route_of(client)
        else:
            route = route_for(host, port, db, password, socket_timeout, cluster, redis_kwargs)
        self._setup(route, prefix, tag, shards, lease_timeout, wait_replicas, wait_timeout, owner)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "smtpq:",
        tag: str = "q",
        shards: int = DEFAULT_SHARDS,
        cluster: bool = False,
        lease_timeout: float = 60.0,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        owner: str | None = None,
        **redis_kwargs: Any,
    ) -> RedisStorage:
        """A storage on the Redis a ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL names
        (with ``cluster``, any node of the cluster: it seeds the topology).

        The URL carries host, port, password, database (``/0`` or ``?db=0``) and options as
        redis-py reads them; ``redis_kwargs`` add to them.
        """
        cls._check(prefix, tag, shards)
        self = cls.__new__(cls)
        route = route_from_url(url, cluster, redis_kwargs)
        self._setup(route, prefix, tag, shards, lease_timeout, wait_replicas, wait_timeout, owner)
        return self

    @staticmethod
    def _check(prefix: str, tag: str, shards: int) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("prefix must not contain braces: the tag is the hash tag")
        if not tag or "{" in tag or "}" in tag:
            raise ValueError("tag must be a non-empty name without braces")
        if not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"shards must be from 1 to {MAX_SHARDS}")

    def _setup(
        self,
        route: Route,
        prefix: str,
        tag: str,
        shards: int,
        lease_timeout: float,
        wait_replicas: int,
        wait_timeout: float,
        owner: str | None,
    ) -> None:
        self._route = route
        self.prefix = prefix
        self.tag = tag
        #: How many shards this storage writes new messages to.
        self.shards = shards
        self.lease_timeout = lease_timeout
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        #: The token that marks this object's leases.
        self.owner = owner if owner is not None else _default_owner()
        self._token = secrets.token_hex(4).encode()  # marks this object's announcements
        self._pipe = Pipeline(route, self._announcements, wait_replicas, wait_timeout)
        self._wake = asyncio.Event()
        self._view = ShardView(
            self._pipe, prefix, tag, shards, lease_timeout, self._token, self._wake
        )
        #: The pub/sub channel on which changes are announced on a single server (on a
        #: cluster, each shard has its own: see :mod:`smtpq.storage.redis.wake`).
        self.channel = self._view.queue.channel
        self._next_write = random.randrange(shards)
        self._write_holdoff: dict[int, float] = {}
        q = self._view.queue
        self._mover = Mover(self._pipe, q, self._view.keys, shards, lease_timeout)
        self._listener: Listener | None = None
        self._closed = False

    # -- announcements -----------------------------------------------------------------------

    def _announcements(self, notices: dict[int, float]) -> list[bytes]:
        """The commands that publish one node's share of announcements (see :mod:`.wake`)."""
        if isinstance(self._route, ServerRoute):
            items = b" ".join(b"%d:%r" % (k, due) for k, due in notices.items())
            return [pack(b"PUBLISH", self.channel, self._token + b" " + items)]
        return [
            pack(b"SPUBLISH", self._view.keys(k).channel, b"%s %d:%r" % (self._token, k, due))
            for k, due in notices.items()
        ]

    # -- records -------------------------------------------------------------------------------

    async def write(self, envelope: Envelope, timestamp: float, *, claimed: bool = False) -> str:
        """See :meth:`QueueStorage.write`; with ``wait_replicas``, also replicated.

        The message goes to the next shard in turn. When that fails (its node is down or
        failing over, or no replica acknowledged it), the shard is left alone for a moment and
        the message is written once more, to another shard.
        """
        if not self._view.registered:
            await self._view.layout(register=True)
        data = envelope.to_bytes()
        shard = self._pick_shard()
        try:
            return await self._write(shard, data, timestamp, claimed)
        except QueueError as exc:
            self._write_holdoff[shard] = time.monotonic() + _WRITE_HOLDOFF
            other = self._pick_shard()
            if other == shard:
                raise
            log.warning("write to shard %d failed (%s); writing to shard %d", shard, exc, other)
            return await self._write(other, data, timestamp, claimed)

    def _pick_shard(self) -> int:
        """The next shard in turn whose writes have not failed a moment ago."""
        now = time.monotonic()
        first = self._next_write
        for step in range(self.shards):
            shard = (first + step) % self.shards
            if self._write_holdoff.get(shard, 0.0) <= now:
                self._next_write = (shard + 1) % self.shards
                return shard
        self._next_write = (first + 1) % self.shards
        return first  # every shard failed lately: try anyway

    async def _write(self, shard: int, data: bytes, timestamp: float, claimed: bool) -> str:
        keys = self._view.keys(shard)
        id = shard_id(timestamp, shard)
        score = timestamp + self.lease_timeout if claimed else timestamp
        names = [keys.msg(id), keys.index, keys.schedule, keys.leases]
        args: list[EncodableT] = [id, data, timestamp, score, self.owner if claimed else ""]
        notice = None if claimed else timestamp
        if not self.wait_replicas:
            reply = await self._view.run(
                WRITE, keys, names, args, patience=_WRITE_PATIENCE, notice=notice
            )
        else:
            reply, acked = await self._view.run(
                WRITE, keys, names, args, replicate=True, patience=_WRITE_PATIENCE, notice=notice
            )
            if acked < self.wait_replicas:
                self._view.learn(keys, reply[1])
                # Not acknowledged: the client will be told 451 and send it again. Withdraw
                # this copy if we still can, so that the retry does not deliver it twice.
                with contextlib.suppress(QueueError):
                    await self.remove(id)
                raise QueueError(f"write reached {acked} of {self.wait_replicas} replicas in time")
        self._view.learn(keys, reply[1], changed=not claimed)
        return id

    async def set_timestamp(
        self, id: str, timestamp: float, *, last_reply: Reply | None = None
    ) -> None:
        """See :meth:`QueueStorage.set_timestamp`.

        Ends this object's lease. When another worker holds a live lease (this one's ran out
        and the message was taken over), that lease is kept; the new time applies after it.
        """
        keys = self._view.found(id)
        reply = json.dumps(last_reply.to_dict()) if last_reply is not None else ""
        names = [keys.msg(id), keys.schedule, keys.leases, keys.held]
        args: list[EncodableT] = [id, timestamp, reply, self.owner]
        found, due = await self._view.run(SET_TIMESTAMP, keys, names, args, notice=timestamp)
        self._view.learn(keys, due, changed=True)
        if not found:
            raise MessageGone(id)

    async def increment_attempts(self, id: str) -> int:
        """See :meth:`QueueStorage.increment_attempts`."""
        keys = self._view.found(id)
        count = int(await self._view.run(INCREMENT, keys, [keys.msg(id)], []))
        if count < 0:
            raise MessageGone(id)
        return count

    async def set_recipients_delivered(self, id: str, indexes: Iterable[int]) -> None:
        """See :meth:`QueueStorage.set_recipients_delivered`."""
        keys = self._view.found(id)
        args = [int(i) for i in indexes]
        if not await self._view.run(DELIVERED, keys, [keys.msg(id)], args):
            raise MessageGone(id)

    async def load(self) -> list[tuple[float, str]]:
        """Every message as ``(timestamp, id)``, oldest first; nothing is kept in memory.

        Pages through the shards' indexes by id, reading each page's times in one pipelined
        round trip: every message present for the whole listing is listed exactly once, and a
        message removed meanwhile is left out.
        """
        found: list[tuple[float, str]] = []
        async for ids in self.iter_ids(_BATCH):
            keys = [self._view.found(id) for id in ids]
            times = await listing.read_times(self._pipe, ids, keys)
            found += [(float(t), id) for id, t in zip(ids, times, strict=True) if t]
        return found

    async def message_ids(self) -> list[str]:
        """Every stored message id, oldest first: the indexes, a page per round trip."""
        return [id async for ids in self.iter_ids(_BATCH) for id in ids]

    async def iter_ids(self, page: int = 500) -> AsyncIterator[list[str]]:
        """See :meth:`QueueStorage.iter_ids`: the shards' indexes merged, a page of each per
        round trip, so the first page of a listing costs one round trip however long the
        queue."""
        await self._view.layout(register=False)
        async for ids in listing.iter_ids(self._pipe, self._view.all(), page):
            yield ids

    async def get_infos(self, ids: Sequence[str]) -> list[MessageInfo]:
        """See :meth:`QueueStorage.get_infos`: one script call per shard and 1000 messages,
        returning the records and the envelopes' metadata but not the messages."""
        keys = [self._view.locate(id) for id in ids]
        return await listing.read_infos(self._pipe, ids, keys, _BATCH)

    async def get_entry(self, id: str) -> StoredMessage:
        """See :meth:`QueueStorage.get_entry`."""
        keys = self._view.found(id)
        flat, held = await self._view.run(GET, keys, [keys.msg(id), keys.held], [id])
        if not flat:
            raise MessageGone(id)
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        version = fields.get(b"v")
        if version != listing.RECORD_VERSION:
            raise EnvelopeFormatError(f"message {id}: unsupported record version {version!r}")
        try:
            envelope = Envelope.from_bytes(fields[b"env"])
            delivered = {int(i) for i in fields[b"delivered"].split(b",") if i}
            attempts = int(fields[b"attempts"])
            timestamp = float(fields[b"ts"])
            reply = fields.get(b"reply")
            last_reply = Reply.from_dict(json.loads(reply)) if reply else None
        except (KeyError, ValueError, TypeError) as exc:
            raise EnvelopeFormatError(f"message {id}: damaged record: {exc!r}") from exc
        everyone = tuple(envelope.recipients)
        pending = tuple(i for i in range(len(everyone)) if i not in delivered)
        envelope.recipients = [everyone[i] for i in pending]
        return StoredMessage(
            id=id,
            envelope=envelope,
            attempts=attempts,
            timestamp=timestamp,
            pending=pending,
            held=bool(held),
            last_reply=last_reply,
            original_recipients=everyone,
        )

    async def remove(self, id: str) -> None:
        """See :meth:`QueueStorage.remove`."""
        keys = self._view.locate(id)
        if keys is None:
            return
        names = [keys.msg(id), keys.index, keys.schedule, keys.leases, keys.held]
        reply = await self._view.run(REMOVE, keys, names, [id])
        self._view.learn(keys, reply[1])

    async def get_info(self) -> dict[str, Any]:
        """``size`` (messages stored), ``held``, ``active`` (leased), ``oldest`` (arrival),
        over every shard; ``shards``, how many; ``moving``, format-1 messages not yet moved
        into the shards (counted in ``size``).

        ``active`` counts leases whose holder may have died and not been taken over yet.
        """
        await self._view.layout(register=False)
        info = await listing.count(self._pipe, self._view.all())
        info["size"] += self._view.legacy
        info["shards"] = self._view.known
        info["moving"] = self._view.legacy
        return info

    async def close(self) -> None:
        """Stop listening for wake-ups and close the connections; idempotent."""
        if self._closed:
            return
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        await self._pipe.join()
        with contextlib.suppress(Exception):
            await self._route.close()

    # -- schedule ------------------------------------------------------------------------------

    async def claim(self, now: float, limit: int) -> list[str]:
        """See :meth:`QueueStorage.claim`.

        Claims from the shards that are due (as far as this object knows, see
        :mod:`smtpq.storage.redis.due`), starting after the shard the previous claim started
        at: first from one shard, for all of ``limit``; when that shard runs dry, from the
        other due shards at once, ``limit`` shared among them, and again from those that
        gave all they were asked, until ``limit`` messages are claimed or no shard is left.
        A shard whose node fails is skipped (its messages wait for the failover); QueueError
        only when nothing was claimed and some shard failed.
        """
        self._ensure_listener()
        if limit <= 0:
            return []
        self._view.now = max(self._view.now, now)
        if self._view.stale():
            await self._view.refresh()
        if self._view.legacy:
            await self._move_some(now)
        todo = self._view.due.claimable(now)
        if todo:
            self._view.due.advance(todo[0])
        claimed: list[str] = []
        failure: QueueError | None = None
        wave = todo[:1]
        while wave:
            left = limit - len(claimed)
            shares = [left // len(wave) + (i < left % len(wave)) for i in range(len(wave))]
            replies = await asyncio.gather(
                *(self._claim(shard, now, share) for shard, share in zip(wave, shares, strict=True))
            )
            more: list[int] = []  # shards that gave all they were asked: they may have more
            for shard, share, reply in zip(wave, shares, replies, strict=True):
                if isinstance(reply, QueueError):
                    failure = reply
                    continue
                claimed += reply
                if len(reply) == share:
                    more.append(shard)
            todo = more + todo[len(wave) :]
            left = limit - len(claimed)
            wave = todo[: min(left, len(todo))] if left > 0 else []
        if failure is not None:
            if not claimed:
                raise failure
            log.warning("claiming from some shards failed: %s", failure)
        return claimed

    async def _claim(self, shard: int, now: float, limit: int) -> list[str] | QueueError:
        """Claim up to ``limit`` from one shard; its failure is returned, not raised."""
        keys = self._view.keys(shard)
        args: list[EncodableT] = [now, limit, now + self.lease_timeout, self.owner]
        try:
            # Quick to give up: the shard is left alone for a moment, the others are served.
            ids, dropped, due = await self._view.run(
                CLAIM, keys, [keys.schedule, keys.leases, keys.held], args, patience=READ_PATIENCE
            )
        except QueueError as exc:
            self._view.due.failed(shard, now)
            return exc
        self._view.claimed(shard, now, len(ids), int(dropped), due)
        return [bytes(i).decode() for i in ids]

    async def renew(self, ids: Sequence[str], now: float) -> None:
        """See :meth:`QueueStorage.renew`; a lease another worker took over is not touched."""
        by_shard: dict[int, list[str]] = {}
        for id in ids:
            keys = self._view.locate(id)
            if keys is not None:
                by_shard.setdefault(keys.shard, []).append(id)
        calls = []
        for shard, members in by_shard.items():
            keys = self._view.keys(shard)
            for start in range(0, len(members), _BATCH):
                args: list[EncodableT] = [now + self.lease_timeout, self.owner]
                args += members[start : start + _BATCH]
                calls.append(
                    (keys, self._view.run(RENEW, keys, [keys.schedule, keys.leases], args))
                )
        failure: BaseException | None = None
        for keys, call in calls:
            try:
                self._view.learn(keys, await call)
            except QueueError as exc:
                failure = exc
        if failure is not None:
            raise failure

    async def release(self, id: str) -> None:
        """See :meth:`QueueStorage.release`; only this object's own lease is released."""
        keys = self._view.locate(id)
        if keys is None:
            return
        names = [keys.msg(id), keys.schedule, keys.leases, keys.held]
        # The time it is due again is stored, not known here: the others look.
        reply = await self._view.run(RELEASE, keys, names, [id, self.owner], notice=-math.inf)
        self._view.learn(keys, reply[1], changed=bool(reply[0]))

    async def next_due(self) -> float | None:
        """See :meth:`QueueStorage.next_due`: from the shards' due times as this object knows
        them (read from Redis when unknown or older than a few seconds)."""
        self._ensure_listener()
        if self._view.stale():
            await self._view.refresh()
        return self._view.due.next_due()

    async def wait(self, timeout: float) -> None:
        """See :meth:`QueueStorage.wait`.

        Woken through pub/sub by any process that writes an unclaimed message or reschedules
        one; also after (re)subscribing, since announcements may have been missed meanwhile.
        Lease expiries are not announced: wait no longer than until :meth:`next_due`.
        """
        self._ensure_listener()
        if not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        self._wake.clear()

    async def flush(self, now: float, ids: Sequence[str] | None = None) -> int:
        """See :meth:`QueueStorage.flush`; the new time is stored (it survives a restart)."""
        if ids is None:
            await self._view.layout(register=False)
            counts = await asyncio.gather(*(self._flush_shard(k, now) for k in self._view.all()))
            return sum(counts)
        by_shard: dict[int, list[str]] = {}
        for id in ids:
            keys = self._view.locate(id)
            if keys is not None:
                by_shard.setdefault(keys.shard, []).append(id)
        counts = await asyncio.gather(
            *(self._flush_ids(self._view.keys(k), now, members) for k, members in by_shard.items())
        )
        return sum(counts)

    async def _flush_shard(self, keys: ShardKeys, now: float) -> int:
        count = 0
        async for ids in listing.iter_ids(self._pipe, [keys], _BATCH):
            count += await self._flush_ids(keys, now, ids)
        return count

    async def _flush_ids(self, keys: ShardKeys, now: float, ids: Sequence[str]) -> int:
        count = 0
        for start in range(0, len(ids), _BATCH):
            batch = ids[start : start + _BATCH]
            names = [keys.schedule, keys.leases, keys.held, *map(keys.msg, batch)]
            done, due = await self._view.run(FLUSH, keys, names, [now, *batch], notice=now)
            self._view.learn(keys, due, changed=bool(done))
            count += int(done)
        return count

    async def set_held(self, id: str, held: bool) -> None:
        """See :meth:`QueueStorage.set_held`."""
        keys = self._view.found(id)
        names = [keys.msg(id), keys.schedule, keys.leases, keys.held]
        args = [id, 1 if held else 0]
        found, due = await self._view.run(
            SET_HELD, keys, names, args, notice=None if held else -math.inf
        )
        self._view.learn(keys, due, changed=not held)
        if int(found) < 0:
            raise MessageGone(id)

    # -- the format-1 layout -------------------------------------------------------------------

    async def migrate(self, now: float) -> int:
        """Move every message of a format-1 queue (all under ``{<tag>}``) into the shards;
        how many are left (their attempts are running under a format-1 worker's lease: run
        this again once those have ended). Workers do this by themselves, a batch per claim;
        ``now`` is the time to compare leases with (the Queue's clock)."""
        await self._view.layout(register=True)
        self._mover.restart()
        left = 0
        while True:
            moved, at_end = await self._mover.step(now, _MOVE_BATCH)
            for shard, due in moved.due.items():
                self._view.learn(self._view.keys(shard), due, changed=True)
            left += moved.waiting
            if at_end:
                if not left:
                    self._view.legacy = 0
                return left

    async def _move_some(self, now: float) -> None:
        """Move a batch of format-1 messages (a worker's share of a queue being upgraded)."""
        try:
            moved, at_end = await self._mover.step(now, _MOVE_BATCH)
        except QueueError as exc:
            log.warning("moving format-1 messages failed: %s", exc)
            return
        for shard, due in moved.due.items():
            self._view.learn(self._view.keys(shard), due, changed=True)
        if moved.moved:
            log.info("moved %d messages of the format-1 layout into the shards", moved.moved)
        if at_end and not moved.moved:
            self._view.legacy = 0  # only leased ones left (if any): look again at the next refresh

    # -- wake-ups ------------------------------------------------------------------------------

    def _ensure_listener(self) -> None:
        if self._listener is not None or self._closed:
            return
        route = self._route
        if isinstance(route, ClusterRoute):
            self._listener = ClusterListener(
                route.client,
                lambda: [(k.slot, k.channel) for k in self._view.all()],
                self._view.heard,
                self._view.missed,
            )
        else:
            assert isinstance(route, ServerRoute)
            self._listener = ServerListener(
                route.client, self.channel, self._view.heard, self._view.missed
            )
        self._listener.start()
