-- KEYS[1]: the tag key of the operations' bucket (what Redis Cluster routes
-- the call by; every key an operation touches shares its hash tag).
-- ARGV[1]: the store's key prefix. ARGV[2]: the operations, MessagePack, an
-- array of {name, subject, arguments}; a subject begins with its bucket's tag.
-- Answers the operations' answers, MessagePack, an array in the same order.
local prefix = ARGV[1]
local answers = {}
for i, op in ipairs(cmsgpack.unpack(ARGV[2])) do
  local operation = OPS[op[1]]
  if operation == nil then return redis.error_reply('unknown fraud operation ' .. tostring(op[1])) end
  answers[i] = operation(prefix .. op[2], op[3])
end
return cmsgpack.pack(answers)
