-- A sidecar's publish: the replica hash, the model's replica set and the server hash, at once.
-- The replica hash is written only when no fresher fact is stored: a poll that began before
-- another writer's sample (the catalogue's cold loader marks a replica healthy the moment its
-- load returns) must not overwrite it with what it saw before the load ("unloaded").
--
-- KEYS[1] replica hash, KEYS[2] the model's replica set, KEYS[3] server hash
-- ARGV[1] when this poll began (ms since the epoch), ARGV[2] TTL (ms), ARGV[3] replica id,
-- ARGV[4] number of replica-hash field/value arguments that follow; then those, then the
-- server hash's field/value pairs.
-- Returns 1 when the replica hash was written, 0 when a fresher fact was kept.
local stored = tonumber(redis.call('HGET', KEYS[1], 'sample_ts_ms') or '0') or 0
local n = tonumber(ARGV[4])
local written = 0
if stored <= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + n))
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  written = 1
end
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[3], unpack(ARGV, 5 + n, #ARGV))
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return written
