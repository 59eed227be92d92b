-- Distinct IPs and devices of the subject (HyperLogLogs key:ips and
-- key:devices), and a flag (key:leaked) raised once when either passes max.
-- a: ip, device ('' adds nothing), ttl_ms, max, flag_ttl_ms.
-- Answers {ips, devices, 1 if this call raised the flag else 0}.
OPS.spread = function(key, a)
  local ips_key, devices_key = key .. ':ips', key .. ':devices'
  if a.ip ~= '' then redis.call('PFADD', ips_key, a.ip) end
  if a.device ~= '' then redis.call('PFADD', devices_key, a.device) end
  local ips = redis.call('PFCOUNT', ips_key)
  local devices = redis.call('PFCOUNT', devices_key)
  redis.call('PEXPIRE', ips_key, a.ttl_ms)
  redis.call('PEXPIRE', devices_key, a.ttl_ms)
  local newly = 0
  if ips > a.max or devices > a.max then
    if redis.call('SET', key .. ':leaked', '1', 'NX', 'PX', a.flag_ttl_ms) then newly = 1 end
  end
  return {ips, devices, newly}
end
