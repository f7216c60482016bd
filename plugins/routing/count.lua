-- Live reservations per replica: for each KEYS[i] = inflight:{id}, drop ended leases and return
-- the count (lease_lib.lua's live_entries). Used by snapshots, tests and diagnostics.

--! protocol count
--! include lease_lib.lua

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local counts = {}
for i = 1, #KEYS do
  counts[i] = live_entries(KEYS[i], now_ms)
end
return counts
