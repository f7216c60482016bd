-- Fleet-wide admission gate for one model, shared by every proxy process.
--
-- KEYS[1]  admitted:{model}   sorted set: ticket -> lease expiry (ms)
-- KEYS[2]  queue:{model}      sorted set: ticket -> priority * 2^40 + arrival sequence
-- KEYS[3]  queuelease:{model} sorted set: ticket -> expiry of its place in the queue (ms)
-- KEYS[4]  queueseq:{model}   integer: arrival sequence
-- KEYS[5..] replica:{id} hashes of the model's replicas
-- ARGV     op (enter | poll | leave | release), ticket, priority, lease_ms, queue_lease_ms,
--          allowance, unknown_slots, stale_after_ms, queue_limit (this priority), max_queue
--
-- capacity    = sum over replicas: fresh and healthy -> max_active + allowance;
--               fresh and unhealthy -> 0; missing or stale -> unknown_slots
-- outstanding = live tickets in admitted
-- A ticket is admitted when fewer than (capacity - outstanding) tickets are queued ahead of it
-- (better priority, or same priority and earlier): FIFO within a priority across all proxies.
--
-- Returns {status, capacity, outstanding, queued, ahead, drain_rps as a string}:
--   status  1 admitted, 0 waiting (queued), -1 queue full, -2 no capacity (no healthy replica),
--           -3 unknown ticket (its place expired), 2 released / left

local op, ticket = ARGV[1], ARGV[2]
local priority = tonumber(ARGV[3])
local lease_ms, queue_lease_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local allowance, unknown_slots = tonumber(ARGV[6]), tonumber(ARGV[7])
local stale_after_ms = tonumber(ARGV[8])
local queue_limit, max_queue = tonumber(ARGV[9]), tonumber(ARGV[10])
local PRIORITY_UNIT = 1099511627776 -- 2^40

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local admitted, queue, qlease, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

-- heal: expired admissions and abandoned places in the queue
redis.call('ZREMRANGEBYSCORE', admitted, '-inf', now_ms)
local gone = redis.call('ZRANGEBYSCORE', qlease, '-inf', now_ms)
if #gone > 0 then
  redis.call('ZREM', queue, unpack(gone))
  redis.call('ZREM', qlease, unpack(gone))
end

if op == 'release' then
  redis.call('ZREM', admitted, ticket)
  return { 2, 0, redis.call('ZCARD', admitted), redis.call('ZCARD', queue), 0, '0' }
end
if op == 'leave' then
  redis.call('ZREM', queue, ticket)
  redis.call('ZREM', qlease, ticket)
  return { 2, 0, redis.call('ZCARD', admitted), redis.call('ZCARD', queue), 0, '0' }
end

local capacity, drain, healthy_or_unknown = 0, 0, 0
for i = 5, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'max_active', 'healthy', 'ts_ms', 'drain_rps')
  local max_active, ts = tonumber(h[1]), tonumber(h[3])
  if max_active == nil or ts == nil or ts < now_ms - stale_after_ms then
    capacity = capacity + unknown_slots
    healthy_or_unknown = healthy_or_unknown + 1
  elseif h[2] == '1' then
    capacity = capacity + max_active + allowance
    healthy_or_unknown = healthy_or_unknown + 1
    local d = tonumber(h[4])
    if d ~= nil and d > 0 then
      drain = drain + d
    end
  end
end

local outstanding = redis.call('ZCARD', admitted)
local queued = redis.call('ZCARD', queue)
local free = capacity - outstanding
local drain_s = string.format('%.17g', drain)

local function admit()
  redis.call('ZREM', queue, ticket)
  redis.call('ZREM', qlease, ticket)
  redis.call('ZADD', admitted, now_ms + lease_ms, ticket)
  if redis.call('PTTL', admitted) < lease_ms then
    redis.call('PEXPIRE', admitted, lease_ms)
  end
  return { 1, capacity, outstanding + 1, redis.call('ZCARD', queue), 0, drain_s }
end

if op == 'enter' then
  if redis.call('ZSCORE', admitted, ticket) then
    return { 1, capacity, outstanding, queued, 0, drain_s }
  end
  local score = priority * PRIORITY_UNIT + redis.call('INCR', seq)
  local ahead = redis.call('ZCOUNT', queue, '-inf', '(' .. score)
  if ahead < free then
    return admit()
  end
  if healthy_or_unknown == 0 then
    return { -2, capacity, outstanding, queued, ahead, drain_s }
  end
  local same = redis.call('ZCOUNT', queue, priority * PRIORITY_UNIT,
    '(' .. ((priority + 1) * PRIORITY_UNIT))
  if queued >= max_queue or same >= queue_limit then
    return { -1, capacity, outstanding, queued, ahead, drain_s }
  end
  redis.call('ZADD', queue, score, ticket)
  redis.call('ZADD', qlease, now_ms + queue_lease_ms, ticket)
  redis.call('PEXPIRE', queue, queue_lease_ms * 10)
  redis.call('PEXPIRE', qlease, queue_lease_ms * 10)
  redis.call('PEXPIRE', seq, queue_lease_ms * 10)
  return { 0, capacity, outstanding, queued + 1, ahead, drain_s }
end

-- poll
local rank = redis.call('ZRANK', queue, ticket)
if rank == false then
  if redis.call('ZSCORE', admitted, ticket) then
    return { 1, capacity, outstanding, queued, 0, drain_s }
  end
  return { -3, capacity, outstanding, queued, 0, drain_s }
end
if rank < free then
  return admit()
end
redis.call('ZADD', qlease, now_ms + queue_lease_ms, ticket)
redis.call('PEXPIRE', queue, queue_lease_ms * 10)
redis.call('PEXPIRE', qlease, queue_lease_ms * 10)
return { 0, capacity, outstanding, queued, rank, drain_s }
