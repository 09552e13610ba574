"""
The Lua scripts of :class:`~balancer.backends.redis.RedisBackend`, and the keys they use.

Every acquire attempt and every release is one ``EVALSHA`` of one of these
scripts, so each step is atomic on the server and costs one round trip.

Key layout (``P`` is ``{namespace}``: one hash tag, so one Redis Cluster slot)::

    P:meta    hash   epoch (random id written at start-up), settle (ms; no grant
                     before it), mapv (digest of the last map applied)
    P:max     hash   channel -> max_jobs, for every known channel (draining too)
    P:inf     hash   channel -> in_flight
    P:drain   set    channels absent from the last map that still have leases
    P:cool    zset   channel -> cooling ends (server ms)
    P:fail    hash   channel -> consecutive failed outcomes
    P:free    set    channels with a free slot (active, not cooling): "random", "p2c"
    P:tok     set    one token "<channel>\\0<k>" per free slot k (in_flight < k <=
                     max_jobs): a uniform pick is a pick weighted by free slots
    P:leases  zset   lease id -> expiry (server ms)
    P:lch     hash   lease id -> channel
    P:tomb    hash   lease id -> "r" (released) / "l" (lost: reclaimed after expiry)
    P:tombx   zset   lease id -> when its tombstone may go (server ms)

Only channel ids, limits, counts, lease ids (which start with their owner's id)
and server times are written: never a credential.

# Invariants (after every script):
#   P:inf[c] == number of leases in P:lch on c, and never negative.
#   c in P:free  iff  c is active (in P:max, not in P:drain, not in P:cool)
#                     and P:inf[c] < P:max[c].
#   "c\\0k" in P:tok  iff  c is active and P:inf[c] < k <= P:max[c].
#   a draining channel with in_flight 0 has been deleted from every key.

Time is the server's (``TIME``), so expiries and cooldowns mean the same thing
to every process whatever their clocks. Work that time makes due (ending
cooldowns, reclaiming expired leases, dropping old tombstones) is done lazily
by whichever script runs next, at most ``LIMIT`` items of each per call, so no
call walks the whole namespace.

Every script starts by comparing the epoch it was given with ``P:meta.epoch``
and answers ``{-1, <epoch>}`` when they differ: the data this process wrote
may be gone (Redis restarted without persistence, or failed over), and it
must re-assert its map and its live leases (``SYNC`` in "adopt" mode) before
retrying.

Common ``ARGV`` of every script:

    ARGV[1]  the epoch the caller knows ("" before the first sync)
    ARGV[2]  ms a "released" tombstone is kept
    ARGV[3]  ms a "lost" tombstone is kept
    ARGV[4]  the pub/sub channel for wake-ups

Wake-ups: a script that makes a slot available where none was (a release or a
reclaimed lease on a full channel, a cooldown ending, a map change) publishes
``"1"`` on ARGV[4]; one that creates a new epoch publishes ``"e"``. A release
on a channel that already had a free slot publishes nothing: nobody can be
waiting for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["ACQUIRE", "KEY_NAMES", "RELEASE", "SYNC", "TRIVIAL", "Script", "keys_for"]

#: The names of the keys, in ``KEYS`` order.
KEY_NAMES = (
    "meta", "max", "inf", "drain", "free", "tok", "cool",
    "fail", "leases", "lch", "tomb", "tombx",
)  # fmt: skip


def keys_for(namespace: str) -> list[str]:
    """Every key of ``namespace``, in ``KEYS`` order, under the one hash tag."""
    return [f"{{{namespace}}}:{name}" for name in KEY_NAMES]


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1 (the name ``EVALSHA`` calls it by)."""

    name: str
    source: str
    sha: str

    @classmethod
    def of(cls, name: str, source: str) -> Script:
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


_PRELUDE = r"""
pcall(redis.replicate_commands)  -- Redis < 7: replicate effects (TIME, SRANDMEMBER)
local META, MAX, INF, DRAIN, FREE, TOK, COOL, FAIL, LEASES, LCH, TOMB, TOMBX =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6],
  KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local SEP = '\0'
local LIMIT = 16
local TOMB_R, TOMB_L, WAKE = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local wake = false

local function num(v)
  if v then return tonumber(v) end
  return 0
end

local function draining(ch) return redis.call('SISMEMBER', DRAIN, ch) == 1 end
local function cooling(ch) return redis.call('ZSCORE', COOL, ch) ~= false end

-- Bring ch's entries in FREE and TOK in line with its state; tokens up to slot
-- hi are cleared (pass the old max_jobs when it was lowered). O(max_jobs).
local function reindex(ch, hi)
  local max = num(redis.call('HGET', MAX, ch))
  local inf = num(redis.call('HGET', INF, ch))
  local active = max > 0 and not draining(ch) and not cooling(ch)
  if active and inf < max then
    redis.call('SADD', FREE, ch)
  else
    redis.call('SREM', FREE, ch)
  end
  if max > hi then hi = max end
  for k = 1, hi do
    if active and k > inf and k <= max then
      redis.call('SADD', TOK, ch .. SEP .. k)
    else
      redis.call('SREM', TOK, ch .. SEP .. k)
    end
  end
  return active and inf < max
end

local function remove_channel(ch)
  local max = num(redis.call('HGET', MAX, ch))
  for k = 1, max do redis.call('SREM', TOK, ch .. SEP .. k) end
  redis.call('HDEL', MAX, ch)
  redis.call('HDEL', INF, ch)
  redis.call('HDEL', FAIL, ch)
  redis.call('SREM', DRAIN, ch)
  redis.call('SREM', FREE, ch)
  redis.call('ZREM', COOL, ch)
end

local function tombstone(id, kind)
  redis.call('HSET', TOMB, id, kind)
  redis.call('ZADD', TOMBX, now + (kind == 'l' and TOMB_L or TOMB_R), id)
end

-- One slot of ch comes back. Returns in_flight, removed.
local function give_back(ch)
  local inf = num(redis.call('HGET', INF, ch))
  if inf <= 0 then return 0, false end  -- never negative
  inf = redis.call('HINCRBY', INF, ch, -1)
  if draining(ch) then
    if inf <= 0 then
      remove_channel(ch)
      return 0, true
    end
    return inf, false
  end
  if not cooling(ch) then
    local max = num(redis.call('HGET', MAX, ch))
    if inf < max then
      redis.call('SADD', FREE, ch)
      redis.call('SADD', TOK, ch .. SEP .. (inf + 1))
      -- Only a channel that was full can have waiters (a channel with a free
      -- slot serves any taker at once): wake them when its first slot frees.
      if inf + 1 >= max then wake = true end
    end
  end
  return inf, false
end

local function reclaim(id)
  local ch = redis.call('HGET', LCH, id)
  redis.call('ZREM', LEASES, id)
  redis.call('HDEL', LCH, id)
  tombstone(id, 'l')
  if ch then give_back(ch) end
end

-- Lazy, bounded upkeep: end due cooldowns, reclaim expired leases, drop old tombstones.
local function housekeeping()
  for _, ch in ipairs(redis.call('ZRANGEBYSCORE', COOL, '-inf', now, 'LIMIT', 0, LIMIT)) do
    redis.call('ZREM', COOL, ch)
    if reindex(ch, 0) then wake = true end
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, LIMIT)) do
    reclaim(id)
  end
  local old = redis.call('ZRANGEBYSCORE', TOMBX, '-inf', now, 'LIMIT', 0, LIMIT)
  if #old > 0 then
    redis.call('HDEL', TOMB, unpack(old))
    redis.call('ZREM', TOMBX, unpack(old))
  end
end

-- Start or extend a cooldown. Returns whether the channel was not cooling.
local function cool(ch, ms)
  redis.call('HSET', FAIL, ch, 0)
  local cur = redis.call('ZSCORE', COOL, ch)
  if cur and tonumber(cur) >= now + ms then return false end
  redis.call('ZADD', COOL, now + ms, ch)
  if not cur then reindex(ch, 0) end
  return not cur
end

-- A channel's figures: max_jobs, in_flight, state (0 active, 1 draining, 2 cooling), cooling ends.
local function figures(ch)
  local max = redis.call('HGET', MAX, ch)
  if not max then return {-1, 0, 0, 0} end
  local inf = num(redis.call('HGET', INF, ch))
  local till = redis.call('ZSCORE', COOL, ch)
  local state = 0
  if draining(ch) then state = 1 elseif till then state = 2 end
  return {tonumber(max), inf, state, num(till)}
end

local function finish(reply)
  if wake then redis.call('PUBLISH', WAKE, '1') end
  return reply
end
"""

_CHECK_EPOCH = r"""
local epoch = redis.call('HGET', META, 'epoch')
if epoch ~= ARGV[1] then return {-1, epoch or ''} end
"""

_RELEASE_ONE = r"""
-- Release lease id with outcome. Returns status (0 unknown, 1 released, 2 lost),
-- channel, in_flight, cooled, removed.
local function release_one(id, outcome, cooldown, failures_to_cool)
  local ch = redis.call('HGET', LCH, id)
  if not ch then
    if redis.call('HGET', TOMB, id) == 'l' then return 2, false, 0, false, false end
    return 0, false, 0, false, false
  end
  redis.call('ZREM', LEASES, id)
  redis.call('HDEL', LCH, id)
  -- NOTE: always leave a tombstone: the owner's renewal may be in flight, and
  -- it must learn "released", not re-assert the lease as lost data.
  tombstone(id, 'r')
  local cooled = false
  if outcome == 'ok' then
    redis.call('HSET', FAIL, ch, 0)
  elseif outcome ~= 'abandoned' then
    local failures = redis.call('HINCRBY', FAIL, ch, 1)
    if outcome == 'throttled' or failures >= failures_to_cool then
      cooled = cool(ch, cooldown)
    end
  end
  local inf, removed = give_back(ch)
  return 1, ch, inf, cooled, removed
end
"""

ACQUIRE = Script.of(
    "acquire",
    _PRELUDE
    + r"""
-- KEYS: see keys_for()
-- ARGV[1..4]: common (epoch, tombstone ms x2, wake channel)
-- ARGV[5] lease id; ARGV[6] pinned channel or ""; ARGV[7] selection
--   ("random", "weighted", "p2c"); ARGV[8] lease ttl (ms)
-- return: {-1, epoch} epoch mismatch
--         {1, now, channel, max_jobs, in_flight} granted
--         {0, now, first lease expiry or -1, first cooldown end or -1, settle,
--            pinned channel's figures (max_jobs -1: unknown)...} nothing free
"""
    + _CHECK_EPOCH
    + r"""
housekeeping()
local id, want, selection, ttl = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])

local held = redis.call('HGET', LCH, id)
if held then  -- a retried call whose first attempt was granted
  local f = figures(held)
  return finish({1, now, held, f[1], f[2]})
end

local function grantable(ch)
  local max = num(redis.call('HGET', MAX, ch))
  return max > 0 and not draining(ch) and not cooling(ch)
    and num(redis.call('HGET', INF, ch)) < max
end

local function load(ch)
  return num(redis.call('HGET', INF, ch)), num(redis.call('HGET', MAX, ch))
end

local function pick()
  if want ~= '' then
    if grantable(want) then return want end
    return false
  end
  if selection == 'weighted' then
    local token = redis.call('SRANDMEMBER', TOK)
    if not token then return false end
    return string.match(token, '^(.*)%z')
  end
  if selection == 'p2c' then
    local two = redis.call('SRANDMEMBER', FREE, 2)
    if #two < 2 then return two[1] or false end
    local a_inf, a_max = load(two[1])
    local b_inf, b_max = load(two[2])
    if b_inf * a_max < a_inf * b_max then return two[2] end
    return two[1]
  end
  return redis.call('SRANDMEMBER', FREE) or false
end

local settle = num(redis.call('HGET', META, 'settle'))
local ch = false
if now >= settle then
  for _ = 1, 3 do
    ch = pick()
    if not ch or grantable(ch) then break end
    reindex(ch, 0)  -- a stale index entry: repair it and pick again
    ch = false
  end
end

if not ch then
  local lease = redis.call('ZRANGE', LEASES, 0, 0, 'WITHSCORES')
  local cooldown = redis.call('ZRANGE', COOL, 0, 0, 'WITHSCORES')
  local reply = {0, now, tonumber(lease[2] or -1), tonumber(cooldown[2] or -1), settle}
  if want ~= '' then
    for _, v in ipairs(figures(want)) do table.insert(reply, v) end
  end
  return finish(reply)
end

local inf = redis.call('HINCRBY', INF, ch, 1)
local max = num(redis.call('HGET', MAX, ch))
redis.call('SREM', TOK, ch .. SEP .. inf)
if inf >= max then redis.call('SREM', FREE, ch) end
redis.call('ZADD', LEASES, now + ttl, id)
redis.call('HSET', LCH, id, ch)
return finish({1, now, ch, max, inf})
""",
)

RELEASE = Script.of(
    "release",
    _PRELUDE
    + _RELEASE_ONE
    + r"""
-- KEYS: see keys_for()
-- ARGV[1..4]: common (epoch, tombstone ms x2, wake channel)
-- ARGV[5] lease id; ARGV[6] outcome ("ok", "failed", "throttled", "abandoned");
-- ARGV[7] cooldown (ms); ARGV[8] failures that cool a channel
-- return: {-1, epoch} epoch mismatch
--         {status (0 unknown, 1 released, 2 lost), now, channel or "",
--          cooled (0/1), removed (0/1), channel's figures (4 values)}
"""
    + _CHECK_EPOCH
    + r"""
housekeeping()
local status, ch, _, cooled, removed = release_one(
  ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]))
local reply = {status, now, ch or '', cooled and 1 or 0, removed and 1 or 0}
local f = {-1, 0, 0, 0}
if ch and not removed then f = figures(ch) end
for _, v in ipairs(f) do table.insert(reply, v) end
return finish(reply)
""",
)

SYNC = Script.of(
    "sync",
    _PRELUDE
    + _RELEASE_ONE
    + r"""
-- Renew this process's leases, run its pending releases, publish its map and
-- read every channel's figures; in "adopt" mode also take over (or create)
-- the epoch and re-assert leases that vanished with lost data.
-- KEYS: see keys_for()
-- ARGV[1..4]: common (epoch, tombstone ms x2, wake channel)
-- ARGV[5] mode: "strict" or "adopt"; ARGV[6] a new epoch id, used if none exists;
-- ARGV[7] grace (ms) with no grants after data loss was detected;
-- ARGV[8] lease ttl (ms); ARGV[9] digest of the map or "" (no map sent);
-- ARGV[10] map pairs n; ARGV[11] leases n; ARGV[12] releases n;
-- ARGV[13] cooldown (ms); ARGV[14] failures that cool a channel;
-- then n x (channel, max_jobs), n x (lease id, channel, max_jobs hint,
-- "1" if the holder knows it has not expired), n x (lease id, outcome).
-- return: {-1, epoch} epoch mismatch (strict mode)
--         {1, now, epoch, settle, lease statuses (one string: "k" kept,
--          "a" re-asserted, "r" released elsewhere, "l" lost),
--          HGETALL max, HGETALL inf, SMEMBERS drain, ZRANGE cool WITHSCORES}
local epoch = redis.call('HGET', META, 'epoch')
if epoch ~= ARGV[1] then
  if ARGV[5] ~= 'adopt' then return {-1, epoch or ''} end
  if not epoch then
    epoch = ARGV[6]
    redis.call('HSET', META, 'epoch', epoch)
    redis.call('HDEL', META, 'mapv')
    if ARGV[1] ~= '' then  -- we knew an epoch: this is data loss, not a fresh namespace
      redis.call('HSET', META, 'settle', now + tonumber(ARGV[7]))
    end
    redis.call('PUBLISH', WAKE, 'e')
  end
end
housekeeping()

local ttl, digest = tonumber(ARGV[8]), ARGV[9]
local n_map, n_leases, n_releases = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local cooldown, failures_to_cool = tonumber(ARGV[13]), tonumber(ARGV[14])
local at = 15

if digest ~= '' and digest ~= redis.call('HGET', META, 'mapv') then
  local wanted = {}
  for i = 0, n_map - 1 do
    local ch, max = ARGV[at + 2 * i], tonumber(ARGV[at + 2 * i + 1])
    wanted[ch] = true
    local old = redis.call('HGET', MAX, ch)
    local was_draining = draining(ch)
    if (not old) or tonumber(old) ~= max or was_draining then
      redis.call('HSET', MAX, ch, max)
      if was_draining then redis.call('SREM', DRAIN, ch) end
      reindex(ch, num(old))
      wake = true
    end
  end
  for _, ch in ipairs(redis.call('HKEYS', MAX)) do
    if not wanted[ch] and not draining(ch) then
      redis.call('SADD', DRAIN, ch)
      if num(redis.call('HGET', INF, ch)) <= 0 then
        remove_channel(ch)
      else
        reindex(ch, 0)
      end
    end
  end
  redis.call('HSET', META, 'mapv', digest)
end
at = at + 2 * n_map

local statuses = {}
for i = 0, n_leases - 1 do
  local id, ch = ARGV[at + 4 * i], ARGV[at + 4 * i + 1]
  local hint, alive = tonumber(ARGV[at + 4 * i + 2]), ARGV[at + 4 * i + 3] == '1'
  local status
  local expiry = redis.call('ZSCORE', LEASES, id)
  if expiry then
    if tonumber(expiry) <= now then
      reclaim(id)
      status = 'l'
    else
      redis.call('ZADD', LEASES, 'XX', now + ttl, id)
      status = 'k'
    end
  else
    local tomb = redis.call('HGET', TOMB, id)
    if tomb then
      status = tomb
    elseif alive then
      -- Gone without a trace while its holder knows it is unexpired: the data
      -- was lost (restart, failover). The job still runs: count it again.
      if not redis.call('HGET', MAX, ch) then
        redis.call('HSET', MAX, ch, hint)
        redis.call('SADD', DRAIN, ch)
      end
      redis.call('HINCRBY', INF, ch, 1)
      redis.call('ZADD', LEASES, now + ttl, id)
      redis.call('HSET', LCH, id, ch)
      reindex(ch, 0)
      status = 'a'
    else
      status = 'l'
    end
  end
  statuses[i + 1] = status
end
at = at + 4 * n_leases

for i = 0, n_releases - 1 do
  release_one(ARGV[at + 2 * i], ARGV[at + 2 * i + 1], cooldown, failures_to_cool)
end

return finish({
  1, now, epoch, num(redis.call('HGET', META, 'settle')), table.concat(statuses),
  redis.call('HGETALL', MAX), redis.call('HGETALL', INF),
  redis.call('SMEMBERS', DRAIN), redis.call('ZRANGE', COOL, 0, -1, 'WITHSCORES'),
})
""",
)

#: The floor the benchmark compares with: a script of three trivial commands.
TRIVIAL = Script.of(
    "trivial",
    r"""
-- KEYS[1] a counter; return: its new value
redis.call('TIME')
redis.call('INCR', KEYS[1])
return redis.call('GET', KEYS[1])
""",
)
