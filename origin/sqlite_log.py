"""The embedded log of record: one SQLite table of records with a global position.

Rules:
- WAL with `synchronous=FULL`: `append_batch` returns after the batch's commit reached the disk.
- One batch is one transaction (`BEGIN IMMEDIATE` … `COMMIT`); a failed batch rolls back whole.
- One writer thread, started and joined by `SqliteLog.run`, owns the write connection; batches
  reach it through a queue (one thread hop each), at most `max_inflight` at a time.
- Fencing, as Kafka's transactional id does it: a writer registers its id in `log_writers` and
  bumps the id's epoch when it starts; every batch checks the epoch inside its transaction, so
  a writer started later under the same id (in this process or another one on the same file)
  fences the earlier one, whose batches then fail with `LogFenced`.
- The log has one partition (0); a record's offset is its position `pos`, which only a commit
  takes (a rolled-back insert leaves no hole).
- A consumer reads on its own connection in its own thread (WAL readers never block the
  writer) and hands batches to Trio through a bounded channel. Consumers made by
  `SqliteLog.consumer` are woken by its commits; others poll every `poll_s`.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import attrs
import outcome
import trio

from node.errors import INTERNAL, INVALID, UNAVAILABLE, GB6Error
from origin.log_port import (
    LogAborted,
    LogBatch,
    LogEntry,
    LogFenced,
    LogRecord,
    WriterStatistics,
    check_batch,
    check_offsets,
)

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS log_records(pos INTEGER PRIMARY KEY,
        room TEXT NOT NULL, seq INTEGER NOT NULL, payload BLOB NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS log_writers(id TEXT PRIMARY KEY, epoch INTEGER NOT NULL)",
)
_STOP: Final = object()
_BUSY_TIMEOUT_S: Final = 30.0


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(
        str(path), isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_S
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if readonly:
        conn.execute("PRAGMA query_only=ON")
    return conn


@attrs.define(eq=False)
class _Job:
    records: Sequence[LogRecord]
    abort_after: int | None
    done: trio.Event = attrs.Factory(trio.Event)
    result: outcome.Outcome[None] | None = None

    def finish(self, result: outcome.Outcome[None]) -> None:
        self.result = result
        self.done.set()


class SqliteLog:
    """The embedded `LogWriter` for `writer_id` on the SQLite file at `path`.

    A component: `await nursery.start(log.run)`; cancelling `run` finishes the batches already
    handed to the writer thread, then joins it.
    """

    def __init__(self, path: Path, writer_id: str, *, max_inflight: int = 8) -> None:
        if not writer_id:
            raise GB6Error(INVALID, "a log writer needs a writer id")
        if not 1 <= max_inflight <= 1_000:
            raise GB6Error(INVALID, f"max_inflight must be 1..1000, not {max_inflight}")
        self.path = path
        self.writer_id = writer_id
        self._max_inflight = max_inflight
        self._slots = trio.Semaphore(max_inflight)
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = True
        self._dead: GB6Error | None = None  # set by the writer thread; final
        self._abort_after: int | None = None
        self._wakes: set[threading.Event] = set()
        self._wakes_lock = threading.Lock()
        self.commits = 0  # committed batches; for metrics and tests

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            conn, epoch = await trio.to_thread.run_sync(self._open)
        except sqlite3.Error as exc:
            raise GB6Error(UNAVAILABLE, f"log {self.path}: cannot open: {exc}") from None
        token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(
            target=self._writer_main,
            args=(conn, epoch, token),
            name=f"gb6-log-{self.writer_id}",
            daemon=True,
        )
        self._thread.start()
        self._closed = False
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._closed = True
            self._queue.put(_STOP)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._thread.join)

    def _open(self) -> tuple[sqlite3.Connection, int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path, readonly=False)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            (epoch,) = conn.execute(
                "INSERT INTO log_writers(id, epoch) VALUES (?, 1)"
                " ON CONFLICT(id) DO UPDATE SET epoch = epoch + 1 RETURNING epoch",
                (self.writer_id,),
            ).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn, epoch

    def consumer(
        self, start: Mapping[int, int], *, max_batch: int = 1_000, max_pending: int = 4
    ) -> SqliteLogConsumer:
        """A consumer of this file that this writer wakes on every commit."""
        return SqliteLogConsumer(
            self.path, start, max_batch=max_batch, max_pending=max_pending, waker=self
        )

    def _register(self, wake: threading.Event, on: bool) -> None:
        with self._wakes_lock:
            if on:
                self._wakes.add(wake)
            else:
                self._wakes.discard(wake)

    # --- appends -------------------------------------------------------------------------

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(
            inflight=self._max_inflight - self._slots.value,
            max_inflight=self._max_inflight,
            commits=self.commits,
        )

    def abort_next_batch_after(self, records: int) -> None:
        """Test hook: the next batch writes its first `records` records, then rolls back."""
        self._abort_after = records

    async def append_batch(self, records: Sequence[LogRecord]) -> None:
        """See `LogWriter.append_batch`."""
        check_batch(records)
        async with self._slots:
            if self._dead is not None:
                raise self._dead
            if self._closed:
                raise GB6Error(UNAVAILABLE, f"log writer {self.writer_id} is not running")
            job = _Job(records, self._abort_after)
            self._abort_after = None
            self._queue.put(job)
            # Once handed over, the outcome is the truth the sequencer needs: wait for it.
            with trio.CancelScope(shield=True):
                await job.done.wait()
        assert job.result is not None
        job.result.unwrap()

    # --- the writer thread ---------------------------------------------------------------

    def _writer_main(
        self, conn: sqlite3.Connection, epoch: int, token: trio.lowlevel.TrioToken
    ) -> None:
        try:
            while True:
                job = self._queue.get()
                if job is _STOP:
                    return
                assert isinstance(job, _Job)
                result = outcome.capture(self._append, conn, epoch, job)
                if isinstance(result, outcome.Value):
                    with self._wakes_lock:
                        for wake in self._wakes:
                            wake.set()
                try:
                    token.run_sync_soon(job.finish, result)
                except trio.RunFinishedError:
                    return
        finally:
            conn.close()

    def _append(self, conn: sqlite3.Connection, epoch: int, job: _Job) -> None:
        if self._dead is not None:
            raise self._dead
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT epoch FROM log_writers WHERE id = ?", (self.writer_id,)
            ).fetchone()
            if row is None or row[0] != epoch:
                conn.execute("ROLLBACK")
                self._dead = LogFenced(
                    f"log writer {self.writer_id} (epoch {epoch}) was fenced by a newer one"
                )
                raise self._dead
            rows = [(r.room, r.seq, r.payload) for r in job.records]
            if job.abort_after is not None:
                conn.executemany(
                    "INSERT INTO log_records(room, seq, payload) VALUES (?, ?, ?)",
                    rows[: job.abort_after],
                )
                conn.execute("ROLLBACK")
                raise LogAborted(f"batch aborted after {job.abort_after} records (test hook)")
            conn.executemany("INSERT INTO log_records(room, seq, payload) VALUES (?, ?, ?)", rows)
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            raise self._settle(conn, exc) from None

    def _settle(self, conn: sqlite3.Connection, exc: sqlite3.Error) -> GB6Error:
        """After a failed statement: roll back, so the batch is known not to be in the log."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error as again:
            self._dead = GB6Error(
                UNAVAILABLE, f"log {self.path}: failed ({exc}), then could not roll back ({again})"
            )
            return self._dead
        return LogAborted(f"log {self.path}: batch rolled back: {exc}")


class SqliteLogConsumer:
    """The embedded `LogConsumer`: committed records at or after `start` (partition 0 only).

    A component: `await nursery.start(consumer.run)`; cancelling `run` stops and joins its
    reader thread. Batches hold at most `max_batch` records; at most `max_pending` wait.
    """

    def __init__(
        self,
        path: Path,
        start: Mapping[int, int],
        *,
        max_batch: int = 1_000,
        max_pending: int = 4,
        poll_s: float = 0.05,
        waker: SqliteLog | None = None,
    ) -> None:
        if not 1 <= max_batch <= 100_000 or not 1 <= max_pending <= 1_000:
            raise GB6Error(INVALID, "max_batch must be 1..100000 and max_pending 1..1000")
        self.path = path
        self._next = check_offsets(start, 1).get(0, 0)
        self._max_batch = max_batch
        self._poll_s = poll_s
        self._waker = waker
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._send, self._recv = trio.open_memory_channel[LogBatch | GB6Error](max_pending)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            conn = await trio.to_thread.run_sync(self._open)
        except sqlite3.Error as exc:
            raise GB6Error(UNAVAILABLE, f"log {self.path}: cannot open: {exc}") from None
        token = trio.lowlevel.current_trio_token()
        thread = threading.Thread(
            target=self._reader_main, args=(conn, token), name="gb6-log-reader", daemon=True
        )
        if self._waker is not None:
            self._waker._register(self._wake, True)
        thread.start()
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._stopping.set()
            self._wake.set()
            self._recv.close()  # a reader blocked on a full channel gets BrokenResourceError
            if self._waker is not None:
                self._waker._register(self._wake, False)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)

    def _open(self) -> sqlite3.Connection:
        conn = _connect(self.path, readonly=True)
        try:
            # The table exists before the first writer starts, so a consumer may start first.
            (found,) = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name = 'log_records'"
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        if not found:
            conn.close()
            raise sqlite3.OperationalError("no log_records table (no writer has started yet)")
        return conn

    def statistics(self) -> trio.MemoryChannelStatistics:
        return self._recv.statistics()

    async def next_batch(self) -> LogBatch:
        """See `LogConsumer.next_batch`."""
        try:
            item = await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise GB6Error(UNAVAILABLE, f"log consumer of {self.path} has stopped") from None
        if isinstance(item, GB6Error):
            raise item
        return item

    def _reader_main(self, conn: sqlite3.Connection, token: trio.lowlevel.TrioToken) -> None:
        try:
            while not self._stopping.is_set():
                # Cleared before the read: a commit after it sets the flag again, so no
                # commit is missed between an empty read and the wait.
                self._wake.clear()
                try:
                    rows = conn.execute(
                        "SELECT pos, room, seq, payload FROM log_records"
                        " WHERE pos >= ? ORDER BY pos LIMIT ?",
                        (self._next, self._max_batch),
                    ).fetchall()
                except sqlite3.Error as exc:
                    self._deliver(token, GB6Error(INTERNAL, f"log {self.path}: read failed: {exc}"))
                    return
                if not rows:
                    self._wake.wait(self._poll_s)
                    continue
                entries = tuple(
                    LogEntry(room=room, seq=seq, payload=bytes(payload), partition=0, offset=pos)
                    for pos, room, seq, payload in rows
                )
                self._next = entries[-1].offset + 1
                if not self._deliver(token, LogBatch(entries, {0: self._next})):
                    return
        finally:
            conn.close()
            try:
                token.run_sync_soon(self._send.close)
            except trio.RunFinishedError:
                pass

    def _deliver(self, token: trio.lowlevel.TrioToken, item: LogBatch | GB6Error) -> bool:
        """Block until Trio takes `item` (backpressure); False once the consumer is closed."""
        try:
            trio.from_thread.run(self._send.send, item, trio_token=token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
            return False
        except trio.Cancelled:
            return False
        return True
