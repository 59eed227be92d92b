-- What the counters share. The script is this file, one file per counter
-- operation (each adds its function to OPS) and run.lua, joined in that
-- order by services/fraud/counters.py.
local OPS = {}

-- Makes key expire at until_ms on the events' clock. A shared hash's TTL is
-- counted from the event's time (a replayed old event's hash still lives its
-- periods), but from this server's clock when that is earlier: a click may
-- be dated minutes ahead, and one such event must not cut short the life of
-- a hash that every other subject in it still needs.
local function expire_at(key, until_ms, now)
  local t = redis.call('TIME')
  local server = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if server < now then now = server end
  redis.call('PEXPIRE', key, until_ms - now)
end

-- Counts inc events at now (ms) into each window of the state hash at key
-- (one HMGET and one HSET whatever the number of windows) and returns the
-- estimates: previous bucket * (1 - elapsed fraction) + current bucket.
local function hit(key, now, inc, windows)
  local fields = {}
  for n = 1, #windows do
    fields[#fields + 1] = n .. 'b'; fields[#fields + 1] = n .. 'c'; fields[#fields + 1] = n .. 'p'
  end
  local st = redis.call('HMGET', key, unpack(fields))
  local out, set = {}, {}
  for n, w in ipairs(windows) do
    local b = math.floor(now / w)
    local sb = tonumber(st[3 * n - 2])
    local c = tonumber(st[3 * n - 1]) or 0
    local p = tonumber(st[3 * n]) or 0
    if sb == nil or b > sb + 1 then
      sb = b; p = 0; c = inc
    elseif b == sb + 1 then
      sb = b; p = c; c = inc
    elseif b == sb then
      c = c + inc
    elseif b == sb - 1 then
      p = p + inc
    end
    set[#set + 1] = fields[3 * n - 2]; set[#set + 1] = sb
    set[#set + 1] = fields[3 * n - 1]; set[#set + 1] = c
    set[#set + 1] = fields[3 * n]; set[#set + 1] = p
    local frac = (now - sb * w) / w
    if frac < 0 then frac = 0 elseif frac > 1 then frac = 1 end
    out[n] = p * (1 - frac) + c
  end
  redis.call('HSET', key, unpack(set))
  return out
end

-- Counts travel as integers, in thousandths: estimates are fractional.
local function milli(x) return math.floor(x * 1000) end

-- Which of the orders ids this key has counted before (their stored
-- answers), and how many are new. An order without an id ('') is always
-- new. Guards live beside the key (key:o:<id>), in its slot.
local function seen_orders(key, ids)
  local seen, fresh = {}, 0
  for i, id in ipairs(ids) do
    local prev = false
    if id ~= '' then prev = redis.call('GET', key .. ':o:' .. id) end
    if prev then seen[i] = prev else fresh = fresh + 1 end
  end
  return seen, fresh
end
