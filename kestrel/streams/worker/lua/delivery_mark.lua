local ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, 2 + n do redis.call('SET', ARGV[i], '1', 'EX', ttl) end
for i = 3 + n, #ARGV do redis.call('DEL', ARGV[i]) end
return n
