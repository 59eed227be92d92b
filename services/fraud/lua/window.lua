-- Sliding window counters of the subject.
-- a: now_ms, inc, ttl_ms, windows_ms (a list). Answers each window's estimate, in thousandths.
OPS.window = function(key, a)
  local estimates = hit(key, a.now_ms, a.inc, a.windows_ms)
  redis.call('PEXPIRE', key, a.ttl_ms)
  for i, e in ipairs(estimates) do estimates[i] = milli(e) end
  return estimates
end
