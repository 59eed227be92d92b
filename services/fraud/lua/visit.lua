-- Unique visitors: whether a visitor's unique event came less than
-- a.window_ms before this one. Each period of window_ms has its hashes
-- (<family key>#<period>:<shard>), a field per visitor whose unique event
-- fell in the period: the visitor's 8 bytes = the event's offset in the
-- period (ms, 4 bytes big-endian) and its owner's tag (4 bytes). The
-- unique event of an event in period d within the window is in d (then
-- less than a window before) or in d - 1 (then compare the times): two
-- lookups, exact; a unique one also looks in d + 1 (an event checked after
-- a later one). A visitor's field is written only by its unique events.
-- key: the family key (of the bucket). a: visitor (its 8 bytes, then the
-- event's owner's tag), shard, now_ms, window_ms. Answers 1 for a repeat,
-- else 0 (a unique event, or a retried check of one: the tag is its own).
OPS.visit = function(key, a)
  local now, window = a.now_ms, a.window_ms
  local visitor, tag = string.sub(a.visitor, 1, 8), string.sub(a.visitor, 9)
  local d = math.floor(now / window)
  local shard = ':' .. a.shard
  local cur_key = key .. '#' .. d .. shard
  local seen = redis.call('HGET', cur_key, visitor)
  if seen then
    if string.sub(seen, 5) == tag then return 0 end
    return 1
  end
  seen = redis.call('HGET', key .. '#' .. (d - 1) .. shard, visitor)
  if seen then
    if string.sub(seen, 5) == tag then return 0 end
    if now - ((d - 1) * window + struct.unpack('>I4', seen)) < window then return 1 end
  end
  -- Checked out of time order (two replicas, a batch across midnight): a
  -- later event of the next period may already be the unique one; this
  -- earlier one is then its repeat, so the visitor still counts once.
  seen = redis.call('HGET', key .. '#' .. (d + 1) .. shard, visitor)
  if seen then
    if string.sub(seen, 5) == tag then return 0 end
    if (d + 1) * window + struct.unpack('>I4', seen) - now < window then return 1 end
  end
  redis.call('HSET', cur_key, visitor, struct.pack('>I4', now - d * window) .. tag)
  -- The hash serves its period and the next one, and a little more (a
  -- minute of a day) for a late event, then goes (counted from the event's time, as the windows are).
  expire_at(cur_key, (d + 2) * window + math.floor(window / 1440), now)
  return 0
end
