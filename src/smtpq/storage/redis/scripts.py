"""The Lua scripts of RedisStorage: every change that touches more than one key is one script.

Each script declares every key it touches (``KEYS``), and all of them are keys of one shard (or,
for the layout and migration scripts, of the queue as a whole), so each runs in one Redis Cluster
slot. Keys are named in :mod:`smtpq.storage.redis.layout`; ``S`` below is a shard's key prefix,
``Q`` the queue's.

A script that changes a shard's schedule also returns the shard's *due time* afterwards: the
lowest score of its schedule (a next attempt time or a lease expiry), or nil when the schedule is
empty. The storage keeps these per shard, so that it knows which shards have work without asking
(see :mod:`smtpq.storage.redis.due`).
"""

from __future__ import annotations

import hashlib

__all__ = [
    "CLAIM",
    "DELIVERED",
    "DUE",
    "FLUSH",
    "GET",
    "INCREMENT",
    "INFOS",
    "LAYOUT",
    "MOVE_COPY",
    "MOVE_DONE",
    "MOVE_MARK",
    "RELEASE",
    "REMOVE",
    "RENEW",
    "SCRIPTS",
    "SET_HELD",
    "SET_TIMESTAMP",
    "WRITE",
    "Script",
]


class Script:
    """A Lua script, run by its SHA1 (EVALSHA) and loaded when Redis answers NOSCRIPT."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.sha[:8]})"


# The lowest score of a schedule: what the storage learns from every script that changes it.
_DUE = """
local function due(schedule)
  local first = redis.call('ZRANGE', schedule, 0, 0, 'WITHSCORES')
  return first[2] or false
end
"""


def _script(body: str, *, due: bool = False) -> Script:
    return Script((_DUE if due else "") + body)


# KEYS: S schedule. Returns the shard's due time.
DUE = _script("return due(KEYS[1])", due=True)

# KEYS: S msg, S index, S schedule, S leases. ARGV: id, env, timestamp, score, owner ("" =
# unclaimed). A retried call (after a lost reply) writes the same values again: idempotent.
WRITE = _script(
    """
redis.call('HSET', KEYS[1], 'v', '1', 'env', ARGV[2], 'ts', ARGV[3], 'attempts', '0',
           'delivered', '')
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[4], ARGV[1], ARGV[5]) end
return {1, due(KEYS[3])}
""",
    due=True,
)

# KEYS: S msg, S schedule, S leases, S held. ARGV: id, timestamp, reply JSON or "", owner.
# Another owner's lease is left alone: its attempt is running, and the new time applies when
# that attempt ends. Returns {found, due}.
SET_TIMESTAMP = _script(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, due(KEYS[2])} end
redis.call('HSET', KEYS[1], 'ts', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'reply', ARGV[3]) end
local holder = redis.call('HGET', KEYS[3], ARGV[1])
if holder and holder ~= ARGV[4] then return {1, due(KEYS[2])} end
if holder then redis.call('HDEL', KEYS[3], ARGV[1]) end
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
return {1, due(KEYS[2])}
""",
    due=True,
)

# KEYS: S msg. Returns the new count, or -1 when the message is gone.
INCREMENT = _script(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""
)

# KEYS: S msg. ARGV: indexes. Returns 0 when the message is gone.
DELIVERED = _script(
    """
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
"""
)

# KEYS: S msg, S index, S schedule, S leases, S held. ARGV: id. Returns {1, due}.
REMOVE = _script(
    """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
return {1, due(KEYS[3])}
""",
    due=True,
)

# KEYS: S msg, S held. ARGV: id. Returns {the hash as a flat list (empty when gone), held}.
GET = _script(
    """
return {redis.call('HGETALL', KEYS[1]), redis.call('SISMEMBER', KEYS[2], ARGV[1])}
"""
)

# KEYS: S schedule, S leases, S held. ARGV: now, limit, lease expiry, owner. A message held
# while it was leased whose lease has run out leaves the schedule here. Returns {the claimed
# ids, how many due ones left because held, due}.
CLAIM = _script(
    """
local due_ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out, dropped = {}, 0
local check_held = redis.call('SCARD', KEYS[3]) > 0
for _, id in ipairs(due_ids) do
  if check_held and redis.call('SISMEMBER', KEYS[3], id) == 1 then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    dropped = dropped + 1
  else
    redis.call('ZADD', KEYS[1], ARGV[3], id)
    redis.call('HSET', KEYS[2], id, ARGV[4])
    out[#out + 1] = id
  end
end
return {out, dropped, due(KEYS[1])}
""",
    due=True,
)

# KEYS: S schedule, S leases. ARGV: lease expiry, owner, ids... Returns the due time.
RENEW = _script(
    """
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[2] then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
  end
end
return due(KEYS[1])
""",
    due=True,
)

# KEYS: S msg, S schedule, S leases, S held. ARGV: id, owner. Returns {released, due}.
RELEASE = _script(
    """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return {0, due(KEYS[2])} end
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {1, due(KEYS[2])}
end
local ts = redis.call('HGET', KEYS[1], 'ts')
if ts then redis.call('ZADD', KEYS[2], ts, ARGV[1]) end
return {1, due(KEYS[2])}
""",
    due=True,
)

# KEYS: S msg, S schedule, S leases, S held. ARGV: id, 1 to hold / 0 to release.
# Returns {-1 when the message is gone else 1, due}. A leased message stays leased until its
# attempt ends.
SET_HELD = _script(
    """
local ts = redis.call('HGET', KEYS[1], 'ts')
if not ts then return {-1, due(KEYS[2])} end
local leased = redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[4], ARGV[1])
  if not leased then redis.call('ZREM', KEYS[2], ARGV[1]) end
elseif redis.call('SREM', KEYS[4], ARGV[1]) == 1 and not leased then
  redis.call('ZADD', KEYS[2], ts, ARGV[1])
end
return {1, due(KEYS[2])}
""",
    due=True,
)

# KEYS: S schedule, S leases, S held, then one S msg key per id. ARGV: now, ids (in the same
# order as their msg keys). Returns {how many were made due, due}.
FLUSH = _script(
    """
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
return {n, due(KEYS[1])}
""",
    due=True,
)

# KEYS: S held, then one S msg key per id. ARGV: the ids, in the same order. For each message,
# {} when it is gone, else {v, ts, attempts, delivered, reply, start of env, held}: the start
# of env is the envelope frame's fixed header (29 bytes) and metadata, without the message, so
# that a listing does not carry every message's content out of Redis.
INFOS = _script(
    """
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
)

# KEYS: Q layout, Q (format 1) index, Q moving. ARGV: this writer's shard count, or 0 to only
# read. Returns {the most shards any writer has used, format-1 messages still to move}.
LAYOUT = _script(
    """
local known = tonumber(redis.call('HGET', KEYS[1], 'shards') or '0')
local mine = tonumber(ARGV[1])
if mine > known then
  redis.call('HSET', KEYS[1], 'shards', ARGV[1], 'format', '2')
  known = mine
end
return {known, redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3])}
"""
)

# Moving a format-1 message into its shard, in three steps, each idempotent; a mover holds a
# lease on the move (in Q moving), so that two movers never copy one message twice.
#
# 1. MOVE_MARK — KEYS: Q msg, Q index, Q schedule, Q leases, Q held, Q moving, Q moving:<id>.
#    ARGV: id, new id, now, mover's lease expiry. A message whose attempt is running (a live
#    lease of a format-1 worker) is left for later: {'leased'}. Otherwise its record is renamed
#    out of the old layout's reach (format-1 workers no longer see it) and returned:
#    {'move', new id, held, the record as a flat list}; {'busy'} while another mover's lease on
#    it runs, {'gone'} when there is nothing to move.
MOVE_MARK = _script(
    """
local id, now = ARGV[1], tonumber(ARGV[3])
local until_ = redis.call('ZSCORE', KEYS[6], id)
if until_ then
  if tonumber(until_) > now then return {'busy'} end
  redis.call('ZADD', KEYS[6], ARGV[4], id)
  return {'move', redis.call('HGET', KEYS[7], 'to'), redis.call('HGET', KEYS[7], 'held'),
          redis.call('HGETALL', KEYS[7])}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], id)
  return {'gone'}
end
if redis.call('HEXISTS', KEYS[4], id) == 1 then
  local score = redis.call('ZSCORE', KEYS[3], id)
  if score and tonumber(score) > now then return {'leased'} end
end
local held = tostring(redis.call('SISMEMBER', KEYS[5], id))
redis.call('RENAME', KEYS[1], KEYS[7])
redis.call('HSET', KEYS[7], 'to', ARGV[2], 'held', held)
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', KEYS[3], id)
redis.call('HDEL', KEYS[4], id)
redis.call('SREM', KEYS[5], id)
redis.call('ZADD', KEYS[6], ARGV[4], id)
return {'move', ARGV[2], held, redis.call('HGETALL', KEYS[7])}
"""
)

# 2. MOVE_COPY — KEYS: S msg, S index, S schedule, S held, S migrated:<new id>. ARGV: new id,
#    held (0/1), then the record's fields and values. Copies once: a copy already made (and
#    perhaps delivered and removed since) is never made again. Returns {1 copied, 0 copied
#    before, -1 another message has that id (never overwritten), due}.
MOVE_COPY = _script(
    """
if not redis.call('SET', KEYS[5], '1', 'NX', 'EX', 604800) then return {0, due(KEYS[3])} end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[5])
  return {-1, due(KEYS[3])}
end
local ts = '0'
for i = 3, #ARGV, 2 do
  local field = ARGV[i]
  if field ~= 'to' and field ~= 'held' then
    redis.call('HSET', KEYS[1], field, ARGV[i + 1])
    if field == 'ts' then ts = ARGV[i + 1] end
  end
end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[4], ARGV[1])
else
  redis.call('ZADD', KEYS[3], ts, ARGV[1])
end
return {1, due(KEYS[3])}
""",
    due=True,
)

# 3. MOVE_DONE — KEYS: Q moving, Q moving:<id>. ARGV: id.
MOVE_DONE = _script(
    """
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""
)

#: Every script, for loading them on a node that lacks them.
SCRIPTS = (
    DUE,
    WRITE,
    SET_TIMESTAMP,
    INCREMENT,
    DELIVERED,
    REMOVE,
    GET,
    CLAIM,
    RENEW,
    RELEASE,
    SET_HELD,
    FLUSH,
    INFOS,
    LAYOUT,
    MOVE_MARK,
    MOVE_COPY,
    MOVE_DONE,
)
