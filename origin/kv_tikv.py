"""The kv port on TiKV: tikv-client's transactional async API (0.0.4) through trio-asyncio.

No TiKV server can be installed on these machines: this adapter's contract tests run only when
GB6_TIKV_PD=host:port names a placement driver of a running cluster, so here it has been checked
only against the library itself (import, connection failure) and not against a server.

Keys live under `namespace` (default b"gb6/kv/"), so a cluster can be shared; a scan never leaves
it. Reads use a snapshot at a fresh timestamp (a consistent read, no locks). Writes use a
pessimistic transaction: `put` and `delete` lock their key, `compare_and_set` reads it with
`get_for_update` (which locks it, so concurrent callers queue behind each other and each compares
against the value the previous one left), and commits only when it changes something. A failure
before the commit has written nothing (a pessimistic lock is not a write), so such an attempt is
retried a few times before the call fails; a failure during the commit is never retried, since
the commit may have happened.

tikv-client panics (and so aborts the process) when a transaction is dropped while still active,
so every transaction ends in commit or rollback inside one asyncio coroutine: each call crosses
into asyncio once, and a Trio cancellation waits for that coroutine's rollback (trio-asyncio lets
a cancelled asyncio task finish before Trio sees the cancellation). Each call is bounded by
`op_timeout_s`; the library's errors are plain `Exception`s with a message, mapped to GB6Error
`unavailable` here.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, TypeVar

import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from node.errors import INTERNAL, UNAVAILABLE, GB6Error, invalid
from node.log import log
from origin.kv import Entry, KvLimits, not_running, prefix_end, scan_range

try:
    from tikv_client import asynchronous as _tikv  # type: ignore[import-untyped, unused-ignore]
except ImportError:  # a Rust extension: wheels exist for Linux x86_64 and macOS only
    _tikv = None

T = TypeVar("T")

_ATTEMPTS: Final = 5  # tries of a write that failed before its commit
_BACKOFF_S: Final = 0.02  # first pause between tries; doubles, with jitter
_MAX_NAMESPACE: Final = 64


class _NotCommitted(Exception):
    """Raised on the asyncio side: the transaction failed before its commit; nothing written."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Turn tikv-client's errors (plain Exceptions) into GB6Error, once, here at the edge."""
    try:
        yield
    except GB6Error:
        raise
    except trio.TooSlowError:
        raise GB6Error(UNAVAILABLE, f"kv store (tikv) timed out: {what}") from None
    except _NotCommitted as exc:
        raise GB6Error(UNAVAILABLE, f"kv store (tikv) failed on {what}: {exc.cause}") from None
    except Exception as exc:
        raise GB6Error(UNAVAILABLE, f"kv store (tikv) failed on {what}: {exc}") from None


class TikvKv:
    """The kv port on TiKV. A component: `await nursery.start(kv.run)`; see origin/kv.py.

    `pd_endpoints` are the placement drivers' `host:port`s; at most `max_inflight` calls are
    in flight at once (more callers wait their turn).
    """

    def __init__(
        self,
        pd_endpoints: Sequence[str],
        *,
        namespace: bytes = b"gb6/kv/",
        limits: KvLimits | None = None,
        op_timeout_s: float = 10.0,
        max_inflight: int = 64,
    ) -> None:
        if isinstance(pd_endpoints, str) or not pd_endpoints:
            raise invalid("kv pd_endpoints must be a non-empty list of host:port")
        if not isinstance(namespace, bytes) or not 1 <= len(namespace) <= _MAX_NAMESPACE:
            raise invalid(f"kv namespace must be 1..{_MAX_NAMESPACE} bytes")
        if prefix_end(namespace) is None:
            raise invalid("kv namespace must not be 0xff bytes only")
        self.pd_endpoints = list(pd_endpoints)
        self.namespace = namespace
        self.limits = limits or KvLimits()
        self.op_timeout_s = op_timeout_s
        self._client: Any = None
        self._slots = trio.CapacityLimiter(max_inflight)

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect to the placement drivers, serve until cancelled.

        Raises GB6Error `unavailable` when the cluster does not answer within `op_timeout_s`,
        and `internal` when tikv-client is not installed.
        """
        if _tikv is None:
            raise GB6Error(
                INTERNAL, "the tikv kv adapter needs tikv-client (pip install tikv-client==0.0.4)"
            )
        if trio_asyncio.current_loop.get() is None:
            raise RuntimeError("TikvKv.run needs trio_asyncio.open_loop() around it")
        with _mapped("connect"), trio.fail_after(self.op_timeout_s):
            client = await aio_as_trio(_tikv.TransactionClient.connect)(self.pd_endpoints)
        try:
            self._client = client
            task_status.started()
            await trio.sleep_forever()
        finally:
            # The client has no close: its connections go when the last reference does.
            self._client = None

    def _running(self) -> Any:
        if self._client is None:
            raise not_running("tikv")
        return self._client

    async def _read(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run `fn(snapshot)` on a snapshot at a fresh timestamp, in one crossing."""
        client = self._running()

        async def in_asyncio() -> T:
            ts = await client.current_timestamp()
            return await fn(client.snapshot(ts, False))

        async with self._slots:
            with _mapped(what), trio.fail_after(self.op_timeout_s):
                value: T = await aio_as_trio(in_asyncio)()
                return value

    async def _write(self, what: str, fn: Callable[[Any], Awaitable[tuple[T, bool]]]) -> T:
        """Run `fn(txn)` in a pessimistic transaction; commit when it says it wrote."""
        client = self._running()
        pause = _BACKOFF_S
        async with self._slots:
            with _mapped(what), trio.fail_after(self.op_timeout_s):
                for attempt in range(_ATTEMPTS):
                    try:
                        value: T = await aio_as_trio(_transact)(client, fn)
                        return value
                    except _NotCommitted:
                        if attempt == _ATTEMPTS - 1:
                            raise
                    # Another transaction holds the lock, or the cluster hiccuped: wait a little.
                    await trio.sleep(pause * (0.5 + random.random()))
                    pause *= 2
        raise AssertionError("unreachable")

    def _key(self, key: bytes) -> bytes:
        return self.namespace + self.limits.key(key)

    # --- the port ------------------------------------------------------------------------

    async def get(self, key: bytes) -> bytes | None:
        full = self._key(key)

        async def fn(snap: Any) -> bytes | None:
            value = await snap.get(full)
            return None if value is None else bytes(value)

        return await self._read("get", fn)

    async def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        full = [self.namespace + k for k in self.limits.keys(keys)]
        if not full:
            return {}
        n = len(self.namespace)

        async def fn(snap: Any) -> dict[bytes, bytes]:
            pairs = await snap.batch_get(full)
            return {bytes(k)[n:]: bytes(v) for k, v in pairs}

        return await self._read("get_many", fn)

    async def put(self, key: bytes, value: bytes) -> None:
        full, value = self._key(key), self.limits.value(value)

        async def fn(txn: Any) -> tuple[None, bool]:
            await txn.put(full, value)
            return None, True

        await self._write("put", fn)

    async def delete(self, key: bytes) -> None:
        full = self._key(key)

        async def fn(txn: Any) -> tuple[None, bool]:
            await txn.delete(full)
            return None, True

        await self._write("delete", fn)

    async def scan(self, prefix: bytes, limit: int, *, after: bytes | None = None) -> list[Entry]:
        rng = scan_range(self.limits, prefix, limit, after)
        if rng.empty:
            return []
        ns = self.namespace
        start = ns + rng.start
        end = ns + rng.end if rng.end is not None else prefix_end(ns)

        async def fn(snap: Any) -> list[Entry]:
            pairs = await snap.scan(start, end, rng.limit, rng.start_inclusive, False)
            return [Entry(bytes(k)[len(ns) :], bytes(v)) for k, v in pairs]

        return await self._read("scan", fn)

    async def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        full = self._key(key)
        expected = self.limits.optional_value(expected, "expected value")
        new = self.limits.optional_value(new, "new value")

        async def fn(txn: Any) -> tuple[bool, bool]:
            current = await txn.get_for_update(full)  # locks the key until commit or rollback
            if (None if current is None else bytes(current)) != expected:
                return False, False
            if new is None and expected is None:
                return True, False  # absent, as expected: nothing to write
            if new is None:
                await txn.delete(full)
            else:
                await txn.put(full, new)
            return True, True

        return await self._write("compare_and_set", fn)


# --- asyncio side ----------------------------------------------------------------------------


async def _transact(client: Any, fn: Callable[[Any], Awaitable[tuple[T, bool]]]) -> T:
    """One pessimistic transaction that always ends in commit or rollback (see the docstring)."""
    try:
        txn = await client.begin(True)
    except Exception as exc:
        raise _NotCommitted(exc) from exc
    try:
        try:
            value, wrote = await fn(txn)
        except Exception as exc:
            raise _NotCommitted(exc) from exc
        if not wrote:
            await _rollback(txn)
            return value
        await txn.commit()
        return value
    except BaseException:
        # Also on asyncio cancellation: the task runs this before it finishes.
        await _rollback(txn)
        raise


async def _rollback(txn: Any) -> None:
    try:
        await txn.rollback()
    except Exception as exc:  # already committed or rolled back; a stray lock's TTL ends it
        log("kv_tikv_rollback_failed", error=repr(exc))
