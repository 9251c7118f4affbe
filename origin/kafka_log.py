"""The Kafka log of record, producer side: the transactional, idempotent producers of a shard.

Rules:
- The producer lives in one thread that `KafkaLog.run` starts and joins (confluent-kafka
  blocks). Batches reach it through a queue, one thread hop per batch; at most `max_inflight`
  batches wait or run (backpressure on the sequencer).
- At start the thread creates the topic if it is missing (`partitions` partitions; an existing
  topic keeps its count, since changing it would move rooms between partitions, and is refused
  if it is compacted, which would delete records of the log of record), then calls
  `init_transactions` under each of the shard's transactional ids. That call bumps the id's
  epoch, which fences any older producer with the same id and aborts whatever transaction it
  left open. Each step waits on the broker up to `commit_timeout_s`, in slices of `_SLICE_S`: a
  writer stopped meanwhile gives up within one, so its owner's shutdown does not wait for a
  broker that does not answer.
- One batch is one transaction: begin, produce every record (key = room, so a room's records
  share a partition and keep their order; header `seq` = the seq, 8 bytes big-endian), commit.
  `acks=all` and idempotence make the commit durable without duplicates. A batch may carry
  usage records (kafka_records.py) for the usage topic (`usage_topic`, one partition, made at
  start like the log's): they are produced in the same transaction, so they are visible exactly
  when the batch's events are, and the meter reads them instead of every event.
- Lanes: the shard's writer is `lanes` producers (transactional ids `<id>`, `<id>.1`, …) that
  take the batches in turn, still one transaction at a time, so the log holds the batches in
  the order they were committed. Why: the broker writes a transaction's commit markers after it
  answered the commit, and a producer's next transaction that registers a partition before they
  are written is refused (CONCURRENT_TRANSACTIONS), which librdkafka retries 20 ms later: measured
  here, one transaction in ten waited those 20 ms. The next lane's id has no markers pending.
  `init_transactions` runs on every lane before the writer serves, so a restarted shard fences
  every lane of its zombie.
- A batch may be appended on a condition (`confirm`): its records are produced at once, and the
  transaction is committed only if `confirm` answers yes (aborted otherwise: `LogWithdrawn`, and
  nothing of it is visible). The store uses it to write a batch while it still checks, in
  PostgreSQL, that none of its ops is a resend.
- confluent-kafka's errors are translated here, once: a commit that fails retriably is retried
  until `commit_timeout_s`; an abortable failure is aborted (`LogAborted`: read_committed
  consumers never see the batch, and the next batch may reuse its seqs); a fenced producer
  raises `LogFenced` and refuses every later batch; anything else leaves the outcome unknown,
  and the writer refuses every later batch: its owner starts a new one (whose
  `init_transactions` settles the transaction left open) and learns the outcome from the log.
"""

from __future__ import annotations

import concurrent.futures
import queue
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

import attrs
import outcome
import trio
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.cimpl import NewTopic

from node.errors import INTERNAL, INVALID, UNAVAILABLE, GB6Error
from node.log import log
from origin.kafka_records import USAGE_KEY
from origin.log_port import (
    MAX_PARTITIONS,
    MAX_PAYLOAD_BYTES,
    LogAborted,
    LogFenced,
    LogRecord,
    WriterStatistics,
    check_batch,
)

SEQ_HEADER: Final = "seq"
_SEQ: Final = struct.Struct(">q")
_STOP: Final = object()
# A writer's start waits on the broker in slices this long, so that it notices being stopped.
_SLICE_S: Final = 0.5
# A usage record's key and seq header: the shape of a log record (kafka_records.py).
_USAGE_KEY: Final = USAGE_KEY.encode()
_USAGE_HEADERS: Final[list[tuple[str, str | bytes | None]]] = [(SEQ_HEADER, _SEQ.pack(1))]
MAX_LANES: Final = 4
# The codes with which librdkafka and the broker say a newer producer took the transactional id.
_FENCED_CODES: Final = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
)


def encode_seq(seq: int) -> bytes:
    return _SEQ.pack(seq)


def decode_seq(raw: bytes) -> int:
    (seq,) = _SEQ.unpack(raw)
    return int(seq)


def lane_id(transactional_id: str, lane: int) -> str:
    """The transactional id of a writer's `lane` (lane 0 keeps the writer's own id)."""
    return transactional_id if lane == 0 else f"{transactional_id}.{lane}"


def kafka_error(exc: BaseException) -> KafkaError | None:
    """The KafkaError inside a confluent-kafka exception, if there is one."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


def ensure_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    timeout_s: float,
    stopping: threading.Event | None = None,
) -> None:
    """Create `topic` with `partitions` partitions unless it exists (blocking). Gives up with
    `_Stopped` soon after `stopping` is set."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [
            NewTopic(
                topic,
                num_partitions=partitions,
                replication_factor=-1,
                # The log of record and its usage records: their consumers (the persister,
                # the meter) start from them, and rebuild from their beginning. The broker's
                # default would delete acknowledged records, persisted or not; compaction
                # would keep one usage record (they share a key).
                config={
                    "retention.ms": "-1",
                    "retention.bytes": "-1",
                    "cleanup.policy": "delete",
                },
            )
        ],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            futures[topic].result(timeout=min(_SLICE_S, max(0.0, deadline - time.monotonic())))
            return
        except concurrent.futures.TimeoutError:
            if stopping is not None and stopping.is_set():
                raise _Stopped() from None
            if time.monotonic() >= deadline:
                raise
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is None or err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            _check_kept(admin, topic, deadline, stopping)
            return


def _check_kept(
    admin: AdminClient, topic: str, deadline: float, stopping: threading.Event | None
) -> None:
    """A topic made before (or by hand) may delete records by age or size: said at each start,
    for its operator to change (`kafka-configs.sh --alter`); not changed here, since an
    operator may mean it (records archived elsewhere). A compacted one is refused (`invalid`):
    compaction keeps one record per key, a room's newest event or the newest usage record,
    whether or not its consumers have read the others. Within the start's `deadline`, given up
    soon after `stopping` is set."""
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    future = admin.describe_configs([resource])[resource]
    while True:
        try:
            found = future.result(timeout=min(_SLICE_S, max(0.0, deadline - time.monotonic())))
            break
        except concurrent.futures.TimeoutError:
            if stopping is not None and stopping.is_set():
                raise _Stopped() from None
            if time.monotonic() >= deadline:
                log("kafka_topic_config_unknown", topic=topic, error="no answer in time")
                return
        except KafkaException as exc:
            log("kafka_topic_config_unknown", topic=topic, error=repr(exc))
            return
    policy = found["cleanup.policy"].value if "cleanup.policy" in found else "delete"
    if "compact" in (policy or ""):
        raise GB6Error(
            INVALID,
            f"topic {topic} has cleanup.policy={policy}: compaction would delete records of"
            " the log of record; set it to delete (kafka-configs.sh --alter --add-config"
            " cleanup.policy=delete)",
        )
    kept = {k: found[k].value for k in ("retention.ms", "retention.bytes") if k in found}
    if any(value != "-1" for value in kept.values()):
        log("kafka_topic_retention_limited", topic=topic, **kept)


class _Stopped(Exception):
    """The writer's start was given up: its owner stopped it."""


def _init_transactions(producer: Producer, timeout_s: float, stopping: threading.Event) -> None:
    """`init_transactions` within `timeout_s`, in slices (librdkafka resumes the call where a
    timed-out one left it), so that a writer stopped meanwhile gives up within `_SLICE_S`
    instead of holding its owner's shutdown for the whole timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            producer.init_transactions(min(_SLICE_S, max(0.0, deadline - time.monotonic())))
            return
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is None or not err.retriable() or time.monotonic() >= deadline:
                raise
            if stopping.is_set():
                raise _Stopped() from None


class LogWithdrawn(LogAborted):
    """The batch's `confirm` said no (or failed): its transaction was aborted, as asked."""


@attrs.define(eq=False)
class _Job:
    records: Sequence[LogRecord]
    abort_after: int | None
    usage: Sequence[bytes] = ()
    # A conditional batch: the thread commits once `gate` is set, and only if `confirmed`.
    gate: threading.Event | None = None
    confirmed: bool = False
    done: trio.Event = attrs.Factory(trio.Event)
    result: outcome.Outcome[None] | None = None

    def finish(self, result: outcome.Outcome[None]) -> None:
        self.result = result
        self.done.set()


class KafkaLog:
    """The Kafka `LogWriter` of one shard: `transactional_id` on `topic` at `bootstrap`, in
    `lanes` producers taken in turn (see the module doc).

    A component: `await nursery.start(log.run)` returns once `init_transactions` succeeded on
    every lane (this writer owns the ids; older producers are fenced). Cancelling `run` lets
    the batches already handed to the producer thread finish, then joins it.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        transactional_id: str,
        *,
        partitions: int = 1,
        usage_topic: str | None = None,
        lanes: int = 2,
        max_inflight: int = 8,
        linger_ms: int = 5,
        commit_timeout_s: float = 30.0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if not topic or not transactional_id:
            raise GB6Error(INVALID, "a Kafka log needs a topic and a transactional id")
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise GB6Error(INVALID, f"partitions must be 1..{MAX_PARTITIONS}, not {partitions}")
        if not 1 <= lanes <= MAX_LANES:
            raise GB6Error(INVALID, f"lanes must be 1..{MAX_LANES}, not {lanes}")
        if not 1 <= max_inflight <= 1_000:
            raise GB6Error(INVALID, f"max_inflight must be 1..1000, not {max_inflight}")
        self.bootstrap = bootstrap
        self.topic = topic
        self.transactional_id = transactional_id
        self.partitions = partitions
        self.usage_topic = usage_topic
        self.commit_timeout_s = commit_timeout_s
        self.transactional_ids = [lane_id(transactional_id, lane) for lane in range(lanes)]
        self._config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            # The commit flushes at once anyway; a short linger fills a batch's produce requests.
            "linger.ms": linger_ms,
            # Java clients' partitioner, so every client maps a room to the same partition.
            "partitioner": "murmur2_random",
            # Longer than a transaction can stay open: a batch with a check flushes, waits for
            # its verdict and commits, each bounded by commit_timeout_s. A broker that timed it
            # out would bump the epoch, and the next call would read as fenced (final).
            "transaction.timeout.ms": int(max(commit_timeout_s * 4, 10.0) * 1000),
            **(config or {}),
        }
        self._max_inflight = max_inflight
        self._slots = trio.Semaphore(max_inflight)
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._closed = True
        self._stopping = threading.Event()
        self._dead: GB6Error | None = None  # set by the producer thread; final
        self._abort_after: int | None = None
        self.commits = 0  # committed batches; for metrics and tests

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        token = trio.lowlevel.current_trio_token()
        started = _Job((), None)
        thread = threading.Thread(
            target=self._producer_main,
            args=(token, started),
            name=f"gb6-kafka-{self.transactional_id}",
            daemon=True,
        )
        thread.start()
        try:
            await started.done.wait()
            assert started.result is not None
            started.result.unwrap()
            self._closed = False
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._closed = True
            self._stopping.set()  # a start under way gives up
            self._queue.put(_STOP)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)

    @property
    def serving(self) -> bool:
        """Whether batches can be appended: started, not stopped, neither fenced nor failed."""
        return not self._closed and self._dead is None

    # --- appends -------------------------------------------------------------------------

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(
            inflight=self._max_inflight - self._slots.value,
            max_inflight=self._max_inflight,
            commits=self.commits,
        )

    def abort_next_batch_after(self, records: int) -> None:
        """Test hook: the next batch produces its first `records` records and its usage
        records (flushed to the broker), then aborts its transaction."""
        self._abort_after = records

    async def append_batch(
        self,
        records: Sequence[LogRecord],
        *,
        usage: Sequence[bytes] = (),
        confirm: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """See `LogWriter.append_batch`. `usage`: payloads for the usage topic, in the same
        transaction (`invalid` without a usage topic). With `confirm`, the records are produced
        while it runs and committed only if it returns True; otherwise the transaction is
        aborted and `LogWithdrawn` raised (if it raises, aborted too, and its error goes on once
        the abort is done). `confirm` runs shielded: it must bound its time."""
        check_batch(records)
        if usage and self.usage_topic is None:
            raise GB6Error(INVALID, "usage records need a usage topic")
        for payload in usage:
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise GB6Error(INVALID, f"a usage record is {len(payload)} bytes")
        async with self._slots:
            if self._dead is not None:
                raise self._dead
            if self._closed:
                raise GB6Error(UNAVAILABLE, f"Kafka log {self.transactional_id} is not running")
            job = _Job(records, self._abort_after, usage, threading.Event() if confirm else None)
            self._abort_after = None
            self._queue.put(job)
            # Once handed over, the outcome is the truth the sequencer needs: wait for it
            # (bounded by commit_timeout_s plus an abort).
            with trio.CancelScope(shield=True):
                try:
                    if confirm is not None and job.gate is not None:
                        job.confirmed = await confirm()
                finally:
                    if job.gate is not None:
                        job.gate.set()
                    await job.done.wait()  # even if `confirm` raised: then it aborts
        assert job.result is not None
        job.result.unwrap()

    # --- the producer thread -------------------------------------------------------------

    def _producer_main(self, token: trio.lowlevel.TrioToken, started: _Job) -> None:
        producers: list[Producer] = []

        def post(job: _Job, result: outcome.Outcome[None]) -> bool:
            try:
                token.run_sync_soon(job.finish, result)
            except trio.RunFinishedError:
                return False
            return True

        try:
            try:
                producers = self._start()
                first: outcome.Outcome[None] = outcome.Value(None)
            except GB6Error as exc:
                first = outcome.Error(exc)
            if not post(started, first):
                return
            turn = 0
            while True:
                job = self._queue.get()
                if job is _STOP:
                    return
                assert isinstance(job, _Job)
                if not producers or self._dead is not None:
                    outcome_: outcome.Outcome[None] = outcome.Error(
                        self._dead or GB6Error(UNAVAILABLE, "Kafka log did not start")
                    )
                else:
                    producer = producers[turn % len(producers)]
                    turn += 1
                    outcome_ = outcome.capture(self._transact, producer, job)
                    if isinstance(outcome_, outcome.Error) and not isinstance(
                        outcome_.error, GB6Error
                    ):
                        # A bug of ours, not Kafka's answer: nothing is known any more.
                        self._dead = GB6Error(INTERNAL, f"Kafka log failed: {outcome_.error!r}")
                        outcome_ = outcome.Error(self._dead)
                if not post(job, outcome_):
                    return
        finally:
            for producer in producers:
                if self._dead is None:
                    producer.close()
                else:
                    _drop(producer)

    def _start(self) -> list[Producer]:
        """One producer per lane, each owning its transactional id (older ones are fenced)."""
        producers: list[Producer] = []
        try:
            timeout_s, stopping = self.commit_timeout_s, self._stopping
            ensure_topic(self.bootstrap, self.topic, self.partitions, timeout_s, stopping)
            if self.usage_topic is not None:
                ensure_topic(self.bootstrap, self.usage_topic, 1, timeout_s, stopping)
            for txn_id in self.transactional_ids:
                producer = Producer(
                    {**self._config, "client.id": txn_id, "transactional.id": txn_id}
                )
                producers.append(producer)
                _init_transactions(producer, timeout_s, stopping)
        except Exception as exc:  # KafkaException, a timeout, a bad setting: all say "no"
            for producer in producers:
                _drop(producer)
            if isinstance(exc, GB6Error):  # ours says why already (a compacted topic)
                raise
            raise GB6Error(
                UNAVAILABLE, f"Kafka log {self.transactional_id}: cannot start: {exc!r}"
            ) from None
        return producers

    def _transact(self, producer: Producer, job: _Job) -> None:
        try:
            producer.begin_transaction()
            records = job.records if job.abort_after is None else job.records[: job.abort_after]
            for record in records:
                producer.produce(
                    self.topic,
                    key=record.room.encode(),
                    value=record.payload,
                    headers=[(SEQ_HEADER, _SEQ.pack(record.seq))],
                )
            for payload in job.usage:
                assert self.usage_topic is not None  # append_batch checked
                producer.produce(
                    self.usage_topic, key=_USAGE_KEY, value=payload, headers=_USAGE_HEADERS
                )
            if job.abort_after is not None:
                # The partial batch really reaches the broker before the abort.
                producer.flush(self.commit_timeout_s)
                producer.abort_transaction(self.commit_timeout_s)
                raise LogAborted(f"batch aborted after {len(records)} records (test hook)")
            if job.gate is not None and not job.gate.is_set():
                # While the verdict is awaited, the records travel: a flush sends them at once
                # (linger.ms holds them otherwise, until the commit's own flush).
                producer.flush(self.commit_timeout_s)
            if job.gate is not None and not (
                job.gate.wait(self.commit_timeout_s) and job.confirmed
            ):
                producer.abort_transaction(self.commit_timeout_s)
                raise LogWithdrawn(f"Kafka log {self.transactional_id}: batch withdrawn")
            self._commit(producer)
            self.commits += 1
        except (KafkaException, BufferError) as exc:
            raise self._settle(producer, exc) from None

    def _commit(self, producer: Producer) -> None:
        deadline = time.monotonic() + self.commit_timeout_s
        while True:
            try:
                producer.commit_transaction(max(deadline - time.monotonic(), 1.0))
                return
            except KafkaException as exc:
                err = kafka_error(exc)
                # librdkafka: a retriable commit error may be retried; the commit is idempotent.
                if err is None or not err.retriable() or time.monotonic() >= deadline:
                    raise

    def _settle(self, producer: Producer, exc: BaseException) -> GB6Error:
        """Translate a failed transaction, aborting it when that makes its outcome certain."""
        err = kafka_error(exc)
        if err is not None and err.code() in _FENCED_CODES:
            self._dead = LogFenced(
                f"Kafka log {self.transactional_id} was fenced by a newer producer: {err.str()}"
            )
            return self._dead
        if err is not None and err.fatal():
            self._dead = GB6Error(
                UNAVAILABLE, f"Kafka log {self.transactional_id} failed: {err.str()}"
            )
            return self._dead
        why = err.str() if err is not None else str(exc) or type(exc).__name__
        try:
            producer.abort_transaction(self.commit_timeout_s)
        except KafkaException as again:
            again_err = kafka_error(again)
            if again_err is not None and again_err.code() in _FENCED_CODES:
                self._dead = LogFenced(
                    f"Kafka log {self.transactional_id} was fenced by a newer producer"
                )
            else:
                self._dead = GB6Error(
                    UNAVAILABLE,
                    f"Kafka log {self.transactional_id}: batch failed ({why}) and could not be"
                    f" aborted ({again}); outcome unknown",
                )
            return self._dead
        return LogAborted(f"Kafka log {self.transactional_id}: batch aborted: {why}")


def _drop(producer: Producer) -> None:
    """Let go of a fenced or failed producer: it cannot abort on close (it would warn), and its
    unsent records are dropped, which is what fencing means. Its last poll may raise the fatal
    error again (seen as an unhandled exception ending the producer thread): it is known."""
    try:
        producer.purge()
        producer.poll(0)
    except KafkaException:
        pass
