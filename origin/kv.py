"""The kv port: a small ordered key-value store for what the origin must agree on.

It holds idempotency keys, read cursors, the shard map (instance → origin shard) and leadership
epochs. It knows nothing of them: keys and values are bytes, keys ordered bytewise.

The contract (tests/test_kv_contract.py runs it against every adapter):

- `get(key)` is the value or None; `get_many(keys)` maps the keys present to their values.
- `put` overwrites; `delete` removes and is a no-op for a missing key.
- `scan(prefix, limit, after=None)` gives the entries whose key starts with `prefix`, in key
  order, at most `limit` of them, starting after key `after` (to page through a prefix).
- `compare_and_set(key, expected, new)` writes `new` only if the key's current value is
  `expected`, atomically, and says whether it did; None means absent on either side, so
  (None, v) creates, (v, w) replaces, (v, None) deletes, and (None, None) only checks that the
  key is absent. Of many concurrent calls expecting the same value, exactly one wins: this is
  what leadership epochs and shard moves are built on.
- A call that returns has taken effect durably; a call that raises or is cancelled may or may
  not have (as with any remote store): retry with compare_and_set, or read back.
- Bad input (not bytes, an empty or oversized key, an oversized value, too many keys, a scan
  limit out of range) raises GB6Error `invalid` and changes nothing. Each adapter turns its
  driver's errors into GB6Error (`unavailable` when the backend cannot be reached, the call
  ran out of time or the server refused it in a way a retry may get past, `internal`
  otherwise), and raises `unavailable` when called while not running.

Each adapter is a component: `await nursery.start(kv.run)` opens it, cancelling `run` closes
it. The adapters:

- SQLite (origin/kv_sqlite.py): the embedded default, one table in a file of its own.
- PostgreSQL (origin/kv_postgres.py): asyncpg through trio-asyncio, one table in a given schema.
- TiKV: the adapter is origin/kv_tikv.py, on tikv-client's transactional async API (pinned,
  0.0.4) through trio-asyncio, with pessimistic transactions for writes; its tests run only when
  GB6_TIKV_PD=host:port names a placement driver; no TiKV server can be installed on these
  machines, so it has not been run against one here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, Protocol

import attrs
import trio

from node.errors import UNAVAILABLE, GB6Error, invalid

MAX_KEY_BYTES: Final = 1024  # well under PostgreSQL's btree entry limit (~2.7 kB)
MAX_VALUE_BYTES: Final = 64 * 1024  # epochs, cursors and shard map entries are tiny
MAX_BATCH_KEYS: Final = 1000  # keys in one get_many
MAX_SCAN_LIMIT: Final = 1000  # entries in one scan


def _positive(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, not {value}")


@attrs.frozen
class KvLimits:
    """Sizes and counts one call may carry; an adapter refuses more with GB6Error `invalid`."""

    max_key_bytes: int = attrs.field(default=MAX_KEY_BYTES, validator=_positive)
    max_value_bytes: int = attrs.field(default=MAX_VALUE_BYTES, validator=_positive)
    max_batch_keys: int = attrs.field(default=MAX_BATCH_KEYS, validator=_positive)
    max_scan_limit: int = attrs.field(default=MAX_SCAN_LIMIT, validator=_positive)

    def key(self, key: object, what: str = "key") -> bytes:
        """`key`, checked: bytes, 1..max_key_bytes long."""
        if not isinstance(key, bytes):
            raise invalid(f"kv {what} must be bytes, not {type(key).__name__}")
        if not key:
            raise invalid(f"kv {what} must not be empty")
        if len(key) > self.max_key_bytes:
            raise invalid(f"kv {what} is {len(key)} bytes; the limit is {self.max_key_bytes}")
        return key

    def value(self, value: object, what: str = "value") -> bytes:
        """`value`, checked: bytes, at most max_value_bytes long (empty is a value)."""
        if not isinstance(value, bytes):
            raise invalid(f"kv {what} must be bytes, not {type(value).__name__}")
        if len(value) > self.max_value_bytes:
            raise invalid(f"kv {what} is {len(value)} bytes; the limit is {self.max_value_bytes}")
        return value

    def optional_value(self, value: object, what: str) -> bytes | None:
        return None if value is None else self.value(value, what)

    def keys(self, keys: object) -> list[bytes]:
        """`keys`, checked, without duplicates, in their first order."""
        if isinstance(keys, bytes | str) or not isinstance(keys, Sequence):
            raise invalid("kv keys must be a sequence (list or tuple) of bytes")
        if len(keys) > self.max_batch_keys:
            raise invalid(f"{len(keys)} kv keys in one call; the limit is {self.max_batch_keys}")
        return list(dict.fromkeys(self.key(k) for k in keys))

    def prefix(self, prefix: object) -> bytes:
        """`prefix`, checked: bytes, at most max_key_bytes long (empty scans every key)."""
        if not isinstance(prefix, bytes):
            raise invalid(f"kv prefix must be bytes, not {type(prefix).__name__}")
        if len(prefix) > self.max_key_bytes:
            raise invalid(f"kv prefix is {len(prefix)} bytes; the limit is {self.max_key_bytes}")
        return prefix

    def limit(self, limit: object) -> int:
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise invalid("kv scan limit must be an int")
        if not 1 <= limit <= self.max_scan_limit:
            raise invalid(f"kv scan limit must be 1..{self.max_scan_limit}, not {limit}")
        return limit


@attrs.frozen
class Entry:
    key: bytes
    value: bytes


@attrs.frozen
class ScanRange:
    """A checked scan: keys in [start, end) (end None: no upper bound), at most `limit`."""

    start: bytes
    start_inclusive: bool
    end: bytes | None
    limit: int

    @property
    def empty(self) -> bool:
        return self.end is not None and self.start >= self.end


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix`; None when there is none
    (an empty prefix, or one of 0xff bytes only)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def scan_range(limits: KvLimits, prefix: object, limit: object, after: object) -> ScanRange:
    """Check a scan's arguments and turn them into a key range (shared by every adapter)."""
    checked = limits.prefix(prefix)
    count = limits.limit(limit)
    end = prefix_end(checked)
    if after is None:
        return ScanRange(start=checked, start_inclusive=True, end=end, limit=count)
    start = limits.key(after, "scan position (after)")
    if start < checked:
        # Everything with the prefix comes after `after`: start at the prefix itself.
        return ScanRange(start=checked, start_inclusive=True, end=end, limit=count)
    return ScanRange(start=start, start_inclusive=False, end=end, limit=count)


class KV(Protocol):
    """The kv port. See the module docstring for the contract every adapter keeps."""

    limits: KvLimits

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store, call `task_status.started()` once it serves, close it when cancelled."""
        ...

    async def get(self, key: bytes) -> bytes | None: ...

    async def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]: ...

    async def put(self, key: bytes, value: bytes) -> None: ...

    async def delete(self, key: bytes) -> None: ...

    async def scan(
        self, prefix: bytes, limit: int, *, after: bytes | None = None
    ) -> list[Entry]: ...

    async def compare_and_set(
        self, key: bytes, expected: bytes | None, new: bytes | None
    ) -> bool: ...


def not_running(adapter: str) -> GB6Error:
    return GB6Error(UNAVAILABLE, f"the {adapter} kv store is not running")
