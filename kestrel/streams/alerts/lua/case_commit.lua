local ttl, marker_ttl, max_hits, open_key = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local req = cjson.decode(ARGV[5])
-- check every case first: nothing is written unless all still are as they were read
for _, w in ipairs(req.w) do
  -- w: card pointer key, expected pointer, case key, expected rev, doc, new rev, case id, rank, hits key, hits
  local cur = redis.call('GET', w[1]) or ''
  local rev = redis.call('HGET', w[3], 'rev') or '0'
  if cur ~= w[2] or rev ~= w[4] then return 0 end
end
for _, w in ipairs(req.w) do
  redis.call('HSET', w[3], 'doc', w[5], 'rev', w[6], 'status', 'open')
  redis.call('EXPIRE', w[3], ttl)
  redis.call('SET', w[1], w[7], 'EX', ttl)
  redis.call('ZADD', open_key, w[8], w[7])
  local hits = w[10]
  for j = 1, #hits, 2 do
    if redis.call('ZCARD', w[9]) < max_hits then redis.call('ZADD', w[9], hits[j], hits[j + 1]) end
  end
  redis.call('EXPIRE', w[9], ttl)
end
for _, m in ipairs(req.m) do redis.call('SET', m[1], m[2], 'EX', marker_ttl, 'NX') end
return 1
