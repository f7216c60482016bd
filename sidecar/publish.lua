-- A sidecar's publish: the replica hash, the model's replica set and the server hash, at once.
-- The replica hash is written only when no fresher fact is stored: a poll that began before
-- another writer's sample (the catalogue's cold loader marks a replica healthy the moment its
-- load returns) must not overwrite it with what it saw before the load ("unloaded").
--
-- KEY.replica the replica hash, KEY.replicas the model's replica set, KEY.server the server hash
-- ARG.poll_started_ms when this poll began (ms since the epoch), ARG.ttl_ms, ARG.replica_id,
-- ARG.replica_fields the number of replica-hash field/value arguments that follow the fixed
-- ones; then those, then the server hash's field/value pairs (PUBLISH in sidecar/service.py).
-- Returns 1 when the replica hash was written, 0 when a fresher fact was kept.

--! protocol publish

local stored = tonumber(redis.call('HGET', KEY.replica, 'sample_ts_ms') or '0') or 0
local n = ARG.replica_fields
local first = FIXED_ARGS + 1
local written = 0
if stored <= ARG.poll_started_ms then
  redis.call('HSET', KEY.replica, unpack(ARGV, first, first + n - 1))
  redis.call('PEXPIRE', KEY.replica, ARG.ttl_ms)
  written = 1
end
redis.call('SADD', KEY.replicas, ARG.replica_id)
redis.call('HSET', KEY.server, unpack(ARGV, first + n, #ARGV))
redis.call('PEXPIRE', KEY.server, ARG.ttl_ms)
return written
