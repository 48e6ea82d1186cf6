"""RedisStorage: one queue shared by any number of Queue processes on any number of hosts.

Everything lives in Redis — records, schedule and leases — so workers need no local state and a
worker that dies loses nothing but its leases. Every change that touches more than one key is one
Lua script (atomic, one round trip); listing walks a sorted set a page at a time, never ``KEYS``.

Layout, format version 1 (``T`` is ``<prefix>{<tag>}:``, e.g. ``smtpq:{q}:``)::

    T msg:<id>   hash   v          format version of this record ("1")
                        env        Envelope.to_bytes(): versioned, checksummed, never pickle
                        ts         next attempt time, Unix epoch seconds (a float's repr)
                        attempts   attempts made so far (integer)
                        delivered  comma-separated indexes (into the recipients as first
                                   written) that are done, ascending; "" when none
                        reply      the Reply that last deferred it, as JSON (absent if none)
    T index      zset   every message id, all with score 0: ordered by id, that is by arrival
                        (ids are time-ordered, see smtpq.storage.base.new_id); load() pages
                        through it with ZRANGEBYLEX, get_info() reads the oldest from it
    T schedule   zset   id -> what a worker waits for: the next attempt time, or the lease
                        expiry while leased. Held messages are absent (unless held while
                        leased: they leave when the attempt ends). claim() takes members whose
                        score is <= now, so a dead worker's lease simply falls due.
    T leases     hash   id -> owner token of the storage object holding the lease
    T held       set    ids that are held (never claimed until released)
    T wake       pub/sub channel: published when a message is written unclaimed or
                 rescheduled, so that waiting workers in any process claim at once

All keys of one queue share the hash tag ``{tag}``: the queue lives in one Redis Cluster slot, and
every script declares the keys it touches. To spread one logical queue over several slots, run
one RedisStorage (and one Queue) per tag — see ``docs/redis.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from smtpq.envelope import Envelope
from smtpq.errors import EnvelopeFormatError, MessageGone, QueueError
from smtpq.reply import Reply
from smtpq.storage.base import MessageInfo, QueueStorage, StoredMessage, id_time, new_id

__all__ = ["FORMAT_VERSION", "RedisStorage"]

log = logging.getLogger(__name__)

#: Version of the record layout described in the module docstring.
FORMAT_VERSION = 1


class _Script:
    """A Lua script, run by its SHA1 (EVALSHA) and loaded when Redis answers NOSCRIPT."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


# KEYS: msg, index, schedule, leases. ARGV: id, env, timestamp, score, owner ("" = unclaimed).
# A retried call (after a lost reply) writes the same values again: idempotent.
_WRITE = _Script("""
redis.call('HSET', KEYS[1], 'v', '1', 'env', ARGV[2], 'ts', ARGV[3], 'attempts', '0',
           'delivered', '')
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[4], ARGV[1], ARGV[5]) end
return 1
""")

# KEYS: msg, schedule, leases, held. ARGV: id, timestamp, reply JSON or "", owner.
# Another owner's lease is left alone: its attempt is running, and the new time applies when
# that attempt ends.
_SET_TIMESTAMP = _Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'ts', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'reply', ARGV[3]) end
local holder = redis.call('HGET', KEYS[3], ARGV[1])
if holder and holder ~= ARGV[4] then return 1 end
if holder then redis.call('HDEL', KEYS[3], ARGV[1]) end
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
return 1
""")

# KEYS: msg. Returns the new count, or -1 when the message is gone.
_INCREMENT = _Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
""")

# KEYS: msg. ARGV: indexes. Returns 0 when the message is gone.
_DELIVERED = _Script("""
local cur = redis.call('HGET', KEYS[1], 'delivered')
if not cur then return 0 end
local seen, list = {}, {}
local function add(s)
  local n = tonumber(s)
  if n and not seen[n] then seen[n] = true; list[#list + 1] = n end
end
for s in string.gmatch(cur, '%d+') do add(s) end
for i = 1, #ARGV do add(ARGV[i]) end
table.sort(list)
redis.call('HSET', KEYS[1], 'delivered', table.concat(list, ','))
return 1
""")

# KEYS: msg, index, schedule, leases, held. ARGV: id.
_REMOVE = _Script("""
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
return 1
""")

# KEYS: msg, held. ARGV: id. Returns {the hash as a flat list (empty when gone), held}.
_GET = _Script("""
return {redis.call('HGETALL', KEYS[1]), redis.call('SISMEMBER', KEYS[2], ARGV[1])}
""")

# KEYS: schedule, leases, held. ARGV: now, limit, lease expiry, owner. A message held while
# it was leased whose lease has run out leaves the schedule here.
_CLAIM = _Script("""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
local check_held = redis.call('SCARD', KEYS[3]) > 0
for _, id in ipairs(due) do
  if check_held and redis.call('SISMEMBER', KEYS[3], id) == 1 then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  else
    redis.call('ZADD', KEYS[1], ARGV[3], id)
    redis.call('HSET', KEYS[2], id, ARGV[4])
    out[#out + 1] = id
  end
end
return out
""")

# KEYS: schedule, leases. ARGV: lease expiry, owner, ids...
_RENEW = _Script("""
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[2] then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
  end
end
return 1
""")

# KEYS: msg, schedule, leases, held. ARGV: id, owner.
_RELEASE = _Script("""
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
local ts = redis.call('HGET', KEYS[1], 'ts')
if ts then redis.call('ZADD', KEYS[2], ts, ARGV[1]) end
return 1
""")

# KEYS: msg, schedule, leases, held. ARGV: id, 1 to hold / 0 to release.
# Returns -1 when the message is gone. A leased message stays leased until its attempt ends.
_SET_HELD = _Script("""
local ts = redis.call('HGET', KEYS[1], 'ts')
if not ts then return -1 end
local leased = redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[4], ARGV[1])
  if not leased then redis.call('ZREM', KEYS[2], ARGV[1]) end
elseif redis.call('SREM', KEYS[4], ARGV[1]) == 1 and not leased then
  redis.call('ZADD', KEYS[2], ts, ARGV[1])
end
return 1
""")

# KEYS: schedule, leases, held, then one msg key per id. ARGV: now, ids (in the same order as
# their msg keys). Returns how many were made due.
_FLUSH = _Script("""
local n = 0
for i = 2, #ARGV do
  local id, msg = ARGV[i], KEYS[i + 2]
  if redis.call('EXISTS', msg) == 1 and redis.call('HEXISTS', KEYS[2], id) == 0
      and redis.call('SISMEMBER', KEYS[3], id) == 0 then
    redis.call('HSET', msg, 'ts', ARGV[1])
    redis.call('ZADD', KEYS[1], ARGV[1], id)
    n = n + 1
  end
end
return n
""")

# KEYS: held, then one msg key per id. ARGV: the ids, in the same order. For each message, {}
# when it is gone, else {v, ts, attempts, delivered, reply, start of env, held}: the start of
# env is the envelope frame's fixed header (29 bytes) and metadata, without the message, so
# that a listing does not carry every message's content out of Redis.
_INFOS = """
local out = {}
for i = 2, #KEYS do
  local f = redis.call('HMGET', KEYS[i], 'v', 'ts', 'attempts', 'delivered', 'reply')
  if f[1] then
    local env = redis.call('HGET', KEYS[i], 'env') or ''
    local head = env
    if #env >= 29 then
      local a, b, c, d = string.byte(env, 10, 13)
      head = string.sub(env, 1, 29 + ((a * 256 + b) * 256 + c) * 256 + d)
    end
    out[#out + 1] = {f[1], f[2] or '', f[3] or '', f[4] or '', f[5] or '', head,
                     redis.call('SISMEMBER', KEYS[1], ARGV[i - 1])}
  else
    out[#out + 1] = {}
  end
end
return out
"""

# Messages listed or flushed per round trip: large enough to amortise the round trip, small
# enough that one script call never blocks Redis for long.
_BATCH = 1000


def _default_owner() -> str:
    """A lease owner token that tells an operator which process holds a lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@contextlib.contextmanager
def _redis_errors(what: str) -> Iterator[None]:
    """Turn a Redis failure into QueueError: the edge answers 451 and the client retries."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise QueueError(f"redis {what} failed: {exc}") from exc


@dataclass(slots=True)
class _Call:
    script: _Script
    args: list[EncodableT]  # the keys, then the arguments
    numkeys: int
    replicate: bool
    wake: bool
    future: asyncio.Future[Any]


class _Pipeliner:
    """Sends the script calls that arrive together in one round trip (automatic pipelining).

    A Queue runs many attempts and enqueues at once; sending each call alone would cost a round
    trip and a pool checkout apiece. Calls wait while a batch is on the wire and go with the next
    one; another batch is sent alongside only when a full one is waiting. With
    ``wait_replicas``, a batch holding a write ends with one ``WAIT``: a group commit. Changes
    that may make a message due are announced by one ``PUBLISH`` per batch, not one per
    message: every worker parses each announcement, so this is what lets workers scale.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        channel: str,
        wait_replicas: int,
        wait_timeout: float,
        max_batch: int = 256,
    ) -> None:
        self._client = client
        self._channel = channel
        self._wait = (wait_replicas, int(wait_timeout * 1000))
        self._max_batch = max_batch
        self._queue: list[_Call] = []
        self._sending = 0  # senders draining the queue (a task's done-callback comes too late)
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(
        self,
        script: _Script,
        keys: Sequence[str],
        args: Sequence[EncodableT],
        replicate: bool,
        wake: bool,
    ) -> Any:
        """Run ``script``; its reply, or ``(reply, replicas that acknowledged)`` to replicate.

        With ``wake``, waiting workers are told (once per batch) that the schedule changed.
        Raises QueueError when Redis fails or the script raises.
        """
        future = asyncio.get_running_loop().create_future()
        call = _Call(script, [*keys, *args], len(keys), replicate, wake, future)
        self._queue.append(call)
        if not self._sending or (len(self._queue) >= self._max_batch and self._sending < 4):
            self._sending += 1
            task = asyncio.get_running_loop().create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def join(self) -> None:
        """Wait until every call made so far has been answered."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # let the calls made in this turn of the loop join the batch
            while self._queue:
                batch = [c for c in self._queue[: self._max_batch] if not c.future.done()]
                del self._queue[: self._max_batch]
                if batch:
                    await self._send(batch)
        finally:
            self._sending -= 1

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._execute(batch)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                # Redis forgot its scripts (it restarted): load them, run those calls again.
                for script in {batch[i].script for i in missing}:
                    await self._client.script_load(script.text)
                again = await self._execute([batch[i] for i in missing])
                for i, result in zip(missing, again, strict=True):
                    results[i] = result
        except (RedisError, OSError) as exc:
            self._fail(batch, f"redis failed: {exc}")
            return
        except Exception as exc:  # a bug here must not leave callers waiting for ever
            log.exception("a batch of redis calls failed unexpectedly")
            self._fail(batch, f"redis batch failed: {exc!r}")
            return
        except BaseException:
            for call in batch:
                call.future.cancel()
            raise
        for call, result in zip(batch, results, strict=True):
            if call.future.done():
                continue  # its caller was cancelled
            if isinstance(result, Exception):
                call.future.set_exception(QueueError(f"redis script failed: {result}"))
            else:
                call.future.set_result(result)

    @staticmethod
    def _fail(batch: list[_Call], why: str) -> None:
        for call in batch:
            if not call.future.done():
                call.future.set_exception(QueueError(why))

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        replicas, wait_ms = self._wait
        replicate = replicas > 0 and any(c.replicate for c in batch)
        commands = [_pack(b"EVALSHA", c.script.sha, c.numkeys, *c.args) for c in batch]
        if replicate:
            # WAIT counts the replicas that have this connection's writes: the whole batch.
            commands.append(_pack(b"WAIT", replicas, wait_ms))
        wake = any(c.wake for c in batch)
        if wake:
            # One announcement for the whole batch, after its changes (same connection, in
            # order): a worker woken by it sees them all.
            commands.append(_pack(b"PUBLISH", self._channel, b"w"))
        pool = self._client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            results: list[Any] = await conn.retry.call_with_retry(
                lambda: _exchange(conn, commands), lambda _: conn.disconnect()
            )
        finally:
            await pool.release(conn)
        if wake:
            results.pop()
        if replicate:
            acked = results.pop()
            results = [
                (r, int(acked)) if c.replicate and not isinstance(r, Exception) else r
                for c, r in zip(batch, results, strict=True)
            ]
        return results


def _pack(*args: EncodableT) -> bytes:
    """One command in the Redis protocol (RESP); redis-py's general packer costs more."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int | float):
            data = repr(arg).encode()
        else:
            data = bytes(arg)
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


async def _exchange(conn: Any, commands: list[bytes]) -> list[Any]:
    """Send commands in one write and read every reply; an error reply is returned in place."""
    await conn.send_packed_command(commands, check_health=False)
    results: list[Any] = []
    for _ in commands:
        try:
            results.append(await conn.read_response())
        except ResponseError as exc:
            results.append(exc)
    return results


class RedisStorage(QueueStorage):
    """A queue in Redis, safe to share between any number of Queue processes.

    :param host, port, db, password, socket_timeout: where Redis is (as in redis-py).
    :param prefix: the start of every key; must not contain ``{`` (see ``tag``).
    :param tag: the queue's name inside ``prefix``; it becomes the Redis Cluster hash tag
        ``{tag}`` shared by all of the queue's keys.
    :param lease_timeout: seconds a claim lasts unless renewed.
    :param wait_replicas: when > 0, ``write`` issues ``WAIT wait_replicas`` and raises
        :class:`~smtpq.errors.QueueError` unless that many replicas acknowledged the write
        within ``wait_timeout`` seconds.
    :param owner: the lease owner token of this storage object (default: host, pid, random).
    :param client: a ready ``redis.asyncio.Redis`` to use instead of connecting (it is closed
        by :meth:`close`).
    :param redis_kwargs: connection options of redis-py (e.g. ``ssl=True``, ``username``,
        ``retry``, ``socket_connect_timeout``, ``unix_socket_path``, ``max_connections`` —
        default 64 — and ``timeout``, how long to wait for a free connection, default 10 s).

    A failed Redis operation raises :class:`~smtpq.errors.QueueError`. Connections are
    re-established on the next operation; each operation retries a broken connection a few
    times with jittered exponential backoff (override with ``retry=``), so that a Redis restart
    costs a few 451s rather than a crash.
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
        lease_timeout: float = 60.0,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        owner: str | None = None,
        client: aioredis.Redis | None = None,
        **redis_kwargs: Any,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("prefix must not contain braces: the tag is the hash tag")
        if not tag or "{" in tag or "}" in tag:
            raise ValueError("tag must be a non-empty name without braces")
        if client is None:
            options = self._pool_options(redis_kwargs)
            path = options.pop("unix_socket_path", None)
            if path is not None:
                options.update(connection_class=aioredis.UnixDomainSocketConnection, path=path)
            else:
                options.update(host=host, port=port)
                if options.pop("ssl", False):
                    options["connection_class"] = aioredis.SSLConnection
            pool = aioredis.BlockingConnectionPool(
                db=db, password=password, socket_timeout=socket_timeout, **options
            )
            client = aioredis.Redis.from_pool(pool)
        self._client = client
        self.prefix = prefix
        self.tag = tag
        self.lease_timeout = lease_timeout
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        #: The token that marks this object's leases.
        self.owner = owner if owner is not None else _default_owner()
        base = f"{prefix}{{{tag}}}:"
        self._msg_prefix = base + "msg:"
        self._index = base + "index"
        self._schedule = base + "schedule"
        self._leases = base + "leases"
        self._held = base + "held"
        #: The pub/sub channel on which changes to the schedule are announced.
        self.channel = base + "wake"
        self._pipeliner = _Pipeliner(client, self.channel, wait_replicas, wait_timeout)
        # A read for listings: run directly, not through the pipeline.
        self._s_infos = client.register_script(_INFOS)
        self._wake = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    @staticmethod
    def _pool_options(kwargs: dict[str, Any]) -> dict[str, Any]:
        """redis-py connection pool options, with this storage's defaults.

        A short retry, so that an outage becomes a 451 in about a second; a bounded pool that
        makes callers wait (``timeout`` seconds at most) for a free connection rather than fail
        when many attempts run at once.
        """
        kwargs = dict(kwargs)
        kwargs.setdefault("max_connections", 64)
        kwargs.setdefault("timeout", 10.0)
        kwargs.setdefault("retry", Retry(EqualJitterBackoff(cap=0.5, base=0.02), 3))
        kwargs.setdefault("retry_on_error", [RedisConnectionError, RedisTimeoutError])
        kwargs.setdefault("socket_connect_timeout", 5.0)
        return kwargs

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "smtpq:",
        tag: str = "q",
        lease_timeout: float = 60.0,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        owner: str | None = None,
        **redis_kwargs: Any,
    ) -> RedisStorage:
        """A storage on the Redis a ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL names.

        The URL carries host, port, password, database (``/0`` or ``?db=0``) and options as
        redis-py reads them; ``redis_kwargs`` add to them.
        """
        pool = aioredis.BlockingConnectionPool.from_url(url, **cls._pool_options(redis_kwargs))
        client = aioredis.Redis.from_pool(pool)
        return cls(
            prefix=prefix,
            tag=tag,
            lease_timeout=lease_timeout,
            wait_replicas=wait_replicas,
            wait_timeout=wait_timeout,
            owner=owner,
            client=client,
        )

    def _key(self, id: str) -> str:
        return self._msg_prefix + id

    def _run(
        self,
        script: _Script,
        keys: Sequence[str],
        args: Sequence[EncodableT],
        *,
        replicate: bool = False,
        wake: bool = False,
    ) -> Awaitable[Any]:
        return self._pipeliner.call(script, keys, args, replicate, wake)

    # -- records -------------------------------------------------------------------------------

    async def write(self, envelope: Envelope, timestamp: float, *, claimed: bool = False) -> str:
        """See :meth:`QueueStorage.write`; with ``wait_replicas``, also replicated."""
        id = new_id(timestamp)
        score = timestamp + self.lease_timeout if claimed else timestamp
        keys = [self._key(id), self._index, self._schedule, self._leases]
        owner = self.owner if claimed else ""
        args: list[EncodableT] = [id, envelope.to_bytes(), timestamp, score, owner]
        if not self.wait_replicas:
            await self._run(_WRITE, keys, args, wake=not claimed)
            return id
        _, acked = await self._run(_WRITE, keys, args, replicate=True, wake=not claimed)
        if acked < self.wait_replicas:
            # Not acknowledged: the client will be told 451 and send it again. Withdraw this
            # copy if we still can, so that the retry does not deliver it twice.
            with contextlib.suppress(QueueError):
                await self.remove(id)
            raise QueueError(f"write reached {acked} of {self.wait_replicas} replicas in time")
        return id

    async def set_timestamp(
        self, id: str, timestamp: float, *, last_reply: Reply | None = None
    ) -> None:
        """See :meth:`QueueStorage.set_timestamp`.

        Ends this object's lease. When another worker holds a live lease (this one's ran out
        and the message was taken over), that lease is kept; the new time applies after it.
        """
        reply = json.dumps(last_reply.to_dict()) if last_reply is not None else ""
        keys = [self._key(id), self._schedule, self._leases, self._held]
        found = await self._run(_SET_TIMESTAMP, keys, [id, timestamp, reply, self.owner], wake=True)
        if not found:
            raise MessageGone(id)

    async def increment_attempts(self, id: str) -> int:
        """See :meth:`QueueStorage.increment_attempts`."""
        count = int(await self._run(_INCREMENT, [self._key(id)], []))
        if count < 0:
            raise MessageGone(id)
        return count

    async def set_recipients_delivered(self, id: str, indexes: Iterable[int]) -> None:
        """See :meth:`QueueStorage.set_recipients_delivered`."""
        args = [int(i) for i in indexes]
        found = await self._run(_DELIVERED, [self._key(id)], args)
        if not found:
            raise MessageGone(id)

    async def load(self) -> list[tuple[float, str]]:
        """Every message as ``(timestamp, id)``, oldest first; nothing is kept in memory.

        Pages through the index by id (ZRANGEBYLEX), reading each page's times in one pipelined
        round trip: every message present for the whole listing is listed exactly once, and a
        message removed meanwhile is left out.
        """
        found: list[tuple[float, str]] = []
        async for ids in self.iter_ids(_BATCH):
            with _redis_errors("load"):
                async with self._client.pipeline(transaction=False) as pipe:
                    for id in ids:
                        pipe.hget(self._key(id), "ts")
                    times = await pipe.execute()
            found += [(float(t), id) for id, t in zip(ids, times, strict=True) if t]
        return found

    async def message_ids(self) -> list[str]:
        """Every stored message id, oldest first: the index, a page per round trip."""
        return [id async for ids in self.iter_ids(_BATCH) for id in ids]

    async def iter_ids(self, page: int = 500) -> AsyncIterator[list[str]]:
        """See :meth:`QueueStorage.iter_ids`: a ZRANGEBYLEX of the index per page, so the first
        page of a listing costs one round trip however long the queue."""
        start = "-"
        while True:
            with _redis_errors("list"):
                members = await self._client.zrangebylex(self._index, start, "+", 0, page)
            ids = [cast(bytes, member).decode() for member in members]
            if ids:
                yield ids
            if len(ids) < page:
                return
            start = "(" + ids[-1]

    async def get_infos(self, ids: Sequence[str]) -> list[MessageInfo]:
        """See :meth:`QueueStorage.get_infos`: one script call per 1000 messages, returning the
        records and the envelopes' metadata but not the messages."""
        infos: list[MessageInfo] = []
        for start in range(0, len(ids), _BATCH):
            batch = list(ids[start : start + _BATCH])
            with _redis_errors("get_infos"):
                rows = await self._s_infos([self._held, *map(self._key, batch)], batch)
            for id, row in zip(batch, rows, strict=True):
                info = self._info(id, row) if row else None
                if info is not None:
                    infos.append(info)
        return infos

    @staticmethod
    def _info(id: str, row: list[Any]) -> MessageInfo | None:
        version, ts, attempts, delivered, reply, head, held = row
        if version != str(FORMAT_VERSION).encode():
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

    async def get_entry(self, id: str) -> StoredMessage:
        """See :meth:`QueueStorage.get_entry`."""
        flat, held = await self._run(_GET, [self._key(id), self._held], [id])
        if not flat:
            raise MessageGone(id)
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        version = fields.get(b"v")
        if version != str(FORMAT_VERSION).encode():
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
        keys = [self._key(id), self._index, self._schedule, self._leases, self._held]
        await self._run(_REMOVE, keys, [id])

    async def get_info(self) -> dict[str, Any]:
        """``size`` (messages stored), ``held``, ``active`` (leased), ``oldest`` (arrival).

        ``active`` counts leases whose holder may have died and not been taken over yet.
        """
        with _redis_errors("get_info"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zcard(self._index)
                pipe.scard(self._held)
                pipe.hlen(self._leases)
                pipe.zrange(self._index, 0, 0)
                size, held, active, first = await pipe.execute()
        oldest = id_time(first[0].decode()) if first else None
        return {"size": size, "held": held, "active": active, "oldest": oldest}

    async def close(self) -> None:
        """Stop listening for wake-ups and close the connections; idempotent."""
        if self._closed:
            return
        self._closed = True
        listener, self._listener = self._listener, None
        while listener is not None and not listener.done():
            listener.cancel()
            # Python 3.11's wait_for (used inside redis-py) can swallow a cancellation that
            # arrives just as its operation completes: insist until the task has ended.
            await asyncio.wait([listener], timeout=0.1)
        await self._pipeliner.join()
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    # -- schedule ------------------------------------------------------------------------------

    async def claim(self, now: float, limit: int) -> list[str]:
        """See :meth:`QueueStorage.claim`: one script call leases up to ``limit`` messages."""
        self._ensure_listener()
        if limit <= 0:
            return []
        keys = [self._schedule, self._leases, self._held]
        args: list[EncodableT] = [now, limit, now + self.lease_timeout, self.owner]
        ids = await self._run(_CLAIM, keys, args)
        return [i.decode() for i in ids]

    async def renew(self, ids: Sequence[str], now: float) -> None:
        """See :meth:`QueueStorage.renew`; a lease another worker took over is not touched."""
        if not ids:
            return
        for start in range(0, len(ids), _BATCH):
            args: list[EncodableT] = [now + self.lease_timeout, self.owner]
            args += ids[start : start + _BATCH]
            await self._run(_RENEW, [self._schedule, self._leases], args)

    async def release(self, id: str) -> None:
        """See :meth:`QueueStorage.release`; only this object's own lease is released."""
        keys = [self._key(id), self._schedule, self._leases, self._held]
        await self._run(_RELEASE, keys, [id, self.owner], wake=True)

    async def next_due(self) -> float | None:
        """See :meth:`QueueStorage.next_due`: the lowest score of the schedule."""
        self._ensure_listener()
        with _redis_errors("next_due"):
            first = await self._client.zrange(self._schedule, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

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
            ids = await self.message_ids()
        count = 0
        for start in range(0, len(ids), _BATCH):
            batch = ids[start : start + _BATCH]
            keys = [self._schedule, self._leases, self._held, *map(self._key, batch)]
            count += int(await self._run(_FLUSH, keys, [now, *batch], wake=True))
        return count

    async def set_held(self, id: str, held: bool) -> None:
        """See :meth:`QueueStorage.set_held`."""
        keys = [self._key(id), self._schedule, self._leases, self._held]
        found = await self._run(_SET_HELD, keys, [id, 1 if held else 0], wake=not held)
        if found < 0:
            raise MessageGone(id)

    # -- wake-ups ------------------------------------------------------------------------------

    def _ensure_listener(self) -> None:
        if self._listener is None and not self._closed:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        """Keep a subscription to the wake channel, reconnecting with backoff."""
        delay = 0.05
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                delay = 0.05
                await self._relay_wakeups(pubsub)
            except (RedisError, OSError) as exc:
                log.warning("redis wake-up subscription lost (%s); retrying in %.2fs", exc, delay)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            # Whatever was announced while we were away is lost: let waiters look again.
            self._wake.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _relay_wakeups(self, pubsub: Any) -> None:
        """Set the wake event for every announcement; ping when idle to detect a dead link."""
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=30.0)
            if message is None:
                if pinged:
                    raise RedisConnectionError("no answer to ping on the wake-up subscription")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False
            if message["type"] in ("message", "subscribe"):
                self._wake.set()
