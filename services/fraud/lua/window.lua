-- Sliding windows of many subjects of one family (the IPs of a bucket), kept
-- in shared hashes: a.shard's hash per bucket of the longest window
-- (<family key>#<index>:<shard>), one field per subject. A field holds,
-- comma separated, each shorter window's bucket (relative to the hash's
-- start), current and previous counts, then the longest window's count;
-- the longest window's previous count is the subject's field in the
-- previous hash. Shards keep each hash small enough for a listpack
-- (ziplist on 6.2): about 25 bytes per subject, against 74 on Redis 7.0
-- (94 on 6.2) in one big hash table and 229 for a hash of its own.
-- key: the family key (of the bucket). a: member, shard, now_ms, inc,
-- windows_ms (ascending). Answers each window's estimate, in thousandths.
OPS.window = function(key, a)
  local ws, now = a.windows_ms, a.now_ms
  local n = #ws
  local long = ws[n]
  local h = math.floor(now / long)
  local shard = ':' .. a.shard
  local cur_key = key .. '#' .. h .. shard
  local cur = redis.call('HGET', cur_key, a.member)
  local prev = redis.call('HGET', key .. '#' .. (h - 1) .. shard, a.member)
  local st = {}
  -- A subject's first event of a long bucket carries the shorter windows on
  -- from the previous hash (a minute that spans the hour keeps its count).
  for x in string.gmatch(cur or prev or '', '[^,]+') do st[#st + 1] = tonumber(x) end
  local out, vals = {}, {}
  for i = 1, n - 1 do
    local w = ws[i]
    local origin = math.floor(h * long / w)
    local b = math.floor(now / w)
    local sb = st[3 * i - 2]
    if sb ~= nil then sb = sb + (cur and origin or math.floor((h - 1) * long / w)) end
    local c = st[3 * i - 1] or 0
    local p = st[3 * i] or 0
    if sb == nil or b > sb + 1 then
      sb = b; p = 0; c = a.inc
    elseif b == sb + 1 then
      sb = b; p = c; c = a.inc
    elseif b == sb then
      c = c + a.inc
    elseif b == sb - 1 then
      p = p + a.inc
    end
    vals[#vals + 1] = sb - origin; vals[#vals + 1] = c; vals[#vals + 1] = p
    local frac = (now - sb * w) / w
    if frac < 0 then frac = 0 elseif frac > 1 then frac = 1 end
    out[i] = milli(p * (1 - frac) + c)
  end
  local count = (cur and st[3 * (n - 1) + 1] or 0) + a.inc
  local before = 0
  if prev then before = tonumber(string.match(prev, '([^,]+)$')) or 0 end
  vals[#vals + 1] = count
  redis.call('HSET', cur_key, a.member, table.concat(vals, ','))
  -- The hash serves as the previous bucket through the next one, then goes
  -- (a lifetime counted from the event's time, as the windows are: a
  -- replayed old event's hash still lives its two buckets; see expire_at).
  -- Set with each new field only: every new field's deadline is the same
  -- instant, on the earlier of the event's and the server's clocks.
  if not cur then expire_at(cur_key, (h + 2) * long + a.slack_ms, now) end
  local frac = (now - h * long) / long
  out[n] = milli(before * (1 - frac) + count)
  return out
end
