-- ARGV: mark TTL, then counted lists: marks to set; logs that are their own marks (a space appended: JSON
-- allows trailing whitespace, so readers parse them unchanged); transient outboxes to drop.
local ttl, pos = tonumber(ARGV[1]), 2
local function take()
  local n = tonumber(ARGV[pos]); local at = pos + 1
  pos = at + n
  return at, at + n - 1
end
local first, last = take()
for i = first, last do redis.call('SET', ARGV[i], '1', 'EX', ttl) end
first, last = take()
for i = first, last do redis.call('APPEND', ARGV[i], ' ') end
for i = pos, #ARGV do redis.call('DEL', ARGV[i]) end
return 1
