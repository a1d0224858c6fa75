-- The entity's head for the current event's feature set (see definitions.HeadLayout): doubles `H`,
-- strings `V` (false: none), its spec `HS` (`HS.ho`: a head-only set, whose head is its whole state);
-- nil when no event is being applied.
-- `HSEQ`: the head's write count, stored after its strings: the tag a worker's compare-and-set checks.
local H, V, HS, HSEQ = nil, nil, nil, 0

-- The reads of one entity's vector at time `at`, from a feature set's template:
-- phase 'pre' (previous event's time and values) or 'post' (windows, distinct counts).
-- With the entity's head `H` (write script), an undelayed window or a distinct count read at or
-- after its newest bucket is one stored value; otherwise it is combined from the buckets.
local NO_BUCKET = -9007199254740992

local function from_head(vals, name, modes, H, top_at, starts, buckets, last)
  local top = H[top_at]
  if top ~= NO_BUCKET and last < top then
    -- a head-only set keeps no buckets: a read before its newest bucket sees the entity as of that bucket
    if not (HS and HS.ho) then return false end
    last = top
  end
  local k = last - top
  for i, m in ipairs(modes) do
    local v = nil
    if k < buckets then v = H[starts[i] + k] end
    if v == nil or v ~= v then
      if m[2] == 'add' then v = '0' else v = cjson.null end
    else
      v = string.format('%.17g', v)  -- cjson would keep only 14 digits
    end
    vals[name .. '|' .. m[1]] = v
  end
  return true
end

local function plan_reads(tpl, key, at, phase, vals, H)
  local list = {}
  for _, f in ipairs(tpl) do
    if f[1] == 'h' then
      if phase == 'pre' then
        if H and HS and HS.ho then  -- the head holds the previous event's time and last values
          if f[3] == '@|t' then
            local x = H[HS.T]
            if x == x then vals[f[2]] = string.format('%.17g', x) else vals[f[2]] = cjson.null end
          else
            vals[f[2]] = V[HS.Vi[f[2]]] or cjson.null
          end
        else
          list[#list + 1] = {f[2], 'hget', key, f[3]}
        end
      end
    elseif phase == 'post' then
      if f[1] == 'w' then
        local last = floor((at - f[6]) / f[4])
        if not (H and f[8] and #f[9] > 0 and from_head(vals, f[2], f[7], H, f[8], f[9], f[5], last)) then
          list[#list + 1] = {f[2], 'window', key, f[3], last - f[5] + 1, last, f[7]}
        end
      else
        local last = floor((at - f[5]) / f[3])
        local top = H and f[6] and H[f[6]]
        if top and (top == NO_BUCKET or last >= top) then
          local k, n = last - top, 0
          if k < f[4] then n = H[f[6] + 1 + k] end
          vals[f[2]] = n
        else
          list[#list + 1] = {f[2], 'zcount', key .. '|' .. f[2], (last - f[4] + 1) * f[3], (last + 1) * f[3]}
        end
      end
    end
  end
  return list
end
