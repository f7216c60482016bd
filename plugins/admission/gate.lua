-- Fleet-wide admission gate for one model, shared by every proxy process.
--
-- The protocol (KEYS, ARGV and the reply, by name) is declared once, in plugins/admission/gate.py
-- (GATE); the policy it applies is plugins/admission/rules.py, which this script mirrors and a
-- property test compares it with (tests/test_gate_parity.py).
--
-- KEY.admitted     admitted:{model}   sorted set: ticket -> lease expiry (ms); the proxy holding
--                                     a ticket renews its lease while the request runs (renew.lua)
-- KEY.queue        queue:{model}      sorted set: ticket -> priority * 2^40 + its start tag (the
--                                     fair order, rules.py; ties by ticket)
-- KEY.queue_lease  queuelease:{model} sorted set: ticket -> expiry of its place in the queue (ms)
-- KEY.fair         fair:{model}       hash: 'v:<priority>' -> the tier's virtual time,
--                                     'f:<priority>:<flow>' -> the flow's last finish tag
-- KEY.queue_flow   queueflow:{model}  hash: queued ticket -> its flow
-- KEY.flow_queued  flowqueued:{model} hash: flow -> its places in the queue
-- KEY.deadlines    deadlines:{model}  sorted set: queued ticket -> the end of its place (ms): its
--                                     time-to-first-token deadline; never granted after it
-- KEY.grant_seq    grantseq:{model}   integer: grants so far (each grant's number is in its
--                                     message)
-- KEY.enqueue_seq  enqueueseq:{model} integer: enqueues so far (each enqueue's number is in its
--                                     message)
-- then (variable) the replica:{id} hashes of the model's N replicas, then the inflight:{id}
--   routing reservations of the same replicas (sorted sets, score = lease expiry; empty when the
--   routing plugin is not used), then their prefix:{id} indexes (pick_lib.lua; read and written
--   only when picking); a replica reported unhealthy counts none of its reservations
--   (lease_lib.lua)
-- ARG      op (enter | poll | leave | release | peek), ticket, priority, lease_ms, queue_lease_ms,
--          allowance, unknown_slots, stale_after_ms, queue_limit (this priority), max_queue,
--          grant_channel, ahead_limit (enter: the most requests that may be ahead of this one in
--          the queue, from the expected-wait policy in expected_wait.py; none = no limit),
--          enqueue_channel, routed_index and routed_reservation (release: the request's routing
--          reservation, its replica's index in 1..N and its id, released in this same call;
--          0 and '' for none), flow, weight, cost (the fair order: the caller's flow, its
--          weight, the request's tokens), flow_limit (the most places its flow may hold; none =
--          no limit of its own), usage (release: the tokens the response used; none = not
--          reported), deadline_ms (enter: the request's time-to-first-token deadline from now;
--          none = no deadline),
--          then optionally (enter, poll; when the routing plugin routes this model): pick_params
--          (pick_lib.lua), the N replica ids and the prompt-block hashes: an admitted request (enter, or poll claiming its
--          grant) also gets its replica picked and reserved, in this same atomic call
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
-- free slot must not go unused while others queue. Slots go to waiters in queue order (priority,
-- then the fair order between flows, rules.py; across all proxies) the
-- moment they free: every op first grants (moves queue heads into admitted, with a short
-- lease until the waiter claims it by polling) and publishes each granted ticket on the
-- grant channel ("<ticket> <grant number>"), so the waiting proxy wakes at once instead of
-- polling; the numbers tell every proxy exactly how far the queue moved since a reply.
--
-- Every request that joins the queue is published on the enqueue channel
-- ("<enqueue number> <score> <flow, or - for none> <ticket>"): with the grants, every proxy can
-- tell how many are ahead of its next request between two calls (its shed memo, controller.py).
--
-- Replies REPLY{status, capacity, outstanding, queued, ahead, drain_rps, grants (so far),
-- enqueued (so far), throughput_rps (the fleet's completions/s when every batch slot is busy:
-- sum over fresh healthy replicas of max_active * 1000 / request_ms, from the sidecars; 0 while
-- none is measured), next_score (enter, peek: the lowest score the caller's flow's next request
-- can get), picked_index, picked_inflight, picked_score (pick_lib's pick when it picked a
-- replica; picked_index 0 when it did not)}:
--   status  1 admitted, 0 waiting (queued), -1 queue full, -2 no capacity (no healthy replica),
--           -3 unknown ticket (its place expired), -4 expected wait too long (more than
--           ahead_limit ahead of it), -5 the flow's places all taken (flow_limit), 2 released /
--           left

--! protocol gate
--! include ../routing/lease_lib.lua
--! include ../routing/pick_lib.lua

local op, ticket, priority = ARG.op, ARG.ticket, ARG.priority
local lease_ms, queue_lease_ms = ARG.lease_ms, ARG.queue_lease_ms
local picking = #ARGV > FIXED_ARGS -- ARGV[FIXED_ARGS + 1..]: pick_params, then the replica ids
local PRIORITY_UNIT = 1099511627776 -- 2^40

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local admitted, queue, qlease = KEY.admitted, KEY.queue, KEY.queue_lease
local fair, queue_flow, flow_queued = KEY.fair, KEY.queue_flow, KEY.flow_queued
local deadlines = KEY.deadlines
local FIRST_REPLICA = FIXED_KEYS + 1 -- KEYS[FIRST_REPLICA..]: replica hashes, reservations, indexes

local function fmt(x)
  return string.format('%.17g', x) -- the same double back (tonumber)
end

-- a place in the queue ends (granted, left, expired, past its deadline, pushed out): the
-- ticket leaves the queue, its lease and its deadline, and its flow holds one place less
local function drop_place(t)
  redis.call('ZREM', queue, t)
  redis.call('ZREM', qlease, t)
  redis.call('ZREM', deadlines, t)
  local flow = redis.call('HGET', queue_flow, t)
  if flow then
    redis.call('HDEL', queue_flow, t)
    if redis.call('HINCRBY', flow_queued, flow, -1) <= 0 then
      redis.call('HDEL', flow_queued, flow)
    end
  end
end

-- the fair order (rules.py: Fair)
local function start_tag(prio, flow)
  local v = tonumber(redis.call('HGET', fair, 'v:' .. prio) or '0')
  local f = tonumber(redis.call('HGET', fair, 'f:' .. prio .. ':' .. flow) or '0')
  return math.max(v, f)
end

local function charge(prio, tag)
  redis.call('HSET', fair, 'f:' .. prio .. ':' .. ARG.flow, fmt(tag + ARG.cost / ARG.weight))
end

local function served(score)
  local prio = math.floor(score / PRIORITY_UNIT)
  local tag = score - prio * PRIORITY_UNIT
  if tag > tonumber(redis.call('HGET', fair, 'v:' .. prio) or '0') then
    redis.call('HSET', fair, 'v:' .. prio, fmt(tag))
  end
end

-- heal: ended leases (lease_lib.lua: admissions no proxy renews any more, unclaimed grants)
-- and abandoned places in the queue
live_entries(admitted, now_ms)
for _, t in ipairs(redis.call('ZRANGEBYSCORE', qlease, '-inf', now_ms)) do
  drop_place(t)
end
-- and places past their deadline (rules.py: gate_call)
for _, t in ipairs(redis.call('ZRANGEBYSCORE', deadlines, '-inf', now_ms)) do
  drop_place(t)
end

local n = (#KEYS - FIXED_KEYS) / 3

if op == 'release' or op == 'leave' then
  -- leave: a waiter gives up (timeout, client gone); a grant it had not claimed goes too
  redis.call('ZREM', admitted, ticket)
  drop_place(ticket)
  if op == 'release' and ARG.usage ~= nil then
    -- rules.py: Fair.correct: the flow was charged ARG.cost, the response used ARG.usage
    local field = 'f:' .. priority .. ':' .. ARG.flow
    local f = redis.call('HGET', fair, field)
    if f then
      redis.call('HSET', fair, field, fmt(tonumber(f) + (ARG.usage - ARG.cost) / ARG.weight))
    end
  end
  if op == 'release' and ARG.routed_index > 0 then
    -- the request's routing reservation ends with it: its batch slot is granted below at once
    redis.call('ZREM', KEYS[FIRST_REPLICA + n + ARG.routed_index - 1], ARG.routed_reservation)
  end
end

-- the fleet (rules.py: fleet): slots, capacity, free batch slots, drain, throughput
local slots, healthy, unknown, drain, free, reserved, throughput = 0, 0, 0, 0, 0, 0, 0
for i = FIRST_REPLICA, FIRST_REPLICA + n - 1 do
  -- the same reading as the pick's (pick_lib.lua): a hash the router holds invalid (missing
  -- field, max_active < 1, kv_fraction out of [0, 1], ...) is unknown here too
  local s = read_replica(KEYS[i])
  local own = 0
  local down = false
  if s == nil or s.ts < now_ms - ARG.stale_after_ms then
    own = ARG.unknown_slots
    unknown = unknown + 1
  elseif not s.healthy then
    down = true -- reported unhealthy: no slots, and its reservations do not count (lease_lib)
  else
    own = s.max_active
    healthy = healthy + 1
    if s.drain_rps ~= nil and s.drain_rps > 0 then
      drain = drain + s.drain_rps
    end
    if s.request_ms ~= nil and s.request_ms > 0 then
      throughput = throughput + own * 1000 / s.request_ms
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
local capacity = slots + ARG.allowance * healthy

-- grant free batch slots to the queue's heads (rules.py: grants)
local outstanding = redis.call('ZCARD', admitted)
free = free - math.max(0, outstanding - reserved)
while free > 0 and outstanding < capacity do
  local head = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
  if #head == 0 then
    break
  end
  drop_place(head[1])
  served(tonumber(head[2]))
  redis.call('ZADD', admitted, now_ms + queue_lease_ms, head[1])
  if redis.call('PTTL', admitted) < queue_lease_ms then
    redis.call('PEXPIRE', admitted, queue_lease_ms)
  end
  redis.call('PUBLISH', ARG.grant_channel, head[1] .. ' ' .. redis.call('INCR', KEY.grant_seq))
  outstanding = outstanding + 1
  free = free - 1
end
local queued = redis.call('ZCARD', queue)
local granted = tonumber(redis.call('GET', KEY.grant_seq) or '0')
local enqueued = tonumber(redis.call('GET', KEY.enqueue_seq) or '0')

local function answer(status, out, waiting, ahead)
  return {
    status = status,
    capacity = capacity,
    outstanding = out,
    queued = waiting,
    ahead = ahead,
    drain_rps = drain,
    grants = granted,
    enqueued = enqueued,
    throughput_rps = throughput,
    next_score = 0,
    picked_index = 0,
    picked_inflight = 0,
    picked_score = 0,
  }
end

-- admitted now: with the pick arguments, the replica is picked and reserved as well
local function admit(out, waiting, nxt)
  local reply = answer(1, out, waiting, 0)
  reply.next_score = nxt or 0
  if picking then
    local first = FIXED_ARGS + 1
    local chosen = pick_replica(FIRST_REPLICA, n, pick_params(first), first + PICK_PARAMS_COUNT,
      now_ms)
    if chosen then
      reply.picked_index, reply.picked_inflight = chosen.index, chosen.inflight
      reply.picked_score = chosen.score
    end
  end
  return REPLY(reply)
end

local function too_long(ahead)
  return ARG.ahead_limit ~= nil and ahead > ARG.ahead_limit
end

if op == 'release' or op == 'leave' then
  return REPLY(answer(2, outstanding, queued, 0))
end

local function hold(expiry_ms)
  redis.call('ZADD', admitted, expiry_ms, ticket)
  if redis.call('PTTL', admitted) < lease_ms then
    redis.call('PEXPIRE', admitted, lease_ms)
  end
end

-- the scores below this one are ahead of a request of this flow and priority
local function next_score()
  return priority * PRIORITY_UNIT + start_tag(priority, ARG.flow)
end

if op == 'peek' then
  -- what a new request of this flow and priority would find (rules.py: peek): what is queued
  -- below the score it would get; nothing changes but the grants
  local score = next_score()
  local ahead = redis.call('ZCOUNT', queue, '-inf', '(' .. fmt(score))
  local reply = answer(0, outstanding, queued, ahead)
  if too_long(ahead) then
    reply.status = -4
  end
  reply.next_score = score
  return REPLY(reply)
end

if op == 'enter' then
  -- rules.py: enter
  if redis.call('ZSCORE', admitted, ticket) then
    return REPLY(answer(1, outstanding, queued, 0))
  end
  if queued == 0 then
    redis.call('DEL', fair) -- nothing to share: the tags start again
  end
  local tag = start_tag(priority, ARG.flow)
  local score = priority * PRIORITY_UNIT + tag
  local ahead = redis.call('ZCOUNT', queue, '-inf', '(' .. fmt(score))
  local function refused(status)
    local reply = answer(status, outstanding, queued, ahead)
    reply.next_score = score
    return REPLY(reply)
  end
  if ahead == 0 and outstanding < capacity then
    hold(now_ms + lease_ms)
    charge(priority, tag)
    served(score)
    redis.call('PEXPIRE', fair, queue_lease_ms * 10)
    return admit(outstanding + 1, queued, next_score())
  end
  if healthy + unknown == 0 then
    return refused(-2)
  end
  local same = redis.call('ZCOUNT', queue, priority * PRIORITY_UNIT,
    '(' .. ((priority + 1) * PRIORITY_UNIT))
  local mine = tonumber(redis.call('HGET', flow_queued, ARG.flow) or '0')
  if ARG.flow_limit ~= nil and mine >= ARG.flow_limit then
    return refused(-5)
  end
  if queued >= ARG.max_queue or same >= ARG.queue_limit then
    if too_long(ahead) then
      return refused(-1)
    end
    -- rules.py: push_out. The last place (of the queue, or of this tier) goes to this request
    -- when it comes after it and its flow holds more places than this one's flow will
    local last
    if queued >= ARG.max_queue then
      last = redis.call('ZRANGE', queue, -1, -1, 'WITHSCORES')
    else
      last = redis.call('ZREVRANGEBYSCORE', queue, '(' .. ((priority + 1) * PRIORITY_UNIT),
        priority * PRIORITY_UNIT, 'WITHSCORES', 'LIMIT', 0, 1)
    end
    if #last == 0 then
      return refused(-1)
    end
    local victim, vscore = last[1], tonumber(last[2])
    local vflow = redis.call('HGET', queue_flow, victim) or ''
    local vcount = tonumber(redis.call('HGET', flow_queued, vflow) or '0')
    if not (vscore > score and vcount > mine + 1) then
      return refused(-1)
    end
    local fewer = same
    if math.floor(vscore / PRIORITY_UNIT) == priority then
      fewer = same - 1
    end
    if not (queued - 1 < ARG.max_queue and fewer < ARG.queue_limit) then
      return refused(-1)
    end
    -- its waiter finds its place gone at its next poll (LOST)
    drop_place(victim)
    queued = queued - 1
  elseif too_long(ahead) then
    return refused(-4)
  end
  charge(priority, tag)
  redis.call('ZADD', queue, fmt(score), ticket)
  redis.call('ZADD', qlease, now_ms + queue_lease_ms, ticket)
  redis.call('HSET', queue_flow, ticket, ARG.flow)
  redis.call('HINCRBY', flow_queued, ARG.flow, 1)
  if ARG.deadline_ms ~= nil then
    redis.call('ZADD', deadlines, now_ms + ARG.deadline_ms, ticket)
  end
  for _, key in ipairs({queue, qlease, fair, queue_flow, flow_queued, deadlines}) do
    redis.call('PEXPIRE', key, queue_lease_ms * 10)
  end
  enqueued = redis.call('INCR', KEY.enqueue_seq)
  local flow_word = ARG.flow
  if flow_word == '' then
    flow_word = '-'
  end
  redis.call('PUBLISH', ARG.enqueue_channel,
    enqueued .. ' ' .. fmt(score) .. ' ' .. flow_word .. ' ' .. ticket)
  local reply = answer(0, outstanding, queued + 1, ahead)
  reply.next_score = next_score()
  return REPLY(reply)
end

-- poll: a waiter claims its grant (the admission's full lease from now), or keeps its place
if redis.call('ZSCORE', admitted, ticket) then
  hold(now_ms + lease_ms)
  return admit(outstanding, queued)
end
local rank = redis.call('ZRANK', queue, ticket)
if rank == false then
  return REPLY(answer(-3, outstanding, queued, 0))
end
redis.call('ZADD', qlease, now_ms + queue_lease_ms, ticket)
redis.call('PEXPIRE', queue, queue_lease_ms * 10)
redis.call('PEXPIRE', qlease, queue_lease_ms * 10)
return REPLY(answer(0, outstanding, queued, rank))
