-- Release one reservation: ZREM the reservation id from inflight:{id} (idempotent: a second
-- release of the same reservation, or one of an ended lease, changes nothing).
-- KEY.inflight = inflight:{id}; ARG.reservation = its id (RELEASE in plugins/routing/store.py).
-- Returns the number of live reservations.

--! protocol release
--! include lease_lib.lua

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEY.inflight, ARG.reservation)
return live_entries(KEY.inflight, now_ms)
