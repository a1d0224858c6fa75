"""Redis backend of the online store.

Writes: one Lua call applies a whole batch. Each event's operations run
atomically inside the script, guarded by its ``applied`` key: an event seen
before changes nothing and gets back the feature snapshot stored the first
time, so a redelivered event (crash, rebalance) is neither double counted
nor decided differently.

Reads: one pipelined round trip for one entity or many, sync or asyncio; the
window arithmetic is the same :func:`~feature_store.definitions.finalize`
the write path uses.

Layout per entity (key ``{prefix}:e:{entity}:{token}``, a hash):
``{feature}|{component}|{bucket}`` bucket values, ``{feature}|lo`` oldest kept
bucket, ``{feature}|v`` / ``{feature}|t`` last value and its time, ``@|t`` time
of the latest event. Distinct counts use one HyperLogLog key per bucket,
recent values a sorted set by time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from feature_store.definitions import EventOps, FeatureSet, combine, finalize, vector_reads
from feature_store.keys import KeyedHasher, KeySpace

APPLY_BATCH_LUA = r"""
local ttl = tonumber(ARGV[1])
local floor = math.floor

local function reads(list, vals)
  local by_key = {}
  for _, r in ipairs(list) do
    local kind = r[2]
    if kind == 'window' then
      -- every window read of one key in a single HMGET
      local g = by_key[r[3]]
      if not g then g = {fields = {}, spans = {}}; by_key[r[3]] = g end
      for _, m in ipairs(r[7]) do
        local first = #g.fields + 1
        for b = r[5], r[6] do g.fields[#g.fields + 1] = r[4] .. '|' .. m[1] .. '|' .. b end
        g.spans[#g.spans + 1] = {r[1] .. '|' .. m[1], m[2], first, #g.fields}
      end
    elseif kind == 'hget' then
      -- as stored (text): cjson would round a number to 14 digits
      local v = redis.call('HGET', r[3], r[4])
      if v then vals[r[1]] = v else vals[r[1]] = cjson.null end
    elseif kind == 'hll' then
      local keys = {}
      for b = r[4], r[5] do keys[#keys + 1] = r[3] .. '|' .. b end
      vals[r[1]] = redis.call('PFCOUNT', unpack(keys))
    end
  end
  for key, g in pairs(by_key) do
    local got = redis.call('HMGET', key, unpack(g.fields))
    for _, span in ipairs(g.spans) do
      local acc = nil
      for j = span[3], span[4] do
        local v = tonumber(got[j])
        if v then
          if acc == nil then acc = v
          elseif span[2] == 'add' then acc = acc + v
          elseif span[2] == 'min' then if v < acc then acc = v end
          elseif v > acc then acc = v end
        end
      end
      if acc == nil then
        if span[2] == 'add' then acc = 0 else acc = cjson.null end
      end
      vals[span[1]] = acc
    end
  end
end

local function bucket(key, name, a)
  local bucket_s, keep, t, comps = a[1], a[2], a[3], a[4]
  local b = floor(t / bucket_s)
  local new = false
  for i, c in ipairs(comps) do
    local f = name .. '|' .. c[1] .. '|' .. b
    if c[2] == 'add' then
      local v = tonumber(redis.call('HINCRBYFLOAT', key, f, c[3]))
      if i == 1 and v == c[3] then new = true end
    else
      local cur = tonumber(redis.call('HGET', key, f))
      if cur == nil and i == 1 then new = true end
      if cur == nil or (c[2] == 'min' and c[3] < cur) or (c[2] == 'max' and c[3] > cur) then
        redis.call('HSET', key, f, c[3])
      end
    end
  end
  if not new then return end
  -- a new bucket: drop buckets that fell out of window + delay + lateness (bounded memory)
  local lo_field = name .. '|lo'
  local new_lo = b - keep + 1
  local lo = tonumber(redis.call('HGET', key, lo_field))
  local drop_from, drop_to = nil, nil
  if lo == nil then
    redis.call('HSET', key, lo_field, new_lo)
  elseif b < lo then
    drop_from, drop_to = b, b  -- later than the allowed lateness: not counted
  elseif new_lo > lo then
    drop_from, drop_to = lo, math.min(new_lo - 1, lo + 4 * keep)
    redis.call('HSET', key, lo_field, new_lo)
  end
  if drop_from then
    for x = drop_from, drop_to do
      for _, c in ipairs(comps) do redis.call('HDEL', key, name .. '|' .. c[1] .. '|' .. x) end
    end
  end
end

local function write(op)
  local kind, key, name, a = op[1], op[2], op[3], op[4]
  if kind == 'bucket' then
    bucket(key, name, a)
  elseif kind == 'last' then
    -- a[3] is the time as text: Lua would print the number with 14 digits only
    local cur = tonumber(redis.call('HGET', key, name .. '|t'))
    if (not cur) or a[1] >= cur then
      redis.call('HSET', key, name .. '|t', a[3], name .. '|v', a[2])
    end
  elseif kind == 'pfadd' then
    local k = key .. '|' .. floor(a[2] / a[1])
    redis.call('PFADD', k, name)
    redis.call('EXPIRE', k, a[3])
  elseif kind == 'zlast' then
    redis.call('ZADD', key, 'GT', a[1], name)
    redis.call('ZREMRANGEBYRANK', key, 0, -(a[2] + 1))
    redis.call('EXPIRE', key, a[3])
  elseif kind == 'sadd' then
    redis.call('SADD', key, name)
    redis.call('EXPIRE', key, a[1])
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
  elseif redis.call('EXISTS', ev.x) == 1 then
    out[#out + 1] = {0, '{"erased":true}'}  -- the subject was erased: never recreate its data
  else
    local vals = {}
    reads(ev.pre, vals)
    for _, op in ipairs(ev.w) do write(op) end
    reads(ev.post, vals)
    local snap = cjson.encode(vals)
    redis.call('SET', ev.d, snap, 'EX', ttl)
    out[#out + 1] = {1, snap}
  end
end
return out
"""

Snapshot = dict[str, Any]


def _decode(rows: Sequence[Any]) -> list[tuple[bool, Snapshot]]:
    return [(bool(applied), orjson.loads(snap)) for applied, snap in rows]


def _wire(ops: EventOps, keys: KeySpace) -> bytes:
    doc = ops.to_wire()
    doc["x"] = keys.tombstone_of(ops.entity_key)
    return orjson.dumps(doc)


class _ReadPlan:
    """The pipelined commands that read feature vectors at time ``at``, and how to turn replies into values."""

    def __init__(self, fs: FeatureSet, keys: KeySpace, hasher: KeyedHasher) -> None:
        self.fs, self.keys, self.hasher = fs, keys, hasher

    def queue(self, pipe: Any, entity_id: str, at: float) -> list[tuple[str, Any]]:
        key = self.keys.entity(self.fs.entity, self.hasher.token(self.fs.entity, entity_id))
        pre, post = vector_reads(self.fs, key, at)
        fields: list[str] = []
        plan: list[tuple[str, Any]] = []
        for r in pre:  # after the last event, "previous" is the latest
            fields.append(r[3])
            plan.append(("field", r[0]))
        for r in post:
            if r[1] == "window":
                name, first, last, modes = r[3], r[4], r[5], r[6]
                for suffix, mode in modes:
                    start = len(fields)
                    fields.extend(f"{name}|{suffix}|{b}" for b in range(first, last + 1))
                    plan.append(("span", (f"{name}|{suffix}", mode, start, len(fields))))
            else:  # hll
                pipe.pfcount(*[f"{r[2]}|{b}" for b in range(r[3], r[4] + 1)])
                plan.append(("hll", r[0]))
        pipe.hmget(key, fields) if fields else pipe.exists(key)
        plan.append(("hmget", None))
        return plan

    def values(self, plan: list[tuple[str, Any]], replies: list[Any], at: float) -> dict[str, Any]:
        raw: dict[str, Any] = {}
        hmget = replies[-1] if isinstance(replies[-1], list) else []
        hll_replies = iter(replies[:-1])
        field_index = 0
        for kind, arg in plan:
            if kind == "field":
                v = hmget[field_index] if field_index < len(hmget) else None
                field_index += 1
                raw[arg] = _number(v)
            elif kind == "span":
                name, mode, start, end = arg
                raw[name] = combine(mode, [float(v) for v in hmget[start:end] if v is not None])
            elif kind == "hll":
                raw[arg] = next(hll_replies)
        return finalize(self.fs, raw, at)


def _number(v: bytes | None) -> Any:
    if v is None:
        return None
    try:
        return float(v)
    except ValueError:
        return v.decode()


class RedisOnlineStore:
    """Sync store: batch writes in one round trip, typed reads of one or many entities."""

    def __init__(self, client: redis.Redis, dedup_ttl_s: int, keys: KeySpace | None = None,
                 hasher: KeyedHasher | None = None) -> None:
        self.client = client
        self.dedup_ttl_s = dedup_ttl_s
        self.keys = keys or KeySpace("kestrel")
        self.hasher = hasher or KeyedHasher(b"kestrel-dev-only-hash-key")
        self._script = client.register_script(APPLY_BATCH_LUA)

    def apply_batch(self, batch: Sequence[EventOps]) -> list[tuple[bool, Snapshot]]:
        """Apply each event once; returns (newly_applied, stored components) per event."""
        if not batch:
            return []
        return _decode(self._script(args=[self.dedup_ttl_s, *(_wire(o, self.keys) for o in batch)]))

    def read(self, fs: FeatureSet, entity_id: str, at: float | None = None) -> dict[str, Any]:
        """One entity's feature vector at ``at`` (default now); a missing entity gives the defaults."""
        return self.read_batch(fs, [entity_id], at)[0]

    def read_batch(self, fs: FeatureSet, entity_ids: Sequence[str], at: float | None = None) -> list[dict[str, Any]]:
        """Feature vectors of many entities in one round trip."""
        at = time.time() if at is None else at
        reader = _ReadPlan(fs, self.keys, self.hasher)
        pipe = self.client.pipeline(transaction=False)
        plans = [reader.queue(pipe, e, at) for e in entity_ids]
        return _split(reader, plans, pipe.execute(), at)


class AsyncRedisOnlineStore:
    """The asyncio twin of :class:`RedisOnlineStore`, used by the stream agents and HTTP views."""

    def __init__(self, client: aioredis.Redis, dedup_ttl_s: int, keys: KeySpace | None = None,
                 hasher: KeyedHasher | None = None) -> None:
        self.client = client
        self.dedup_ttl_s = dedup_ttl_s
        self.keys = keys or KeySpace("kestrel")
        self.hasher = hasher or KeyedHasher(b"kestrel-dev-only-hash-key")
        self._script = client.register_script(APPLY_BATCH_LUA)

    async def apply_batch(self, batch: Sequence[EventOps]) -> list[tuple[bool, Snapshot]]:
        if not batch:
            return []
        return _decode(await self._script(args=[self.dedup_ttl_s, *(_wire(o, self.keys) for o in batch)]))

    async def read(self, fs: FeatureSet, entity_id: str, at: float | None = None) -> dict[str, Any]:
        return (await self.read_batch(fs, [entity_id], at))[0]

    async def read_batch(self, fs: FeatureSet, entity_ids: Sequence[str],
                         at: float | None = None) -> list[dict[str, Any]]:
        at = time.time() if at is None else at
        reader = _ReadPlan(fs, self.keys, self.hasher)
        pipe = self.client.pipeline(transaction=False)
        plans = [reader.queue(pipe, e, at) for e in entity_ids]
        return _split(reader, plans, await pipe.execute(), at)


def _split(reader: _ReadPlan, plans: list[list[tuple[str, Any]]], replies: list[Any],
           at: float) -> list[dict[str, Any]]:
    out, i = [], 0
    for plan in plans:
        n = sum(1 for kind, _ in plan if kind in ("hll", "hmget"))
        out.append(reader.values(plan, replies[i:i + n], at))
        i += n
    return out


async def read_recent_and_top(client: aioredis.Redis, set_keys: Sequence[str], top_key: str,
                              top_n: int) -> tuple[list[set[str]], list[str]]:
    """Members of each set in ``set_keys`` and the ``top_n`` best of a sorted set, one round trip."""
    pipe = client.pipeline(transaction=False)
    for key in set_keys:
        pipe.smembers(key)
    pipe.zrevrange(top_key, 0, max(top_n - 1, 0))
    *sets, top = await pipe.execute()
    return ([{m.decode() for m in s} for s in sets], [m.decode() for m in top])
