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
