-- A rate far above the subject's own usual rate (key:rate), alerted once
-- per episode (key:alerted).
-- a: now_ms, inc, ttl_ms, short_ms, long_ms, min_volume, factor, flag_ttl_ms,
--    and order_ids (optional: then each order counts once, and inc is how
--    many of them are new; guards key:o:<id>).
-- Answers {short, baseline, state}: the short window's count and the usual
-- one, in thousandths, and 0 calm, 1 spiking, 2 spiking and this call is the
-- first to notice (raise the alert).
OPS.spike = function(key, a)
  local now, inc = a.now_ms, a.inc
  local short_ms, long_ms = a.short_ms, a.long_ms
  local rate = key .. ':rate'
  if a.order_ids then
    local seen, fresh = seen_orders(key, a.order_ids)
    inc = fresh
    for i, id in ipairs(a.order_ids) do
      if id ~= '' and not seen[i] then redis.call('SET', key .. ':o:' .. id, '1', 'PX', a.ttl_ms) end
    end
  end
  local had_history = redis.call('HEXISTS', rate, '1b') == 1
  local estimates = hit(rate, now, inc, {short_ms, long_ms})
  local short, long = estimates[1], estimates[2]
  redis.call('PEXPIRE', rate, a.ttl_ms)
  -- The usual rate is what the long window held before the current short
  -- one, per short window of history actually seen: a subject first seen
  -- two hours ago has two hours of history, not a quiet rest of the day.
  -- With no full window behind it, it has no usual rate yet (baseline 0).
  local first = tonumber(redis.call('HGET', rate, 'first'))
  if first == nil and had_history then
    -- Counted before first-seen times were kept: assume a full history
    -- rather than a cold start that would make every busy subject spike.
    first = now - long_ms
    redis.call('HSET', rate, 'first', first)
  elseif first == nil or now < first then
    redis.call('HSET', rate, 'first', now); first = now
  end
  local periods = long_ms / short_ms - 1
  local history = (now - first) / short_ms - 1
  local baseline = 0
  if history > 0 then
    if history < periods then periods = history end
    if periods < 1 then periods = 1 end
    baseline = (long - short) / periods
    if baseline < 0 then baseline = 0 end
  end
  local state = 0
  if short >= a.min_volume and short >= a.factor * math.max(baseline, 1) then
    state = 1
    if redis.call('SET', key .. ':alerted', '1', 'NX', 'PX', a.flag_ttl_ms) then state = 2 end
  end
  return {milli(short), milli(baseline), state}
end
