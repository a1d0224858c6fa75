-- ARGV: one set's write template (JSON), entity keys... Builds the head of each entity that has
-- stored data but no head (written by a version without heads), expiring with the entity.
HS = cjson.decode(ARGV[1]).hd
local built = 0
for i = 2, #ARGV do
  local key = ARGV[i]
  local pttl = redis.call('PTTL', key)
  if pttl ~= -2 and redis.call('EXISTS', key .. HS.sfx) == 0 then
    H, V = build_head(key, HS)
    HSEQ = 0
    save_head(key, HS)
    if pttl > 0 then redis.call('PEXPIRE', key .. HS.sfx, pttl) end
    built = built + 1
  end
end
return built
