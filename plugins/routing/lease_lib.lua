-- The lease policy in Redis: the mirror of plugins/routing/leases.py (`lease_live`,
-- `counted_reservations`), included (`--! include`) by count.lua, release.lua, and by pick.lua
-- and the admission gate (gate.lua) before pick_lib.lua, which uses it.
--
-- Admission tickets (admitted:{model}) and routing reservations (inflight:{id}) are members of
-- sorted sets whose score is their lease's expiry (ms since the epoch, Redis TIME). An entry
-- counts while its lease has not ended (expiry > now_ms); the proxy process that holds it
-- renews the lease while its request runs (renew.lua), so an entry nobody renews (its proxy
-- died, its release was lost to a Redis outage) stops counting one lease after its last renewal.
-- A replica's reservations count only while the replica is not reported down (a fresh state
-- saying unhealthy): their requests are failing there and will be retried elsewhere, where the
-- retry's own reservation counts; counting both would count one request twice.

-- Remove the ended leases of a sorted set (expiry <= now_ms); the number of live ones.
local function live_entries(key, now_ms)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
  return redis.call('ZCARD', key)
end

-- The reservations of one replica that count: its live ones, none while it is reported down.
local function counted_reservations(key, now_ms, down)
  local live = live_entries(key, now_ms)
  if down then
    return 0
  end
  return live
end
