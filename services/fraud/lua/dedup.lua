-- The subject's first owner keeps it for ttl_ms (SET NX).
-- a: owner, ttl_ms. Answers '' when the subject is a.owner's now, else its owner.
OPS.dedup = function(key, a)
  if redis.call('SET', key, a.owner, 'NX', 'PX', a.ttl_ms) then return '' end
  return redis.call('GET', key) or ''
end
