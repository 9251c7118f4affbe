"""The relational store of a shard whose log of record is Kafka (`[store] backend = "kafka"`).

DESIGN §3: the shard's sequencer assigns seqs and appends each batch to Kafka as ONE
transaction (transactional id `gb6-shard-<shard>`); a message is acknowledged once that
transaction committed. PostgreSQL is the relational store: tenancy, reads and search go to a
`PgStore` (same schema, same tables), and a persister (pg_persister.py) writes the log's
committed events into it, storing its offsets in the same transaction.

Topics: one topic per shard (`kafka_topic`, by default `gb6-log-<shard>`), keyed by room, created
with `kafka_partitions` partitions (one by default: every partition a batch touches costs a
produce request and a commit marker, and the shard's consumers read them all anyway). The
shard's producer is the topic's only writer, so once its `init_transactions` has fenced the
previous incarnation no transaction is open there, and "the end of the log" is well defined.
Each transaction also carries its events' usage on the usage topic `<topic>.usage`
(kafka_records.py), which the meter reads instead of the events; at start, once the log is
persisted to its end, the store claims that end as `usage_from` (stored once: where usage
records began, the meter's handover point for a log begun under an earlier version).

Rules:
- Start (recovery): PgStore migrates; the Kafka producer takes the transactional id (fencing a
  zombie and aborting what it left open); the persister reads from its stored offsets until no
  committed record is left (kafka_tail.py), so PostgreSQL holds every acknowledged event and
  the heads loaded from it continue gapless after a kill -9. That recovery persister is
  stopped, and the persister proper starts in a child process (persister_process.py: the
  origin's busy thread keeps the CPU it would take). Only then does `run` serve.
- Appends: `submit_append` takes a slot (at most `max_inflight_appends` in flight); one
  sequencer task takes every op waiting (at most `writer_batch`), asks PostgreSQL once for what
  its memory lacks (kafka_sequencer.py; a room's key filter, key_filter.py, spares it the new
  cids, filled in by the key loader task), plans, appends the batch as one transaction, and calls
  `on_appended` once it committed, in commit order. `LogAborted`: the same records are tried
  again (their seqs reused, so no gap and no duplicate), at most `_ATTEMPTS` times, then every
  new op of the batch is `unavailable` and the next batch takes the seqs.
- `LogFenced`, or an unknown outcome (the broker did not answer the commit, nor the abort,
  within the commit timeout): the batch's ops are `unavailable`. Fenced by an origin of the
  shard started since, the store refuses every later append — a zombie never writes. Otherwise
  (the outcome unknown; or fenced by a zombie's recovery, or by the broker timing a transaction
  out) it refuses appends while it recovers in place, as at start but without a restart: once
  every op taken is answered, a new producer takes the transactional id (which settles the
  transaction left open: committed or aborted); the persister writes the log to its end; the
  sequencer starts afresh (its heads, resend filters and unpersisted entries come from
  PostgreSQL again); if the batch turned out committed (PostgreSQL holds each of its keys at the
  seq it planned), its events go to `on_recovered` (the shard publishes them: they were not
  answered as appended, but they are the log's). A failed attempt is tried again after 1 s,
  doubling to 30 s. Every origin records its incarnation in PostgreSQL before its producer takes
  the transactional id; one that finds a newer incarnation there when it recovers is the
  zombie, and stops appending for good (taking the id back would fence the newer one), and
  stops its persister child (the newer one's writes the log). One whose start fails before it
  serves gives the shard back (if it is still the newest): the one it replaced finds itself the
  newest again, at its recovery or, if it stopped meanwhile, within `_SUPERSEDED_POLL_S`, and
  recovers in place, starting its persister child again. A zombie
  that took the id back before it found out (it was cut off while the newer one started) stops
  then, unwritten, and the newer one, fenced by it, finds itself the newest and takes the id
  back in turn.
- Pipelined, one transaction at a time: while batch N's transaction commits (in its own task),
  the sequencer takes batch N+1 — at once when a whole batch (`writer_batch`) waits, else once N
  is done, so that a light load still fills each transaction with what arrived while the
  previous one committed, and no sooner than `log_transaction_interval_s` after N started
  (unless a whole batch waits) — and runs its PostgreSQL lookup; it plans N+1 only once N's
  outcome is known (so N+1's seqs follow N's, or reuse them if N aborted), starts N+1's
  transaction, and only then answers N (the producer thread works while the shard publishes) —
  unless N was done before N+1 was taken: then N is answered first. The early lookup is sound
  because the shard is its rooms' only writer: what it does not find in PostgreSQL was not
  appended before, except by batch N, whose keys, heads and targets the plan reads from memory
  first once N committed; entries are pruned only at the top of an iteration, never between a
  lookup and its plan.
- The check (the usual case, when a batch needs nothing of PostgreSQL but whether some keys are
  resends): the lookup runs as a task, the batch is planned as if none were, and its
  transaction is written with the commit held until the lookup answers (kafka_log.py's
  `confirm`). No resend: it commits. A resend: it is aborted (`LogWithdrawn`, nothing
  visible) and the batch is planned again, in the sequencer's task, with a fresh lookup, then
  appended. A plan that refuses an op whose key it did not know waits for the answer first (a
  resend's answer is its original, whatever the checks say now).
- Memory: what is appended and not yet persisted is held by the sequencer; above
  `_MAX_UNPERSISTED` entries the sequencer waits for the persister (backpressure).
- Reads that must see acknowledged messages (events_after, history, search, load_rooms' heads)
  wait until the persister has written what was acknowledged in their rooms, at most
  `_READ_WAIT_S`, else `unavailable`.
- Shutdown: the ops queued before the cancellation are appended (the Kafka producer outlives
  the sequencer: its scope is cancelled only after), then everything closes.
"""

from __future__ import annotations

import secrets
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from math import inf
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson
import trio
from trio_asyncio import aio_as_trio

from node.channels import take_waiting
from node.config import Limits
from node.errors import INVALID, UNAVAILABLE, GB6Error
from node.events import Event
from node.log import log
from node.metrics import Metric
from origin.kafka_consumer import KafkaLogConsumer
from origin.kafka_log import KafkaLog, LogWithdrawn
from origin.kafka_records import encode_usage, usage_topic
from origin.kafka_sequencer import Lookup, Needs, Plan, Sequencer, Target
from origin.kafka_tail import committed_records_after
from origin.log_port import LogAborted, LogBatch, LogFenced, writer_id
from origin.persister_main import Settings
from origin.persister_process import PersisterProcess
from origin.pg_append import HEADS, fetch_events_at, fetch_priors
from origin.pg_errors import DB_ERRORS, translate
from origin.pg_persister import PgPersister, prepare
from origin.pg_store import PgStore, open_pool
from origin.records import (
    ApiKey,
    FileRecord,
    Instance,
    Org,
    OrgMember,
    RoomRecord,
    Token,
    User,
)
from origin.sqlite_store import AppendCallback, Appended, AppendItem, now_ms

_ATTEMPTS: Final = 3  # appends of one batch whose transaction aborted
_MAX_UNPERSISTED: Final = 200_000
_READ_WAIT_S: Final = 10.0
_DRAIN_IDLE_S: Final = 0.2  # recovery: a quiet consumer this long means "ask the broker again"
_COMMAND_TIMEOUT_S: Final = 30.0
_RECOVERY_READ_S: Final = 120.0  # an in-place recovery's wait for the persister, per attempt
_CLOSE_TIMEOUT_S: Final = 10.0
_SUPERSEDED_POLL_S: Final = 5.0  # a superseded origin asks this often whether it was given back

_ROOMS: Final = "SELECT id, instance FROM rooms WHERE id = ANY($1::text[])"
# A page of a room's keys for its filter (origin/key_filter.py), by the primary key's order.
_ROOM_KEYS: Final = (
    "SELECT seq, sender, cid FROM event_keys WHERE room = $1 AND seq > $2 ORDER BY seq LIMIT $3"
)
_KEYS_PAGE: Final = 1_000  # ~3.5 ms of the busy thread to add to a filter
_KEYS_RETRY_S: Final = (1.0, 30.0)  # the key loader's waits after a failed page: first, most
# Where each target is (one probe each, as pg_append.KEYS_AT); its event is then read by
# `fetch_events_at`, with its instance and ts known when PostgreSQL plans it.
_TARGETS_AT: Final = (
    "SELECT q.room, q.seq, k.instance, k.ts"
    " FROM unnest($1::text[], $2::bigint[]) AS q(room, seq)"
    " CROSS JOIN LATERAL (SELECT k.instance, k.ts FROM event_keys k"
    " WHERE k.room = q.room AND k.seq = q.seq LIMIT 1) k"
)


def default_topic(shard: str) -> str:
    """The topic of a shard's log when the config names none."""
    return f"gb6-log-{shard}"


@attrs.define(eq=False)
class _Check:
    """The lookup of a batch whose only needs are keys, run while its transaction is written."""

    needs: Needs
    result: Lookup | GB6Error | None = None
    done: trio.Event = attrs.Factory(trio.Event)

    async def confirm(self) -> bool:
        """Whether none of the batch's keys is in PostgreSQL (a failed lookup: no)."""
        await self.done.wait()
        return isinstance(self.result, Lookup) and not self.result.priors

    def verdict(self) -> Lookup | GB6Error:
        """The lookup's answer, once `done`."""
        return self.result or GB6Error(UNAVAILABLE, "the batch's lookup did not finish")


def _refuses_a_key_of(plan: Plan, needs: Needs) -> bool:
    """Whether `plan` refused an op whose key it did not know (it may be a resend)."""
    return any(
        isinstance(result, GB6Error) and (item.room, item.sender, item.cid) in needs.keys
        for item, result in plan.results
    )


@attrs.define(eq=False)
class _Inflight:
    """A planned batch whose transaction is being appended; `failure` once `done`, if any."""

    plan: Plan
    check: _Check | None = None  # the batch was planned as if none of its keys were repeats
    failure: GB6Error | None = None
    done: trio.Event = attrs.Factory(trio.Event)
    settled: bool = False  # its answers were given out (`_finish`): never twice


@attrs.frozen
class _ShieldWhenStarted:
    """The task status of the log's `run`: shields `scope` the moment the log serves."""

    inner: trio.TaskStatus[None]
    scope: trio.CancelScope

    def started(self, value: None = None) -> None:
        # Unless its start was cancelled already (it was rescheduled before the cancel came):
        # then trio leaves it in the starter's nursery, where a shield would keep it, and the
        # starter waiting on it, for good.
        if trio.current_effective_deadline() != -inf:
            self.scope.shield = True
        self.inner.started(value)


def _rooms_of(inflight: _Inflight | None) -> Mapping[str, int]:
    """The rooms of the transaction in flight, if any (its heads)."""
    return inflight.plan.heads if inflight is not None else {}


def _in(plan: Plan, found: Lookup) -> bool:
    """Whether PostgreSQL, which holds the whole log, holds `plan`'s events: each of its keys
    with the very seq the plan gave it (a transaction is all or nothing)."""
    return all(
        (prior := found.priors.get(key)) is not None and prior.seq == event.seq
        for key, event in plan.keys.items()
    )


def _ignore(_: Any) -> None:
    """PgStore's append callback: never called, appends go through Kafka."""


async def _give_back(pool: Any, key: str, mine: str, previous: str | None) -> None:
    """asyncio side: make `previous` the shard's writer again, if `mine` still is."""
    if previous is None:
        await pool.execute("DELETE FROM meta WHERE key = $1 AND value = $2", key, mine)
    else:
        await pool.execute(
            "UPDATE meta SET value = $3 WHERE key = $1 AND value = $2", key, mine, previous
        )


async def _claim_usage_from(pool: Any, key: str, end: str) -> str:
    """asyncio side: `key` is `end` unless it was set; its value. The first claim also wraps
    the meter's stored offset of the log (`{"events": …}`, metering.KafkaEventSource) in the
    same transaction: a meter of an earlier version still running (in an origin this one
    fenced) cannot read it any more, so it stops before counting events past `end`, which
    their usage records count."""
    async with pool.acquire() as conn, conn.transaction():
        claimed: str | None = await conn.fetchval(
            "INSERT INTO meta(key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING"
            " RETURNING value",
            key,
            end,
        )
        if claimed is None:
            stored: str = await conn.fetchval("SELECT value FROM meta WHERE key = $1", key)
            return stored
        if await conn.fetchval("SELECT to_regclass('billing_offsets')") is not None:
            # No offset yet is one from the log's start: stored, so that a meter of an earlier
            # version, whose first apply expects none, cannot store one of its own after this.
            await conn.execute(
                "INSERT INTO billing_offsets(consumer, value) VALUES ('meter-kafka', $1)"
                " ON CONFLICT (consumer) DO UPDATE"
                " SET value = '{\"events\":' || billing_offsets.value || '}'"
                " WHERE billing_offsets.value NOT LIKE '{\"usage\"%'"
                " AND billing_offsets.value NOT LIKE '{\"events\"%'",
                '{"events":{}}',
            )
        return claimed


class KafkaStore:
    """Kafka as log of record, PostgreSQL as relational store (see the module doc).

    A component: `await nursery.start(store.run)` inside `trio_asyncio.open_loop()`; serves
    once recovered. Raises from `run` (`unavailable`) when PostgreSQL or Kafka cannot be reached
    at start.
    """

    def __init__(
        self,
        dsn: str,
        bootstrap: str,
        topic: str,
        shard: str,
        limits: Limits,
        on_appended: AppendCallback,
        *,
        schema: str = "gb6",
        partitions: int = 1,
        commit_timeout_s: float = 30.0,
    ) -> None:
        if not bootstrap or not topic or not shard:
            raise GB6Error(INVALID, "the kafka store needs kafka_bootstrap, a topic and a shard")
        if topic == usage_topic(topic.removesuffix(".usage")):
            # It would be another log's usage topic (a shard named `x.usage` included).
            raise GB6Error(INVALID, f"a log's topic must not end in .usage: {topic!r}")
        self.pg = PgStore(dsn, limits, _ignore, schema=schema)
        self._shard = shard
        self._writer_key = f"log_writer:{writer_id(shard)}"
        self._incarnation = secrets.token_hex(8)
        self._partitions = partitions
        self._commit_timeout_s = commit_timeout_s
        self.dsn = dsn
        self.bootstrap = bootstrap
        self.topic = topic
        self.log = self._new_log()
        self.schema = schema
        self.limits = limits
        self._on_appended = on_appended
        # Events of a batch whose outcome was unknown, found committed by an in-place recovery.
        self.on_recovered: Callable[[list[Event]], None] = lambda events: None
        self._seq = Sequencer(limits.key_filter_bytes)
        self._keys_wanted = trio.Event()  # set when a room's filter waits for its keys
        self._pool: Any = None
        self.persister: PersisterProcess | None = None  # once recovered
        self._persister_restarts_before = 0  # by the children this origin replaced
        self._persister_scope = trio.CancelScope()
        self._log_scope = trio.CancelScope()  # shielded once the log serves (`_run_log`)
        self._log_ended = trio.Event()
        self._slots = trio.Semaphore(limits.max_inflight_appends)
        self._send, self._recv = trio.open_memory_channel[AppendItem](limits.max_inflight_appends)
        self._closed = True  # until run serves
        self._dead: GB6Error | None = None  # appends refused: fenced (final), or recovering
        self._unknown: list[Plan] = []  # batches whose outcome the recovery learns
        self._recovery_wanted = trio.Event()
        self._superseded = False  # another origin of the shard started since (see `_dead`)
        self.recoveries = 0  # in-place recoveries done; for metrics and tests
        # Where this shard's usage records began (partition → offset; see `_claim_usage_from`):
        # set before the store serves.
        self.usage_from: dict[int, int] | None = None
        self._inflight = 0
        self._carry: list[AppendItem] = []  # the sequencer's ops not yet in a batch, once it ended
        self._idle = trio.Event()
        self._idle.set()
        self._progress = trio.Event()  # set (and replaced) whenever the persister writes
        self._restarted = trio.Event()  # set (and replaced) when a new persister child is ready
        self.commits = 0  # batches committed to the log; for metrics and tests
        self.withdrawn = 0  # transactions withdrawn (their check found a resend, or failed); same
        self.keys_asked = 0  # op keys looked up in PostgreSQL (no filter ruled them out); same

    # --- lifecycle -----------------------------------------------------------------------

    def _new_log(self) -> KafkaLog:
        return KafkaLog(
            self.bootstrap,
            self.topic,
            writer_id(self._shard),
            partitions=self._partitions,
            usage_topic=usage_topic(self.topic),
            commit_timeout_s=self._commit_timeout_s,
        )

    @property
    def stopped(self) -> GB6Error | None:
        return self._dead

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # The sequencer's lookups (two batches' may overlap), recovery's persister, one spare.
        self._pool = await open_pool(self.dsn, self.schema, "gb6-origin-log", 4)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.pg.run)
                try:
                    await self._serve(nursery, task_status)
                finally:
                    self._closed = True
                    with trio.CancelScope(shield=True):
                        await self._commit_queued()
                    self._log_scope.cancel()  # the producer goes last: queued ops needed it
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
                    await aio_as_trio(self._pool.close)()
                if scope.cancelled_caught:
                    self._pool.terminate()

    async def _serve(self, nursery: trio.Nursery, task_status: trio.TaskStatus[None]) -> None:
        offsets: dict[int, int] = await self._call(
            prepare, "reading the persister's offsets", self._pool, self.topic, "persister"
        )
        # Before the producer fences its predecessor: a zombie that finds it later stops.
        previous = await self.pg.meta(self._writer_key)
        try:
            await self.pg.set_meta(self._writer_key, self._incarnation)
            await nursery.start(self._run_log)
            async with trio.open_nursery() as recovery:
                consumer = KafkaLogConsumer(self.bootstrap, self.topic, offsets, name="persister")
                await recovery.start(consumer.run)
                persister = PgPersister(
                    self._pool, self.schema, self.topic, consumer, self._persisted
                )
                end = await self._recover(consumer, persister, offsets)
                recovery.cancel_scope.cancel()  # stopped before its successor reads
            await self._start_persister(nursery)
        except BaseException:
            # A start that failed gives the shard back to the origin it may have fenced, which
            # finds itself the newest again, at its recovery or, if it stopped meanwhile, within
            # `_SUPERSEDED_POLL_S`. (A start killed outright cannot: restart that origin.)
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
                try:
                    await self._call(
                        _give_back,
                        "giving the shard back",
                        self._pool,
                        self._writer_key,
                        self._incarnation,
                        previous,
                    )
                except GB6Error as exc:  # the start's own failure is the one to tell
                    log("log_give_back_failed", topic=self.topic, error=exc.message)
            raise
        # Not before: a start that fails after it would give the shard back to an origin that
        # may be of an earlier version, whose appends would carry no usage.
        await self._claim_usage_from(end)
        self._closed = False
        async with trio.open_nursery() as inner:
            inner.start_soon(self._sequencer)
            inner.start_soon(self._key_loader)
            inner.start_soon(self._heads_after_restarts)
            inner.start_soon(self._recoveries, nursery)
            inner.start_soon(self._watch_superseded)
            task_status.started()
            await trio.sleep_forever()

    async def _start_persister(self, nursery: trio.Nursery) -> None:
        settings = Settings(self.dsn, self.schema, self.bootstrap, self.topic)
        if self.persister is not None:  # given the shard back: its child starts again
            self._persister_restarts_before += self.persister.restarts + 1
        self.persister = PersisterProcess(settings, self._persisted, lambda: self._restarted.set())
        scope = self._persister_scope = trio.CancelScope()
        try:
            await nursery.start(self._run_persister, self.persister)
        except BaseException:
            scope.cancel()  # none runs: a recovery tried again starts one
            raise

    async def _watch_superseded(self) -> None:
        """A superseded origin asks now and then whether the shard is its again (the newer
        origin's start failed, and it gave the shard back): then it recovers in place."""
        while True:
            await trio.sleep(_SUPERSEDED_POLL_S)
            if not self._superseded:
                continue
            try:
                holder = await self.pg.meta(self._writer_key)
            except GB6Error:
                continue
            if holder == self._incarnation:
                log("log_writer_given_back", topic=self.topic)
                self._superseded = False
                self._dead = GB6Error(
                    UNAVAILABLE, "this shard was given back to this origin, which recovers"
                )
                self._recovery_wanted.set()

    async def _run_persister(
        self, persister: PersisterProcess, *, task_status: trio.TaskStatus[None]
    ) -> None:
        with self._persister_scope:  # cancelled when this origin turns out a zombie
            await persister.run(task_status=task_status)

    async def _run_log(self, *, task_status: trio.TaskStatus[None]) -> None:
        # Shielded from the store's cancellation once it serves; `run` cancels it once queued
        # ops are in. Not while it starts: a store stopped then need not wait for the broker.
        scope, ended = self._log_scope, self._log_ended
        try:
            with scope:
                await self.log.run(task_status=_ShieldWhenStarted(task_status, scope))
        finally:
            ended.set()

    async def _claim_usage_from(self, end: Mapping[int, int]) -> None:
        """Where usage records began (`usage_from`): the log's end when the first origin that
        writes them started (stored once: the first claim wins). Before it, only the events
        tell usage; from it, every transaction also carries its usage records."""
        claimed = await self._call(
            _claim_usage_from,
            "claiming where usage records begin",
            self._pool,
            f"usage_from:{self.topic}",
            orjson.dumps({str(p): o for p, o in sorted(end.items())}).decode(),
        )
        self.usage_from = {int(p): int(o) for p, o in orjson.loads(claimed).items()}

    async def _recover(
        self, consumer: KafkaLogConsumer, persister: PgPersister, offsets: Mapping[int, int]
    ) -> dict[int, int]:
        """Persist the whole log, so PostgreSQL's heads are the log's (see the module doc).
        Returns where the log ends (no committed record at or after it)."""
        resume = dict(offsets)
        while await trio.to_thread.run_sync(
            committed_records_after, self.bootstrap, self.topic, resume
        ):
            try:
                with trio.fail_after(_COMMAND_TIMEOUT_S):  # the broker said there is a record
                    first = await consumer.next_batch()
            except trio.TooSlowError:
                raise GB6Error(
                    UNAVAILABLE, f"Kafka topic {self.topic!r}: recovery read nothing in time"
                ) from None
            await persister.write(first)
            while True:  # what the consumer has read ahead, until it is quiet
                batch: LogBatch | None = None
                with trio.move_on_after(_DRAIN_IDLE_S):
                    batch = await consumer.next_batch()
                if batch is None:
                    break
                await persister.write(batch)  # outside the timeout: a batch taken is written
            resume = dict(persister.offsets)
        if persister.batches:
            log("log_recovered", topic=self.topic, batches=persister.batches)
        return resume

    async def _recoveries(self, nursery: trio.Nursery) -> None:
        """Recover in place after each unknown outcome, until it succeeds (see the module doc).
        `nursery` is the store's: the new log outlives the sequencer at shutdown, as the first."""
        first_pause, most_pause = _KEYS_RETRY_S
        while True:
            await self._recovery_wanted.wait()
            self._recovery_wanted = trio.Event()
            pause = first_pause
            while True:
                try:
                    await self._recover_in_place(nursery)
                    break
                except GB6Error as exc:
                    log("log_recovery_failed", topic=self.topic, error=exc.message)
                    await trio.sleep(pause)
                    pause = min(2 * pause, most_pause)

    async def _recover_in_place(self, nursery: trio.Nursery) -> None:
        await self._idle.wait()  # appends are refused: the sequencer answers what it took
        if not await self._still_the_writer():
            return
        if not self.log.serving:
            self._log_scope.cancel()
            await self._log_ended.wait()  # one producer at a time
            self.log = self._new_log()
            self._log_scope, self._log_ended = trio.CancelScope(), trio.Event()
            # Its init_transactions fences the old producer and settles what it left open.
            await nursery.start(self._run_log)
            # Another origin that started meanwhile may be fenced by it: it (its incarnation
            # the newest) goes on; this one stops.
            if not await self._still_the_writer():
                return
        if self._persister_scope.cancel_called:  # stopped when it was superseded
            await self._start_persister(nursery)
        with trio.move_on_after(_RECOVERY_READ_S) as reading:
            while True:  # until PostgreSQL holds the whole log
                offsets: dict[int, int] = await self._call(
                    prepare, "reading the persister's offsets", self._pool, self.topic, "persister"
                )
                if not await trio.to_thread.run_sync(
                    committed_records_after, self.bootstrap, self.topic, offsets
                ):
                    break
                with trio.move_on_after(_DRAIN_IDLE_S):
                    await self._progress.wait()
        if reading.cancelled_caught:
            raise GB6Error(UNAVAILABLE, f"the persister did not reach the end of {self.topic}")
        unknown = self._unknown
        keys = frozenset(key for plan in unknown for key in plan.keys)
        none: frozenset[Any] = frozenset()
        found = await self._lookup(Needs(none, none, keys, none)) if keys else Lookup()
        committed = [plan for plan in unknown if _in(plan, found)]
        old, fresh = self._seq, Sequencer(self.limits.key_filter_bytes)
        fresh.instances, fresh.last_ts = old.instances, old.last_ts  # a room never moves
        fresh.key_filters.evicted = old.key_filters.evicted  # a counter, for /metrics
        self._seq = fresh  # what it needs, it asks PostgreSQL, which holds the whole log
        self._wake_progress()  # nothing of the old one's is waited on any more
        self._unknown = []
        self.recoveries += 1
        log(
            "log_recovered_in_place",
            topic=self.topic,
            batches=len(unknown),
            committed=len(committed),
        )
        for plan in committed:
            self.on_recovered(list(plan.keys.values()))  # the events it made, in seq order
        self._dead = None

    async def _still_the_writer(self) -> bool:
        """Whether this origin is still the shard's newest. If another started since (its
        incarnation in PostgreSQL), this one, cut off from Kafka meanwhile, is the zombie:
        taking the transactional id back would fence the origin serving the shard now, so it
        stops appending for good instead."""
        holder = await self.pg.meta(self._writer_key)
        if holder == self._incarnation:
            return True
        log("log_writer_superseded", topic=self.topic, incarnation=holder)
        self._superseded = True
        self._dead = LogFenced(
            f"this shard stopped appending for good: fenced by another origin of it, started"
            f" since (incarnation {holder})"
        )
        self._unknown = []
        # The newer origin's persister writes the log: a second one would read all of it
        # again only to find each batch written (and wait on the same offsets' row).
        self._persister_scope.cancel()
        return False

    def _persisted(self, heads: Mapping[str, int]) -> None:
        for room, seq in heads.items():
            self._seq.unpersisted.persisted_upto(room, seq)
        self._wake_progress()

    def _wake_progress(self) -> None:
        """Whoever waits on the persister looks again: it reported, or what they wait on changed
        (a recovery's fresh sequencer, a stop of appends)."""
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    async def _heads_after_restarts(self) -> None:
        """A persister child that died may have written batches it never reported, and its
        successor starts after them: without this, a room whose last events were in them would
        wait for PostgreSQL (reads `unavailable` after `_READ_WAIT_S`) until its next append.
        Once a new child is ready, PostgreSQL says how far the rooms still waited on are; a
        failed question is asked again, after 1 s doubling to 30 s."""
        first_pause, most_pause = _KEYS_RETRY_S
        while True:
            await self._restarted.wait()
            self._restarted = trio.Event()
            pause = first_pause
            while rooms := self._seq.unpersisted.behind():
                none: frozenset[Any] = frozenset()
                try:
                    found = await self._lookup(Needs(none, frozenset(rooms), none, none))
                except GB6Error as exc:
                    log("persister_heads_failed", rooms=len(rooms), error=exc.message)
                    await trio.sleep(pause)
                    pause = min(2 * pause, most_pause)
                    continue
                self._persisted(found.heads)
                break

    @property
    def persister_restarts(self) -> int:
        """Times the persister's child started again: after it died, or with a new one when
        the shard was given back to this origin."""
        now = self.persister.restarts if self.persister is not None else 0
        return self._persister_restarts_before + now

    def metrics(self) -> list[Metric]:
        """This store's part of `/metrics`."""
        state = self._seq.unpersisted
        return [
            Metric(
                "gb6_log_withdrawn_total",
                "counter",
                "log transactions withdrawn (a resend found after they were written)",
                self.withdrawn,
            ),
            Metric(
                "gb6_key_lookups_total",
                "counter",
                "op keys asked of PostgreSQL: possible resends no room filter ruled out",
                self.keys_asked,
            ),
            Metric(
                "gb6_key_filter_rooms",
                "gauge",
                "rooms whose resend filter holds all their keys",
                self._seq.key_filters.ready_rooms(),
            ),
            Metric(
                "gb6_key_filter_bytes",
                "gauge",
                "memory of the rooms' resend filters",
                self._seq.key_filters.nbytes,
            ),
            Metric(
                "gb6_key_filters_given_up_total",
                "counter",
                "rooms' resend filters given up for the memory budget (idle rooms' making way)",
                self._seq.key_filters.evicted,
            ),
            Metric(
                "gb6_unpersisted_entries",
                "gauge",
                "keys and targets committed to the log and not yet in PostgreSQL",
                len(state),
            ),
            Metric(
                "gb6_persister_rooms_behind",
                "gauge",
                "rooms whose last committed event is not yet in PostgreSQL",
                len(state.behind()),
            ),
            Metric(
                "gb6_log_recoveries_total",
                "counter",
                "in-place recoveries from a log write whose outcome was unknown",
                self.recoveries,
            ),
            Metric(
                "gb6_persister_restarts_total",
                "counter",
                "restarts of the persister's child process",
                self.persister_restarts,
            ),
        ]

    async def _key_loader(self) -> None:
        """Fill each newly tracked room's key filter from PostgreSQL, a page per crossing. A
        room whose page fails asks PostgreSQL meanwhile (its filter not ready) and is tried
        again later, from where it stopped: after 1 s, doubling with each failure in a row up to
        30 s, while the rooms behind it load. Failures in a row, whatever their rooms, also
        pause the loader, for as long, so a PostgreSQL that is down is asked rarely. A filter
        given up for the memory budget is not loaded on."""
        first_pause, most_pause = _KEYS_RETRY_S
        pause = first_pause
        while True:
            filters = self._seq.key_filters  # a recovery in place replaces them
            found = filters.next_to_load(trio.current_time())
            if found is None:
                self._keys_wanted = trio.Event()
                retry_at = filters.next_retry_at()
                with trio.move_on_at(inf if retry_at is None else retry_at):
                    await self._keys_wanted.wait()
                continue
            room, keys = found
            while True:
                after = keys.loaded_upto
                try:
                    rows = await self._call(self._room_keys, "reading a room's keys", room, after)
                except GB6Error as exc:
                    log("key_filter_load_failed", room=room, error=exc.message)
                    filters.retry_later(room, keys, trio.current_time(), _KEYS_RETRY_S)
                    await trio.sleep(pause)
                    pause = min(2 * pause, most_pause)
                    break
                pause = first_pause
                last = len(rows) < _KEYS_PAGE
                upto = int(rows[-1][0]) if rows else after
                pairs = ((r[1], r[2]) for r in rows)
                if not filters.loaded(room, keys, pairs, upto=upto, last=last) or last:
                    break

    async def _room_keys(self, room: str, after: int) -> list[Any]:
        async with self._pool.acquire() as c:
            return list(await c.fetch(_ROOM_KEYS, room, after, _KEYS_PAGE))

    async def wait_idle(self) -> None:
        """Return once every submitted append and write has been committed and answered."""
        await self._idle.wait()
        await self.pg.wait_idle()

    # --- the sequencer -------------------------------------------------------------------

    async def _sequencer(self) -> None:
        """The pipelined loop (see the module doc). Every op taken is answered, whatever is
        cancelled: the work on taken ops is shielded, and a transaction in flight is waited
        for on the way out."""
        carry: list[AppendItem] = []
        inflight: _Inflight | None = None
        started_at = -inf
        async with trio.open_nursery() as writes:
            try:
                while True:
                    if inflight is not None and not self._full(carry):
                        # Fewer ops wait than a batch holds: taking them now would make the
                        # next transaction small and leave those arriving meanwhile for the
                        # one after. Let them gather while this one commits.
                        await inflight.done.wait()
                    if inflight is not None and inflight.done.is_set():
                        # Done before the next batch is taken: answered now, not after that
                        # batch's lookup and plan (under a light load, every op waited for
                        # them: 23 ms p50 of a lookup at 2,000 sends/s in the cluster).
                        self._answer(await self._finish(inflight))
                        inflight = None
                    await self._persister_behind(inflight)
                    if inflight is None and not carry:
                        # No linger after the first op (unlike PgStore's writer), only the
                        # interval below: the ops of a batch gathered while the previous
                        # transaction committed, and a linger added latency (2 ms: 4.4 -> 2.5 ms
                        # p50 from one commit to the next transaction, 2,000 sends/s).
                        carry = [await self._recv.receive()]
                    if not self._full(carry):
                        # At most one transaction per interval: each costs the broker and this
                        # process a fixed CPU, so fewer, larger ones leave the machine more
                        # (2 cores, 2,000 sends/s: p99 26.5-43.2 ms against 41.8-93.5 without).
                        await trio.sleep_until(started_at + self.limits.log_transaction_interval_s)
                    started_at = trio.current_time()
                    batch = carry + take_waiting(self._recv, self.limits.writer_batch - len(carry))
                    with trio.CancelScope(shield=True):
                        inflight, carry = await self._step(writes, inflight, batch)
            finally:
                self._carry = carry  # taken, not yet in a batch: `_commit_queued` appends them
                if inflight is not None:
                    self._answer(await self._finish(inflight))

    async def _persister_behind(self, inflight: _Inflight | None) -> None:
        """Wait while the sequencer's memory holds more than `_MAX_UNPERSISTED` entries that
        PostgreSQL lacks. Pruned before each wait: entries the persister reported while the
        sequencer looked elsewhere would otherwise be waited on for a report that never comes.
        Not while appends are stopped: the ops are answered `unavailable` at once, and the
        recovery (which waits until every op taken is answered) can start."""
        while self._dead is None and len(self._seq.unpersisted) > _MAX_UNPERSISTED:
            self._seq.unpersisted.prune(_rooms_of(inflight))
            if len(self._seq.unpersisted) > _MAX_UNPERSISTED:
                await self._progress.wait()

    async def _step(
        self, writes: trio.Nursery, inflight: _Inflight | None, batch: list[AppendItem]
    ) -> tuple[_Inflight | None, list[AppendItem]]:
        """Look `batch` up while `inflight` commits; settle `inflight`; plan `batch` and start
        its transaction; answer `inflight`. Returns the new transaction in flight and the ops
        left for the next batch."""
        lookup: Lookup | GB6Error = Lookup()
        check: _Check | None = None
        if batch and self._dead is None:
            self._seq.unpersisted.prune(_rooms_of(inflight))
            needs = self._seq.needs(batch)
            if needs.keys and not (needs.rooms or needs.heads or needs.targets):
                # Only keys: the usual case. Planned as if none were a repeat, the batch's
                # transaction is written while PostgreSQL is asked, and committed only if
                # none was (else redone, see `_finish`): the lookup leaves the critical path.
                check = _Check(needs)
                writes.start_soon(self._check_task, check)
            elif needs:
                try:
                    lookup = await self._lookup(needs)
                except GB6Error as exc:
                    lookup = exc
        done: list[tuple[AppendItem, Appended | GB6Error]] = []
        if inflight is not None:
            done = await self._finish(inflight)
        plan: Plan | None = None
        left: list[AppendItem] = []
        if batch and self._dead is None and not isinstance(lookup, GB6Error):
            plan, left = self._plan(batch, lookup)
            if check is not None and _refuses_a_key_of(plan, check.needs):
                # A refusal stands only if the op is not a resend (whose answer is the
                # original): ask PostgreSQL before answering, and plan again with its answer.
                await check.done.wait()
                lookup, check, plan, left = check.verdict(), None, None, []
                if not isinstance(lookup, GB6Error):
                    plan, left = self._plan(batch, lookup)
        started: _Inflight | None = None
        if self._dead is not None:
            done += [(item, self._dead) for item in batch]
        elif isinstance(lookup, GB6Error):
            done += [(item, lookup) for item in batch]
        elif plan is not None:
            if plan.records:
                started = _Inflight(plan, check)
                writes.start_soon(self._write_task, started)
            else:  # repeats and refusals only: nothing to append
                done += plan.results
        self._answer(done)  # after the next transaction started: the producer works meanwhile
        return started, left

    def _full(self, carry: list[AppendItem]) -> bool:
        """Whether a whole batch is waiting (carried over and queued)."""
        waiting = len(carry) + self._recv.statistics().current_buffer_used
        return waiting >= self.limits.writer_batch

    def _plan(self, batch: list[AppendItem], lookup: Lookup) -> tuple[Plan, list[AppendItem]]:
        plan = self._seq.plan(lookup, now_ms())
        for i, item in enumerate(batch):
            if plan.full():
                return plan, batch[i:]
            plan.add(item)
        return plan, []

    async def _write_task(self, inflight: _Inflight) -> None:
        with trio.CancelScope(shield=True):  # once planned, its outcome must be learned
            try:
                inflight.failure = await self._write(inflight.plan, inflight.check)
            except BaseException as exc:
                # Never answered as committed, and no batch planned over its seqs: its outcome
                # is unknown (the process is likely going down).
                inflight.failure = self._stop_appending(inflight.plan, repr(exc))
                raise
            finally:
                inflight.done.set()

    async def _check_task(self, check: _Check) -> None:
        with trio.CancelScope(shield=True):  # a transaction waits for its verdict
            try:
                check.result = await self._lookup(check.needs)
            except GB6Error as exc:
                check.result = exc
            finally:
                check.done.set()

    async def _finish(self, inflight: _Inflight) -> list[tuple[AppendItem, Appended | GB6Error]]:
        """Wait for a transaction, redo it if its check found a repeat, and settle it. Run by
        the sequencer's task only, so no prune comes between the redo's lookup and its plan."""
        if inflight.settled:  # a raise between `_finish` and forgetting it: answered already
            return []
        inflight.settled = True
        with trio.CancelScope(shield=True):  # ops taken are answered
            await inflight.done.wait()
            if isinstance(inflight.failure, LogWithdrawn):
                self.withdrawn += 1
                inflight = await self._redo(inflight.plan)
        return self._settle(inflight)

    async def _redo(self, withdrawn: Plan) -> _Inflight:
        """Plan the ops of a withdrawn transaction again, with what PostgreSQL holds, and append
        them (its seqs are taken again: nothing of it is visible). Returns it done."""
        items = [item for item, _ in withdrawn.results]
        needs = self._seq.needs(items)
        try:
            lookup = await self._lookup(needs) if needs else Lookup()
        except GB6Error as exc:
            failed = _Inflight(withdrawn, failure=exc)
            failed.done.set()
            return failed
        plan = self._seq.plan(lookup, now_ms())
        for item in items:
            plan.add(item)
        redo = _Inflight(plan)
        if plan.records:
            await self._write_task(redo)
        else:
            redo.done.set()
        return redo

    def _settle(self, inflight: _Inflight) -> list[tuple[AppendItem, Appended | GB6Error]]:
        """The answers of a finished transaction; its plan becomes the state if it committed."""
        plan, failure = inflight.plan, inflight.failure
        if failure is None:
            self._seq.commit(plan)
            if self._seq.key_filters.wants_load():
                self._keys_wanted.set()
            return plan.results
        made = {(e.room, e.seq) for e in plan.keys.values()}
        return [
            (item, failure)
            if isinstance(r, Appended) and (r.event.room, r.event.seq) in made
            else (item, r)
            for item, r in plan.results
        ]

    async def _commit_queued(self) -> None:
        """On exit: append what was queued before the store closed (shielded by the caller),
        one transaction at a time."""
        carry, self._carry = self._carry, []
        async with trio.open_nursery() as writes:
            while batch := carry + take_waiting(self._recv, self.limits.writer_batch - len(carry)):
                inflight, carry = await self._step(writes, None, batch)
                if inflight is not None:
                    self._answer(await self._finish(inflight))

    async def _write(self, plan: Plan, check: _Check | None) -> GB6Error | None:
        """Append the plan's records as one transaction (on `check`'s verdict, if any); the
        error its ops get, if any (`LogWithdrawn`: the check found a repeat, or failed)."""
        usage = encode_usage(plan.ts, plan.usage)
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                await self.log.append_batch(
                    plan.records,
                    usage=usage,
                    confirm=check.confirm if check is not None else None,
                )
                self.commits += 1
                return None
            except LogWithdrawn as exc:
                return exc
            except LogAborted as exc:
                log("log_batch_aborted", topic=self.topic, attempt=attempt, error=exc.message)
                failure: GB6Error = exc
            except GB6Error as exc:  # fenced, or the outcome is unknown: the recovery decides
                return self._stop_appending(plan, exc.message)
            except Exception as exc:  # a bug of ours: the batch's outcome is unknown too
                log("log_write_failed", topic=self.topic, traceback=traceback.format_exc())
                return self._stop_appending(plan, repr(exc))
        return GB6Error(
            UNAVAILABLE, f"the log refused the batch (resend with the same cid): {failure.message}"
        )

    def _stop_appending(self, plan: Plan, why: str) -> GB6Error:
        """Stop appending until the recovery has learned whether `plan` was committed (it
        reads the log): answering its ops either way could lose or double one."""
        dead = self._dead = GB6Error(UNAVAILABLE, f"this shard stopped appending: {why}")
        self._unknown.append(plan)
        self._recovery_wanted.set()
        self._wake_progress()  # ops held for the persister are answered `unavailable`
        log("log_writer_stopped", topic=self.topic, error=why)
        return dead

    def _answer(self, results: list[tuple[AppendItem, Appended | GB6Error]]) -> None:
        if not results:
            return
        try:
            self._on_appended(results)
        except Exception as exc:
            # The ops are in the log. A failing callback must not unwind the sequencer between
            # starting a transaction and keeping it (the ops it carries would be planned again,
            # at the same seqs); their clients resend, and a resend gets its original.
            log("appended_callback_failed", topic=self.topic, error=repr(exc))
        finally:
            self._release(len(results))

    async def _lookup(self, needs: Needs) -> Lookup:
        """What PostgreSQL holds of `needs`: one crossing, one connection."""

        async def q() -> Lookup:
            found = Lookup()
            async with self._pool.acquire() as c:
                if needs.rooms:
                    rows = await c.fetch(_ROOMS, sorted(needs.rooms))
                    found.instances.update((r[0], r[1]) for r in rows)
                if needs.heads:
                    rows = await c.fetch(HEADS, sorted(needs.heads))
                    found.heads.update((r[0], int(r[1])) for r in rows)
                if needs.keys:
                    self.keys_asked += len(needs.keys)
                    found.priors.update(await fetch_priors(c, needs.keys))
                if needs.targets:
                    rooms, seqs = (list(col) for col in zip(*needs.targets, strict=True))
                    places = [
                        (r[2], int(r[3]), r[0], int(r[1]))
                        for r in await c.fetch(_TARGETS_AT, rooms, seqs)
                    ]
                    for r in await fetch_events_at(c, places):  # EVENT_COLS
                        found.targets[(r[0], int(r[1]))] = Target(r[3], r[4], bool(r[10]))
            return found

        found: Lookup = await self._call(q, "looking up the batch")
        return found

    async def _call(self, fn: Any, doing: str, *args: Any) -> Any:
        """One crossing into asyncio; driver errors come back as GB6Error."""
        try:
            return await aio_as_trio(fn)(*args)
        except DB_ERRORS as exc:
            raise translate(exc, doing) from exc

    # --- slots ---------------------------------------------------------------------------

    def _release(self, n: int) -> None:
        self._inflight -= n
        for _ in range(n):
            self._slots.release()
        if self._inflight == 0:
            self._idle.set()

    async def submit_append(self, item: AppendItem) -> None:
        """Queue an append; waits only for a free slot (backpressure). The result reaches
        `on_appended` once the log committed it. Raises `unavailable` once the store has
        stopped or stopped appending (fenced)."""
        if self._closed or self._dead is not None:
            raise self._dead or GB6Error(UNAVAILABLE, "the store is not serving")
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        if self._closed:
            self._slots.release()
            raise GB6Error(UNAVAILABLE, "the store is not serving")
        if self._inflight == 0:
            self._idle = trio.Event()
        self._inflight += 1
        self._send.send_nowait(item)  # the channel has room for every slot

    # --- reads that must see every acknowledged event --------------------------------------

    async def _caught_up(self, rooms: Iterable[str]) -> None:
        wanted = list(rooms)
        with trio.move_on_after(_READ_WAIT_S):
            while not self._seq.unpersisted.caught_up(wanted):  # replaced by a recovery
                await self._progress.wait()
            return
        raise GB6Error(
            UNAVAILABLE, f"PostgreSQL is more than {_READ_WAIT_S:g}s behind the log; retry"
        )

    async def events_after(self, room: str, after: int, limit: int) -> list[Event]:
        await self._caught_up([room])
        return await self.pg.events_after(room, after, limit)

    async def history(self, room: str, before: int | None, limit: int) -> list[Event]:
        await self._caught_up([room])
        return await self.pg.history(room, before, limit)

    async def search(self, rooms: Sequence[str], query: str, limit: int) -> list[Event]:
        await self._caught_up(rooms)
        return await self.pg.search(rooms, query, limit)

    async def load_rooms(self) -> list[tuple[RoomRecord, int, dict[str, int]]]:
        await self._caught_up(self._seq.unpersisted.behind())
        rooms = await self.pg.load_rooms()
        for rec, _, _ in rooms:
            self._seq.instances[rec.id] = rec.instance
        return rooms

    # --- the rest is PostgreSQL's --------------------------------------------------------

    async def create_org(self, org: Org) -> None:
        await self.pg.create_org(org)

    async def create_instance(self, inst: Instance) -> None:
        await self.pg.create_instance(inst)

    async def create_user(self, user: User) -> None:
        await self.pg.create_user(user)

    async def create_token(self, token: Token, digest: str) -> None:
        await self.pg.create_token(token, digest)

    async def revoke_token(self, user: str, token_id: str) -> bool:
        return await self.pg.revoke_token(user, token_id)

    async def create_room(self, room: RoomRecord, members: Iterable[str]) -> None:
        await self.pg.create_room(room, members)
        self._seq.instances[room.id] = room.instance

    async def add_members(self, room: str, users: Iterable[str]) -> None:
        await self.pg.add_members(room, users)

    async def remove_members(self, room: str, users: Iterable[str]) -> None:
        await self.pg.remove_members(room, users)

    async def set_read(self, room: str, user: str, seq: int) -> None:
        await self.pg.set_read(room, user, seq)

    async def create_file(self, rec: FileRecord) -> None:
        await self.pg.create_file(rec)

    async def set_meta(self, key: str, value: str) -> None:
        await self.pg.set_meta(key, value)

    async def token(self, digest: str) -> Token | None:
        return await self.pg.token(digest)

    async def load_tenancy(self) -> tuple[list[Org], list[Instance], list[User]]:
        return await self.pg.load_tenancy()

    async def file(self, file_id: str) -> FileRecord | None:
        return await self.pg.file(file_id)

    async def meta(self, key: str) -> str | None:
        return await self.pg.meta(key)

    # Tenancy (origin/tenancy.py): relational data, PostgreSQL's.

    async def update_org(self, org: Org) -> None:
        await self.pg.update_org(org)

    async def delete_org(self, org_id: str) -> None:
        await self.pg.delete_org(org_id)

    async def update_instance(self, inst: Instance) -> None:
        await self.pg.update_instance(inst)

    async def update_user(self, user: User) -> None:
        await self.pg.update_user(user)

    async def delete_user(self, user_id: str) -> None:
        await self.pg.delete_user(user_id)

    async def create_org_member(self, member: OrgMember) -> None:
        await self.pg.create_org_member(member)

    async def update_org_member(self, member: OrgMember) -> None:
        await self.pg.update_org_member(member)

    async def delete_org_member(self, member_id: str) -> None:
        await self.pg.delete_org_member(member_id)

    async def create_member_token(self, token: Token, digest: str) -> None:
        await self.pg.create_member_token(token, digest)

    async def revoke_member_token(self, member: str, token_id: str) -> bool:
        return await self.pg.revoke_member_token(member, token_id)

    async def member_token(self, digest: str) -> Token | None:
        return await self.pg.member_token(digest)

    async def create_api_key(self, key: ApiKey, digest: str) -> None:
        await self.pg.create_api_key(key, digest)

    async def revoke_api_key(self, key_id: str) -> bool:
        return await self.pg.revoke_api_key(key_id)

    async def api_key(self, digest: str) -> ApiKey | None:
        return await self.pg.api_key(digest)

    async def load_access(self) -> tuple[list[OrgMember], list[ApiKey]]:
        return await self.pg.load_access()

    async def messages_since(self, since_ms: int) -> dict[str, int]:
        # At start the log has been persisted to its end (`_recover`), so PostgreSQL has it.
        await self._caught_up(self._seq.unpersisted.behind())
        return await self.pg.messages_since(since_ms)

    async def stored_bytes(self) -> dict[str, int]:
        return await self.pg.stored_bytes()

    async def event_by_cid(self, room: str, sender: str, cid: str) -> Event | None:
        await self._caught_up([room])  # what was acknowledged is in PostgreSQL
        return await self.pg.event_by_cid(room, sender, cid)


if TYPE_CHECKING:  # KafkaStore fits the port (checked by mypy)
    from origin.store_port import RelationalStore

    def _fits(store: KafkaStore) -> RelationalStore:
        return store
