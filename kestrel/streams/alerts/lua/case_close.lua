-- ARGV: case key, expected rev, doc, new rev, open key, case id, card pointer key, ttl
if (redis.call('HGET', ARGV[1], 'rev') or '0') ~= ARGV[2] then return 0 end
redis.call('HSET', ARGV[1], 'doc', ARGV[3], 'rev', ARGV[4], 'status', 'closed')
redis.call('EXPIRE', ARGV[1], tonumber(ARGV[8]))
redis.call('ZREM', ARGV[5], ARGV[6])
if redis.call('GET', ARGV[7]) == ARGV[6] then redis.call('DEL', ARGV[7]) end
return 1
