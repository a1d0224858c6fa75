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
