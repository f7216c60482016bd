-- Atomic pick-and-reserve over N candidate replicas (the policy is in pick_lib.lua).
--
-- KEYS[1..N]     replica:{id} hashes of the N candidates
-- KEYS[N+1..2N]  inflight:{id} reservation sets, same candidate order
-- ARGV           N, then pick_lib's PICK_ARGS values (tiebreak, stale_after_ms, kv_threshold,
--                kv_weight, unknown_score, default_service_ms, tie_tolerance, reservation id,
--                lease_ms), then the N replica ids
--
-- Returns {chosen_index (1-based), new inflight value, score as a "%.17g" string},
-- or {0} when no candidate is eligible (all unhealthy, or N = 0).

--! include lease_lib.lua
--! include pick_lib.lua

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
return pick_replica(1, n, pick_params(2), 2 + PICK_ARGS, now_ms) or { 0 }
