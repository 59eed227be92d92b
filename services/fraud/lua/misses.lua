-- Code guessing: unknown or mistyped codes of one subject (a customer
-- address or id) in a fixed window that starts with its first miss, so a
-- blocked subject is told exactly when it may try again (the key's TTL).
-- key: the subject's counter. a: inc (0 only reads), window_ms, threshold.
-- Answers {count, ms left in the window, 1 when this call crossed the
-- threshold (the window's one alert), else 0}.
OPS.misses = function(key, a)
  local count
  if a.inc > 0 then
    count = redis.call('INCRBY', key, a.inc)
    if count == a.inc then redis.call('PEXPIRE', key, a.window_ms) end
  else
    count = tonumber(redis.call('GET', key) or '0')
  end
  local left = 0
  if count > 0 then
    left = redis.call('PTTL', key)
    if left < 0 then
      -- A key without a TTL (a crash between INCRBY and PEXPIRE) must not block for ever.
      redis.call('PEXPIRE', key, a.window_ms)
      left = a.window_ms
    end
  end
  local crossed = 0
  if a.inc > 0 and count >= a.threshold and count - a.inc < a.threshold then crossed = 1 end
  return {count, left, crossed}
end
