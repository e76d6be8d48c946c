"""The two Lua scripts that keep the counters in Redis (``proxy.limits.memory`` mirrors them).

Each check declares two keys (a window uses the first; a hold uses a hash and its lease
set, ``<key>:x``); every key of one request carries the same hash tag, so a script runs
on one Redis Cluster slot. Numbers written back are formatted with ``%d`` (Lua would
print large doubles as ``1e+15``). Layouts:

* window hash: ``t`` total of live buckets, ``o``/``n`` oldest/newest bucket index, and
  one field per bucket index (bucket = ``floor(now_ms / bucket_ms)``).
* hold hash: ``spent``, ``held`` and ``r:<rid>`` = amount held by request ``rid``; the
  lease set scores each ``rid`` by the Unix ms its hold expires.

RESERVE: ``ARGV = now_ms, rid, lease_ms, dry, "limit,cost,bucket_ms (0 = hold),buckets,
ttl_ms,..."`` (five numbers per check, comma-separated); returns ``"admitted,used,spent,
reset_ms,retry_ms,bucket,..."`` (five per check). SETTLE: ``ARGV = rid, "kind (1 window, 2
hold),bucket,delta,spend,ttl_ms,..."``; returns ``"spent,..."`` per release. Arguments and
results travel as one string each: redis-py parses a 20-integer array several times
slower than one string.
"""

from __future__ import annotations

__all__ = ["RESERVE", "SETTLE"]

_COMMON = """
local function fmt(x) return string.format('%d', x) end
local function numbers(csv)
  local out = {}
  for v in string.gmatch(csv, '[^,]+') do out[#out + 1] = tonumber(v) end
  return out
end
"""

RESERVE = (
    _COMMON
    + """
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local lease = tonumber(ARGV[3])
local dry = ARGV[4] == '1'
local p = numbers(ARGV[5])

local function buckets_of(key)
  local all = redis.call('HGETALL', key)
  local idxs, counts = {}, {}
  for i = 1, #all, 2 do
    local f = all[i]
    if f ~= 't' and f ~= 'o' and f ~= 'n' then
      local idx = tonumber(f)
      idxs[#idxs + 1] = idx
      counts[idx] = tonumber(all[i + 1])
    end
  end
  table.sort(idxs)
  return idxs, counts
end

local function check_window(key, limit, cost, g, nb)
  local b = math.floor(now / g)
  local cutoff = b - nb
  local h = redis.call('HMGET', key, 't', 'o', 'n')
  local t, o, newest = tonumber(h[1]) or 0, tonumber(h[2]), tonumber(h[3])
  if o ~= nil and o < cutoff then
    local idxs, counts = buckets_of(key)
    t, o, newest = 0, nil, nil
    local dead = {}
    for _, idx in ipairs(idxs) do
      if idx < cutoff then
        dead[#dead + 1] = fmt(idx)
      else
        t = t + counts[idx]
        if o == nil then o = idx end
        newest = idx
      end
    end
    if o == nil then
      redis.call('DEL', key)
    else
      if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
      redis.call('HSET', key, 't', fmt(t), 'o', fmt(o), 'n', fmt(newest))
    end
  end
  local retry = 0
  if t + cost > limit then
    retry = -1
    if cost <= limit then
      local idxs, counts = buckets_of(key)
      local need, freed = t + cost - limit, 0
      for _, idx in ipairs(idxs) do
        freed = freed + counts[idx]
        if freed >= need then
          retry = (idx + nb + 1) * g - now
          break
        end
      end
    end
  end
  local reset = 0
  if newest ~= nil then reset = (newest + nb + 1) * g - now end
  return {t, 0, reset, retry, b}
end

local function take_window(key, cost, g, nb, state)
  local b = state[5]
  redis.call('HINCRBY', key, fmt(b), fmt(cost))
  local t = redis.call('HINCRBY', key, 't', fmt(cost))
  local h = redis.call('HMGET', key, 'o', 'n')
  local o, newest = tonumber(h[1]), tonumber(h[2])
  if o == nil or b < o then redis.call('HSET', key, 'o', fmt(b)) end
  if newest == nil or b > newest then
    newest = b
    redis.call('HSET', key, 'n', fmt(b))
  end
  local reset = (newest + nb + 1) * g - now
  redis.call('PEXPIRE', key, fmt(reset + 1000))
  return {t, 0, reset, 0, b}
end

local function check_hold(key, z, limit, cost)
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  if #expired > 0 then
    local freed = 0
    for _, r in ipairs(expired) do
      local amount = redis.call('HGET', key, 'r:' .. r)
      if amount then
        freed = freed + tonumber(amount)
        redis.call('HDEL', key, 'r:' .. r)
      end
    end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
    if freed > 0 then redis.call('HINCRBY', key, 'held', fmt(-freed)) end
  end
  local h = redis.call('HMGET', key, 'spent', 'held')
  local spent, held = tonumber(h[1]) or 0, tonumber(h[2]) or 0
  local retry = 0
  if spent + held + cost > limit then
    if cost > limit or spent + cost > limit then
      retry = -1
    else
      local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
      retry = 1
      if first[2] then retry = math.max(1, tonumber(first[2]) - now) end
    end
  end
  return {spent + held, spent, 0, retry, 0}
end

local function take_hold(key, z, cost, ttl, state)
  redis.call('HSET', key, 'r:' .. rid, fmt(cost))
  redis.call('HINCRBY', key, 'held', fmt(cost))
  redis.call('ZADD', z, fmt(now + lease), rid)
  if ttl > 0 then
    local keep = fmt(math.max(ttl, lease + 60000))
    redis.call('PEXPIRE', key, keep)
    redis.call('PEXPIRE', z, keep)
  end
  return {state[1] + cost, state[2], 0, 0, 0}
end

local states, fits = {}, true
for i = 1, #KEYS / 2 do
  local a = (i - 1) * 5
  local limit, cost, g = p[a + 1], p[a + 2], p[a + 3]
  local key = KEYS[2 * i - 1]
  if g > 0 then
    states[i] = check_window(key, limit, cost, g, p[a + 4])
  else
    states[i] = check_hold(key, KEYS[2 * i], limit, cost)
  end
  if states[i][4] ~= 0 then fits = false end
end
if fits and not dry then
  for i = 1, #KEYS / 2 do
    local a = (i - 1) * 5
    local cost, g = p[a + 2], p[a + 3]
    if cost > 0 then
      local key = KEYS[2 * i - 1]
      if g > 0 then
        states[i] = take_window(key, cost, g, p[a + 4], states[i])
      else
        states[i] = take_hold(key, KEYS[2 * i], cost, p[a + 5], states[i])
      end
    end
  end
end
local out = {fits and 1 or 0}
for i = 1, #states do
  for j = 1, 5 do out[#out + 1] = fmt(states[i][j]) end
end
return table.concat(out, ',')
"""
)

SETTLE = (
    _COMMON
    + """
local rid = ARGV[1]
local p = numbers(ARGV[2])
local out = {}
for i = 1, #KEYS / 2 do
  local a = (i - 1) * 5
  local key = KEYS[2 * i - 1]
  if p[a + 1] == 1 then
    local delta = p[a + 3]
    if delta ~= 0 then
      local field = fmt(p[a + 2])
      local count = tonumber(redis.call('HGET', key, field))
      if count ~= nil then
        local new = math.max(0, count + delta)
        redis.call('HSET', key, field, fmt(new))
        redis.call('HINCRBY', key, 't', fmt(new - count))
      end
    end
    out[i] = '0'
  else
    local amount = redis.call('HGET', key, 'r:' .. rid)
    if amount then
      redis.call('HDEL', key, 'r:' .. rid)
      redis.call('HINCRBY', key, 'held', fmt(-tonumber(amount)))
      redis.call('ZREM', KEYS[2 * i], rid)
    end
    local spend, ttl = p[a + 4], p[a + 5]
    if spend > 0 and amount then  -- spend once: only while this request's hold exists
      out[i] = fmt(redis.call('HINCRBY', key, 'spent', fmt(spend)))
      if ttl > 0 then redis.call('PEXPIRE', key, fmt(ttl)) end
    else
      out[i] = fmt(tonumber(redis.call('HGET', key, 'spent')) or 0)
    end
  end
end
return table.concat(out, ',')
"""
)
