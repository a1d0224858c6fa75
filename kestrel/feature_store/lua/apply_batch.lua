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
    redis.call('ZADD', key, 'GT', string.format('%.17g', a[1]), name)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. a[2])
    redis.call('EXPIRE', key, a[3])
  elseif kind == 'zlast' then
    redis.call('ZADD', key, 'GT', string.format('%.17g', a[1]), name)
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
    redis.call('ZADD', key, 'GT', string.format('%.17g', t), member)  -- %.17g: Lua would keep 14 digits
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
  H, V, before, HSEQ = load_head(p.k, HS)
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
