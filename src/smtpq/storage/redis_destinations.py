"""RedisDestinationStore: dead marks, rates and concurrency shared by every worker on a Redis.

The Redis side of :class:`~smtpq.queue.shared.DestinationStore`: one destination's limits hold
for the whole cluster of workers and nodes. It uses keys of its own under the queue's prefix,
two per destination, with the destination as their hash tag, so that every script touches one
slot and the store works on Redis Cluster as it does on one server::

    P dest:{<name>}          hash  until     dead until (epoch seconds; absent: not dead)
                                   error     the last error, as a reply's text
                                   cool      the cool-down that made it dead
                                   probe     the token of the attempt probing it, and
                                   probe_until  when that probe's lease runs out
                                   tat       the message rate's state (GCRA)
                                   ctat      the connection rate's state
    P dest:{<name>}:leases   zset  one member per running attempt (its token), scored by its
                                   lease expiry: the concurrency limit counts the live ones

    P dests:dead             set   the names marked dead, an index for a flush (beside the
                                   marks, not with them: they hash to other slots)

``P`` is the prefix (``smtpq:``); a name with braces is hashed into its tag. Keys expire a day
after their last change (or twice the longest cool-down), so destinations no longer used leave
nothing behind. Times are the workers' clocks, as everywhere in smtpq: keep the hosts' clocks
in step (NTP), or rates drift by their difference.

A worker that dies holds its leases until they run out (``lease_timeout``); a live one renews
them while its attempts run. Every call is one round trip; a destination at its shared limit
is asked again after :data:`~smtpq.queue.shared.BUSY_RETRY` seconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from smtpq.queue.destinations import RATE_TOLERANCE, DeadMark, DestinationLimits
from smtpq.queue.shared import BUSY_RETRY, GRANTED, DestinationStore, Permit

__all__ = ["RedisDestinationStore"]

_DAY = 86400

# KEYS: state, leases. ARGV: now, token, lease expiry, limit, interval ("" = no rate),
# tolerance, probe ("1"/"0"), ttl. Returns {"ok"}, {"busy"} (at the limit, or another
# worker's probe runs), {"rate", start} or {"dead", until, error, cool}.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local probing = false
local until_ = redis.call('HGET', KEYS[1], 'until')
if until_ then
  local err = redis.call('HGET', KEYS[1], 'error') or ''
  local cool = redis.call('HGET', KEYS[1], 'cool') or '0'
  if now < tonumber(until_) or ARGV[7] ~= '1' then return {'dead', until_, err, cool} end
  local holder = redis.call('HGET', KEYS[1], 'probe')
  local probe_until = redis.call('HGET', KEYS[1], 'probe_until')
  if holder and holder ~= ARGV[2] and tonumber(probe_until) > now then return {'busy'} end
  probing = true
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return {'busy'} end
if ARGV[5] ~= '' then
  local interval = tonumber(ARGV[5])
  local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or '0')
  local start = math.max(now, tat - tonumber(ARGV[6]))
  if start > now then return {'rate', string.format('%.6f', start)} end
  redis.call('HSET', KEYS[1], 'tat', string.format('%.6f', math.max(tat, now) + interval))
  redis.call('EXPIRE', KEYS[1], ARGV[8])
end
if probing then
  redis.call('HSET', KEYS[1], 'probe', ARGV[2], 'probe_until', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[8])
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[8])
return {'ok'}
"""

# KEYS: state, leases. ARGV: token.
_RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'probe') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'probe', 'probe_until')
end
return 1
"""

# KEYS: state, leases. ARGV: lease expiry, tokens...
_RENEW = """
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[i])
  if redis.call('HGET', KEYS[1], 'probe') == ARGV[i] then
    redis.call('HSET', KEYS[1], 'probe_until', ARGV[1])
  end
end
return 1
"""

# KEYS: state. ARGV: now, interval, tolerance, ttl. Returns when the connection may open.
_RESERVE = """
local now = tonumber(ARGV[1])
local tat = tonumber(redis.call('HGET', KEYS[1], 'ctat') or '0')
local start = math.max(now, tat - tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'ctat', string.format('%.6f', math.max(tat, start) + tonumber(ARGV[2])))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return string.format('%.6f', start)
"""

# KEYS: state. ARGV: now. Ends a cool-down under way; 1 if it did, 0 if none, -1 if not dead.
_END_COOL_DOWN = """
local until_ = redis.call('HGET', KEYS[1], 'until')
if not until_ then return -1 end
if tonumber(until_) <= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'until', ARGV[1])
return 1
"""

# KEYS: state. ARGV: until, error, cool, ttl.
_MARK_DEAD = """
redis.call('HSET', KEYS[1], 'until', ARGV[1], 'error', ARGV[2], 'cool', ARGV[3])
redis.call('HDEL', KEYS[1], 'probe', 'probe_until')
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


class RedisDestinationStore(DestinationStore):
    """Destination state in Redis, shared by every Queue that uses the same prefix.

    :param client: a ``redis.asyncio.Redis`` or ``RedisCluster``; closed by :meth:`close`.
    :param prefix: the queue's key prefix (the storage's ``prefix``).
    :param lease_timeout: seconds an attempt's lease lasts unless renewed.
    """

    shared = True

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        prefix: str = "smtpq:",
        *,
        lease_timeout: float = 60.0,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("prefix must not contain braces: each destination is a hash tag")
        self.client = client
        self.prefix = prefix
        self.lease_timeout = lease_timeout
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._reserve = client.register_script(_RESERVE)
        self._mark_dead = client.register_script(_MARK_DEAD)
        self._end_cool_down = client.register_script(_END_COOL_DOWN)
        self._dead_index = f"{prefix}dests:dead"

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str = "smtpq:",
        *,
        cluster: bool = False,
        lease_timeout: float = 60.0,
        **redis_kwargs: Any,
    ) -> RedisDestinationStore:
        """A store on the Redis (``cluster``: the Redis Cluster) that ``url`` names."""
        redis_kwargs.setdefault("socket_connect_timeout", 5.0)
        client: aioredis.Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(url, **redis_kwargs)
        else:
            client = aioredis.Redis.from_url(url, **redis_kwargs)
        return cls(client, prefix, lease_timeout=lease_timeout)

    def _keys(self, name: str) -> list[str]:
        tag = name
        if "{" in name or "}" in name or not name:
            tag = hashlib.sha1(name.encode()).hexdigest()[:20]
        state = f"{self.prefix}dest:{{{tag}}}"
        return [state, state + ":leases"]

    async def acquire(
        self, name: str, limits: DestinationLimits, token: str, now: float, *, probe: bool
    ) -> Permit:
        """See :meth:`DestinationStore.acquire`."""
        rate = limits.message_rate
        interval = 1.0 / rate if rate is not None else None
        args: list[str | int] = [
            repr(now),
            token,
            repr(now + self.lease_timeout),
            limits.concurrency,
            repr(interval) if interval is not None else "",
            repr(interval * RATE_TOLERANCE) if interval is not None else "0",
            "1" if probe else "0",
            self._ttl(limits),
        ]
        answer = await self._acquire(keys=self._keys(name), args=args)
        kind = _text(answer[0])
        if kind == "ok":
            return GRANTED
        if kind == "busy":
            return Permit(False, retry_at=now + BUSY_RETRY)
        if kind == "rate":
            return Permit(False, retry_at=float(answer[1]))
        until, error, cool = float(answer[1]), _text(answer[2]), float(answer[3])
        return Permit(False, mark=DeadMark(until, error, cool or limits.cool_down))

    @staticmethod
    def _ttl(limits: DestinationLimits) -> int:
        return int(max(_DAY, 2 * limits.max_cool_down))

    async def release(self, name: str, token: str) -> None:
        """See :meth:`DestinationStore.release`."""
        await self._release(keys=self._keys(name), args=[token])

    async def renew(self, held: Mapping[str, Sequence[str]], now: float) -> None:
        """See :meth:`DestinationStore.renew`: one call per destination."""
        until = repr(now + self.lease_timeout)
        for name, tokens in held.items():
            await self._renew(keys=self._keys(name), args=[until, *tokens])

    async def reserve_connection(self, name: str, rate: float, now: float) -> float:
        """See :meth:`DestinationStore.reserve_connection`."""
        interval = 1.0 / rate
        args: list[str | int] = [repr(now), repr(interval), repr(interval * RATE_TOLERANCE), _DAY]
        return float(await self._reserve(keys=self._keys(name)[:1], args=args))

    async def mark_dead(self, name: str, mark: DeadMark) -> None:
        """See :meth:`DestinationStore.mark_dead`."""
        ttl = int(max(_DAY, 2 * mark.cool_down))
        args: list[str | int] = [repr(mark.until), mark.error, repr(mark.cool_down), ttl]
        await self._mark_dead(keys=self._keys(name)[:1], args=args)
        # After the mark: a worker gone in between leaves a mark that a flush does not end
        # (it runs out by itself), never an index entry without a mark.
        await self.client.sadd(self._dead_index, name)
        await self.client.expire(self._dead_index, ttl)  # as long as the newest mark lives

    async def clear_dead(self, name: str) -> None:
        """See :meth:`DestinationStore.clear_dead`."""
        state = self._keys(name)[0]
        await self.client.hdel(state, "until", "error", "cool", "probe", "probe_until")
        await self.client.srem(self._dead_index, name)

    async def end_cool_downs(self, now: float) -> list[str]:
        """See :meth:`DestinationStore.end_cool_downs`: one call per destination in the index
        of dead ones; names whose mark is gone (cleared, or expired) leave the index."""
        ended: list[str] = []
        for raw in await self.client.smembers(self._dead_index):
            name = _text(raw)
            done = await self._end_cool_down(keys=self._keys(name)[:1], args=[repr(now)])
            if done == 1:
                ended.append(name)
            elif done == -1:
                await self.client.srem(self._dead_index, name)
        return sorted(ended)

    async def dead_marks(self, names: Sequence[str]) -> dict[str, DeadMark]:
        """See :meth:`DestinationStore.dead_marks`."""
        marks: dict[str, DeadMark] = {}
        for name in names:
            until, error, cool = await self.client.hmget(
                self._keys(name)[0], ["until", "error", "cool"]
            )
            if until is not None:
                marks[name] = DeadMark(float(until), _text(error or b""), float(cool or 0))
        return marks

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
