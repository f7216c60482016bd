-- Release one reservation: DECR inflight:{id}, never below 0 (a double release heals to 0).
-- KEYS[1] = inflight:{id}. Returns the new value. KEEPTTL keeps any lease on the counter.
local value = redis.call('DECR', KEYS[1])
if value < 0 then
  redis.call('SET', KEYS[1], 0, 'KEEPTTL')
  value = 0
end
return value
