"""
The Lua scripts of :class:`~balancer.backends.redis.RedisBackend`, and the keys they use.

Every acquire attempt and every release is one ``EVALSHA`` of one of these
scripts, so each step is atomic on the server and costs one round trip. Each
script is the shared Lua of :mod:`.lua` followed by its own body here.

Key layout (``P`` is ``{namespace}``: one hash tag, so one Redis Cluster slot)::

    P:meta    hash   epoch (random id written at start-up), settle (ms; no grant
                     before it), mapv (digest of the last map applied), due (ms;
                     no lease expiry, cooldown end or tombstone end is earlier)
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
call walks the whole namespace. ``P:meta.due`` (read with the epoch, in the
same ``HMGET``) says when the next such item is due: every script that adds
one lowers it if needed, and ``ACQUIRE`` / ``RELEASE`` do the upkeep only once
it has passed (``SYNC`` always does it, and recomputes ``due``), so the usual
acquire or release pays one field read for it instead of three range scans.

Each hot script is a handful of commands (the cost of a script is mostly its
``redis.call`` commands): ``ACQUIRE`` trusts the free-slot index (``P:free`` /
``P:tok``, kept exact by every script) for draining and cooling, and checks the
count itself after its ``HINCRBY`` (a stale entry is undone and repaired);
``RELEASE`` skips the "released" tombstone when the owner releases with none of
its renewals in flight (nobody can ask about that lease again but by id, and
an unknown id answers "unknown" either way).

Redis Cluster: a script declares one key, ``P:meta``, and derives the others'
names from it. Declared keys only route the call to a slot; every key of the
namespace shares the ``{namespace}`` hash tag, hence that slot and node.
XX Redis Cluster: all keys share one hash tag; scripts declare one of them
(``P:meta``, which routes the call to that slot) and name the others, which
live in the same slot. Only a single server is tested.

Every script starts by comparing the epoch it was given with ``P:meta.epoch``
and answers ``{-1, <epoch>}`` when they differ: the data this process wrote
may be gone (Redis restarted without persistence, or failed over), and it
must re-assert its map and its live leases (``SYNC`` in "adopt" mode) before
retrying.

Common ``ARGV`` of every script:

    ARGV[1]  the epoch the caller knows ("" before the first sync)
    ARGV[2]  the caller's lease ttl (ms): a "released" tombstone is kept
             2 x ttl + 10 s (it must outlive the holder's next renewal), a
             "lost" one 10 x ttl, at least 10 min (it answers late releases)

Wake-ups: a script that makes a slot available where none was (a release or a
reclaimed lease on a full channel, a cooldown ending, a map change) publishes
``"1"`` on ``P:wake``; one that creates a new epoch publishes ``"e"``. A release
on a channel that already had a free slot publishes nothing: nobody can be
waiting for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from .lua import PRELUDE, RELEASE_ONE

__all__ = [
    "ACQUIRE",
    "KEY_NAMES",
    "RELEASE",
    "RELEASE_STATUS",
    "SYNC",
    "Script",
    "keys_for",
    "text",
]

#: The names of the keys; scripts declare only the first (``KEYS[1]``, ``P:meta``).
KEY_NAMES = (
    "meta", "max", "inf", "drain", "free", "tok", "cool",
    "fail", "leases", "lch", "tomb", "tombx",
)  # fmt: skip


def keys_for(namespace: str) -> list[str]:
    """Every key of ``namespace``, under the one hash tag (``P:meta`` first)."""
    return [f"{{{namespace}}}:{name}" for name in KEY_NAMES]


#: A release's status in a reply, by its code (``RELEASE``'s first value).
RELEASE_STATUS: tuple[Literal["unknown", "released", "lost"], ...] = ("unknown", "released", "lost")


def text(value: Any) -> str:
    """A string of a script's reply (bytes from redis-py, maybe str from coredis)."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1 (the name ``EVALSHA`` calls it by)."""

    name: str
    source: str
    sha: str

    @classmethod
    def of(cls, name: str, source: str) -> Script:
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


ACQUIRE = Script.of(
    "acquire",
    PRELUDE
    + r"""
-- KEYS[1]: P:meta (see keys_for())
-- ARGV[1..2]: common (epoch, lease ttl ms)
-- ARGV[3] lease id; ARGV[4] pinned channel or ""; ARGV[5] selection
--   ("random", "weighted", "p2c"); ARGV[6] lease ttl (ms)
-- return: {-1, epoch} epoch mismatch
--         {1, stamp, channel, max_jobs, in_flight} granted
--         {0, stamp, first lease expiry or -1, first cooldown end or -1, settle,
--            pinned channel's figures (max_jobs -1: unknown)...} nothing free
local meta = redis.call('HMGET', META, 'epoch', 'settle', 'due')
if meta[1] ~= ARGV[1] then return {-1, meta[1] or ''} end
upkeep(meta[3])
local id, want, selection, ttl = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local settle = num(meta[2])

local function load(ch)
  return num(redis.call('HGET', INF, ch)), num(redis.call('HGET', MAX, ch))
end

-- A channel from the free-slot index (FREE holds exactly the active channels
-- with a free slot, TOK their free slots).
local function pick()
  if want ~= '' then
    if redis.call('SISMEMBER', FREE, want) == 1 then return want end
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

local ch, inf, max = false, 0, 0
if now >= settle then
  for _ = 1, 3 do
    ch = pick()
    if not ch then break end
    inf = redis.call('HINCRBY', INF, ch, 1)
    max = num(redis.call('HGET', MAX, ch))
    if inf <= max then break end
    -- A stale index entry (full, or gone): undo, repair it and pick again.
    if redis.call('HINCRBY', INF, ch, -1) <= 0 and max == 0 then redis.call('HDEL', INF, ch) end
    slow().reindex(ch, 0)
    ch = false
  end
end

if ch and redis.call('HSETNX', LCH, id, ch) == 0 then
  redis.call('HINCRBY', INF, ch, -1)  -- a retried call whose first attempt was granted
  ch = false
end

if not ch then
  local held = redis.call('HGET', LCH, id)
  if held then  -- a retried call whose first attempt was granted
    local f = slow().figures(held)
    return finish({1, stamp, held, f[1], f[2]})
  end
  local lease = redis.call('ZRANGE', LEASES, 0, 0, 'WITHSCORES')
  local cooldown = redis.call('ZRANGE', P .. 'cool', 0, 0, 'WITHSCORES')
  local reply = {0, stamp, tonumber(lease[2] or -1), tonumber(cooldown[2] or -1), settle}
  if want ~= '' then
    for _, v in ipairs(slow().figures(want)) do table.insert(reply, v) end
  end
  return finish(reply)
end

redis.call('SREM', TOK, ch .. SEP .. inf)
if inf >= max then redis.call('SREM', FREE, ch) end
redis.call('ZADD', LEASES, now + ttl, id)
soon(now + ttl)
return finish({1, stamp, ch, max, inf})
""",
)

RELEASE = Script.of(
    "release",
    PRELUDE
    + RELEASE_ONE
    + r"""
-- KEYS[1]: P:meta (see keys_for())
-- ARGV[1..2]: common (epoch, lease ttl ms)
-- ARGV[3] lease id; ARGV[4] outcome ("ok", "failed", "throttled", "abandoned");
-- ARGV[5] cooldown (ms); ARGV[6] failures that cool a channel;
-- ARGV[7] "0": no "released" tombstone (the owner, with no renewal in flight);
--   anything else or absent: leave one
-- return: {-1, epoch} epoch mismatch
--         {status (0 unknown, 1 released, 2 lost), stamp, channel or "",
--          cooled (0/1), removed (0/1), channel's figures (4 values)}
local meta = redis.call('HMGET', META, 'epoch', 'due')
if meta[1] ~= ARGV[1] then return {-1, meta[1] or ''} end
upkeep(meta[2])
local status, ch, cooled, removed, f = release_one(
  ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] ~= '0')
local reply = {status, stamp, ch or '', cooled and 1 or 0, removed and 1 or 0}
for _, v in ipairs(f or {-1, 0, 0, 0}) do table.insert(reply, v) end
return finish(reply)
""",
)

SYNC = Script.of(
    "sync",
    PRELUDE
    + RELEASE_ONE
    + r"""
-- Renew this process's leases, run its pending releases, publish its map and
-- read every channel's figures; in "adopt" mode also take over (or create)
-- the epoch and re-assert leases that vanished with lost data.
-- KEYS[1]: P:meta (see keys_for())
-- ARGV[1..2]: common (epoch, lease ttl ms)
-- ARGV[3] mode: "strict" or "adopt"; ARGV[4] a new epoch id, used if none exists;
-- ARGV[5] grace (ms) with no grants after data loss was detected;
-- ARGV[6] lease ttl (ms); ARGV[7] digest of the map or "" (no map sent);
-- ARGV[8] map pairs n; ARGV[9] leases n; ARGV[10] releases n;
-- ARGV[11] cooldown (ms); ARGV[12] failures that cool a channel;
-- then n x (channel, max_jobs), n x (lease id, channel, max_jobs hint,
-- "1" if the holder knows it has not expired), n x (lease id, outcome).
-- return: {-1, epoch} epoch mismatch (strict mode)
--         {1, stamp, epoch, settle, lease statuses (one string: "k" kept,
--          "a" re-asserted after data loss, "r" released elsewhere, "l" lost),
--          HGETALL max, HGETALL inf, SMEMBERS drain, ZRANGE cool WITHSCORES,
--          release statuses (one string, a digit a release: as RELEASE's status,
--          "0" unknown, "1" released, "2" lost)}
local epoch = redis.call('HGET', META, 'epoch')
-- Only a sync that finds the epoch changed (data was lost) may re-create a
-- lease: otherwise a lease missing from Redis was released (by id, elsewhere),
-- and renewing must never bring it back, whatever the releaser's ttl.
local lost_data = epoch ~= ARGV[1]
if epoch ~= ARGV[1] then
  if ARGV[3] ~= 'adopt' then return {-1, epoch or ''} end
  if not epoch then
    epoch = ARGV[4]
    redis.call('HSET', META, 'epoch', epoch)
    redis.call('HDEL', META, 'mapv')
    if ARGV[1] ~= '' then  -- we knew an epoch: this is data loss, not a fresh namespace
      redis.call('HSET', META, 'settle', now + tonumber(ARGV[5]))
    end
    redis.call('PUBLISH', WAKE, 'e')
  end
end
local h = slow()
local reindex, remove_channel, reclaim, draining = h.reindex, h.remove_channel, h.reclaim,
  h.draining
local DRAIN, COOL, TOMB = P .. 'drain', P .. 'cool', P .. 'tomb'
h.housekeeping()  -- always (bounded): a sync also repairs P:meta.due

local ttl, digest = tonumber(ARGV[6]), ARGV[7]
local n_map, n_leases, n_releases = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local cooldown, failures_to_cool = tonumber(ARGV[11]), tonumber(ARGV[12])
local at = 13

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
    elseif alive and not lost_data then
      status = 'r'  -- released elsewhere, its tombstone gone or never written
    elseif alive then
      -- Gone with the data (restart, failover) while its holder knows it is
      -- unexpired. The job still runs: count it again.
      if not redis.call('HGET', MAX, ch) then
        redis.call('HSET', MAX, ch, hint)
        redis.call('SADD', DRAIN, ch)
      end
      redis.call('HINCRBY', INF, ch, 1)
      redis.call('ZADD', LEASES, now + ttl, id)
      soon(now + ttl)
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

-- NOTE: the caller learns what each release found: one that found its lease
-- reclaimed ("lost") did not give a slot back.
local released = {}
for i = 0, n_releases - 1 do
  released[i + 1] = release_one(
    ARGV[at + 2 * i], ARGV[at + 2 * i + 1], cooldown, failures_to_cool, true)
end

return finish({
  1, stamp, epoch, num(redis.call('HGET', META, 'settle')), table.concat(statuses),
  redis.call('HGETALL', MAX), redis.call('HGETALL', INF),
  redis.call('SMEMBERS', DRAIN), redis.call('ZRANGE', COOL, 0, -1, 'WITHSCORES'),
  table.concat(released),
})
""",
)
