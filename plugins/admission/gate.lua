-- Fleet-wide admission gate for one model, shared by every proxy process.
--
-- KEYS[1]  admitted:{model}   sorted set: ticket -> lease expiry (ms); the proxy holding a
--                             ticket renews its lease while the request runs (renew.lua)
-- KEYS[2]  queue:{model}      sorted set: ticket -> priority * 2^40 + arrival sequence
-- KEYS[3]  queuelease:{model} sorted set: ticket -> expiry of its place in the queue (ms)
-- KEYS[4]  queueseq:{model}   integer: arrival sequence
-- KEYS[5]  grantseq:{model}   integer: grants so far (each grant's number is in its message)
-- KEYS[6]  enqueueseq:{model} integer: enqueues so far (each enqueue's number is in its message)
-- KEYS[7..6+N]    replica:{id} hashes of the model's N replicas
-- KEYS[7+N..6+2N] inflight:{id} routing reservations of the same replicas (sorted sets, score =
--                 lease expiry; empty when the routing plugin is not used); a replica reported
--                 unhealthy counts none of its reservations (lease_lib.lua)
-- ARGV     op (enter | poll | leave | release | peek), ticket, priority, lease_ms, queue_lease_ms,
--          allowance, unknown_slots, stale_after_ms, queue_limit (this priority), max_queue,
--          grant channel, ahead_limit (enter: the most requests that may be ahead of this one
--          in the queue, from the expected-wait policy in expected_wait.py; '' = no limit),
--          enqueue channel, then optionally (when the routing plugin routes this model):
--            enter, poll: pick_lib's PICK_ARGS values and the N replica ids: an admitted
--              request (enter, or poll claiming its grant) also gets its replica picked and
--              reserved, in this same atomic call;
--            release: the request's routing reservation (its replica's index in 1..N, its
--              reservation id), released in this same call
--
-- slots       = sum over replicas: fresh and healthy -> max_active; fresh and unhealthy -> 0;
--               missing, invalid (pick_lib.lua's read_replica, as the router reads it) or
--               stale -> unknown_slots
-- capacity    = slots + allowance per fresh healthy replica
-- outstanding = live tickets in admitted
-- free slots  = sum over replicas of max(0, its slots - its routing reservations), less the
--               admitted tickets not yet routed (outstanding - all reservations); without the
--               routing plugin (no reservations) this is slots - outstanding
--
-- A new request with nobody queued ahead of it (better priority, or same priority and
-- earlier) is admitted while outstanding < capacity: the allowance keeps every batch slot fed
-- without a gateway round trip between one request's end and the next one's start.
-- A request that had to wait is granted only while a batch slot is free somewhere (free
-- slots > 0), never into the allowance: its gateway wait already used its time. A slot counts
-- per replica: the router may queue a granted request briefly on a fast replica rather than
-- start it on a slow one (only when that is expected to finish sooner), and the slow one's
-- free slot must not go unused while others queue. Slots go to waiters in order (priority, then arrival; FIFO across all proxies) the
-- moment they free: every op first grants (moves queue heads into admitted, with a short
-- lease until the waiter claims it by polling) and publishes each granted ticket on the
-- grant channel ("<ticket> <grant number>"), so the waiting proxy wakes at once instead of
-- polling; the numbers tell every proxy exactly how far the queue moved since a reply.
--
-- Every request that joins the queue is published on the enqueue channel
-- ("<enqueue number> <priority> <ticket>"): with the grants, every proxy can tell how many are ahead of
-- its next request between two calls (its shed memo, controller.py).
--
-- Returns {status, capacity, outstanding, queued, ahead, drain_rps as a string, grants so far,
-- enqueues so far, throughput as a string (the fleet's completions/s when every batch slot is
-- busy: sum over fresh healthy replicas of max_active / mean request time, from the sidecars'
-- request_ms; 0 while none is measured)}, and when it picked a replica, pick_lib's
-- {chosen index, inflight, score}:
--   status  1 admitted, 0 waiting (queued), -1 queue full, -2 no capacity (no healthy replica),
--           -3 unknown ticket (its place expired), -4 expected wait too long (more than
--           ahead_limit ahead of it), 2 released / left

local op, ticket = ARGV[1], ARGV[2]
local priority = tonumber(ARGV[3])
local lease_ms, queue_lease_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local allowance, unknown_slots = tonumber(ARGV[6]), tonumber(ARGV[7])
local stale_after_ms = tonumber(ARGV[8])
local queue_limit, max_queue = tonumber(ARGV[9]), tonumber(ARGV[10])
local channel = ARGV[11]
local ahead_limit = tonumber(ARGV[12] or '')
local enqueue_channel = ARGV[13]
local PICK_FIRST = 14 -- ARGV[PICK_FIRST..]: enter, poll: the pick; release: the reservation
local picking = #ARGV >= PICK_FIRST
local PRIORITY_UNIT = 1099511627776 -- 2^40

--! include ../routing/lease_lib.lua
--! include ../routing/pick_lib.lua

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local admitted, queue, qlease, seq, grantseq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local enqueueseq = KEYS[6]
local FIRST_REPLICA = 7 -- KEYS[FIRST_REPLICA..]: the N replica hashes, then their reservations

-- heal: ended leases (lease_lib.lua: admissions no proxy renews any more, unclaimed grants)
-- and abandoned places in the queue
live_entries(admitted, now_ms)
local gone = redis.call('ZRANGEBYSCORE', qlease, '-inf', now_ms)
if #gone > 0 then
  redis.call('ZREM', queue, unpack(gone))
  redis.call('ZREM', qlease, unpack(gone))
end

local n = (#KEYS - FIRST_REPLICA + 1) / 2

if op == 'release' or op == 'leave' then
  -- leave: a waiter gives up (timeout, client gone); a grant it had not claimed goes too
  redis.call('ZREM', admitted, ticket)
  redis.call('ZREM', queue, ticket)
  redis.call('ZREM', qlease, ticket)
  if op == 'release' and ARGV[PICK_FIRST] then
    -- the request's routing reservation ends with it: its batch slot is granted below at once
    local replica = tonumber(ARGV[PICK_FIRST])
    redis.call('ZREM', KEYS[FIRST_REPLICA + n + replica - 1], ARGV[PICK_FIRST + 1])
  end
end
local slots, healthy, unknown, drain, free, reserved, throughput = 0, 0, 0, 0, 0, 0, 0
for i = FIRST_REPLICA, FIRST_REPLICA + n - 1 do
  -- the same reading as the pick's (pick_lib.lua): a hash the router holds invalid (missing
  -- field, max_active < 1, kv_fraction out of [0, 1], ...) is unknown here too
  local s, h = read_replica(KEYS[i], 'drain_rps', 'request_ms')
  local own = 0
  local down = false
  if s == nil or s.ts < now_ms - stale_after_ms then
    own = unknown_slots
    unknown = unknown + 1
  elseif not s.healthy then
    down = true -- reported unhealthy: no slots, and its reservations do not count (lease_lib)
  else
    own = s.max_active
    healthy = healthy + 1
    local d = tonumber(h[8])
    if d ~= nil and d > 0 then
      drain = drain + d
    end
    local request_ms = tonumber(h[9])
    if request_ms ~= nil and request_ms > 0 then
      throughput = throughput + own * 1000 / request_ms
    end
  end
  slots = slots + own
  -- a down replica's requests are failing and will be retried elsewhere: counting their
  -- reservations would make them look routed (and count their retries twice); not counted,
  -- their tickets count as admitted and not yet routed, which is what they are
  local taken = counted_reservations(KEYS[i + n], now_ms, down)
  reserved = reserved + taken
  free = free + math.max(0, own - taken)
end
local capacity = slots + allowance * healthy
local drain_s = string.format('%.17g', drain)
local throughput_s = string.format('%.17g', throughput)

-- grant free batch slots to the queue's heads
local outstanding = redis.call('ZCARD', admitted)
free = free - math.max(0, outstanding - reserved)
while free > 0 and outstanding < capacity do
  local head = redis.call('ZRANGE', queue, 0, 0)
  if #head == 0 then
    break
  end
  redis.call('ZREM', queue, head[1])
  redis.call('ZREM', qlease, head[1])
  redis.call('ZADD', admitted, now_ms + queue_lease_ms, head[1])
  if redis.call('PTTL', admitted) < queue_lease_ms then
    redis.call('PEXPIRE', admitted, queue_lease_ms)
  end
  redis.call('PUBLISH', channel, head[1] .. ' ' .. redis.call('INCR', grantseq))
  outstanding = outstanding + 1
  free = free - 1
end
local queued = redis.call('ZCARD', queue)
local granted = tonumber(redis.call('GET', grantseq) or '0')
local enqueued = tonumber(redis.call('GET', enqueueseq) or '0')

local function answer(status, out, waiting, ahead)
  return { status, capacity, out, waiting, ahead, drain_s, granted, enqueued, throughput_s }
end

-- admitted now: with the pick arguments, the replica is picked and reserved as well
local function admit(out, waiting)
  local reply = answer(1, out, waiting, 0)
  if picking then
    local chosen = pick_replica(FIRST_REPLICA, n, pick_params(PICK_FIRST), PICK_FIRST + PICK_ARGS,
      now_ms)
    if chosen then
      reply[10], reply[11], reply[12] = chosen[1], chosen[2], chosen[3]
    end
  end
  return reply
end

local function too_long(ahead)
  return ahead_limit ~= nil and ahead > ahead_limit
end

if op == 'release' or op == 'leave' then
  return answer(2, outstanding, queued, 0)
end

local function hold(expiry_ms)
  redis.call('ZADD', admitted, expiry_ms, ticket)
  if redis.call('PTTL', admitted) < lease_ms then
    redis.call('PEXPIRE', admitted, lease_ms)
  end
end

if op == 'peek' then
  -- what a new request of this priority would find: everything queued at its priority or
  -- better is ahead of it (it would arrive last); nothing changes but the grants above
  local ahead = redis.call('ZCOUNT', queue, '-inf', '(' .. ((priority + 1) * PRIORITY_UNIT))
  if too_long(ahead) then
    return answer(-4, outstanding, queued, ahead)
  end
  return answer(0, outstanding, queued, ahead)
end

if op == 'enter' then
  if redis.call('ZSCORE', admitted, ticket) then
    return answer(1, outstanding, queued, 0)
  end
  local score = priority * PRIORITY_UNIT + redis.call('INCR', seq)
  local ahead = redis.call('ZCOUNT', queue, '-inf', '(' .. score)
  if ahead == 0 and outstanding < capacity then
    hold(now_ms + lease_ms)
    return admit(outstanding + 1, queued)
  end
  if healthy + unknown == 0 then
    return answer(-2, outstanding, queued, ahead)
  end
  local same = redis.call('ZCOUNT', queue, priority * PRIORITY_UNIT,
    '(' .. ((priority + 1) * PRIORITY_UNIT))
  if queued >= max_queue or same >= queue_limit then
    return answer(-1, outstanding, queued, ahead)
  end
  if too_long(ahead) then
    return answer(-4, outstanding, queued, ahead)
  end
  redis.call('ZADD', queue, score, ticket)
  redis.call('ZADD', qlease, now_ms + queue_lease_ms, ticket)
  redis.call('PEXPIRE', queue, queue_lease_ms * 10)
  redis.call('PEXPIRE', qlease, queue_lease_ms * 10)
  redis.call('PEXPIRE', seq, queue_lease_ms * 10)
  enqueued = redis.call('INCR', enqueueseq)
  redis.call('PUBLISH', enqueue_channel, enqueued .. ' ' .. priority .. ' ' .. ticket)
  return answer(0, outstanding, queued + 1, ahead)
end

-- poll: a waiter claims its grant (the admission's full lease from now), or keeps its place
if redis.call('ZSCORE', admitted, ticket) then
  hold(now_ms + lease_ms)
  return admit(outstanding, queued)
end
local rank = redis.call('ZRANK', queue, ticket)
if rank == false then
  return answer(-3, outstanding, queued, 0)
end
redis.call('ZADD', qlease, now_ms + queue_lease_ms, ticket)
redis.call('PEXPIRE', queue, queue_lease_ms * 10)
redis.call('PEXPIRE', qlease, queue_lease_ms * 10)
return answer(0, outstanding, queued, rank)
