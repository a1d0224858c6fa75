local hist_ttl, keep, nread, case_prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local req = cjson.decode(ARGV[5])
for _, g in ipairs(req.h) do
  redis.call('ZADD', g[1], unpack(g[2]))
  redis.call('ZREMRANGEBYRANK', g[1], 0, -(keep + 1))
  redis.call('EXPIRE', g[1], hist_ttl)
end
local markers = {}
for m, key in ipairs(req.m) do markers[m] = redis.call('GET', key) end
local cards = {}
for c, pair in ipairs(req.c) do
  local ptr = redis.call('GET', pair[1])
  local doc = false
  if ptr then doc = redis.call('HGET', case_prefix .. ptr, 'doc') end
  cards[c] = {ptr, doc, redis.call('ZREVRANGE', pair[2], 0, nread - 1, 'WITHSCORES')}
end
return {markers, cards}
