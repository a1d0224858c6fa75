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

