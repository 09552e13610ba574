"""
The Lua that the scripts of :mod:`.scripts` are built from (see there for the keys).

``PRELUDE`` starts every script: it names the keys, reads the server's clock,
and defines ``give_back`` (one slot comes back: the hot path of a release),
the helpers off the usual path (created on first use by ``slow()``: indexing,
tombstones, cooldowns, bounded housekeeping) and ``upkeep``. ``RELEASE_ONE``
is the release of one lease, shared by ``RELEASE`` and ``SYNC``.
"""

from __future__ import annotations

__all__ = ["PRELUDE", "RELEASE_ONE"]

PRELUDE = r"""
pcall(redis.replicate_commands)  -- Redis < 5: replicate effects (TIME, SRANDMEMBER)
-- Only P:meta is declared (it routes the call to the namespace's Redis Cluster
-- slot); the other keys share its hash tag, hence its slot, and are named here.
local META = KEYS[1]
local P = string.sub(META, 1, -5)  -- "{namespace}:"
local MAX, INF, FREE, TOK, LEASES, LCH = P .. 'max', P .. 'inf', P .. 'free', P .. 'tok',
  P .. 'leases', P .. 'lch'
local SEP = '\0'
local WAKE = P .. 'wake'  -- the pub/sub channel
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
-- The server's clock in microseconds, the second field of every reply: scripts
-- run one at a time, so it orders their replies (a client applies only the
-- newest figures of a channel, whatever order replies arrive in).
local stamp = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local wake = false
local due = 0  -- P:meta.due as this script knows it

local function num(v)
  if v then return tonumber(v) end
  return 0
end

-- Something becomes due at t (a lease expiry, a cooldown end, a tombstone's
-- end): keep P:meta.due a lower bound of all of them.
local function soon(t)
  if t < due then
    due = t
    redis.call('HSET', META, 'due', t)
  end
end

local function finish(reply)
  if wake then redis.call('PUBLISH', WAKE, '1') end
  return reply
end

local give_back, slow  -- defined below

-- One slot of ch comes back. Returns in_flight, removed, and ch's figures
-- afterwards (see figures(); max_jobs -1 once removed).
give_back = function(ch)
  local inf = redis.call('HINCRBY', INF, ch, -1)
  if inf < 0 then  -- it counted no lease: never negative
    if redis.call('HINCRBY', INF, ch, 1) == 0 and not redis.call('HGET', MAX, ch) then
      redis.call('HDEL', INF, ch)
    end
    return 0, false, slow().figures(ch)
  end
  local max = num(redis.call('HGET', MAX, ch))
  if inf + 1 < max and redis.call('SISMEMBER', FREE, ch) == 1 then
    -- It had a free slot and is in FREE: active (not draining, not cooling).
    redis.call('SADD', TOK, ch .. SEP .. (inf + 1))
    return inf, false, {max, inf, 0, 0}
  end
  if redis.call('SISMEMBER', P .. 'drain', ch) == 1 then
    if inf <= 0 then
      slow().remove_channel(ch)
      return 0, true, {-1, 0, 0, 0}
    end
    return inf, false, {max, inf, 1, 0}
  end
  local till = redis.call('ZSCORE', P .. 'cool', ch)
  if till then return inf, false, {max, inf, 2, tonumber(till)} end
  if inf < max then
    redis.call('SADD', TOK, ch .. SEP .. (inf + 1))
    -- Only a channel that was full can have waiters (a channel with a free
    -- slot serves any taker at once, and is in FREE already): wake them when
    -- its first slot frees.
    if inf + 1 >= max then
      redis.call('SADD', FREE, ch)
      wake = true
    end
  end
  return inf, false, {max, inf, 0, 0}
end

-- NOTE: a script's cost is mostly fixed work, and creating a function is
-- some of it: the helpers off the usual path are created on first use.
local H = false
slow = function()
  if H then return H end
  H = {}
  local DRAIN, COOL, FAIL = P .. 'drain', P .. 'cool', P .. 'fail'
  local TOMB, TOMBX = P .. 'tomb', P .. 'tombx'
  local LIMIT = 16
  local NEVER = 1e15  -- ms: "nothing is due"
  local TTL = tonumber(ARGV[2])
  local TOMB_R, TOMB_L = 2 * TTL + 10000, math.max(10 * TTL, 600000)

  local function draining(ch) return redis.call('SISMEMBER', DRAIN, ch) == 1 end
  local function cooling(ch) return redis.call('ZSCORE', COOL, ch) ~= false end
  H.draining = draining

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
  H.reindex = reindex

  function H.remove_channel(ch)
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
    local till = now + (kind == 'l' and TOMB_L or TOMB_R)
    redis.call('HSET', TOMB, id, kind)
    redis.call('ZADD', TOMBX, till, id)
    soon(till)
  end
  H.tombstone = tombstone

  -- A channel's figures: max_jobs, in_flight, state (0 active, 1 draining,
  -- 2 cooling), cooling ends.
  function H.figures(ch)
    local max = redis.call('HGET', MAX, ch)
    if not max then return {-1, 0, 0, 0} end
    local inf = num(redis.call('HGET', INF, ch))
    local till = redis.call('ZSCORE', COOL, ch)
    local state = 0
    if draining(ch) then state = 1 elseif till then state = 2 end
    return {tonumber(max), inf, state, num(till)}
  end

  local function reclaim(id)
    local ch = redis.call('HGET', LCH, id)
    redis.call('ZREM', LEASES, id)
    redis.call('HDEL', LCH, id)
    tombstone(id, 'l')
    if ch then give_back(ch) end
  end
  H.reclaim = reclaim

  local function first(key)
    local item = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if item[2] then return tonumber(item[2]) end
    return NEVER
  end

  -- Bounded upkeep: end due cooldowns, reclaim expired leases, drop old
  -- tombstones (at most LIMIT of each), then record when the next is due.
  function H.housekeeping()
    due = 0  -- no soon() writes meanwhile: P:meta.due is rewritten below
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
    due = math.min(first(COOL), first(LEASES), first(TOMBX))
    redis.call('HSET', META, 'due', due)
  end

  -- Start or extend a cooldown. Returns whether the channel was not cooling.
  function H.cool(ch, ms)
    redis.call('HSET', FAIL, ch, 0)
    local cur = redis.call('ZSCORE', COOL, ch)
    if cur and tonumber(cur) >= now + ms then return false end
    redis.call('ZADD', COOL, now + ms, ch)
    soon(now + ms)
    if not cur then reindex(ch, 0) end
    return not cur
  end
  return H
end

-- Housekeeping only when something is due by P:meta.due (read by the caller;
-- missing after a data loss: due at once).
local function upkeep(known_due)
  due = num(known_due)
  if due <= now then slow().housekeeping() end
end
"""

RELEASE_ONE = r"""
-- Release lease id with outcome; leave a "released" tombstone if mark. Returns
-- status (0 unknown, 1 released, 2 lost), channel, cooled, removed, and the
-- channel's figures afterwards (nil unless released).
local function release_one(id, outcome, cooldown, failures_to_cool, mark)
  local ch = redis.call('HGET', LCH, id)
  if not ch then
    if redis.call('HGET', P .. 'tomb', id) == 'l' then return 2, false, false, false, nil end
    return 0, false, false, false, nil
  end
  redis.call('ZREM', LEASES, id)
  redis.call('HDEL', LCH, id)
  -- NOTE: the tombstone tells an in-flight renewal by the owner "released",
  -- so that it does not re-assert the lease as lost data. Only the owner,
  -- releasing while none of its renewals is in flight, may skip it.
  if mark then slow().tombstone(id, 'r') end
  local cooled = false
  if outcome == 'ok' then
    redis.call('HSET', P .. 'fail', ch, 0)
  elseif outcome ~= 'abandoned' then
    local failures = redis.call('HINCRBY', P .. 'fail', ch, 1)
    if outcome == 'throttled' or failures >= failures_to_cool then
      cooled = slow().cool(ch, cooldown)
    end
  end
  local _, removed, f = give_back(ch)
  return 1, ch, cooled, removed, f
end
"""
