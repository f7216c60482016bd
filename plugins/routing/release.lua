-- Release one reservation: ZREM the reservation id from inflight:{id} (idempotent: a second
-- release of the same reservation, or one of an ended lease, changes nothing).
-- KEYS[1] = inflight:{id}; ARGV[1] = reservation id. Returns the number of live reservations.

--! include lease_lib.lua

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[1], ARGV[1])
return live_entries(KEYS[1], now_ms)
