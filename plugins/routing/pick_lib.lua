-- The routing policy in Redis: pick a replica and reserve it. The Redis mirror of
-- plugins/routing/policy.py (`choose`), included (`--! include`) by pick.lua and by the
-- admission gate (gate.lua), which picks in the same call that admits.
--
-- pick_replica(first_key, n, p, first_id, now_ms):
--   KEYS[first_key .. first_key+n-1]      replica:{id} hashes of the n candidates
--   KEYS[first_key+n .. first_key+2n-1]   inflight:{id} reservation sets (sorted sets: member =
--                                         reservation id, score = lease expiry in ms since the
--                                         epoch), same candidate order
--   KEYS[first_key+2n .. first_key+3n-1]  prefix:{id} prefix indexes (sorted sets: member = a
--                                         salted prompt-block hash, score = last use), same order
--   ARGV[first_id .. first_id+n-1]        the candidates' replica ids
--   ARGV[first_id+n .. first_id+n+b-1]    the request's b = p.blocks prompt-block hashes, first
--                                         block first (the request's shape: p.prompt_tokens,
--                                         p.output_tokens, p.tokens_per_block)
--   p                                     pick_params(first): the PICK_PARAMS_COUNT values of
--                                         ARGV from `first`, by name (PICK_PARAMS in
--                                         plugins/routing/store.py declares them)
-- A candidate's in-flight count is the number of its reservations that count (lease_lib.lua:
-- ended leases are removed first, so a reservation whose release was lost or whose proxy died
-- heals one lease after its last renewal; a replica reported down counts none, though it scores
-- inf anyway).
-- A fresh, healthy candidate is credited with the prompt's leading blocks its index holds
-- (ZMSCORE, up to the first missing one), and with the request's session (p.session, a member
-- of the same index) when it has served that session: the last tie rule. The chosen
-- candidate's index gets every block of the
-- prompt (score now_ms * 1024 + 1023 - position: older prompts, and a prompt's later blocks,
-- are forgotten first), trimmed to the blocks its KV cache holds (kv_tokens / block_tokens,
-- else prefix_index_blocks), and expires prefix_ttl_ms after this pick.
-- Returns {index = the chosen candidate (1-based), inflight = its reservations now, score}, or
-- nil when no candidate is eligible (all unhealthy, or n = 0).
--
-- Every number is a double (Lua 5.1). The arithmetic follows policy.py step by step in the
-- same order, so both compute bit-identical scores (see policy.py's docstring). The scripts' REPLY
-- sends the score as a "%.17g" string: Redis truncates Lua numbers to integers in replies, and
-- tostring() keeps only 14 significant digits.

-- Needs lease_lib.lua included before it (pick.lua and gate.lua include both, in that order).

-- pick_params(first): the policy's parameters from ARGV[first..], by name, and PICK_PARAMS_COUNT
-- (generated from PICK_PARAMS in plugins/routing/store.py):
--! protocol pick_params

-- A number from a hash field; nil for missing (false), empty, garbage or nan.
local function num(v)
  if not v or v == '' then
    return nil
  end
  local x = tonumber(v)
  if x == nil or x ~= x then
    return nil
  end
  return x
end

-- A finite whole number, else nil (the hash's integer fields).
local function int(v)
  local x = num(v)
  if x == nil or x == math.huge or x == -math.huge or x ~= math.floor(x) then
    return nil
  end
  return x
end

-- An optional non-negative number field: false = invalid; nil = absent or empty.
local function optional(v)
  if not v or v == '' then
    return nil
  end
  local x = num(v)
  if x == nil or x < 0 then
    return false
  end
  return x
end

-- The replica's state, or nil when the hash is missing or invalid (= unknown). Mirrors the
-- validation of ReplicaState (core/keyschema.py) for the fields read here.
local function parse(h)
  local waiting, active, max_active = int(h[1]), int(h[2]), int(h[3])
  local kv, ts = num(h[4]), int(h[7])
  if waiting == nil or active == nil or max_active == nil or kv == nil or ts == nil then
    return nil
  end
  if h[11] ~= 'trtllm' and h[11] ~= 'triton' then
    return nil
  end
  local kv_tokens = nil
  if h[10] and h[10] ~= '' then
    kv_tokens = int(h[10])
    if kv_tokens == nil or kv_tokens < 0 then
      return nil
    end
  end
  if h[6] == false then -- healthy missing (an empty value reads as unhealthy, as in Python)
    return nil
  end
  if waiting < 0 or active < 0 or max_active < 1 or kv < 0 or kv > 1 then
    return nil
  end
  local service, drain, request_ms = optional(h[5]), optional(h[8]), optional(h[9])
  if service == false or drain == false or request_ms == false then
    return nil
  end
  return {
    waiting = waiting,
    active = active,
    max_active = max_active,
    kv = kv,
    service = service,
    healthy = (h[6] == '1'),
    ts = ts,
    drain_rps = drain,
    request_ms = request_ms,
    kv_tokens = kv_tokens,
    source = h[11],
  }
end

-- Byte-wise order of the replica ids (Python sorts str by code point = UTF-8 byte order;
-- Lua's `<` on strings uses strcoll, which depends on the server's locale).
local function bytes_less(a, b)
  local la, lb = #a, #b
  for k = 1, math.min(la, lb) do
    local ca, cb = string.byte(a, k), string.byte(b, k)
    if ca ~= cb then
      return ca < cb
    end
  end
  return la < lb
end

-- The replica hash at `key`, parsed (nil = unknown): the one reading of a replica's state for
-- the pick and for the admission gate (gate.lua), so that both agree on which are valid.
local function read_replica(key)
  return parse(redis.call('HMGET', key, 'waiting', 'active', 'max_active', 'kv_fraction',
    'service_ms', 'healthy', 'ts_ms', 'drain_rps', 'request_ms', 'kv_tokens', 'source'))
end

-- The output tokens the reservations in `key` carry (their names end in '#<tokens>',
-- policy.reservation_member); `unknown_size` for each one without a valid size. The mirror of
-- policy.reserved_tokens; call it after the ended leases are removed (counted_reservations).
local MAX_RESERVED_SIZE = 1000000000
local function reserved_tokens(key, unknown_size)
  local total = 0
  for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local digits = string.match(member, '#(%d+)$')
    local size = nil
    if digits ~= nil and #digits <= 10 then
      size = tonumber(digits)
    end
    if size == nil or size < 1 or size > MAX_RESERVED_SIZE then
      size = unknown_size
    end
    total = total + size
  end
  return total
end

local function pick_replica(first_key, n, p, first_id, now_ms)
  local states, fresh, inflight = {}, {}, {}
  for i = 1, n do
    local s = read_replica(KEYS[first_key + i - 1])
    states[i] = s
    fresh[i] = (s ~= nil) and (s.ts >= now_ms - p.stale_after_ms)
    local down = fresh[i] and not s.healthy
    inflight[i] = counted_reservations(KEYS[first_key + n + i - 1], now_ms, down)
  end

  -- Effective service time: own when known (fresh, present, > 0), else the mean of the known.
  local total, count = 0, 0
  for i = 1, n do
    if fresh[i] and states[i].service ~= nil and states[i].service > 0 then
      total = total + states[i].service
      count = count + 1
    end
  end
  local fallback = p.default_service_ms
  if count > 0 then
    fallback = total / count
  end

  -- The prompt's leading blocks each fresh, healthy candidate's prefix index holds.
  local hashes = {}
  for k = 1, p.blocks do
    hashes[k] = ARGV[first_id + n + k - 1]
  end
  local cached = {}
  for i = 1, n do
    cached[i] = 0
    if p.blocks > 0 and fresh[i] and states[i].healthy then
      local found = redis.call('ZMSCORE', KEYS[first_key + 2 * n + i - 1], unpack(hashes))
      for k = 1, p.blocks do
        if not found[k] then
          break
        end
        cached[i] = k
      end
    end
  end

  -- Whether each fresh, healthy candidate has served the request's session (its index holds it).
  local held = {}
  for i = 1, n do
    held[i] = false
    if p.session ~= '' and fresh[i] and states[i].healthy then
      held[i] = redis.call('ZSCORE', KEYS[first_key + 2 * n + i - 1], p.session) ~= false
    end
  end

  local best = nil
  local scores = {}
  for i = 1, n do
    local s = states[i]
    local score
    if not fresh[i] then
      score = p.unknown_score + inflight[i]
    elseif not s.healthy then
      score = math.huge
    else
      local service = fallback
      if s.service ~= nil and s.service > 0 then
        service = s.service
      end
      local excess = math.max(0, s.kv - p.kv_threshold)
      local kv_penalty = 1 + p.kv_weight * excess / (1 - p.kv_threshold)
      local uncached = 0
      if p.prompt_tokens > 0 then
        uncached = math.max(1, p.prompt_tokens - cached[i] * p.tokens_per_block)
      end
      local load = math.max(inflight[i], s.active + s.waiting)
      -- the prefill delays this request and the ones it shares the batch with
      local prefill = p.prefill_ms_per_token * uncached * (1 + math.min(load, s.max_active - 1))
      if s.source == 'trtllm' then
        -- sizes in tokens: with every slot taken, wait for n - C + 1 completions of the
        -- requests ahead (reserved ones at their sizes, unreserved ones at this one's)
        local own = p.output_tokens
        local wait = 0
        if load + 1 > s.max_active then
          local ahead = reserved_tokens(KEYS[first_key + n + i - 1], own)
            + math.max(0, s.active + s.waiting - inflight[i]) * own
          wait = (load + 1 - s.max_active) / s.max_active * (ahead / load)
        end
        score = (own + wait) * service * kv_penalty + prefill
      else
        score = math.max(1, (load + 1) / s.max_active) * service * kv_penalty + prefill
      end
    end
    scores[i] = score
    if score < math.huge and (best == nil or score < best) then
      best = score
    end
  end

  if best == nil then
    return nil
  end

  -- Tied: every score within tie_tolerance of the best; among them the fewest in-flight,
  -- then the most cached blocks, then the ones that have served the session.
  local limit = best + math.abs(best) * p.tie_tolerance
  local fewest = nil
  for i = 1, n do
    if scores[i] <= limit and (fewest == nil or inflight[i] < fewest) then
      fewest = inflight[i]
    end
  end
  local most, tied = nil, {}
  for i = 1, n do
    if scores[i] <= limit and inflight[i] == fewest then
      if most == nil or cached[i] > most then
        most, tied = cached[i], { i }
      elseif cached[i] == most then
        tied[#tied + 1] = i
      end
    end
  end
  local warm = {}
  for _, i in ipairs(tied) do
    if held[i] then
      warm[#warm + 1] = i
    end
  end
  if #warm > 0 then
    tied = warm
  end
  table.sort(tied, function(x, y)
    return bytes_less(ARGV[first_id + x - 1], ARGV[first_id + y - 1])
  end)

  -- fmod is exact for whole doubles (tiebreak < 2^53, checked by the caller).
  local chosen = tied[math.fmod(p.tiebreak, #tied) + 1]
  local key = KEYS[first_key + n + chosen - 1]
  redis.call('ZADD', key, now_ms + p.lease_ms, p.reservation)
  if redis.call('PTTL', key) < p.lease_ms then
    redis.call('PEXPIRE', key, p.lease_ms) -- the set lives as long as its longest lease
  end
  if p.blocks > 0 or p.session ~= '' then
    -- the chosen replica will hold the prompt's blocks and has served the session: index
    -- them (scores as exact integers: a number argument would reach Redis with 14 significant
    -- digits only)
    local index = KEYS[first_key + 2 * n + chosen - 1]
    local members = {}
    for k = 1, p.blocks do
      members[#members + 1] = string.format('%.0f', now_ms * 1024 + (1024 - k))
      members[#members + 1] = hashes[k]
    end
    if p.session ~= '' then -- forgotten before this prompt's blocks
      members[#members + 1] = string.format('%.0f', now_ms * 1024)
      members[#members + 1] = p.session
    end
    redis.call('ZADD', index, unpack(members))
    local bound = p.prefix_index_blocks
    local s = states[chosen]
    if s ~= nil and s.kv_tokens ~= nil and s.kv_tokens > 0 then
      bound = math.max(1, math.floor(s.kv_tokens / p.block_tokens))
    end
    local size = redis.call('ZCARD', index)
    if size > bound then
      redis.call('ZREMRANGEBYRANK', index, 0, size - bound - 1)
    end
    redis.call('PEXPIRE', index, p.prefix_ttl_ms)
  end
  return { index = chosen, inflight = redis.call('ZCARD', key), score = scores[chosen] }
end
