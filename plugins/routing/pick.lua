-- Atomic pick-and-reserve over N candidate replicas (the policy is in pick_lib.lua).
--
-- KEYS        (none fixed) the N candidates' replica:{id} hashes, then their inflight:{id}
--             reservation sets in the same order
-- ARGV        n (= N), then pick_params (pick_lib.lua; PICK_PARAMS in store.py), then the N
--             replica ids
-- Reply       REPLY{index (1-based; 0 when no candidate is eligible: all unhealthy, or N = 0),
--             inflight (the chosen replica's reservations now), score}
-- The protocol is declared in plugins/routing/store.py (PICK).

--! protocol pick
--! include lease_lib.lua
--! include pick_lib.lua

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = FIXED_ARGS + 1
local chosen = pick_replica(1, ARG.n, pick_params(first), first + PICK_PARAMS_COUNT, now_ms)
return REPLY(chosen or { index = 0, inflight = 0, score = 0 })
