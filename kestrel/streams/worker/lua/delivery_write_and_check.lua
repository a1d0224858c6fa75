local ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local written = {}  -- keys this call stored: what they hold is the caller's own bytes
for i = 0, n - 1 do
  -- NX: a replayed batch must not rewrite what was logged (and sent) the first time
  if redis.call('SET', ARGV[3 + 2 * i], ARGV[4 + 2 * i], 'EX', ttl, 'NX') then written[ARGV[3 + 2 * i]] = true end
end
local base = 3 + 2 * n
-- counts made with a write (hash, field, the write's key): added only where this call stored that write, so
-- each is counted once however often its batch is replayed; one HINCRBY per distinct field
local n_counts = tonumber(ARGV[base])
local sums, order = {}, {}
for i = base + 1, base + 3 * n_counts, 3 do
  if written[ARGV[i + 2]] then
    local at = ARGV[i] .. '\0' .. ARGV[i + 1]
    if not sums[at] then sums[at] = {ARGV[i], ARGV[i + 1], 0}; order[#order + 1] = at end
    sums[at][3] = sums[at][3] + 1
  end
end
for _, at in ipairs(order) do redis.call('HINCRBY', sums[at][1], sums[at][2], sums[at][3]) end
base = base + 1 + 3 * n_counts
local outbox_ttl = tonumber(ARGV[base])
local out = {}
-- then one (mark, outbox key, body) triple per output: 0 if delivered, 1 if the outbox now holds the caller's
-- bytes (the first attempt: nothing travels back), else the bytes stored by an earlier attempt.
-- An empty mark: the outbox is a log that is its own mark (delivery.py): it ends with a space once delivered.
for i = base + 1, #ARGV, 3 do
  local mark, key = ARGV[i], ARGV[i + 1]
  if mark == '' then
    if written[key] then
      out[#out + 1] = 1
    else
      local stored = redis.call('GET', key) or ''
      if string.byte(stored, -1) == 32 then out[#out + 1] = 0 else out[#out + 1] = stored end
    end
  elseif redis.call('EXISTS', mark) == 1 then
    out[#out + 1] = 0
  elseif written[key]
      or (ARGV[i + 2] ~= '' and redis.call('SET', key, ARGV[i + 2], 'EX', outbox_ttl, 'NX')) then
    out[#out + 1] = 1
  else
    out[#out + 1] = redis.call('GET', key) or ''  -- never nil: a nil would end the reply list
  end
end
return out
