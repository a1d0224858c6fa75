"""Redis backend of the online store: one Lua call applies a whole batch.

Each event's operations run atomically inside the script, guarded by its
``applied`` key: an event seen before changes nothing and gets back the
feature snapshot stored the first time, so a redelivered event (crash,
rebalance) is neither double counted nor decided differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from feature_store.definitions import EventOps

APPLY_BATCH_LUA = r"""
local ttl = tonumber(ARGV[1])
local floor = math.floor
local function windows(reads, vals)
  -- every window read of one key in a single HMGET
  local by_key = {}
  for _, r in ipairs(reads) do
    if r[2] == 'window' then
      local g = by_key[r[3]]
      if not g then g = {fields = {}, spans = {}}; by_key[r[3]] = g end
      local last, first = floor(r[7] / r[5]), #g.fields + 1
      for b = last - r[6] + 1, last do g.fields[#g.fields + 1] = r[4] .. '|' .. b end
      g.spans[#g.spans + 1] = {r[1], first, #g.fields}
    elseif r[2] == 'hget' then
      local v = redis.call('HGET', r[3], r[4])
      if v then vals[r[1]] = tonumber(v) else vals[r[1]] = cjson.null end
    end
  end
  for key, g in pairs(by_key) do
    local got = redis.call('HMGET', key, unpack(g.fields))
    for _, span in ipairs(g.spans) do
      local total = 0
      for j = span[2], span[3] do if got[j] then total = total + tonumber(got[j]) end end
      vals[span[1]] = total
    end
  end
end
local function write(op)
  local kind, key, name, a = op[1], op[2], op[3], op[4]
  if kind == 'bucket' then
    local bucket_s, keep, value, t = a[1], a[2], a[3], a[4]
    local b = floor(t / bucket_s)
    local lo_field = name .. '|lo'
    local now = tonumber(redis.call('HINCRBYFLOAT', key, name .. '|' .. b, value))
    if now ~= value then return end  -- an existing bucket: nothing to clean up
    -- a new bucket: drop the buckets that fell out of window + lateness (bounded memory)
    local new_lo = b - keep + 1
    local lo = tonumber(redis.call('HGET', key, lo_field))
    if lo == nil then
      redis.call('HSET', key, lo_field, new_lo)
    elseif b < lo then
      redis.call('HDEL', key, name .. '|' .. b)  -- later than the allowed lateness: not counted
    elseif new_lo > lo then
      local stop = math.min(new_lo - 1, lo + 4 * keep)
      for x = lo, stop do redis.call('HDEL', key, name .. '|' .. x) end
      redis.call('HSET', key, lo_field, new_lo)
    end
  elseif kind == 'hmax' then
    local cur = tonumber(redis.call('HGET', key, name))
    if (not cur) or a[1] > cur then redis.call('HSET', key, name, a[1]) end
  elseif kind == 'lpush_trim' then
    redis.call('LPUSH', key, name)
    redis.call('LTRIM', key, 0, a[1] - 1)
  elseif kind == 'sadd' then
    redis.call('SADD', key, name)
  elseif kind == 'zincr' then
    redis.call('ZINCRBY', key, a[1], name)
  elseif kind == 'expire' then
    redis.call('EXPIRE', key, a[1])
  end
end
local out = {}
for i = 2, #ARGV do
  local ev = cjson.decode(ARGV[i])
  local prior = redis.call('GET', ev.d)
  if prior then
    out[#out + 1] = {0, prior}
  else
    local vals = {}
    windows(ev.pre, vals)
    for _, op in ipairs(ev.w) do write(op) end
    windows(ev.post, vals)
    local snap = cjson.encode(vals)
    redis.call('SET', ev.d, snap, 'EX', ttl)
    out[#out + 1] = {1, snap}
  end
end
return out
"""


def _decode(rows: Sequence[Any]) -> list[tuple[bool, dict[str, float | None]]]:
    return [(bool(applied), orjson.loads(snap)) for applied, snap in rows]


def _args(batch: Sequence[EventOps], dedup_ttl_s: int) -> list[Any]:
    # cjson turns an empty list into an object; it is only iterated, so both work.
    return [dedup_ttl_s, *(orjson.dumps(ops.to_wire()) for ops in batch)]


class RedisOnlineStore:
    """Applies compiled feature operations in one round trip per batch (sync API)."""

    def __init__(self, client: redis.Redis, dedup_ttl_s: int) -> None:
        self.client = client
        self.dedup_ttl_s = dedup_ttl_s
        self._script = client.register_script(APPLY_BATCH_LUA)

    def apply_batch(self, batch: Sequence[EventOps]) -> list[tuple[bool, dict[str, float | None]]]:
        """Apply each event once; returns (newly_applied, feature snapshot) per event."""
        if not batch:
            return []
        return _decode(self._script(args=_args(batch, self.dedup_ttl_s)))


class AsyncRedisOnlineStore:
    """The asyncio twin of :class:`RedisOnlineStore`, used by the stream agents."""

    def __init__(self, client: aioredis.Redis, dedup_ttl_s: int) -> None:
        self.client = client
        self.dedup_ttl_s = dedup_ttl_s
        self._script = client.register_script(APPLY_BATCH_LUA)

    async def apply_batch(self, batch: Sequence[EventOps]) -> list[tuple[bool, dict[str, float | None]]]:
        if not batch:
            return []
        return _decode(await self._script(args=_args(batch, self.dedup_ttl_s)))


async def read_recent_and_top(client: aioredis.Redis, set_keys: Sequence[str], top_key: str,
                              top_n: int) -> tuple[list[set[str]], list[str]]:
    """Members of each set in ``set_keys`` and the ``top_n`` best of a sorted set, one round trip."""
    pipe = client.pipeline(transaction=False)
    for key in set_keys:
        pipe.smembers(key)
    pipe.zrevrange(top_key, 0, max(top_n - 1, 0))
    *sets, top = await pipe.execute()
    return ([{m.decode() for m in s} for s in sets], [m.decode() for m in top])
