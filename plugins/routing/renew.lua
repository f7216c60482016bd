-- Renew the leases of the entries one proxy process still holds, in one call per interval.
--
-- KEYS        (none fixed) K sorted sets (admitted:{model}, inflight:{id}): member -> lease
--             expiry (ms)
-- ARGV        ARG.lease_ms, ARG.mode (RENEW in plugins/routing/leases.py), then per key: the
--             number of members, then the members
--   mode 'renew'    only members still present get the new expiry (ZADD XX): a member
--                   released while this call was on its way stays released
--   mode 'restore'  the members are added back (Redis lost them: a restart without its data,
--                   an outage longer than the lease); the caller sends only members it still
--                   holds after a 'renew' reported them missing
--   mode 'release'  the members are removed (ZREM): releases that failed while Redis was
--                   unreachable, done now
-- Every key's own TTL is kept at least one lease (the set lives as long as its longest lease).
-- Returns, per key, the members that were missing ('renew' only; empty for the other modes).

--! protocol renew

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = ARG.lease_ms
local restore = ARG.mode == 'restore'
local release = ARG.mode == 'release'
local expiry = now_ms + lease_ms
local arg = FIXED_ARGS + 1
local missing = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local count = tonumber(ARGV[arg])
  arg = arg + 1
  local gone = {}
  for j = 1, count do
    local member = ARGV[arg + j - 1]
    if release then
      redis.call('ZREM', key, member)
    -- present = not removed yet: a lease that ended while its request still runs (the renewal
    -- came late) is renewed as well, its holder says the request is live
    elseif restore or redis.call('ZSCORE', key, member) then
      redis.call('ZADD', key, expiry, member)
    else
      gone[#gone + 1] = member
    end
  end
  arg = arg + count
  if not release and redis.call('PTTL', key) < lease_ms and redis.call('EXISTS', key) == 1 then
    redis.call('PEXPIRE', key, lease_ms)
  end
  missing[i] = gone
end
return missing
