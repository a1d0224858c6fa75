-- A worker's batch of head-only events (head_state.py), stored all or nothing.
-- ARGV: marker TTL, then counted lists:
--   heads (key, tag, new head, TTL): the tag is the last 8 bytes (the write count) of the head as the
--     worker read it, '' if it was absent;
--   tombstones that must still be absent;
--   new markers: their keys (which must still be absent), then their snapshots in the same order;
--   commands (name, argument count, arguments...): the sorted-set updates, in the events' order.
-- Returns 1, or 0 with nothing written when anything changed since the read: the worker reads again.
local ttl = tonumber(ARGV[1])
local pos = 2
local function take(width)
  local n = tonumber(ARGV[pos]); local at = pos + 1
  pos = at + width * n
  return at, n
end
local function none_exist(at, n)  -- EXISTS takes many keys: one call per few thousand, not one per key
  for i = at, at + n - 1, 4000 do
    if redis.call('EXISTS', unpack(ARGV, i, math.min(i + 3999, at + n - 1))) > 0 then return false end
  end
  return true
end
local heads_at, n_heads = take(4)
local tombs_at, n_tombs = take(1)
local new_at, n_new = take(2)
if not none_exist(tombs_at, n_tombs) or not none_exist(new_at, n_new) then return 0 end
-- GETRANGE of the tag, not MGET of the heads: 1.3 against 2.8 µs a head (no copy of each head into Lua)
for i = heads_at, heads_at + 4 * (n_heads - 1), 4 do
  if redis.call('GETRANGE', ARGV[i], -8, -1) ~= ARGV[i + 1] then return 0 end
end
for i = heads_at, heads_at + 4 * (n_heads - 1), 4 do redis.call('SET', ARGV[i], ARGV[i + 2], 'EX', ARGV[i + 3]) end
for i = new_at, new_at + n_new - 1 do redis.call('SET', ARGV[i], ARGV[i + n_new], 'EX', ttl) end
local n_commands = tonumber(ARGV[pos]); pos = pos + 1
for _ = 1, n_commands do
  local name, n = ARGV[pos], tonumber(ARGV[pos + 1])
  redis.call(name, unpack(ARGV, pos + 2, pos + 1 + n))
  pos = pos + 2 + n
end
return 1
