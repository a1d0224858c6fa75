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
    return h, v, false, 0
  end
  local h = {struct.unpack(hs.fmt, blob)}
  local pos, v = h[hs.n + 1], {}
  h[hs.n + 1] = nil
  for i = 1, #hs.V do
    local len
    len, pos = struct.unpack('<I4', blob, pos)
    if len == 4294967295 then v[i] = false else v[i] = string.sub(blob, pos, pos + len - 1); pos = pos + len end
  end
  local seq = 0
  if #blob >= pos + 7 then seq = struct.unpack('<d', blob, pos) end
  return h, v, blob, seq
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
  parts[#parts + 1] = struct.pack('<d', HSEQ + 1)  -- every write changes the tag (head_state.py)
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

