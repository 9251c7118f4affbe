"""The embedded kv adapter: one table in an SQLite file of its own.

Threading: one worker thread, started and joined by `run`, owns the only connection and does
every call; callers hand it jobs through a queue and wait on a trio.Event. Not
`trio.to_thread` with a CapacityLimiter of 1: that runs each call on whichever pooled thread is
free, one thread hop and one commit per call, whereas a thread of our own drains everything
queued, applies it in one transaction (each write in its own savepoint, so a failing one undoes
only itself) and commits once. Under many concurrent compare-and-sets that is one fsync per batch
instead of one per call, and the single writer is also what makes each compare-and-set atomic.

Durability: WAL with `synchronous=FULL`: a call returns only after its commit reached the disk.
Admission is bounded (`max_inflight` calls queued or running); more callers wait their turn.
A call cancelled while waiting may still be applied (the port's contract says so).
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import outcome
import trio

from node.errors import INTERNAL, UNAVAILABLE, GB6Error
from origin.kv import Entry, KvLimits, ScanRange, not_running, scan_range
from origin.schema_version import migrate_sqlite

_MIGRATIONS: Final[tuple[str, ...]] = (
    "CREATE TABLE kv(key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID",
)
_BATCH: Final = 256  # jobs per transaction
_OPEN_WAIT_S: Final = 30.0  # how long an open waits for another process opening the file
_OPEN_BUSY_S: Final = 0.25  # the busy timeout while opening: a cancelled open stops within it
_BUSY_S: Final = 30.0  # the busy timeout once open
_STOP: Final = object()
T = TypeVar("T")


@attrs.define
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    writes: bool
    done: trio.Event = attrs.field(factory=trio.Event)
    result: outcome.Outcome[Any] | None = None


def _translate(exc: sqlite3.Error) -> GB6Error:
    if isinstance(exc, sqlite3.OperationalError):  # locked, disk full or I/O error, unopenable
        return GB6Error(UNAVAILABLE, f"kv store (sqlite) unavailable: {exc}")
    return GB6Error(INTERNAL, f"kv store (sqlite) failed: {type(exc).__name__}: {exc}")


class SqliteKv:
    """The kv port on SQLite. A component: `await nursery.start(kv.run)`; see origin/kv.py."""

    def __init__(
        self, path: Path, limits: KvLimits | None = None, *, max_inflight: int = 1024
    ) -> None:
        self.path = path
        self.limits = limits or KvLimits()
        self._slots = trio.Semaphore(max_inflight)
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._running = False
        self.commits = 0  # transactions committed; for tests and metrics

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open (and migrate) the file, serve until cancelled, then finish what is queued."""
        try:
            conn = await trio.to_thread.run_sync(self._open)
        except sqlite3.Error as exc:
            raise _translate(exc) from None
        token = trio.lowlevel.current_trio_token()
        thread = threading.Thread(
            target=self._worker, args=(conn, token), name="gb6-kv-sqlite", daemon=True
        )
        thread.start()
        try:
            self._running = True
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._running = False
            # The worker answers every job queued before the stop marker, then closes.
            self._queue.put(_STOP)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Short busy waits while another process opens the file too, so that a cancelled
        # start stops within one of them (`_while_busy`); the long one once open.
        conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=_OPEN_BUSY_S
        )
        try:
            _while_busy(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=FULL")
            _while_busy(lambda: migrate_sqlite(conn, "the kv", _MIGRATIONS))
            conn.execute(f"PRAGMA busy_timeout={int(_BUSY_S * 1000)}")
        except BaseException:
            conn.close()
            raise
        return conn

    # --- the worker thread ---------------------------------------------------------------

    def _worker(self, conn: sqlite3.Connection, token: trio.lowlevel.TrioToken) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch: list[_Job] = [first]  # type: ignore[list-item]
                stop = False
                while len(batch) < _BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stop = True
                        break
                    batch.append(nxt)  # type: ignore[arg-type]
                self._apply(conn, batch)
                try:
                    token.run_sync_soon(self._deliver, batch)
                except trio.RunFinishedError:
                    return
                if stop:
                    return
        finally:
            conn.close()

    def _apply(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                if job.writes:
                    conn.execute("SAVEPOINT job")
                try:
                    job.result = outcome.Value(job.fn(conn))
                except Exception as exc:  # the caller gets it; the worker must go on
                    if job.writes:
                        conn.execute("ROLLBACK TO job")
                    err = _translate(exc) if isinstance(exc, sqlite3.Error) else exc
                    job.result = outcome.Error(err)
                if job.writes:
                    conn.execute("RELEASE job")
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            # Nothing of this batch is durable: every job fails, even one that looked done.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            err = _translate(exc)
            for job in batch:
                job.result = outcome.Error(err)

    @staticmethod
    def _deliver(batch: list[_Job]) -> None:
        for job in batch:
            job.done.set()

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, writes: bool) -> T:
        async with self._slots:
            if not self._running:
                raise not_running("sqlite")
            job = _Job(fn, writes)
            self._queue.put(job)
            await job.done.wait()
            assert job.result is not None
            value: T = job.result.unwrap()
            return value

    # --- the port ------------------------------------------------------------------------

    async def get(self, key: bytes) -> bytes | None:
        key = self.limits.key(key)
        return await self._call(lambda c: _get(c, key), writes=False)

    async def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        checked = self.limits.keys(keys)
        if not checked:
            return {}

        def fn(conn: sqlite3.Connection) -> dict[bytes, bytes]:
            marks = ",".join("?" * len(checked))
            rows = conn.execute(f"SELECT key, value FROM kv WHERE key IN ({marks})", checked)
            return dict(rows.fetchall())

        return await self._call(fn, writes=False)

    async def put(self, key: bytes, value: bytes) -> None:
        key, value = self.limits.key(key), self.limits.value(value)

        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO kv(key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        await self._call(fn, writes=True)

    async def delete(self, key: bytes) -> None:
        key = self.limits.key(key)
        await self._call(lambda c: c.execute("DELETE FROM kv WHERE key = ?", (key,)), writes=True)

    async def scan(self, prefix: bytes, limit: int, *, after: bytes | None = None) -> list[Entry]:
        rng = scan_range(self.limits, prefix, limit, after)
        if rng.empty:
            return []
        return await self._call(lambda c: _scan(c, rng), writes=False)

    async def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        key = self.limits.key(key)
        expected = self.limits.optional_value(expected, "expected value")
        new = self.limits.optional_value(new, "new value")

        def fn(conn: sqlite3.Connection) -> bool:
            # Atomic: this thread is the only writer and holds the write lock (BEGIN IMMEDIATE).
            if _get(conn, key) != expected:
                return False
            if new is None:
                conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            else:
                conn.execute(
                    "INSERT INTO kv(key, value) VALUES (?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, new),
                )
            return True

        return await self._call(fn, writes=True)


def _get(conn: sqlite3.Connection, key: bytes) -> bytes | None:
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return None if row is None else bytes(row[0])


def _scan(conn: sqlite3.Connection, rng: ScanRange) -> list[Entry]:
    sql = "SELECT key, value FROM kv WHERE key " + (">=" if rng.start_inclusive else ">") + " ?"
    args: list[object] = [rng.start]
    if rng.end is not None:
        sql += " AND key < ?"
        args.append(rng.end)
    sql += " ORDER BY key LIMIT ?"
    args.append(rng.limit)
    return [Entry(bytes(k), bytes(v)) for k, v in conn.execute(sql, args).fetchall()]


def _while_busy(step: Callable[[], object]) -> None:
    """`step` again while the file is locked by another process that opens it at once (origins
    sharing a kv file), for up to `_OPEN_WAIT_S`; a cancelled caller stops the wait. Changing
    the journal mode fails at once with "database is locked" while another connection holds
    the lock, whatever the busy timeout; a migration's BEGIN IMMEDIATE waits `_OPEN_BUSY_S`.
    Runs in a `trio.to_thread.run_sync` thread."""
    deadline = time.monotonic() + _OPEN_WAIT_S
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            # The primary code: SQLITE_BUSY_RECOVERY and the like are busy too.
            busy = (exc.sqlite_errorcode & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
        trio.from_thread.check_cancelled()
        time.sleep(0.05)
