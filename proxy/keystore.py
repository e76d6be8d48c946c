"""Runtime virtual keys: created, updated and revoked through the admin API, kept in the store.

Only SHA-256 hashes are stored, never a key. In Redis (hash tag ``{keys}``)::

    orp:{keys}:records   hash: key name -> JSON record (``KeyRecord``)
    orp:{keys}:version   counter, incremented by every change

The hot path never reads the store: ``KeySync`` keeps the ``Keyring``'s runtime keys in
step, reading the version (one ``GET``) every ``interval_s`` (1 s) and reloading the records
only when it changed. A key created, updated or revoked through any replica therefore takes
effect on every replica within about a second, and at once on the replica that made the
change. With the in-memory store, runtime keys live and die with the process. Redis errors
are translated to ``StoreUnavailable`` here; ``KeySync`` then keeps the last known keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Protocol

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from proxy.auth import Keyring
from proxy.config import SHA256_HEX
from proxy.limits.policy import KeyBudgets, PositiveUSD
from proxy.store import Store, StoreUnavailable
from proxy.store.redis import RedisStore
from proxy.store.redis_errors import REDIS_ERRORS

__all__ = [
    "KeyExists",
    "KeyMissing",
    "KeyRecord",
    "KeyStore",
    "KeySync",
    "MemoryKeyStore",
    "RedisKeyStore",
    "open_keystore",
]

log = logging.getLogger("proxy.keystore")

_RECORDS = "orp:{keys}:records"
_VERSION = "orp:{keys}:version"
# One atomic change: create (only if absent), put (only if present) or delete.
_CHANGE = """
local old = redis.call('HGET', KEYS[1], ARGV[2])
if ARGV[1] == 'create' then
  if old then return {0, old} end
elseif not old then
  return {0, ''}
elseif ARGV[4] ~= '' and old ~= ARGV[4] then
  return {2, old}
end
if ARGV[1] == 'delete' then redis.call('HDEL', KEYS[1], ARGV[2]) else redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
redis.call('INCR', KEYS[2])
return {1, old or ''}
"""


class KeyExists(Exception):
    """A key with that name already exists."""


class KeyMissing(Exception):
    """No runtime key has that name."""


class KeyChanged(Exception):
    """The record is no longer the one the change was made from: ``current`` is (``raw``:
    its stored form, to pass back as ``expected_raw``)."""

    def __init__(self, current: KeyRecord, raw: bytes | None = None) -> None:
        super().__init__(current.name)
        self.current = current
        self.raw = raw


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A runtime key. ``sha256``: hex digest of the secret; times are Unix seconds."""

    name: str
    sha256: str
    team: str | None = None
    tier: str | None = None
    budgets: KeyBudgets = field(default_factory=KeyBudgets)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def key_id(self) -> str:
        return self.sha256[:12]

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> KeyRecord:
        """A record as ``to_json`` wrote it; ``ValueError`` (pydantic's ``ValidationError``)
        for anything else, a record edited by hand in the store or damaged: wrong types, a
        digest that is not 64 hex characters, a budget that is not a positive USD amount of
        at most ``MAX_BUDGET_USD`` (as the admin API accepts them), or an unknown field."""
        stored = _StoredKey.model_validate_json(raw)
        budgets = KeyBudgets(**stored.budgets.model_dump()) if stored.budgets else KeyBudgets()
        return cls(**{**stored.model_dump(), "budgets": budgets})


class _StoredBudgets(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    usd_per_day: PositiveUSD | None = None
    usd_per_month: PositiveUSD | None = None
    usd_total: PositiveUSD | None = None


class _StoredKey(BaseModel):
    """A ``KeyRecord`` as the store holds it (``KeyRecord.to_json``), checked on the way in."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1)]
    sha256: Annotated[str, Field(pattern=SHA256_HEX.pattern)]
    team: str | None = None
    tier: str | None = None
    budgets: _StoredBudgets | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


class KeyStore(Protocol):
    async def version(self) -> int:
        """A number that changes whenever any record changes."""

    async def records(self) -> list[KeyRecord]: ...

    async def change(
        self, op: str, record: KeyRecord, expected: KeyRecord | None = None, expected_raw: bytes | None = None
    ) -> KeyRecord | None:
        """``create`` (``KeyExists`` if the name is taken), ``put`` or ``delete``
        (``KeyMissing`` if absent); returns the previous record. With ``expected``, a
        ``put`` applies only if the stored record is still that one (else ``KeyChanged``):
        so two concurrent updates of one key cannot lose each other's fields.
        ``expected_raw``: that record as stored (from ``KeyChanged.raw``), when known."""


class MemoryKeyStore:
    def __init__(self) -> None:
        self._records: dict[str, KeyRecord] = {}
        self._version = 0

    async def version(self) -> int:
        return self._version

    async def records(self) -> list[KeyRecord]:
        return list(self._records.values())

    async def change(
        self, op: str, record: KeyRecord, expected: KeyRecord | None = None, expected_raw: bytes | None = None
    ) -> KeyRecord | None:
        old = self._records.get(record.name)
        if op == "create" and old is not None:
            raise KeyExists(record.name)
        if op != "create" and old is None:
            raise KeyMissing(record.name)
        if expected is not None and old is not None and old != expected:
            raise KeyChanged(old)
        if op == "delete":
            del self._records[record.name]
        else:
            self._records[record.name] = record
        self._version += 1
        return old


class RedisKeyStore:
    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster, timeout_s: float = 1.0) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._change = client.register_script(_CHANGE)

    async def _call(self, command: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await command
        except TimeoutError:
            raise StoreUnavailable("Redis did not answer in time") from None
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def version(self) -> int:
        return int(await self._call(self._client.get(_VERSION)) or 0)

    async def records(self) -> list[KeyRecord]:
        """Every valid record; an invalid one is logged and left out (the others still apply)."""
        raw: dict[str, str] = await self._call(self._client.hgetall(_RECORDS))
        records = []
        for name, value in raw.items():
            try:
                records.append(KeyRecord.from_json(value))
            except ValueError as exc:
                log.error("runtime key %r in the store is invalid and was skipped: %s", name, exc)
        return records

    async def change(
        self, op: str, record: KeyRecord, expected: KeyRecord | None = None, expected_raw: bytes | None = None
    ) -> KeyRecord | None:
        # The stored JSON is compared byte for byte: the proxy writes to_json(), and a record
        # written otherwise (by hand) fails once, then matches with the raw form KeyChanged gives.
        compare = expected_raw if expected_raw is not None else expected.to_json() if expected is not None else b""
        args: list[str | bytes] = [op, record.name, record.to_json(), compare]
        done, old = await self._call(self._change(keys=[_RECORDS, _VERSION], args=args))
        if not int(done):
            raise KeyExists(record.name) if op == "create" else KeyMissing(record.name)
        if int(done) == 2:
            raw = old if isinstance(old, bytes) else str(old).encode()
            try:
                current = KeyRecord.from_json(raw)
            except ValueError:  # a damaged record: replaced all the same (as without expected)
                return await self.change(op, record)
            raise KeyChanged(current, raw)
        if not old:
            return None
        try:
            return KeyRecord.from_json(old)
        except ValueError as exc:  # replaced or revoked all the same: that mends a damaged record
            log.error("runtime key %r was invalid in the store before this change: %s", record.name, exc)
            return None


def open_keystore(store: Store) -> KeyStore:
    """Runtime keys beside the store: in Redis with a ``RedisStore``, else in memory."""
    if isinstance(store, RedisStore):
        return RedisKeyStore(store.client)
    return MemoryKeyStore()


class KeySync:
    """Keeps ``keyring``'s runtime keys equal to the key store's (see module docstring)."""

    def __init__(self, store: KeyStore, keyring: Keyring, interval_s: float = 1.0) -> None:
        self.store = store
        self.keyring = keyring
        self.interval_s = interval_s
        self.records: dict[str, KeyRecord] = {}
        self._budgets: dict[str, KeyBudgets] = {}
        self._version: int | None = None
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    def budgets_of(self, key_id: str) -> KeyBudgets | None:
        """The per-key budget overrides of a runtime key (``None``: the tier's budgets)."""
        return self._budgets.get(key_id)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    async def refresh(self, *, force: bool = False) -> None:
        """Reload the records if the version changed (never raises; failures are logged)."""
        try:
            version = await self.store.version()
            if force or version != self._version:
                records = await self.store.records()
                self._apply(records)
                self._version = version
        except StoreUnavailable as exc:
            if not self._failing:
                log.warning("runtime keys not refreshed (store unavailable: %s); keeping the last known keys", exc)
            self._failing = True
            return
        if self._failing:
            log.info("runtime keys refreshed again")
        self._failing = False

    def _apply(self, records: list[KeyRecord]) -> None:
        self.records = {r.name: r for r in records}
        self._budgets = {r.key_id: r.budgets for r in records if r.budgets != KeyBudgets()}
        self.keyring.set_runtime([(r.sha256, r.name, r.team, r.tier) for r in records])


def now() -> float:
    """Unix seconds, for record timestamps."""
    return round(time.time(), 3)
