-- A sliding window that counts each order once: an order seen before
-- answers its count as it was then (guards key:o:<id>) and adds nothing.
-- a: now_ms, ttl_ms, window_ms, order_ids ('' for an order without an id).
-- Answers each order's count, in thousandths.
OPS.once_per_order = function(key, a)
  local ids = a.order_ids
  local seen, fresh = seen_orders(key, ids)
  local estimate = hit(key, a.now_ms, fresh, {a.window_ms})[1]
  redis.call('PEXPIRE', key, a.ttl_ms)
  local out, j = {}, 0
  for i, id in ipairs(ids) do
    if seen[i] then
      out[i] = tonumber(seen[i])
    else
      j = j + 1
      out[i] = milli(estimate - (fresh - j))
      if id ~= '' then redis.call('SET', key .. ':o:' .. id, out[i], 'PX', a.ttl_ms) end
    end
  end
  return out
end
