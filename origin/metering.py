"""Usage metering: a consumer of the log of record with its own offset (DESIGN §3.5).

Rules:
- The meter reads the shard's committed events (on Kafka, the usage records that each log
  transaction carries for them) in log order from where its stored offset says,
  folds them into usage read by read (`Usage`, pure) and hands usage and the new offset to the
  billing store in ONE transaction (`BillingStore.apply`, which refuses a batch whose starting
  offset is no longer the stored one). What is folded and not applied yet is held in memory,
  from pass to pass (lost on a crash: read again from the stored offset). Replaying the log,
  restarting mid-stream or a crash between read and write never counts an event twice or
  misses one; a fresh store fed the log from the start ends with the same usage (given the
  same months closed: see origin/billing_store.py).
- What is counted, per instance, UTC day and UTC month: `messages` (sends), `edits`, `deletes`,
  `reactions`, and `seats`: the distinct users with any such event in the period. The period is
  the event's own `ts` (when the log committed it), never when the meter read it.
- The meter is derived data, off the commit path: it wakes every `EventSource.poll_s`, or at
  once when someone calls `catch_up` (which returns once everything committed before the call
  is counted: reads and invoices see their own writes). A background pass reads what the source
  has at hand for at most `_GATHER_S`, never asking where the log ends; it applies once it
  holds `batch` events, once what it holds is `APPLY_S` old, or when the source has nothing
  more at hand. An exact pass applies at least every `_GATHER_S` and at its end.
- How often the background passes run is the source's (`EventSource.poll_s`). A table source
  folds a read in SQL and pays about one row per active user (seats) whatever the number of
  events, so its passes are rare (`POLL_S`) and large (`BATCH`). A log consumer decodes every
  record on the event loop (on Kafka, a usage record per transaction, standing for all its
  events: an apply may pass `BATCH` by a read's worth): its passes run nearly back to back
  (`LOG_POLL_S`), so that it
  reads each log transaction soon after it commits and this work is spread out (every 10 s
  it came as a burst of ~90 ms; every 2 s, the second's backlog still slowed the sequencer),
  while its applies stay ten seconds apart under load (each is one row per active user, and
  slowed the sequencer's lookups in PostgreSQL): bench/RESULTS.md.
- Sources (`EventSource`): the embedded store's `events` table in `gb6.db` (read-only, on a
  thread of the source's own) and the PostgreSQL store's `events` (`PgEventSource`), by event
  id (the offset is the text of the last id counted); the `kafka` backend's usage records, one
  per log transaction (`KafkaEventSource`, the offset is JSON Kafka positions; events from
  before usage records are read from the log of record itself).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import attrs
import orjson
import trio
from trio_asyncio import aio_as_trio

from node.errors import UNAVAILABLE, GB6Error
from node.log import log
from origin.billing import day_of, month_of
from origin.billing_store import BillingStore, UsageDelta
from origin.pg_errors import DB_ERRORS, translate
from origin.quotas import DAY_MS
from origin.sqlite_worker import SqliteWorker

METRIC_OF_TYPE: Final = {
    "message": "messages",
    "edit": "edits",
    "delete": "deletes",
    "react": "reactions",
}
BATCH: Final = 20_000  # events per transaction
_IDLE_S: Final = 0.2  # how long a Kafka read waits for records before it says "none yet"
_TAIL_S: Final = 15.0  # how long asking Kafka for its end may take
POLL_S: Final = 10.0  # background passes of a table source; reads of usage catch up first anyway
LOG_POLL_S: Final = 0.05  # between background passes of a log consumer
_FAILED_PAUSE_S: Final = 0.5  # before the first background pass after a failed one
_FAILED_PAUSE_MAX_S: Final = 10.0  # doubling with each failure in a row, up to this
_CONSUMER_BATCH: Final = 1_000  # records per read of the Kafka meter's consumer, at most
# An exact pass applies at least this often; a background pass reads at most this long.
_GATHER_S: Final = 1.0
APPLY_S: Final = 10.0  # under load, background passes apply at most this often


@attrs.frozen
class MeterEvent:
    """What the meter needs of one committed event."""

    instance: str
    ts: int  # ms
    type: str
    sender: str
    n: int = 1  # how many such events (same instance, UTC day, type and sender)


@attrs.define
class Usage:
    """The usage of events, per (instance, day and month, metric), and their active users:
    folded read after read until it is applied as one delta."""

    counts: dict[tuple[str, str, str], int] = attrs.Factory(dict)
    seats: set[tuple[str, str, str]] = attrs.Factory(set)
    events: int = 0  # folded so far (a MeterEvent may stand for several)
    # A UTC day is exactly DAY_MS (POSIX time has no leap seconds), so the day number names
    # the day and month: strftime once per day, not twice per event (~10 µs each).
    _periods: dict[int, tuple[str, str]] = attrs.Factory(dict)

    def add(self, events: Iterable[MeterEvent]) -> None:
        counts, seats, periods = self.counts, self.seats, self._periods
        for ev in events:
            self.events += ev.n
            metric = METRIC_OF_TYPE.get(ev.type)
            if metric is None:
                continue  # a type that is not billed
            day = ev.ts // DAY_MS
            pair = periods.get(day)
            if pair is None:
                pair = periods[day] = (day_of(ev.ts), month_of(ev.ts))
            for period in pair:
                key = (ev.instance, period, metric)
                counts[key] = counts.get(key, 0) + ev.n
                seats.add((ev.instance, period, ev.sender))

    def delta(self) -> UsageDelta:
        return UsageDelta(dict(self.counts), frozenset(self.seats))


def fold(usages: Iterable[tuple[str, int, str, str]]) -> list[MeterEvent]:
    """(instance, ts, type, sender) of events as one MeterEvent per instance, UTC day, type and
    sender (its ts: the first seen, all a MeterEvent's ts says is its day): what the table
    sources' SQL folds (`_READ`), here in Python. A MeterEvent and a `Usage.add` per record
    were ~5% of the origin's busy thread at full load."""
    folded: dict[tuple[str, int, str, str], list[int]] = {}
    for instance, ts, type_, sender in usages:
        key = (instance, ts // DAY_MS, type_, sender)
        found = folded.get(key)
        if found is None:
            folded[key] = [ts, 1]
        else:
            found[1] += 1
    return [
        MeterEvent(instance, ts, type_, sender, n)
        for (instance, _, type_, sender), (ts, n) in folded.items()
    ]


class EventSource(Protocol):
    """Committed events in log order, by offset. A component: `nursery.start(source.run)`."""

    name: str  # the consumer's name in the billing store's offsets
    poll_s: float  # how often the meter's background passes run on this source

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    async def read(self, after: str | None, limit: int) -> tuple[list[MeterEvent], str] | None:
        """Up to `limit` events after `after` (None: from the start) and the offset after
        them; None, promptly, when there are none yet."""
        ...

    async def drained(self, after: str | None) -> bool:
        """After `read` said None: True if nothing committed is after `after` (the sources
        that read a table know that already; a log consumer asks the log)."""
        ...

    async def end(self) -> Callable[[str], bool] | None:
        """Where the log ends now, as a test of an offset: True once reading up to it has
        read everything committed before this call. None where `read` saying None is the end
        already (a table). A log consumer needs it: under a steady load its reads never say
        None, and a pass would never end."""
        ...


def _after_id(after: str | None) -> int:
    try:
        return 0 if after is None else int(after)
    except ValueError:
        raise GB6Error(UNAVAILABLE, f"metering offset {after!r} is not an event id") from None


# The embedded source folds in SQLite (C code, GIL released, on its own thread): one row per
# (instance, UTC day, type, sender) with its count, so the event loop handles a few rows per
# active user and day instead of building and folding one object per event (at 2,000 sends/s
# that was a stall of 20+ ms of the event loop once a second). Events have `ts` ≥ 0, so
# integer division is the floor `Usage.add` uses.
_BATCH_END: Final = "SELECT MAX(id) FROM (SELECT id FROM events WHERE id > ? ORDER BY id LIMIT ?)"
_READ: Final = (
    "SELECT r.instance, MIN(e.ts), e.type, e.sender, COUNT(*)"
    " FROM events e JOIN rooms r ON r.id = e.room WHERE e.id > ? AND e.id <= ?"
    f" GROUP BY r.instance, e.ts / {DAY_MS}, e.type, e.sender"
)


# The same fold in PostgreSQL, in one statement: a read of 20,000 events from 1,000 users cost
# the event loop 68-109 ms of CPU as rows, 7-13 ms folded (bench/RESULTS.md). `upto` is the
# batch's last id.
_PG_READ: Final = (
    "WITH b AS (SELECT id, instance, ts, type, sender FROM events WHERE id > $1"
    " ORDER BY id LIMIT $2)"
    " SELECT (SELECT max(id) FROM b) AS upto, instance, min(ts), type, sender, count(*) FROM b"
    f" GROUP BY instance, ts / {DAY_MS}, type, sender"
)


def _reader_error(exc: sqlite3.Error) -> GB6Error:
    return GB6Error(UNAVAILABLE, f"the meter cannot read the embedded log: {exc}")


class SqliteEventSource:
    """The embedded store's events (`gb6.db`), read on a read-only connection of its own,
    counted per instance, day, type and sender there (`MeterEvent.n`)."""

    name = "meter"
    poll_s = POLL_S

    def __init__(self, log_path: Path) -> None:
        self._path = log_path
        self._worker = SqliteWorker("gb6-meter-reader", self._open, _reader_error)

    def _open(self) -> sqlite3.Connection:
        # The store made the file (in WAL mode) before the meter starts; only ever read here.
        conn = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only=ON")
        return conn

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._worker.run(task_status=task_status)

    async def read(self, after: str | None, limit: int) -> tuple[list[MeterEvent], str] | None:
        start = _after_id(after)

        def q(conn: sqlite3.Connection) -> tuple[int | None, list[MeterEvent]]:
            conn.execute("BEGIN")  # one snapshot for both statements
            try:
                (end,) = conn.execute(_BATCH_END, (start, limit)).fetchone()
                rows = [] if end is None else conn.execute(_READ, (start, end)).fetchall()
            finally:
                conn.execute("COMMIT")
            return end, [MeterEvent(*r) for r in rows]  # here, not on the event loop

        end, events = await self._worker.call(q)
        if end is None:
            return None
        return events, str(end)

    async def drained(self, after: str | None) -> bool:
        return True  # `read` found no row after `after`

    async def end(self) -> Callable[[str], bool] | None:
        return None  # a read past the last row says None


class PgEventSource:
    """The PostgreSQL store's events, by id (one writer per shard assigns ids in commit order:
    the store's writer for `postgres`, the persister for `kafka`)."""

    name = "meter"
    poll_s = POLL_S

    def __init__(self, dsn: str, schema: str) -> None:
        self._dsn = dsn
        self._schema = schema
        self._pool: Any = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from origin.pg_store import open_pool

        self._pool = await open_pool(self._dsn, self._schema, "gb6-meter", 1)
        try:
            # The meter reads `events` by id, across its partitions: an index per partition
            # (made once; IF NOT EXISTS) keeps each read to the new rows.
            try:
                await aio_as_trio(self._pool.execute)(
                    "CREATE INDEX IF NOT EXISTS events_by_id ON events(id)"
                )
            except DB_ERRORS as exc:
                raise translate(exc, "indexing events for metering") from exc
            task_status.started()
            await trio.sleep_forever()
        finally:
            pool, self._pool = self._pool, None
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await aio_as_trio(pool.close)()

    async def read(self, after: str | None, limit: int) -> tuple[list[MeterEvent], str] | None:
        if self._pool is None:
            raise GB6Error(UNAVAILABLE, "the meter's event source is not running")
        try:
            rows = await aio_as_trio(self._pool.fetch)(_PG_READ, _after_id(after), limit)
        except DB_ERRORS as exc:
            raise translate(exc, "reading events for metering") from exc
        if not rows:
            return None
        events = [MeterEvent(r[1], r[2], r[3], r[4], r[5]) for r in rows]
        return events, str(rows[0][0])

    async def drained(self, after: str | None) -> bool:
        return True  # `read` found no row after `after`

    async def end(self) -> Callable[[str], bool] | None:
        return None  # a read past the last row says None


class KafkaEventSource:
    """The shard's usage in Kafka, from the offsets the billing store keeps. It joins no
    consumer group: the offsets stored with the usage are the only ones, so usage and position
    commit together (origin/kafka_consumer.py).

    Every log transaction carries its usage records on the usage topic (kafka_records.py), so
    the meter reads a record per transaction, not every event a second time (that second read
    cost ~20% of a shard's appends: bench/RESULTS.md). Transactions written before the shard's
    first origin that wrote usage records (`usage_from`: where the log ended when it started,
    kafka_store.py) have none: their events are read from the log of record, up to there.
    The stored offset says which: `{"events": {partition: next offset}}` in the log of record
    (or the bare mapping, as the meter kept it before usage records: the store's claim of
    `usage_from` wraps it, so that a meter of that version still running, which would count
    on past `usage_from`, can read it no more), then `{"usage": {partition: next offset}}`;
    the read that reaches `usage_from` moves it on (events past `usage_from` are counted by
    their usage records only).

    A `read` from other offsets than where the consumer stands (the first read, or after
    another meter moved the stored offset) starts a new consumer there. `read` waits at most
    `_IDLE_S` for records; `drained` asks the broker whether a committed record is left
    (origin/kafka_tail.py), so `catch_up` sees every acknowledged event.
    """

    name = "meter-kafka"  # its offsets mean Kafka positions, not event ids
    poll_s = LOG_POLL_S

    def __init__(
        self, bootstrap: str, topic: str, usage_from: Callable[[], Mapping[int, int] | None]
    ) -> None:
        from origin.kafka_records import usage_topic

        self._bootstrap = bootstrap
        self._topic = topic
        self._usage_topic = usage_topic(topic)
        self._usage_from = usage_from
        self._nursery: trio.Nursery | None = None
        self._consumer: Any = None
        self._scope: trio.CancelScope | None = None
        self._position: tuple[str, dict[int, int]] | None = None  # (topic, offsets)
        self._max_batch = _CONSUMER_BATCH

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def _serve(
        self,
        topic: str,
        start: dict[int, int],
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # confluent-kafka only where used
        from origin.kafka_consumer import GATHERED, KafkaLogConsumer

        consumer = KafkaLogConsumer(
            self._bootstrap,
            topic,
            start,
            name="meter",
            max_batch=self._max_batch,
            config=GATHERED,
        )
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(consumer.run)
                task_status.started((consumer, scope))

    def _until(self) -> Mapping[int, int]:
        until = self._usage_from()
        if until is None:
            raise GB6Error(UNAVAILABLE, "the meter waits for the shard's log to start")
        return until

    async def read(self, after: str | None, limit: int) -> tuple[list[MeterEvent], str] | None:
        from origin.kafka_records import decode_usage, decode_usage_record
        from origin.kafka_tail import committed_records_after

        in_usage, start = _offsets(after)
        if self._nursery is None:
            raise GB6Error(UNAVAILABLE, "the meter's event source is not running")
        until: Mapping[int, int] = {}
        if not in_usage:
            until = self._until()
            if _reached(start, until):
                return [], _usage_offsets({})
        topic = self._usage_topic if in_usage else self._topic
        if self._consumer is None or self._position != (topic, start):
            self._drop_consumer()
            # Small reads: each is decoded on the event loop; `catch_up` gathers them.
            self._max_batch = max(1, min(limit, _CONSUMER_BATCH))
            self._consumer, self._scope = await self._nursery.start(self._serve, topic, start)
            self._position = (topic, start)
        with trio.move_on_after(_IDLE_S):
            try:
                batch = await self._consumer.next_batch()
                if in_usage:
                    events = [
                        MeterEvent(*row)
                        for entry in batch.entries
                        for row in decode_usage_record(entry)
                    ]
                else:  # before `until` only: past it, usage records count the events
                    events = fold(
                        decode_usage(entry)
                        for entry in batch.entries
                        if entry.offset < until.get(entry.partition, 0)
                    )
            except Exception:  # not a cancellation: the idle timeout leaves it reading
                # The consumer has moved past a batch that was not counted, or has stopped:
                # the next read starts a new one at the position last counted.
                self._drop_consumer()
                raise
            resume = dict(batch.resume)
            if in_usage:
                self._position = (topic, resume)
                return events, _usage_offsets(resume)
            # A partition read past `until` is done: its offset stays there, and the consumer
            # (kept for the next read from this offset) reads on only for the others.
            resume = {p: min(o, until.get(p, 0)) for p, o in resume.items()}
            self._position = (topic, resume)
            if _reached(resume, until):
                return events, _usage_offsets({})
            return events, _log_offsets(resume)
        if not in_usage and not await _in_time(
            lambda: committed_records_after(
                self._bootstrap, self._topic, start, before=until, timeout_s=_TAIL_S
            )
        ):  # what is left below `until` is transaction markers and aborted records
            return [], _usage_offsets({})
        return None

    def _drop_consumer(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        self._consumer = self._scope = self._position = None

    async def end(self) -> Callable[[str], bool] | None:
        from origin.kafka_tail import end_offsets

        ends = await _in_time(
            lambda: end_offsets(self._bootstrap, self._usage_topic, timeout_s=_TAIL_S)
        )

        def passed(offset: str) -> bool:
            in_usage, at = _offsets(offset)
            return in_usage and all(at.get(p, 0) >= end for p, end in ends.items())

        return passed

    async def drained(self, after: str | None) -> bool:
        from origin.kafka_tail import committed_records_after

        in_usage, start = _offsets(after)
        if not in_usage:
            return False  # a read moves the offset on to the usage records, once it is due
        more = await _in_time(
            lambda: committed_records_after(
                self._bootstrap, self._usage_topic, start, timeout_s=_TAIL_S
            )
        )
        return not more


def _reached(at: Mapping[int, int], until: Mapping[int, int]) -> bool:
    return all(at.get(p, 0) >= o for p, o in until.items())


T = TypeVar("T")


async def _in_time(ask: Callable[[], T]) -> T:
    """Ask the broker in a worker thread; `unavailable` (which a pass survives) if it takes
    longer than its own timeout should allow. The thread is waited for (a worker thread cannot
    be cancelled): the asks bound themselves, by `_TAIL_S` in all."""
    with trio.move_on_after(_TAIL_S + 5):
        return await trio.to_thread.run_sync(ask)
    raise GB6Error(UNAVAILABLE, f"Kafka did not answer the meter within {_TAIL_S + 5:g}s")


def _offsets(after: str | None) -> tuple[bool, dict[int, int]]:
    """(whether it is a position in the usage records, partition → next offset)."""
    if after is None:
        return False, {}
    try:
        raw = orjson.loads(after)
        in_usage = "usage" in raw
        if in_usage or "events" in raw:  # else as an earlier version kept it: the log's
            raw = raw["usage" if in_usage else "events"]
        return in_usage, {int(p): int(o) for p, o in raw.items()}
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise GB6Error(UNAVAILABLE, f"metering offset {after!r} is not Kafka offsets") from None


def _log_offsets(at: Mapping[int, int]) -> str:
    # Wrapped, as the store's claim of `usage_from` wraps the offset an earlier version kept:
    # a meter of that version, still running, cannot read it and count on past `usage_from`.
    return orjson.dumps({"events": {str(p): o for p, o in sorted(at.items())}}).decode()


def _usage_offsets(at: Mapping[int, int]) -> str:
    return orjson.dumps({"usage": {str(p): o for p, o in sorted(at.items())}}).decode()


class Meter:
    """Feeds the billing store from a source. A component: `await nursery.start(meter.run)`.

    `run` starts the source, serves once the offset is loaded, and meters every
    `source.poll_s` until cancelled. `catch_up` meters now; it raises `unavailable` if
    the store or source fails.
    """

    def __init__(
        self,
        store: BillingStore,
        source: EventSource,
        *,
        batch: int = BATCH,
    ) -> None:
        self.store = store
        self.source = source
        self.batch = batch  # events per transaction
        self._offset: str | None = None  # the store's: where `_pending` begins
        # Read and folded, not applied yet (passes carry it over), and where it ends.
        self._pending = Usage()
        self._resume: str | None = None
        self._since = 0.0  # when `_pending` began
        self._lock = trio.Lock()  # one pass at a time: the loop's or a catch_up's
        self._exact_begun = 0  # exact passes begun (under the lock)
        self._exact_ended = 0  # the latest of them (by `_exact_begun`) that ended counting all
        self._running = False
        self.applied = 0  # batches applied; for tests and metrics

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.source.run)
            self._offset = await self.store.offset(self.source.name)
            self._running = True
            task_status.started()
            try:
                pause = self.source.poll_s
                while True:
                    await trio.sleep(pause)
                    try:
                        await self.catch_up(exact=False)
                    except GB6Error as exc:  # the next pass retries; nothing was half-applied
                        # Paused longer after each failure in a row: a pass that fails may
                        # have opened a consumer of the log (its thread, its connections).
                        pause = min(max(2 * pause, _FAILED_PAUSE_S), _FAILED_PAUSE_MAX_S)
                        log("metering_failed", error=exc.message, pause=pause)
                    else:
                        pause = self.source.poll_s
            finally:
                self._running = False
                nursery.cancel_scope.cancel()

    async def catch_up(self, *, exact: bool = True) -> None:
        """Meter everything committed so far (`exact=False`: what the source has at hand)."""
        if not self._running:
            raise GB6Error(UNAVAILABLE, "the meter is not running")
        before = self._exact_begun
        async with self._lock:
            if exact and self._exact_ended > before:
                # An exact pass began after this call did and has ended counting all (we hold
                # the lock): it counted everything committed before this call. Callers waiting
                # together share one pass (on Kafka, `drained` asks the broker: worth sharing);
                # one that failed or was cancelled counts for nobody.
                return
            if exact:
                self._exact_begun += 1
                mine = self._exact_begun
            await self._pass(exact)
            if exact:
                self._exact_ended = mine

    async def _pass(self, exact: bool) -> None:
        """One pass, under the lock (see `catch_up`)."""
        # Reads are gathered into one transaction of the billing store: a log consumer's
        # reads are as small as the log's transactions, and under load a pass applied one
        # store transaction (seven round trips, one row per active user) per log
        # transaction, ~17 a second (bench/RESULTS.md). An exact pass applies at least
        # every `_GATHER_S` and at its end; a background pass (reading at most
        # `_GATHER_S`) applies what it gathered once it reached `batch` events, is
        # `APPLY_S` old, or the source has nothing more at hand. So a log consumer reads
        # all along (spread out) and applies every ten seconds under load: each apply
        # slowed the sequencer's lookups in PostgreSQL (bench/RESULTS.md).
        # Where the log ends now: under a steady load a log consumer's reads never come
        # back empty, and an exact pass (holding the lock) must end all the same.
        end = await self.source.end() if exact else None
        began = trio.current_time()
        while True:
            if self._resume is not None and self._pending.events >= self.batch:
                # A whole batch held from a pass whose apply failed: a read for none more
                # would come back empty, and an exact pass would take that for the end.
                await self._apply()
            after = self._offset if self._resume is None else self._resume
            got = await self.source.read(after, self.batch - self._pending.events)
            done = got is None
            if got is not None:
                if self._resume is None:
                    self._since = trio.current_time()
                self._pending.add(got[0])  # folded read by read: no stall at apply time
                self._resume = got[1]
                done = (end is not None and end(self._resume)) or (
                    not exact and trio.current_time() - began >= _GATHER_S
                )
            now = trio.current_time()
            if self._resume is not None and (
                self._pending.events >= self.batch
                or (exact and (done or now - max(began, self._since) >= _GATHER_S))
                or (not exact and (got is None or now - self._since >= APPLY_S))
            ):
                await self._apply()
            if done and (got is not None or not exact or await self.source.drained(self._offset)):
                return

    async def _apply(self) -> None:
        """Apply `_pending` (up to `_resume`) as one transaction of the billing store."""
        assert self._resume is not None
        if await self.store.apply(
            self.source.name, self._offset, self._resume, self._pending.delta()
        ):
            self._offset = self._resume
            self.applied += 1
        else:  # someone else moved the offset on: continue from theirs
            self._offset = await self.store.offset(self.source.name)
        self._pending, self._resume = Usage(), None
