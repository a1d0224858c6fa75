"""Redis backend of the online store.

Writes: one Lua call applies a whole batch. Each event's operations run
atomically inside the script, guarded by its ``applied`` key: an event seen
before changes nothing and gets back the feature snapshot stored the first
time, so a redelivered event (crash, rebalance) is neither double counted
nor decided differently.

Reads: one round trip for one entity or many, sync or asyncio: a ``GET`` /
``MGET`` of the entities' heads, decoded in Python
(:mod:`feature_store.read_path`). The write script keeps each head in step
with the buckets, so that a read touches one stored number per feature
instead of every bucket of every window. Reads a head cannot serve (before
the entity's newest bucket; sets with delayed windows) run the bucket script,
whose arithmetic is the same :func:`~feature_store.definitions.finalize`
the write path uses.

Layout per entity (key ``{prefix}:e:{entity}:{token}``, a hash):
``{series}@{bucket_s}|{component}|{bucket}`` bucket values,
``{series}@{bucket_s}|lo`` oldest kept bucket, ``{feature}|v`` /
``{feature}|t`` last value and its time, ``@|t`` time of the latest event.
Distinct counts use a sorted set (value -> latest time) under the same key
prefix, recent values a sorted set by time. The head of feature set ``fs`` is
the string ``{entity key}|@{fs.name}`` (:class:`~feature_store.definitions.HeadLayout`),
with the entity's TTL.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from feature_store.definitions import (
    COMPONENTS,
    EventOps,
    EventUnit,
    FeatureSet,
    GlobalScore,
    TimeSince,
    Windowed,
    finalize,
)
from feature_store.keys import KeyedHasher, KeySpace, escape_glob
from feature_store.read_path import PAST, HeadReader

LUA_READS = r"""
local floor = math.floor

-- Number formatting is the costliest step of building field names in Redis's
-- Lua (about 1 µs each): format each bucket number once per call.
local bucket_text = {}
local function bs(b)
  local s = bucket_text[b]
  if not s then s = tostring(b); bucket_text[b] = s end
  return s
end

-- Values of many fields of one hash. A small hash is a listpack, where every
-- HMGET field is a linear scan: fetching it whole and looking up in a Lua
-- table is then several times cheaper.
local function hvalues(key, fields)
  if redis.call('HLEN', key) <= 128 then
    local flat, map, got = redis.call('HGETALL', key), {}, {}
    for i = 1, #flat, 2 do map[flat[i]] = flat[i + 1] end
    for i, f in ipairs(fields) do got[i] = map[f] or false end
    return got
  end
  return redis.call('HMGET', key, unpack(fields))
end

-- Combine bucket values into one value per span {name, mode, field positions}:
-- add -> sum (0 when empty), min / max -> extreme (null when empty).
local function combine_spans(got, spans, vals)
  for _, span in ipairs(spans) do
    local acc = nil
    for _, j in ipairs(span[3]) do
      local v = tonumber(got[j])
      if v then
        if acc == nil then acc = v
        elseif span[2] == 'add' then acc = acc + v
        elseif span[2] == 'min' then if v < acc then acc = v end
        elseif v > acc then acc = v end
      end
    end
    if acc == nil then
      if span[2] == 'add' then acc = '0' else acc = cjson.null end
    else
      acc = string.format('%.17g', acc)  -- cjson would keep only 14 digits
    end
    vals[span[1]] = acc
  end
end

local function reads(list, vals)
  local by_key = {}
  for _, r in ipairs(list) do
    local kind = r[2]
    if kind == 'window' then
      -- every window read of one key in a single HMGET, each field once
      local g = by_key[r[3]]
      if not g then g = {fields = {}, index = {}, spans = {}}; by_key[r[3]] = g end
      for _, m in ipairs(r[7]) do
        local idx, prefix = {}, r[4] .. '|' .. m[1] .. '|'
        for b = r[5], r[6] do
          local f = prefix .. bs(b)
          local at = g.index[f]
          if not at then g.fields[#g.fields + 1] = f; at = #g.fields; g.index[f] = at end
          idx[#idx + 1] = at
        end
        g.spans[#g.spans + 1] = {r[1] .. '|' .. m[1], m[2], idx}
      end
    elseif kind == 'hget' then
      -- as stored (text): cjson would round a number to 14 digits
      local v = redis.call('HGET', r[3], r[4])
      if v then vals[r[1]] = v else vals[r[1]] = cjson.null end
    elseif kind == 'zcount' then
      vals[r[1]] = redis.call('ZCOUNT', r[3], r[4], '(' .. r[5])
    end
  end
  for key, g in pairs(by_key) do
    local got = hvalues(key, g.fields)
    combine_spans(got, g.spans, vals)
  end
end

"""

LUA_PLAN = r"""
-- The entity's head for the current event's feature set (see definitions.HeadLayout): doubles `H`,
-- strings `V` (false: none), its spec `HS` (`HS.ho`: a head-only set, whose head is its whole state);
-- nil when no event is being applied.
local H, V, HS = nil, nil, nil

-- The reads of one entity's vector at time `at`, from a feature set's template:
-- phase 'pre' (previous event's time and values) or 'post' (windows, distinct counts).
-- With the entity's head `H` (write script), an undelayed window or a distinct count read at or
-- after its newest bucket is one stored value; otherwise it is combined from the buckets.
local NO_BUCKET = -9007199254740992

local function from_head(vals, name, modes, H, top_at, starts, buckets, last)
  local top = H[top_at]
  if top ~= NO_BUCKET and last < top then
    -- a head-only set keeps no buckets: a read before its newest bucket sees the entity as of that bucket
    if not (HS and HS.ho) then return false end
    last = top
  end
  local k = last - top
  for i, m in ipairs(modes) do
    local v = nil
    if k < buckets then v = H[starts[i] + k] end
    if v == nil or v ~= v then
      if m[2] == 'add' then v = '0' else v = cjson.null end
    else
      v = string.format('%.17g', v)  -- cjson would keep only 14 digits
    end
    vals[name .. '|' .. m[1]] = v
  end
  return true
end

local function plan_reads(tpl, key, at, phase, vals, H)
  local list = {}
  for _, f in ipairs(tpl) do
    if f[1] == 'h' then
      if phase == 'pre' then
        if H and HS and HS.ho then  -- the head holds the previous event's time and last values
          if f[3] == '@|t' then
            local x = H[HS.T]
            if x == x then vals[f[2]] = string.format('%.17g', x) else vals[f[2]] = cjson.null end
          else
            vals[f[2]] = V[HS.Vi[f[2]]] or cjson.null
          end
        else
          list[#list + 1] = {f[2], 'hget', key, f[3]}
        end
      end
    elseif phase == 'post' then
      if f[1] == 'w' then
        local last = floor((at - f[6]) / f[4])
        if not (H and f[8] and #f[9] > 0 and from_head(vals, f[2], f[7], H, f[8], f[9], f[5], last)) then
          list[#list + 1] = {f[2], 'window', key, f[3], last - f[5] + 1, last, f[7]}
        end
      else
        local last = floor((at - f[5]) / f[3])
        local top = H and f[6] and H[f[6]]
        if top and (top == NO_BUCKET or last >= top) then
          local k, n = last - top, 0
          if k < f[4] then n = H[f[6] + 1 + k] end
          vals[f[2]] = n
        else
          list[#list + 1] = {f[2], 'zcount', key .. '|' .. f[2], (last - f[4] + 1) * f[3], (last + 1) * f[3]}
        end
      end
    end
  end
  return list
end
"""

LUA_HEAD = r"""
-- Combine a value into an aggregate; NaN is "none" (an empty min / max).
local function combine(mode, acc, v)
  if mode == 'add' then return acc + v end
  if acc ~= acc then return v end
  if (mode == 'min' and v < acc) or (mode == 'max' and v > acc) then return v end
  return acc
end

-- A head rebuilt from what is stored (buckets, sorted sets, last values): exact, for an entity
-- whose head is missing (new, expired, or written by a version without heads).
local function build_head(key, hs)
  local h, v = {}, {}
  for i = 1, hs.n do h[i] = 0 end
  for name, s in pairs(hs.S) do
    local lo = nil
    if not hs.ho then lo = tonumber(redis.call('HGET', key, name .. '|lo')) end
    local top = NO_BUCKET
    if lo then top = lo + s[2] - 1 end
    h[s[1]] = top
    for _, win in ipairs(s[3]) do
      local w, got = win[1], nil
      if lo then
        local fields = {}
        for _, c in ipairs(win[2]) do
          local prefix = name .. '|' .. c[1] .. '|'
          for x = top - w + 1, top do fields[#fields + 1] = prefix .. bs(x) end
        end
        got = redis.call('HMGET', key, unpack(fields))
      end
      for i, c in ipairs(win[2]) do
        local acc = 0
        if c[2] ~= 'add' then acc = 0 / 0 end
        for k = w - 1, 0, -1 do  -- S[k] covers buckets top-w+1+k .. top: accumulate from the newest
          local x = got and tonumber(got[(i - 1) * w + k + 1])
          if x then acc = combine(c[2], acc, x) end
          h[c[3] + k] = acc
        end
      end
    end
  end
  for name, d in pairs(hs.D) do
    local zkey, at, bucket_s, w = key .. '|' .. name, d[1], d[2], d[3]
    local newest = redis.call('ZREVRANGE', zkey, 0, 0, 'WITHSCORES')
    if newest[2] then
      local top = floor(tonumber(newest[2]) / bucket_s)
      h[at] = top
      for k = 0, w - 1 do h[at + 1 + k] = redis.call('ZCOUNT', zkey, (top - w + 1 + k) * bucket_s, '+inf') end
    else
      h[at] = NO_BUCKET
    end
  end
  if hs.ho then  -- a head-only set keeps nothing else: a missing head is an entity with nothing stored
    if hs.T > 0 then h[hs.T] = 0 / 0 end
    for i = 1, #hs.V do v[i] = false end
    return h, v
  end
  if hs.T > 0 then h[hs.T] = tonumber(redis.call('HGET', key, '@|t')) or 0 / 0 end
  for i, name in ipairs(hs.V) do v[i] = redis.call('HGET', key, name .. '|v') end
  return h, v
end

local function load_head(key, hs)
  local blob = redis.call('GET', key .. hs.sfx)
  if not blob then
    local h, v = build_head(key, hs)
    return h, v, false
  end
  local h = {struct.unpack(hs.fmt, blob)}
  local pos, v = h[hs.n + 1], {}
  h[hs.n + 1] = nil
  for i = 1, #hs.V do
    local len
    len, pos = struct.unpack('<I4', blob, pos)
    if len == 4294967295 then v[i] = false else v[i] = string.sub(blob, pos, pos + len - 1); pos = pos + len end
  end
  return h, v, blob
end

local function save_head(key, hs)
  local parts = {struct.pack(hs.fmt, unpack(H, 1, hs.n))}
  for i = 1, #hs.V do
    if V[i] then
      parts[#parts + 1] = struct.pack('<I4', #V[i]) .. V[i]
    else
      parts[#parts + 1] = struct.pack('<I4', 4294967295)  -- none
    end
  end
  local blob = table.concat(parts)
  redis.call('SET', key .. hs.sfx, blob, 'EX', hs.ttl)
  return blob
end

-- This event's values `vals` (component -> value) reached bucket `b` of series `s`: update its
-- suffix totals. A new newest bucket slides each window by d (the buckets in between are empty);
-- the newest or a late bucket is in every suffix that reaches back to it.
local function head_series(s, b, vals)
  local top = H[s[1]]
  local d = b - top
  for _, win in ipairs(s[3]) do
    local w = win[1]
    for _, c in ipairs(win[2]) do
      local mode, v, p = c[2], vals[c[1]], c[3]
      if d > 0 then
        for k = 0, w - 1 do
          if k + d < w then H[p + k] = combine(mode, H[p + k + d], v) else H[p + k] = v end
        end
      else
        for k = 0, w - 1 + d do H[p + k] = combine(mode, H[p + k], v) end
      end
    end
  end
  if d > 0 then H[s[1]] = b end
end

-- A distinct value moved from bucket `xo` (nil: unseen) to `xn` as of an event in bucket `bt`.
local function head_distinct(d, bt, xo, xn)
  local at, w = d[1], d[3]
  local top = H[at]
  if bt > top then
    local shift = bt - top
    for k = 0, w - 1 do
      if k + shift < w then H[at + 1 + k] = H[at + 1 + k + shift] else H[at + 1 + k] = 0 end
    end
    H[at] = bt
    top = bt
  end
  if xo == nil or xn > xo then
    local first = top - w + 1  -- D[k] counts values last seen at or after bucket first + k
    local from = 0
    if xo then from = math.max(0, xo - first + 1) end
    for k = from, math.min(w - 1, xn - first) do H[at + 1 + k] = H[at + 1 + k] + 1 end
  end
end

"""

APPLY_BATCH_LUA = LUA_READS + LUA_PLAN + LUA_HEAD + r"""
-- The entity hash's field names as they were when this event began (fetched once, if needed).
local event_fields = nil
local function fields_before(key)
  if event_fields == nil then event_fields = redis.call('HKEYS', key) end
  return event_fields
end

local function bucket(key, name, a)
  local bucket_s, keep, t, comps, late = a[1], a[2], a[3], a[4], a[5]
  local b = floor(t / bucket_s)
  if HS.ho then  -- the head is the whole state: no bucket fields, no `lo` (the head's newest bucket is it)
    local s = HS.S[name]
    local top = H[s[1]]
    if top ~= NO_BUCKET and b < top - late then return end
    local vals = {}
    for _, c in ipairs(comps) do vals[c[1]] = c[3] end
    head_series(s, b, vals)
    return
  end
  local lo_field = name .. '|lo'
  local lo = tonumber(redis.call('HGET', key, lo_field))
  -- the newest bucket is lo + keep - 1; an event more than `late` buckets older is not counted
  if lo and b < lo + keep - 1 - late then return end
  if H and HS.S[name] then
    local vals = {}
    for _, c in ipairs(comps) do vals[c[1]] = c[3] end
    head_series(HS.S[name], b, vals)
  end
  local new = false
  for i, c in ipairs(comps) do
    local f = name .. '|' .. c[1] .. '|' .. bs(b)
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
  local new_lo = b - keep + 1
  if lo == nil then
    redis.call('HSET', key, lo_field, new_lo)
  elseif new_lo > lo then
    redis.call('HSET', key, lo_field, new_lo)
    if new_lo - lo <= 4 then
      for x = lo, new_lo - 1 do
        for _, c in ipairs(comps) do redis.call('HDEL', key, name .. '|' .. c[1] .. '|' .. bs(x)) end
      end
    else
      -- a long gap: delete the fields that exist rather than walk every empty bucket
      local prefix, dead = name .. '|', {}
      local plen = #prefix
      for _, f in ipairs(fields_before(key)) do
        if string.sub(f, 1, plen) == prefix then
          local fb = tonumber(string.match(f, '|(%-?%d+)$'))
          if fb and fb < new_lo then dead[#dead + 1] = f end
        end
      end
      if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
    end
  end
end

local function write(op)
  local kind, key, name, a = op[1], op[2], op[3], op[4]
  if kind == 'bucket' then
    bucket(key, name, a)
  elseif kind == 'last' and HS.ho then
    -- the head's previous-event time orders every last value of the set (all are written by every event)
    local cur = H[HS.T]
    if cur ~= cur or a[1] >= cur then
      if name == '@' then H[HS.T] = a[1] else V[HS.Vi[name]] = a[2] end
    end
  elseif kind == 'last' then
    -- a[3] is the time as text: Lua would print the number with 14 digits only
    local cur = tonumber(redis.call('HGET', key, name .. '|t'))
    if (not cur) or a[1] >= cur then
      redis.call('HSET', key, name .. '|t', a[3], name .. '|v', a[2])
      if H then
        if name == '@' then
          if HS.T > 0 then H[HS.T] = a[1] end
        elseif HS.Vi[name] then
          V[HS.Vi[name]] = a[2]
        end
      end
    end
  elseif kind == 'zdistinct' then
    local d = H and HS.D[a[4]]
    if d then
      local old = tonumber(redis.call('ZSCORE', key, name))
      local xo, newest = nil, a[1]
      if old then
        xo = floor(old / d[2])
        if old > newest then newest = old end
      end
      head_distinct(d, floor(a[1] / d[2]), xo, floor(newest / d[2]))
    end
    redis.call('ZADD', key, 'GT', a[1], name)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. a[2])
    redis.call('EXPIRE', key, a[3])
  elseif kind == 'zlast' then
    redis.call('ZADD', key, 'GT', a[1], name)
    redis.call('ZREMRANGEBYRANK', key, 0, -(a[2] + 1))
    redis.call('EXPIRE', key, a[3])
  elseif kind == 'sadd' then
    redis.call('SADD', key, name)
    redis.call('EXPIRE', key, a[1])
  elseif kind == 'zincr' then
    redis.call('ZINCRBY', key, a[1], name)
    if a[2] then  -- time-bucketed: keep the bucket a window long, remember the newest bucket index
      redis.call('EXPIRE', key, a[2])
      local newest = tonumber(redis.call('GET', a[4]) or '-1')
      if a[3] > newest then redis.call('SET', a[4], a[3]) end
      redis.call('EXPIRE', a[4], a[2])
    end
  elseif kind == 'expire' then
    redis.call('EXPIRE', key, a[1])
  elseif kind == 'version' then  -- the entity changed: readers that cache its vectors must read again
    redis.call('INCR', key)
    redis.call('EXPIRE', key, a[1])
  end
end

local ttl, templates = tonumber(ARGV[1]), cjson.decode(ARGV[2])
for _, tpl in ipairs(templates) do
  local hs = tpl.hd
  hs.Vi = {}
  for i, name in ipairs(hs.V) do hs.Vi[name] = i end
end
-- A head-only set's writes, compact (see definitions.compile_event): the part `p` gives the entity key
-- and the time, the set's template (`HS.C`, `HS.Z`) what is the same for every event.
local function write_head(op, p)
  local kind = op[1]
  if kind == 'b' then  -- {b, series, values in the series' component order}
    local name, xs = op[2], op[3]
    local spec, s = HS.C[name], HS.S[name]  -- spec: {components, late buckets, bucket size}
    local b = floor(p.t / spec[3])
    local top = H[s[1]]
    if top ~= NO_BUCKET and b < top - spec[2] then return end  -- too late to count
    local vals = {}
    for i, c in ipairs(spec[1]) do vals[c] = xs[i] end
    head_series(s, b, vals)
  elseif kind == 'l' then  -- {l, '@' or a LastValue's name, value}: ordered by the head's previous-event time
    local cur = H[HS.T]
    if cur ~= cur or p.t >= cur then
      if op[2] == '@' then H[HS.T] = p.t else V[HS.Vi[op[2]]] = op[3] end
    end
  elseif kind == 'z' then  -- {z, feature, member}: value -> latest time, in the entity's sorted set
    local name, member, t = op[2], op[3], p.t
    local key, d = p.k .. '|' .. name, HS.D[name]
    local old = tonumber(redis.call('ZSCORE', key, member))
    local xo, newest = nil, t
    if old then
      xo = floor(old / d[2])
      if old > newest then newest = old end
    end
    local top = H[d[1]]
    head_distinct(d, floor(t / d[2]), xo, floor(newest / d[2]))
    redis.call('ZADD', key, 'GT', t, member)
    -- values older than the window and lateness only bound memory (a stale one counts as unseen): trim
    -- them when a new bucket begins, not on every event
    if H[d[1]] ~= top then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. string.format('%.17g', t - HS.Z[name]))
    end
    redis.call('EXPIRE', key, HS.ttl)
  else
    write(op)
  end
end

-- One part of a unit: one feature set's writes and reads for one entity; its component map, or with
-- `heads` for a head-only set the head before and after the event (the caller decodes them: no reads,
-- no number formatting, no JSON here).
local function apply_part(p, heads)
  event_fields = nil
  local vals, tpl = {}, templates[p.r + 1]
  HS = tpl.hd
  local before
  H, V, before = load_head(p.k, HS)
  if heads and HS.ho then
    for _, op in ipairs(p.w) do write_head(op, p) end
    local after = before
    if #p.w > 0 then after = save_head(p.k, HS) end
    return {before, after}
  end
  reads(plan_reads(tpl.f, p.k, p.t, 'pre', vals, H), vals)
  if HS.ho then
    for _, op in ipairs(p.w) do write_head(op, p) end
  else
    for _, op in ipairs(p.w) do write(op) end
  end
  if #p.w > 0 then save_head(p.k, HS) end
  reads(plan_reads(tpl.f, p.k, p.t, 'post', vals, H), vals)
  return vals
end

-- A unit's snapshot as frames, one per part: 'H' + the two heads, or 'J' + the component map's JSON.
local function frame(x)
  if x == false then return struct.pack('<I4', 4294967295) end
  return struct.pack('<I4', #x) .. x
end
local function framed(snaps)
  local out = {}
  for j, sn in ipairs(snaps) do
    if sn[1] ~= nil then out[j] = 'H' .. frame(sn[1]) .. frame(sn[2])
    else out[j] = 'J' .. frame(cjson.encode(sn)) end
  end
  return table.concat(out)
end

-- One unit per ARGV entry {d = applied key, m = 1 if multi-part, h = 1 for heads (framed snapshot),
-- p = parts}: applied once, under one marker. A part whose data subject was erased (tombstone x)
-- changes nothing and reads {"erased": true}.
local out, erased = {}, {}
for i = 3, #ARGV do
  local ev = cjson.decode(ARGV[i])
  local prior = redis.call('GET', ev.d)
  if prior then
    out[#out + 1] = {0, prior}
  else
    local snaps, applied = {}, 0
    for j, p in ipairs(ev.p) do
      local gone = erased[p.x]
      if gone == nil then gone = redis.call('EXISTS', p.x) == 1; erased[p.x] = gone end
      if gone then snaps[j] = {erased = true} else snaps[j] = apply_part(p, ev.h == 1); applied = 1 end
    end
    local snap
    if ev.h == 1 then snap = framed(snaps)
    elseif ev.m == 1 then snap = cjson.encode(snaps) else snap = cjson.encode(snaps[1]) end
    -- a unit with nothing applied (every part erased) leaves no marker: a replay is refused again
    if applied == 1 then redis.call('SET', ev.d, snap, 'EX', ttl) end
    out[#out + 1] = {applied, snap}
  end
end
return out
"""

REBUILD_LUA = LUA_READS + LUA_PLAN + LUA_HEAD + r"""
-- ARGV: one set's write template (JSON), entity keys... Builds the head of each entity that has
-- stored data but no head (written by a version without heads), expiring with the entity.
HS = cjson.decode(ARGV[1]).hd
local built = 0
for i = 2, #ARGV do
  local key = ARGV[i]
  local pttl = redis.call('PTTL', key)
  if pttl ~= -2 and redis.call('EXISTS', key .. HS.sfx) == 0 then
    H, V = build_head(key, HS)
    save_head(key, HS)
    if pttl > 0 then redis.call('PEXPIRE', key .. HS.sfx, pttl) end
    built = built + 1
  end
end
return built
"""

READ_LUA = LUA_READS + r"""
-- ARGV: template (JSON), at, entity keys...; returns one JSON object of stored components per key,
-- combined from the buckets: for the reads a head cannot serve (see read_path.py). Every entity is
-- read at the same time, so the field list is built once; per key only the fetch and the sums run.
local tpl, at = cjson.decode(ARGV[1]), tonumber(ARGV[2])
local fields, index, spans, others = {}, {}, {}, {}
for _, f in ipairs(tpl) do
  if f[1] == 'w' then
    local last = floor((at - f[6]) / f[4])
    for _, m in ipairs(f[7]) do
      local idx, prefix = {}, f[3] .. '|' .. m[1] .. '|'
      for b = last - f[5] + 1, last do
        local name = prefix .. bs(b)
        local at_ = index[name]
        if not at_ then fields[#fields + 1] = name; at_ = #fields; index[name] = at_ end
        idx[#idx + 1] = at_
      end
      spans[#spans + 1] = {f[2] .. '|' .. m[1], m[2], idx}
    end
  elseif f[1] == 'z' then
    local last = floor((at - f[5]) / f[3])
    others[#others + 1] = {f[2], 'z', (last - f[4] + 1) * f[3], '(' .. ((last + 1) * f[3])}
  else
    others[#others + 1] = {f[2], 'h', f[3]}
  end
end
local out = {}
for i = 3, #ARGV do
  local key, vals = ARGV[i], {}
  if #fields > 0 then
    local got = hvalues(key, fields)
    combine_spans(got, spans, vals)
  end
  for _, o in ipairs(others) do
    if o[2] == 'z' then
      vals[o[1]] = redis.call('ZCOUNT', key .. '|' .. o[1], o[3], o[4])
    else
      local v = redis.call('HGET', key, o[3])
      if v then vals[o[1]] = v else vals[o[1]] = cjson.null end
    end
  end
  out[#out + 1] = cjson.encode(vals)
end
return out
"""

Snapshot = dict[str, Any]


def read_template(fs: FeatureSet) -> bytes:
    """The feature set's reads, independent of entity and time, for the read script."""
    tpl: list[list[Any]] = []
    for feat in fs.vector:
        if isinstance(feat, Windowed):
            if feat.agg == "distinct":
                tpl.append(["z", feat.name, feat.bucket_s, feat.buckets, feat.delay_s])
            else:
                modes = [[suffix, mode] for suffix, mode in COMPONENTS[feat.agg]]
                tpl.append(["w", feat.name, feat.storage, feat.bucket_s, feat.buckets, feat.delay_s, modes])
        elif isinstance(feat, TimeSince):
            tpl.append(["h", feat.name, "@|t"])
        else:
            tpl.append(["h", feat.name, f"{feat.name}|v"])
    return orjson.dumps(tpl)


def head_suffix(fs: FeatureSet) -> str:
    """Key suffix of ``fs``'s head next to the entity hash ('@' cannot occur in a feature name).

    It names the set's version and a digest of the head layout: a head
    written under another definition of the set is never misread (its
    numbers would sit at other places); the new definition's heads are
    rebuilt from the buckets by each entity's next event, or by
    :meth:`RedisOnlineStore.rebuild_heads`, and the old ones expire.
    """
    lay = fs.head
    shape = repr((lay.lua_fmt, lay.series, lay.distinct, lay.last_time, lay.strings)).encode()
    return f"|@{fs.name}:{fs.version}:{hashlib.sha1(shape).hexdigest()[:8]}"


def write_template(fs: FeatureSet) -> bytes:
    """The write script's view of ``fs``: the reads after an event (``f``, with where the head
    answers each; indexes 1-based, as Lua counts) and the head's layout (``hd``)."""
    lay = fs.head
    entries: list[list[Any]] = []
    for feat in fs.vector:
        if isinstance(feat, Windowed):
            if feat.agg == "distinct":
                entries.append(["z", feat.name, feat.bucket_s, feat.buckets, feat.delay_s,
                                lay.distinct_index(feat.name) + 1])
            else:
                modes = [[suffix, mode] for suffix, mode in COMPONENTS[feat.agg]]
                starts = [] if feat.delay_s else [lay.suffix_start(feat.storage, feat.buckets, s) + 1 for s, _ in modes]
                entries.append(["w", feat.name, feat.storage, feat.bucket_s, feat.buckets, feat.delay_s, modes,
                                lay.top_index(feat.storage) + 1, starts])
        elif isinstance(feat, TimeSince):
            entries.append(["h", feat.name, "@|t"])
        else:
            entries.append(["h", feat.name, f"{feat.name}|v"])
    series = {storage: [top + 1, kept, [[w, [[c, m, start + 1] for c, m, start in comps]] for w, comps in windows]]
              for storage, top, kept, windows in lay.series}
    distinct = {name: [top + 1, bucket_s, buckets] for name, top, bucket_s, buckets in lay.distinct}
    head = {"sfx": head_suffix(fs), "n": lay.size, "fmt": lay.lua_fmt, "ttl": lay.ttl_s, "S": series, "D": distinct,
            "T": 0 if lay.last_time is None else lay.last_time + 1, "V": list(lay.strings), "ho": not fs.buckets}
    if not fs.buckets:  # what a compact write leaves out (the same for every event)
        head["C"] = {storage: [[c for c, _ in comps], feat.late_buckets, feat.bucket_s]
                     for storage, (feat, comps, _) in fs.series_plan.items()}
        head["Z"] = {f.name: f.window_s + f.lateness_s for f in fs.vector if isinstance(f, Windowed)
                     and f.agg == "distinct"}
    return orjson.dumps({"f": entries, "hd": head})


def _decode(rows: Sequence[Any]) -> list[tuple[bool, Snapshot]]:
    return [(bool(applied), orjson.loads(snap)) for applied, snap in rows]


_FRAME = struct.Struct("<I")
_NONE = 0xFFFFFFFF


def _frames(snap: bytes) -> list[tuple[bytes, bytes | None, bytes | None]]:
    """A framed unit snapshot: per part ('H', head before, head after) or ('J', component JSON, None)."""
    out = []
    pos, end = 0, len(snap)
    while pos < end:
        kind = snap[pos:pos + 1]
        pos += 1
        blobs: list[bytes | None] = []
        for _ in range(2 if kind == b"H" else 1):
            (n,) = _FRAME.unpack_from(snap, pos)
            pos += 4
            if n == _NONE:
                blobs.append(None)
            else:
                blobs.append(snap[pos:pos + n])
                pos += n
        out.append((kind, blobs[0], blobs[1] if kind == b"H" else None))
    return out


def _decode_units(rows: Sequence[Any], units: Sequence[EventUnit]) -> list[tuple[bool, list[dict[str, Any]]]]:
    """Each unit's feature vectors, one per part, as of the part's time (its event's)."""
    out = []
    for (applied, snap), unit in zip(rows, units, strict=True):
        if snap.startswith(b"{"):  # a unit whose every part was erased: nothing applied, nothing framed
            vectors = [finalize(ops.reads_of, {}, ops.time) for ops in unit.parts]
        else:
            vectors = [_read_plan(ops.reads_of).vector_after(kind, a, b, ops.time)
                       for ops, (kind, a, b) in zip(unit.parts, _frames(snap), strict=True)]
        out.append((bool(applied), vectors))
    return out


def _apply_args(batch: Sequence[EventUnit], keys: KeySpace, ttl_s: int) -> list[Any]:
    """Script arguments: TTL, the templates used in this batch, then one JSON document per unit."""
    sets: dict[int, int] = {}
    templates: list[bytes] = []
    events: list[bytes] = []
    for unit in batch:
        parts = []
        for ops in unit.parts:
            index = sets.get(id(ops.reads_of))  # ops keep their feature set alive for this call
            if index is None:
                index = sets[id(ops.reads_of)] = len(templates)
                templates.append(_write_template(ops.reads_of))
            parts.append({"x": keys.tombstone_of(ops.entity_key), "k": ops.entity_key, "t": ops.time, "r": index,
                          "w": ops.writes})
        events.append(orjson.dumps({"d": unit.applied_key, "m": int(len(parts) > 1), "h": int(unit.framed),
                                    "p": parts}))
    return [ttl_s, b"[" + b",".join(templates) + b"]", *events]


def _single(batch: Sequence[EventOps]) -> list[EventUnit]:
    """Each operation as a unit of its own, under its own marker, answering component maps (the old contract)."""
    return [EventUnit(ops.applied_key, (ops,), framed=False) for ops in batch]


def entity_keys(fs: FeatureSet, entity_ids: Sequence[str], keys: KeySpace, hasher: KeyedHasher) -> list[str]:
    return [keys.entity(fs.entity, hasher.token(fs.entity, e)) for e in entity_ids]


_TEMPLATES: dict[FeatureSet, bytes] = {}
_WRITE_TEMPLATES: dict[FeatureSet, bytes] = {}


def _template(fs: FeatureSet) -> bytes:
    if fs not in _TEMPLATES:
        _TEMPLATES[fs] = read_template(fs)
    return _TEMPLATES[fs]


def _write_template(fs: FeatureSet) -> bytes:
    if fs not in _WRITE_TEMPLATES:
        _WRITE_TEMPLATES[fs] = write_template(fs)
    return _WRITE_TEMPLATES[fs]


class _ReadPlan:
    """How to read ``fs``: its heads' key suffix and decoder, and the bucket script's template."""

    def __init__(self, fs: FeatureSet) -> None:
        self.fs = fs
        self.reader = HeadReader(fs)
        self.suffix = head_suffix(fs)
        self.template = read_template(fs)

    def decode(self, heads: Sequence[bytes | None], at: float) -> tuple[list[Any], list[int]]:
        """Vectors from heads (a missing head is an entity with nothing stored: the defaults), and the
        positions the heads cannot serve (reads before an entity's newest bucket, delayed windows)."""
        reader = self.reader
        if not reader.usable:
            return [None] * len(heads), list(range(len(heads)))
        lasts = reader.lasts(at)
        decode = reader.decode
        out: list[Any] = []
        later: list[int] = []
        for i, head in enumerate(heads):
            if head is None:
                out.append(self.missing(at))
                continue
            vector = decode(head, at, lasts)
            if vector is PAST:
                later.append(i)
            out.append(vector)
        return out, later

    def vector_after(self, kind: bytes, first: bytes | None, second: bytes | None, at: float) -> dict[str, Any]:
        """A part of a framed unit snapshot as the feature vector at ``at``: the component map ('J'), or
        ('H') the windows from the head after the event and the previous time / values from the head before."""
        if kind == b"J":
            return finalize(self.fs, orjson.loads(first or b"{}"), at)
        vector = self.missing(at) if second is None else self.reader.decode(second, at, self.reader.lasts(at))
        vector.update(self.reader.previous(first, at))
        return vector

    def missing(self, at: float) -> dict[str, Any]:
        """An entity without a head: the values the bucket script gives one with nothing stored."""
        return finalize(self.fs, self._empty, at)

    @cached_property
    def _empty(self) -> dict[str, Any]:
        raw: dict[str, Any] = {}
        for feat in self.fs.vector:
            if isinstance(feat, Windowed):
                if feat.agg == "distinct":
                    raw[feat.name] = 0
                for suffix, mode in COMPONENTS.get(feat.agg, ()):
                    raw[f"{feat.name}|{suffix}"] = "0" if mode == "add" else None
        return raw

    def from_buckets(self, rows: Sequence[bytes], at: float) -> list[dict[str, Any]]:
        return [finalize(self.fs, orjson.loads(row), at) for row in rows]


_READ_PLANS: dict[FeatureSet, _ReadPlan] = {}


def _read_plan(fs: FeatureSet) -> _ReadPlan:
    plan = _READ_PLANS.get(fs)
    if plan is None:
        plan = _READ_PLANS[fs] = _ReadPlan(fs)
    return plan


class _StoreBase:
    """What the sync and asyncio stores share: client, scripts, key layout, hashing."""

    def __init__(self, client: redis.Redis | aioredis.Redis, dedup_ttl_s: int, keys: KeySpace | None = None,
                 hasher: KeyedHasher | None = None) -> None:
        self.client = client
        self.dedup_ttl_s = dedup_ttl_s
        self.keys = keys or KeySpace("kestrel")
        self.hasher = hasher or KeyedHasher(b"kestrel-dev-only-hash-key")
        self._script = client.register_script(APPLY_BATCH_LUA)
        self._read = client.register_script(READ_LUA)

    def _apply_args(self, batch: Sequence[EventUnit]) -> list[Any]:
        return _apply_args(batch, self.keys, self.dedup_ttl_s)


class RedisOnlineStore(_StoreBase):
    """Sync store: batch writes in one round trip, typed reads of one or many entities."""

    def __init__(self, client: redis.Redis, dedup_ttl_s: int, keys: KeySpace | None = None,
                 hasher: KeyedHasher | None = None) -> None:
        super().__init__(client, dedup_ttl_s, keys, hasher)
        # Sync reads use one connection of their own, outside the pool: checking a connection out and
        # back in costs about as much as the read itself. Another thread reading meanwhile uses the pool.
        self._conn: Any = None
        self._conn_pid = 0
        self._conn_lock = threading.Lock()

    def apply_batch(self, batch: Sequence[EventOps]) -> list[tuple[bool, Snapshot]]:
        """Apply each event once; returns (newly_applied, stored components) per event."""
        if not batch:
            return []
        return _decode(self._script(args=self._apply_args(_single(batch))))

    def apply_units(self, units: Sequence[EventUnit]) -> list[tuple[bool, list[Snapshot]]]:
        """Apply each unit once; returns (newly_applied, stored components of each part) per unit."""
        if not units:
            return []
        return _decode_units(self._script(args=self._apply_args(units)), units)

    def read(self, fs: FeatureSet, entity_id: str, at: float | None = None) -> dict[str, Any]:
        """One entity's feature vector at ``at`` (default now); a missing entity gives the defaults."""
        return self.read_batch(fs, [entity_id], at)[0]

    def read_batch(self, fs: FeatureSet, entity_ids: Sequence[str], at: float | None = None) -> list[dict[str, Any]]:
        """Feature vectors of many entities in one round trip: one ``MGET`` of their heads.

        Reads the heads cannot serve take a second round trip, to the bucket script.
        """
        at = time.time() if at is None else at
        plan = _read_plan(fs)
        keys = entity_keys(fs, entity_ids, self.keys, self.hasher)
        if plan.reader.usable:
            suffix = plan.suffix
            heads = self._command("MGET", *[k + suffix for k in keys])
        else:
            heads = [None] * len(keys)
        out, later = plan.decode(heads, at)
        if later:
            rows = self._read(args=[plan.template, repr(at), *[keys[i] for i in later]])
            for i, vector in zip(later, plan.from_buckets(rows, at), strict=True):
                out[i] = vector
        return out

    def _command(self, *args: Any) -> Any:
        """One command on the read connection; the pool (and the client's retry policy) when it is busy
        in another thread or fails."""
        if not self._conn_lock.acquire(blocking=False):
            return self.client.execute_command(*args)
        try:
            conn = self._conn
            if conn is None or self._conn_pid != os.getpid():  # never share a socket with a forked parent
                conn = self._conn = self.client.connection_pool.make_connection()
                self._conn_pid = os.getpid()
            try:
                conn.send_command(*args)
                return conn.read_response()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                conn.disconnect()  # a reply may be left behind: start over on a fresh socket next time
        finally:
            self._conn_lock.release()
        return self.client.execute_command(*args)

    def rebuild_heads(self, fs: FeatureSet, batch_size: int = 500) -> int:
        """Build the heads of ``fs``'s entities stored without one; returns how many were built.

        For data written by a version without heads: a read takes an entity
        without a head to have nothing stored (so that a missing entity costs
        one round trip), and the next event of an entity builds its head
        anyway; this builds them all at once after an upgrade. Safe to run
        while events are applied (each head is built atomically, or left
        alone if an event built it first).
        """
        if not fs.buckets:
            return 0  # a head-only set has nothing to rebuild its heads from: they are its state
        script = self.client.register_script(REBUILD_LUA)
        template = _write_template(fs)
        prefix = self.keys.entity(fs.entity, "")
        built, chunk = 0, []
        for key in self.client.scan_iter(match=escape_glob(prefix) + "*", count=1000, _type="hash"):
            name = key.decode()
            if ":" in name[len(prefix):] or "|" in name:
                continue  # another entity type's key, or a part of an entity
            chunk.append(name)
            if len(chunk) >= batch_size:
                built += script(args=[template, *chunk])
                chunk.clear()
        if chunk:
            built += script(args=[template, *chunk])
        return built

    def close(self) -> None:
        """Close the read connection (the client's pool is the caller's)."""
        with self._conn_lock:
            if self._conn is not None:
                self._conn.disconnect()
                self._conn = None


class AsyncRedisOnlineStore(_StoreBase):
    """The asyncio twin of :class:`RedisOnlineStore`, used by the stream agents and HTTP views."""

    async def apply_batch(self, batch: Sequence[EventOps]) -> list[tuple[bool, Snapshot]]:
        if not batch:
            return []
        return _decode(await self._script(args=self._apply_args(_single(batch))))

    async def apply_units(self, units: Sequence[EventUnit]) -> list[tuple[bool, list[Snapshot]]]:
        if not units:
            return []
        return _decode_units(await self._script(args=self._apply_args(units)), units)

    async def read(self, fs: FeatureSet, entity_id: str, at: float | None = None) -> dict[str, Any]:
        return (await self.read_batch(fs, [entity_id], at))[0]

    async def read_batch(self, fs: FeatureSet, entity_ids: Sequence[str],
                         at: float | None = None) -> list[dict[str, Any]]:
        at = time.time() if at is None else at
        plan = _read_plan(fs)
        keys = entity_keys(fs, entity_ids, self.keys, self.hasher)
        if plan.reader.usable:
            suffix = plan.suffix
            heads = await self.client.execute_command("MGET", *[k + suffix for k in keys])
        else:
            heads = [None] * len(keys)
        out, later = plan.decode(heads, at)
        if later:
            rows = await self._read(args=[plan.template, repr(at), *[keys[i] for i in later]])
            for i, vector in zip(later, plan.from_buckets(rows, at), strict=True):
                out[i] = vector
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


# ARGV: newest-bucket key, bucket key prefix ("...name@"), buckets, depth, union key, union lifetime (s)
WINDOWED_TOP_LUA = r"""
local union = ARGV[5]
if redis.call('EXISTS', union) == 0 then
  local newest = tonumber(redis.call('GET', ARGV[1]) or '')
  if not newest then return {} end
  local parts = {}
  for i = newest - tonumber(ARGV[3]) + 1, newest do parts[#parts + 1] = ARGV[2] .. string.format('%d', i) end
  if redis.call('ZUNIONSTORE', union, #parts, unpack(parts)) == 0 then return {} end
  redis.call('EXPIRE', union, tonumber(ARGV[6]))
end
return redis.call('ZREVRANGE', union, 0, tonumber(ARGV[4]) - 1)
"""


def windowed_top_args(feat: GlobalScore, keys: KeySpace, depth: int, union_s: int = 5) -> list[object]:
    """Arguments of :data:`WINDOWED_TOP_LUA` for a time-bucketed :class:`GlobalScore`.

    The union of the window's buckets is cached under ``name@top`` for
    ``union_s`` seconds, shared by every worker: a request reads one sorted
    set, and the union is recomputed at most every few seconds.
    """
    if feat.bucket_s is None:
        raise ValueError(f"{feat.name} is not time-bucketed")
    prefix = feat.bucket_key(keys, "")
    return [feat.bucket_key(keys, "latest"), prefix, feat.buckets, depth, feat.bucket_key(keys, "top"), union_s]
