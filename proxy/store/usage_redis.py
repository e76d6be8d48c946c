"""The Redis ``UsageLedger``: a capped Stream, one rollup hash per day, a ticket hash.

Keys (the ``{usage}`` hash tag keeps them on one Redis Cluster slot, so one script may
touch them all):

=================================  ==========================================================
``orp:{usage}:ledger``             Stream; each entry has one field ``e``: the JSON line
``orp:{usage}:day:<YYYY-MM-DD>``   Hash; ``<key>\\x1f<team>\\x1f<model>\\x1f<rule>\\x1f<metric>`` ->
                                   integer (``HINCRBY``), expires ``day_ttl_s`` after its last write
``orp:{usage}:pending``            Hash; stream id -> reconciliation ticket
``orp:{usage}:batch:<id>``         String; marks an applied batch for ``BATCH_TTL_S``
=================================  ==========================================================

A batch is one ``EVALSHA`` round trip: for each write, the optional ``HDEL`` of the ticket
it settles, ``XADD``, the optional ticket ``HSET`` and, for a write that settles a ticket,
its ``HINCRBY``s; the counters of every other write are summed per rollup field in Python
first (a batch of many requests of a few keys sends a few dozen ``HINCRBY``s, not ten per
request); then the trims (``XTRIM MAXLEN ~`` and ``XTRIM MINID ~``). Scripts run
atomically, so the stream and the rollups always agree. redis-py errors become
``StoreUnavailable`` here.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis

from proxy.store.base import StoreUnavailable
from proxy.store.redis_errors import REDIS_ERRORS
from proxy.store.usage import BATCH_TTL_S, METRICS, Group, LedgerWrite, Retention, UsageTotals, totals_of

__all__ = ["RedisUsage"]

STREAM = "orp:{usage}:ledger"
PENDING = "orp:{usage}:pending"
BATCH_PREFIX = "orp:{usage}:batch:"
DAY_PREFIX = "orp:{usage}:day:"
SEP = "\x1f"

# KEYS: stream, pending, batch marker, day hashes...
# ARGV: maxlen ('' = none), minid ('' = none), ttl, batch ttl ('' = no batch id), number of writes W, then per
# write: line, day index (1-based into the day hashes), settles ('' = none), ticket ('' = none), n, n (field,
# amount) pairs; then the summed counters of the writes that settle nothing: (day index, field, amount) triples.
_APPEND = """
local stream, pending = KEYS[1], KEYS[2]
if ARGV[4] ~= '' and not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[4]) then
  return {}
end
local ids, touched = {}, {}
local i = 6
for _ = 1, tonumber(ARGV[5]) do
  local line, day, settles, ticket, n = ARGV[i], tonumber(ARGV[i+1]), ARGV[i+2], ARGV[i+3], tonumber(ARGV[i+4])
  i = i + 5
  if settles == '' or redis.call('HDEL', pending, settles) == 1 then
    local id = redis.call('XADD', stream, '*', 'e', line)
    if ticket ~= '' then redis.call('HSET', pending, id, ticket) end
    local hash = KEYS[3 + day]
    for j = 0, n - 1 do
      redis.call('HINCRBY', hash, ARGV[i + 2*j], ARGV[i + 2*j + 1])
    end
    touched[hash] = true
    ids[#ids + 1] = id
  else
    ids[#ids + 1] = ''
  end
  i = i + 2*n
end
while i <= #ARGV do
  local hash = KEYS[3 + tonumber(ARGV[i])]
  redis.call('HINCRBY', hash, ARGV[i + 1], ARGV[i + 2])
  touched[hash] = true
  i = i + 3
end
for hash in pairs(touched) do redis.call('EXPIRE', hash, ARGV[3]) end
if ARGV[1] ~= '' then redis.call('XTRIM', stream, 'MAXLEN', '~', ARGV[1]) end
if ARGV[2] ~= '' then redis.call('XTRIM', stream, 'MINID', '~', ARGV[2]) end
return ids
"""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisUsage:
    """``UsageLedger`` on a shared redis-py client (``decode_responses=True``)."""

    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster) -> None:
        self._redis = client
        self._append = client.register_script(_APPEND)

    async def append(
        self, writes: Sequence[LedgerWrite], retention: Retention, batch_id: str | None = None
    ) -> list[str | None]:
        if not writes:
            return []
        days: dict[str, int] = {}
        argv: list[str | bytes | int] = [
            "" if retention.max_entries is None else retention.max_entries,
            "" if retention.max_age_s is None else f"{int((time.time() - retention.max_age_s) * 1000)}-0",
            retention.day_ttl_s,
            BATCH_TTL_S if batch_id else "",
            len(writes),
        ]
        summed: dict[tuple[int, Group], dict[str, int]] = {}
        for write in writes:
            index = days.setdefault(write.day, len(days) + 1)
            if write.settles:  # applies only if its ticket is still pending: its own counters
                prefix = SEP.join(write.group) + SEP
                argv += [write.line, index, write.settles, write.ticket or b"", len(write.counters)]
                for name, amount in write.counters:
                    argv += [prefix + name, amount]
                continue
            argv += [write.line, index, "", write.ticket or b"", 0]
            totals = summed.get((index, write.group))
            if totals is None:
                totals = summed[(index, write.group)] = {}
            for name, amount in write.counters:
                totals[name] = totals.get(name, 0) + amount
        for (index, group), totals in summed.items():
            prefix = SEP.join(group) + SEP
            for name, amount in totals.items():
                if amount:
                    argv += [index, prefix + name, amount]
        keys = [STREAM, PENDING, BATCH_PREFIX + (batch_id or "-"), *(DAY_PREFIX + day for day in days)]
        try:
            ids = await self._append(keys=keys, args=argv)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [str(i) or None for i in ids]

    async def read(self, after: str, count: int) -> list[tuple[str, bytes]]:
        start = "-" if after in ("0-0", "0") else f"({after}"
        try:
            entries = await self._redis.xrange(STREAM, start, "+", count)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [(str(entry_id), str(fields["e"]).encode()) for entry_id, fields in entries or () if fields]

    async def tickets(self, cursor: int, count: int) -> tuple[int, list[tuple[str, bytes]]]:
        try:
            following, items = await self._redis.hscan(PENDING, cursor, count=count)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(str(exc)) from exc
        assert isinstance(items, dict)
        return int(following), [(str(k), str(v).encode()) for k, v in items.items()]

    async def drop_ticket(self, entry_id: str) -> bool:
        try:
            removed = await self._redis.hdel(PENDING, entry_id)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(str(exc)) from exc
        return removed == 1

    async def totals(self, day: str, key: str | None = None) -> list[UsageTotals]:
        name = DAY_PREFIX + day
        raw: dict[Any, Any] = {}
        try:
            if key is None:
                raw = await cast(Awaitable[dict[Any, Any]], self._redis.hgetall(name))
            else:
                async for field, value in self._redis.hscan_iter(name, match=_glob_escape(key + SEP) + "*", count=1000):
                    raw[field] = value
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(str(exc)) from exc
        groups: dict[Group, dict[str, int]] = defaultdict(dict)
        for field, value in raw.items():
            parts = str(field).split(SEP)
            if len(parts) == 5 and parts[4] in METRICS:
                groups[(parts[0], parts[1], parts[2], parts[3])][parts[4]] = int(value)
        return totals_of(day, groups)
