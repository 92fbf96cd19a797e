-- Token buckets: one atomic step over every bucket of one request.
--
-- KEYS[i]    the hash of bucket i (fields "level" and "ms"). All keys of one call
--            share one hash tag, so the call is valid on Redis Cluster.
-- ARGV[1]    "acquire" or "adjust".
-- ARGV[2..]  three integers per bucket, in KEYS order:
--              capacity_tokens  the most the bucket holds (>= 1);
--              period_ms        time to refill from empty to full (>= 1);
--              amount_tokens    acquire: the cost (>= 0); adjust: a signed correction,
--                               positive gives tokens back, negative takes more.
--
-- acquire is all or nothing: when any bucket holds less than its cost, nothing is
-- debited. adjust always applies; the level is kept within [-capacity, capacity].
--
-- Reply: { status, then four integers per bucket:
--            limit_tokens, remaining_tokens, reset_ms, retry_ms }
--   status            1 admitted (adjust: applied), 0 refused: wait, -1 refused: some cost
--                     exceeds its capacity, so no wait can help.
--   remaining_tokens  whole tokens left after this step (negative after an overdraft).
--   reset_ms          milliseconds until the bucket is full again.
--   retry_ms          acquire: milliseconds until this bucket holds its cost (0: it does
--                     now, -1: never). Always 0 for adjust.
--
-- Units and precision. A bucket gains capacity_tokens per period_ms. One token is
-- stored as period_ms "ticks", so every millisecond adds exactly capacity_tokens
-- ticks and all arithmetic is on integers (Lua numbers are doubles, exact below
-- 2^53; the caller keeps capacity_tokens * period_ms far below that). The field
-- "ms" is the Redis time up to which refill has been credited; the sub-millisecond
-- rest of TIME is credited at the next call, so no client is ever given tokens
-- early. A full bucket is stored as no key at all; a partial one expires when it
-- would be full again, so idle buckets cost no memory.

-- Redis >= 5 replicates script effects by default; this makes older servers do the
-- same, which a script reading TIME before writing needs.
if redis.replicate_commands then
  redis.replicate_commands()
end

local FIELDS_PER_BUCKET = 3

local function integer_argument(position, name)
  local value = tonumber(ARGV[position])
  if value == nil or value ~= math.floor(value) then
    error('token_bucket: ' .. name .. ' must be an integer, got ' .. tostring(ARGV[position]))
  end
  return value
end

-- Integers as decimal text: tostring() of a Lua 5.1 number keeps only 14 digits.
local function decimal(value)
  return string.format('%.0f', value)
end

local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- The bucket as it stands at `now`, with refill credited up to it.
local function load(index, now)
  local base = 1 + (index - 1) * FIELDS_PER_BUCKET
  local bucket = {
    key = KEYS[index],
    capacity = integer_argument(base + 1, 'capacity_tokens'),
    period = integer_argument(base + 2, 'period_ms'),
    amount = integer_argument(base + 3, 'amount_tokens'),
  }
  if bucket.capacity < 1 or bucket.period < 1 then
    error('token_bucket: capacity_tokens and period_ms must be >= 1')
  end
  bucket.full = bucket.capacity * bucket.period
  local stored = redis.call('HMGET', bucket.key, 'level', 'ms')
  local level, since = tonumber(stored[1]), tonumber(stored[2])
  if level == nil or since == nil then
    level, since = bucket.full, now
  end
  -- A clock that went back (failover to another server) credits nothing until it
  -- catches up, rather than crediting the same interval twice.
  if now > since then
    level = level + (now - since) * bucket.capacity
    since = now
  end
  -- min() also applies a capacity that was lowered since the last write.
  bucket.level = math.min(bucket.full, level)
  bucket.since = since
  bucket.retry = 0
  return bucket
end

local function reset_ms(bucket)
  return math.ceil((bucket.full - bucket.level) / bucket.capacity)
end

local function store(bucket)
  if bucket.level >= bucket.full then
    redis.call('DEL', bucket.key)
    return
  end
  redis.call('HSET', bucket.key, 'level', decimal(bucket.level), 'ms', decimal(bucket.since))
  redis.call('PEXPIRE', bucket.key, decimal(reset_ms(bucket)))
end

local operation = ARGV[1]
if #KEYS < 1 or #ARGV ~= 1 + #KEYS * FIELDS_PER_BUCKET then
  error('token_bucket: expected 1 + 3 arguments per key')
end

local now = now_ms()
local buckets = {}
for index = 1, #KEYS do
  buckets[index] = load(index, now)
end

local status = 1
if operation == 'acquire' then
  for _, bucket in ipairs(buckets) do
    local needed = bucket.amount * bucket.period
    if bucket.amount < 0 then
      error('token_bucket: a cost must be >= 0')
    elseif bucket.amount > bucket.capacity then
      bucket.retry = -1
      status = -1
    elseif bucket.level < needed then
      bucket.retry = math.ceil((needed - bucket.level) / bucket.capacity)
      if status == 1 then
        status = 0
      end
    end
  end
  if status == 1 then
    for _, bucket in ipairs(buckets) do
      bucket.level = bucket.level - bucket.amount * bucket.period
      store(bucket)
    end
  end
elseif operation == 'adjust' then
  for _, bucket in ipairs(buckets) do
    local level = bucket.level + bucket.amount * bucket.period
    -- The debt is bounded: a wildly wrong usage report delays an account by at
    -- most one more period instead of locking it out.
    bucket.level = math.max(-bucket.full, math.min(bucket.full, level))
    store(bucket)
  end
else
  error('token_bucket: unknown operation ' .. tostring(operation))
end

local reply = { status }
for _, bucket in ipairs(buckets) do
  table.insert(reply, bucket.capacity)
  table.insert(reply, math.floor(bucket.level / bucket.period))
  table.insert(reply, reset_ms(bucket))
  table.insert(reply, bucket.retry)
end
return reply
