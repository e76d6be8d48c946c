"""The two Lua scripts that keep the counters in Redis (``proxy.limits.memory`` mirrors them).

Each check declares two keys (a window uses the first; a hold uses a hash and its lease
set, ``<key>:x``); every key of one request carries the same hash tag, so a script runs
on one Redis Cluster slot, and the keys of one request are distinct (one per rule).
Numbers written back are formatted with ``%d`` (Lua would print large doubles as
``1e+15``). Layouts:

* window hash: ``t`` total of live buckets, ``o``/``n`` oldest/newest bucket index, and
  one field per bucket index (bucket = ``floor(now_ms / bucket_ms)``). Its expiry follows
  the newest bucket, so it is set only when a new bucket opens.
* hold hash: ``spent``, ``held``, ``r:<rid>`` = amount held by request ``rid``, ``x`` = no
  later than the earliest lease's end (Unix ms; the lease set is only scanned once it has
  passed) and ``e`` = when the hash expires (Unix ms; moved at most once a minute, so it is
  always at least ``max(ttl, lease + 60 s)`` after the newest take and at most a minute more);
  the lease set scores each ``rid`` by the Unix ms its hold expires and gets the hash's
  expiry plus a minute on every take (Redis deletes an emptied set, and its next ``ZADD``
  recreates it without one); holds left without a lease set are dropped on the next purge.
  Amounts are Lua doubles, exact up to 2^53 (budgets are capped well below).

Every ``redis.call`` from Lua costs Redis a few microseconds beyond the command itself,
so each counter is read with one ``HMGET`` and written with one ``HSET``: a window costs
2 calls to reserve and 2 to settle, a hold 4 (5 when its expiry moves) and 4 (the
previous layout's scripts made about twice as many).

RESERVE: ``ARGV = now_ms, rid, lease_ms, dry, "limit,cost,bucket_ms (0 = hold),buckets,
ttl_ms,..."`` (five numbers per check, comma-separated); returns ``"admitted,used,spent,
reset_ms,retry_ms,bucket,..."`` (five per check). With ``ARGV[6] = factor`` and
``ARGV[7] = life_ms`` it also grants allotments (``proxy.limits.leased``): each check then
carries two more numbers, ``want,least``, and an admitted request takes for each check
``min(want, (limit - used - cost) / (factor + 1))`` more, or nothing when that is under
``least`` (so at least ``factor`` times the grant stays free): a window counts it in the
current bucket, a hold as member ``r:<rid>+`` leased ``life_ms`` longer than the request;
each check's result then has a sixth number, the amount granted.

SETTLE: ``ARGV = rid, "kind,bucket,delta,spend,..." [, "aid,..." [, once_ms]]``; kind 1 (window): add
``delta`` to ``bucket``; kind 2 (hold): release ``rid``'s hold and add ``spend``; kind 3
(allotment ``aid``, taken in order from ``ARGV[3]``): release ``delta`` of it (all of it
and delete it when ``bucket`` is 1) and add ``spend``, only while it exists. Returns
``"spent,..."`` per release. Kind 4 (window allotment ``aid``, recorded at the grant as field
``a:<aid>`` = ``"bucket:amount"``): take ``delta`` of it (all when -1) out of its bucket and
delete the field, so a repeated return does nothing. With ``ARGV[4] = once_ms`` the call
applies at most once per ``rid``: it keeps its result in its last key, a once-marker declared
after the pairs (``<KEYS[1]>:once:<rid>``, same hash tag, so same slot), for ``once_ms``, and
a repeat while that lives changes nothing and returns that first result (``"-1,..."`` if
the first call stopped part way);
a settlement whose outcome is unknown (a timeout) can then be retried, and its kind-3 spend
counts even when the allotment is gone by then (while the counter lives). Arguments and results
travel as one string each: redis-py parses a 20-integer array several times slower than one
string.
"""

from __future__ import annotations

__all__ = ["ADD_SPEND", "RESERVE", "SETTLE"]

_COMMON = """
local function fmt(x) return string.format('%d', x) end
local function numbers(csv)
  local out = {}
  for v in string.gmatch(csv, '[^,]+') do out[#out + 1] = tonumber(v) end
  return out
end
local function push(t, a, b) t[#t + 1] = a; t[#t + 1] = b end
"""

RESERVE = (
    _COMMON
    + """
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local lease = tonumber(ARGV[3])
local dry = ARGV[4] == '1'
local p = numbers(ARGV[5])
local factor = tonumber(ARGV[6])  -- nil: exact admission, nothing granted
local life = tonumber(ARGV[7]) or 0

-- HDEL of any number of fields (unpack has a limit, so 256 at a time)
local function hdel(key, fields)
  for i = 1, #fields, 256 do redis.call('HDEL', key, unpack(fields, i, math.min(i + 255, #fields))) end
end

-- the buckets (sorted indexes and counts) and the allotment fields of buckets before ``cutoff``
local function buckets_of(key, cutoff)
  local all = redis.call('HGETALL', key)
  local idxs, counts, stale = {}, {}, {}
  for i = 1, #all, 2 do
    local f = all[i]
    if string.sub(f, 1, 2) == 'a:' then
      if cutoff and tonumber(string.match(all[i + 1], '^(%-?%d+)')) < cutoff then stale[#stale + 1] = f end
    elseif f ~= 't' and f ~= 'o' and f ~= 'n' then
      local idx = tonumber(f)
      idxs[#idxs + 1] = idx
      counts[idx] = tonumber(all[i + 1])
    end
  end
  table.sort(idxs)
  return idxs, counts, stale
end

-- returns the state and what take_window needs: {count of bucket b, oldest, newest}
local function check_window(key, limit, cost, g, nb)
  local b = math.floor(now / g)
  local cutoff = b - nb
  local h = redis.call('HMGET', key, 't', 'o', 'n', fmt(b))
  local t, o, newest, cur = tonumber(h[1]) or 0, tonumber(h[2]), tonumber(h[3]), tonumber(h[4]) or 0
  if o ~= nil and o < cutoff then
    local idxs, counts, dead = buckets_of(key, cutoff)
    t, o, newest = 0, nil, nil
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
      hdel(key, dead)
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
  return {t, 0, reset, retry, b}, {cur, o, newest}
end

local function take_window(key, cost, g, nb, state, seen, gr)
  local b, o, newest = state[5], seen[2], seen[3]
  local t = state[1] + cost
  local f = {'t', fmt(t), fmt(b), fmt(seen[1] + cost)}
  -- an allotment (counted in ``cost``) is recorded as ``a:<rid>+`` = "bucket:amount" so that
  -- its return is idempotent; dropped with its bucket
  if gr > 0 then push(f, 'a:' .. rid .. '+', fmt(b) .. ':' .. fmt(gr)) end
  if o == nil or b < o then push(f, 'o', fmt(b)) end
  local opened = newest == nil or b > newest
  if opened then
    newest = b
    push(f, 'n', fmt(b))
  end
  redis.call('HSET', key, unpack(f))
  local reset = (newest + nb + 1) * g - now
  -- the expiry is (newest + buckets + 1) * bucket_ms + 1 s: it moves only with the newest bucket
  if opened then redis.call('PEXPIRE', key, fmt(reset + 1000)) end
  return {t, 0, reset, 0, b}
end

-- frees the holds whose lease ended; returns held and the new earliest lease end (or nil)
local function purge(key, z, held)
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  if #expired > 0 then
    local freed = 0
    for i = 1, #expired, 256 do
      local fields = {}
      for j = i, math.min(i + 255, #expired) do fields[#fields + 1] = 'r:' .. expired[j] end
      local amounts = redis.call('HMGET', key, unpack(fields))
      local gone = {}
      for j, amount in ipairs(amounts) do
        if amount then
          freed = freed + tonumber(amount)
          gone[#gone + 1] = fields[j]
        end
      end
      hdel(key, gone)
    end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
    held = held - freed
  end
  local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
  local x = tonumber(first[2])
  if x ~= nil then
    redis.call('HSET', key, 'held', fmt(held), 'x', fmt(x))
  else
    if held ~= 0 then
      -- no lease left yet something held: holds whose lease set was lost; none can settle
      local orphans = {}
      for _, f in ipairs(redis.call('HKEYS', key)) do
        if string.sub(f, 1, 2) == 'r:' then orphans[#orphans + 1] = f end
      end
      hdel(key, orphans)
      held = 0
    end
    redis.call('HSET', key, 'held', fmt(held))
    redis.call('HDEL', key, 'x')
  end
  return held, x
end

-- returns the state and what take_hold needs: {earliest lease end, expiry}
local function check_hold(key, z, limit, cost)
  local h = redis.call('HMGET', key, 'spent', 'held', 'x', 'e')
  local spent, held, x, e = tonumber(h[1]) or 0, tonumber(h[2]) or 0, tonumber(h[3]), tonumber(h[4])
  if (x ~= nil and x <= now) or (x == nil and held ~= 0) then
    held, x = purge(key, z, held)
  end
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
  return {spent + held, spent, 0, retry, 0}, {x, e}
end

local function take_hold(key, z, cost, ttl, state, seen, gr)
  local ends = now + lease
  local f = {'r:' .. rid, fmt(cost), 'held', fmt(state[1] - state[2] + cost + gr)}
  if seen[1] == nil or ends < seen[1] then push(f, 'x', fmt(ends)) end
  -- an allotment is a hold of its own (member ``r:<rid>+``), leased for the allotment's
  -- life plus a request's lease: the last request it admits must still find it to spend
  if gr > 0 then push(f, 'r:' .. rid .. '+', fmt(gr)) end
  local left, refresh = 0, false  -- ms until the hash expires (0: it does not)
  if ttl > 0 then
    -- the hash must outlive this lease by the grace; its expiry moves at most once a minute
    local least = math.max(ttl, lease + 60000)
    if seen[2] == nil or seen[2] < now + least then
      left, refresh = least + 60000, true
      push(f, 'e', fmt(now + left))
    else
      left = seen[2] - now
    end
  end
  redis.call('HSET', key, unpack(f))
  if gr > 0 then
    redis.call('ZADD', z, fmt(ends), rid, fmt(ends + life), rid .. '+')
  else
    redis.call('ZADD', z, fmt(ends), rid)
  end
  if refresh then redis.call('PEXPIRE', key, fmt(left)) end
  -- every time: the lease set is deleted when its last member goes and recreated without
  -- one. A minute past the hash, as ``e`` may come from a replica whose clock runs behind:
  -- a set outliving its hash is harmless, a hash outliving its set keeps orphans (purged).
  if left > 0 then redis.call('PEXPIRE', z, fmt(left + 60000)) end
  return {state[1] + cost + gr, state[2], 0, 0, 0}
end

local stride = factor and 7 or 5
local states, seen, fits, granted = {}, {}, true, {}
for i = 1, #KEYS / 2 do
  local a = (i - 1) * stride
  local limit, cost, g = p[a + 1], p[a + 2], p[a + 3]
  local key = KEYS[2 * i - 1]
  if g > 0 then
    states[i], seen[i] = check_window(key, limit, cost, g, p[a + 4])
  else
    states[i], seen[i] = check_hold(key, KEYS[2 * i], limit, cost)
  end
  if states[i][4] ~= 0 then fits = false end
end
if fits and not dry then
  for i = 1, #KEYS / 2 do
    local a = (i - 1) * stride
    local limit, cost, g = p[a + 1], p[a + 2], p[a + 3]
    -- the grant: at most ``want``, leaving at least ``factor`` times it free; none under ``least``
    local gr = 0
    if factor and p[a + 6] > 0 then
      gr = math.min(p[a + 6], math.floor((limit - states[i][1] - cost) / (factor + 1)))
      if gr < p[a + 7] then gr = 0 end
    end
    granted[i] = gr
    -- a hold is taken even at zero cost: its settlement adds what was actually spent
    if cost + gr > 0 or g == 0 then
      local key = KEYS[2 * i - 1]
      if g > 0 then
        states[i] = take_window(key, cost + gr, g, p[a + 4], states[i], seen[i], gr)
      else
        states[i] = take_hold(key, KEYS[2 * i], cost, p[a + 5], states[i], seen[i], gr)
      end
    end
  end
end
local out = {fits and 1 or 0}
for i = 1, #states do
  local st = states[i]
  if factor then
    out[i + 1] = string.format('%d,%d,%d,%d,%d,%d', st[1], st[2], st[3], st[4], st[5], granted[i] or 0)
  else
    out[i + 1] = string.format('%d,%d,%d,%d,%d', st[1], st[2], st[3], st[4], st[5])
  end
end
return table.concat(out, ',')
"""
)

SETTLE = (
    _COMMON
    + """
local rid = ARGV[1]
local p = numbers(ARGV[2])
local nchecks = math.floor(#KEYS / 2)  -- then the once-marker, when ARGV[4] is given
if ARGV[4] then
  local first = redis.call('GET', KEYS[#KEYS])
  if first and first ~= '' then return first end  -- this settlement ran already: its result
  if first then  -- it began and failed part way (it never does): apply nothing twice
    local again = {}
    for i = 1, nchecks do again[i] = '-1' end
    return table.concat(again, ',')
  end
  redis.call('SET', KEYS[#KEYS], '', 'PX', ARGV[4])  -- the result replaces it at the end
end
local aids, na = {}, 0  -- allotment ids, one per kind-3 or kind-4 release in order
if ARGV[3] then for v in string.gmatch(ARGV[3], '[^,]+') do aids[#aids + 1] = v end end

-- adds ``delta`` to bucket ``field`` of window ``key`` while that bucket lives (never below 0)
local function add_to_bucket(key, field, delta)
  local h = redis.call('HMGET', key, field, 't')
  local count = tonumber(h[1])
  if count ~= nil then
    local new = math.max(0, count + delta)
    redis.call('HSET', key, field, fmt(new), 't', fmt((tonumber(h[2]) or 0) + new - count))
  end
end

-- releases ``release`` of hold ``id`` of ``key`` (nil: all of it, and deletes it from the hash
-- and lease set ``z``) and adds ``spend``, only while the hold exists, so a repeated final
-- release spends nothing; with ``late`` (a call under a once-marker, repeats excluded) the
-- spend counts even when the hold is gone, while the counter lives; returns ``spent``
local function release_hold(key, z, id, release, spend, late)
  local member = 'r:' .. id
  local h = redis.call('HMGET', key, member, 'held', 'spent')
  local amount, spent = tonumber(h[1]), tonumber(h[3]) or 0
  if amount then
    local r = amount
    if release then r = math.min(math.max(release, 0), amount) end
    local f = {'held', fmt((tonumber(h[2]) or 0) - r)}
    if spend > 0 then
      spent = spent + spend
      push(f, 'spent', fmt(spent))
    end
    if release then
      push(f, member, fmt(amount - r))
    else
      redis.call('HDEL', key, member)
      redis.call('ZREM', z, id)
    end
    redis.call('HSET', key, unpack(f))
  elseif late and spend > 0 and redis.call('EXISTS', key) == 1 then
    spent = redis.call('HINCRBY', key, 'spent', fmt(spend))
  end
  return spent
end

local out = {}
for i = 1, nchecks do
  local a = (i - 1) * 4
  local kind, key = p[a + 1], KEYS[2 * i - 1]
  if kind == 1 then
    if p[a + 3] ~= 0 then add_to_bucket(key, fmt(p[a + 2]), p[a + 3]) end
    out[i] = '0'
  elseif kind == 4 then
    -- a window allotment's return: ``delta`` of it (-1: all) leaves its bucket, once
    na = na + 1
    local field = 'a:' .. aids[na]
    local v = redis.call('HGET', key, field)
    if v then
      local b, amount = string.match(v, '^(%-?%d+):(%d+)$')
      local r = tonumber(amount)
      if p[a + 3] >= 0 then r = math.min(p[a + 3], r) end
      redis.call('HDEL', key, field)
      if r > 0 then add_to_bucket(key, b, -r) end
    end
    out[i] = '0'
  elseif kind == 3 then
    -- an allotment hold: part of it, or all of it when ``bucket`` is 1 (its last release)
    na = na + 1
    local release = nil
    if p[a + 2] ~= 1 then release = p[a + 3] end
    out[i] = fmt(release_hold(key, KEYS[2 * i], aids[na], release, p[a + 4], ARGV[4] ~= nil))
  else
    out[i] = fmt(release_hold(key, KEYS[2 * i], rid, nil, p[a + 4]))
  end
end
local result = table.concat(out, ',')
if ARGV[4] then redis.call('SET', KEYS[#KEYS], result, 'PX', ARGV[4]) end
return result
"""
)

# ``KEYS``: budget hold hashes (one hash tag); ``ARGV[1]``: nano-USD to add to each one's
# ``spent`` (may be negative; never below zero). A hash that is gone (its period expired, or
# it was never made) is left alone. Returns each one's ``spent`` afterwards ("-1": gone),
# comma-separated.
ADD_SPEND = (
    _COMMON
    + """
local delta = tonumber(ARGV[1])
local out = {}
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local spent = (tonumber(redis.call('HGET', key, 'spent')) or 0) + delta
    if spent < 0 then spent = 0 end
    redis.call('HSET', key, 'spent', fmt(spent))
    out[#out + 1] = fmt(spent)
  else
    out[#out + 1] = '-1'
  end
end
return table.concat(out, ',')
"""
)
