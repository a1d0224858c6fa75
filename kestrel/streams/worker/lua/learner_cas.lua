local rev = redis.call('HGET', KEYS[1], 'rev') or ''
if rev ~= ARGV[1] then return 0 end
local next_rev = (tonumber(rev) or 0) + 1
redis.call('HSET', KEYS[1], 'blob', ARGV[2], 'rev', tostring(next_rev))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
