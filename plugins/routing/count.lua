-- Live reservations per replica: for each KEYS[i] = inflight:{id}, drop expired leases and
-- return the count. Used by snapshots and the admission gate (outstanding work).
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local counts = {}
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now_ms)
  counts[i] = redis.call('ZCARD', KEYS[i])
end
return counts
