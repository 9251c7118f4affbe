"""The Kafka log of record, consumer side: committed records from offsets its owner keeps.

Rules:
- The consumer lives in one thread that `KafkaLogConsumer.run` starts and joins. It reads with
  `isolation.level=read_committed` (an aborted or open transaction's records are never
  delivered), commits nothing to Kafka (`enable.auto.commit=false`, no offset store) and joins
  no group: it is assigned every partition of the topic at the offsets it was given, so its
  owner stores offsets where its side effects go and resumes exactly there.
- A partition without a given offset is read from its beginning, which must be the log's first
  record: one whose first records are gone (retention, `delete_records`) is an error. So is an
  offset the log no longer holds (`auto.offset.reset=error`). Never a silent skip.
- Batches cross into Trio through a bounded channel: the thread blocks while `max_pending`
  batches wait, so a slow owner slows the reads, not memory. One batch per thread hop.
- A batch's `resume` is where each partition's reading stands, past the transaction markers
  and aborted records that follow its last record once the client has skipped them (its
  position): a partition whose last record is followed by a marker would otherwise never reach
  the log's end (its high watermark), which an owner that waits for that end needs (the meter's
  exact pass, while other partitions keep it busy). What such a position skips delivers
  nothing, so a batch may carry it for a partition it holds no record of.
- Each record's seq is its `seq` header (see kafka_log.py); a record without one is not ours
  and stops the consumer with an error naming its position.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import trio
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from node.errors import INTERNAL, INVALID, UNAVAILABLE, GB6Error
from node.log import log
from origin.kafka_log import SEQ_HEADER, decode_seq
from origin.log_port import LogBatch, LogEntry, check_offsets

if TYPE_CHECKING:
    from confluent_kafka._types import HeadersType  # the client's own name for the shape

_POLL_S: Final = 0.1  # how often an idle thread looks at the stop flag
# For a consumer off the ack path (the persister, the meter): the broker answers a fetch once
# it holds this much, or after this long. Each batch such a consumer handles costs about the
# same whatever its size (a thread hop, a round trip, syscalls: ~1.5 ms of the persister's
# CPU), and reading every transaction as it committed made batches of ~20 events at 2,000
# sends/s (the persister took 17.5% of a core, 8% with this; bench/RESULTS.md, 2026-11-27).
# What waits for such a consumer (a read after a send) waits this long more, at most.
GATHERED: Final = {"fetch.wait.max.ms": 50, "fetch.min.bytes": 256 << 10}
_METADATA_TIMEOUT_S: Final = 15.0


class KafkaLogConsumer:
    """The Kafka `LogConsumer` of `topic`, from `start` (partition → next offset).

    A component: `await nursery.start(consumer.run)` returns once every partition is assigned;
    cancelling `run` stops and joins the thread (within about `_POLL_S`). `name` labels the
    consumer in the broker's logs (e.g. "persister"); it joins no group.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        start: Mapping[int, int],
        *,
        name: str = "consumer",
        max_batch: int = 1_000,
        max_pending: int = 4,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if not topic:
            raise GB6Error(INVALID, "a Kafka log consumer needs a topic")
        if not 1 <= max_batch <= 100_000 or not 1 <= max_pending <= 1_000:
            raise GB6Error(INVALID, "max_batch must be 1..100000 and max_pending 1..1000")
        self.topic = topic
        self._start = dict(start)
        self._max_batch = max_batch
        self._config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "client.id": f"gb6-{name}",
            # Required by the client, never used: the consumer is assigned, it never subscribes.
            "group.id": f"gb6-{name}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "error",
            # librdkafka reads ahead on its own (64 MiB by default); bound it too.
            "queued.max.messages.kbytes": 8 << 10,
            **(config or {}),
        }
        self._stopping = threading.Event()
        self._send, self._recv = trio.open_memory_channel[LogBatch | GB6Error](max_pending)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        consumer, resume = await trio.to_thread.run_sync(self._open)
        token = trio.lowlevel.current_trio_token()
        thread = threading.Thread(
            target=self._reader_main,
            args=(consumer, resume, token),
            name=f"gb6-kafka-read-{self.topic}",
            daemon=True,
        )
        thread.start()
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._stopping.set()
            self._recv.close()  # a thread blocked on a full channel gets BrokenResourceError
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)

    def _open(self) -> tuple[Consumer, dict[int, int]]:
        try:
            consumer = Consumer(self._config)
        except KafkaException as exc:
            raise GB6Error(INVALID, f"Kafka log consumer: bad settings: {exc}") from None
        try:
            meta = consumer.list_topics(self.topic, _METADATA_TIMEOUT_S)
            found = meta.topics.get(self.topic)
            if found is None or found.error is not None or not found.partitions:
                why = found.error if found is not None else "missing"
                raise GB6Error(UNAVAILABLE, f"Kafka topic {self.topic!r}: {why}")
            start = check_offsets(self._start, len(found.partitions))
            for p in sorted(found.partitions):
                if p in start:  # below the log's beginning: `auto.offset.reset=error`
                    continue
                low, _ = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), _METADATA_TIMEOUT_S
                )
                if low > 0:
                    raise GB6Error(
                        INTERNAL,
                        f"Kafka topic {self.topic!r} partition {p} begins at offset {low}: "
                        "the records before it are gone (retention?), and this consumer has "
                        "no stored offset to start after them; it would skip them",
                    )
            consumer.assign(
                [
                    TopicPartition(self.topic, p, start.get(p, OFFSET_BEGINNING))
                    for p in sorted(found.partitions)
                ]
            )
        except KafkaException as exc:
            consumer.close()
            raise GB6Error(UNAVAILABLE, f"Kafka topic {self.topic!r}: {exc}") from None
        except BaseException:
            consumer.close()
            raise
        return consumer, start

    def statistics(self) -> trio.MemoryChannelStatistics:
        return self._recv.statistics()

    async def next_batch(self) -> LogBatch:
        """See `LogConsumer.next_batch`."""
        try:
            item = await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise GB6Error(UNAVAILABLE, f"Kafka log consumer of {self.topic} stopped") from None
        if isinstance(item, GB6Error):
            raise item
        return item

    # --- the reader thread ---------------------------------------------------------------

    def _reader_main(
        self, consumer: Consumer, resume: dict[int, int], token: trio.lowlevel.TrioToken
    ) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    # poll waits for the first message; consume(…, 0) takes what else is
                    # there without waiting (consume alone would wait for a full batch).
                    first = consumer.poll(_POLL_S)
                    if first is None:
                        _skip_to_positions(consumer, resume)
                        continue
                    messages = [first]
                    if self._max_batch > 1:
                        messages += consumer.consume(self._max_batch - 1, 0)
                except KafkaException as exc:
                    self._deliver(token, GB6Error(UNAVAILABLE, f"Kafka log consumer: {exc}"))
                    return
                try:
                    entries = self._entries(messages, resume)
                except GB6Error as exc:
                    self._deliver(token, exc)
                    return
                if entries and not self._deliver(token, LogBatch(entries, resume)):
                    return
                try:
                    _skip_to_positions(consumer, resume)  # carried by the next batch
                except KafkaException as exc:
                    self._deliver(token, GB6Error(UNAVAILABLE, f"Kafka log consumer: {exc}"))
                    return
        finally:
            consumer.close()
            try:
                token.run_sync_soon(self._send.close)
            except trio.RunFinishedError:
                pass

    def _entries(self, messages: list[Message], resume: dict[int, int]) -> tuple[LogEntry, ...]:
        """Turn messages into entries, advancing `resume`; raise on an error that stops us."""
        entries: list[LogEntry] = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.fatal() or err.code() == KafkaError._AUTO_OFFSET_RESET:
                    raise GB6Error(INTERNAL, f"Kafka log consumer of {self.topic}: {err.str()}")
                # Transport trouble and the like: librdkafka retries by itself.
                log("kafka_consumer_error", topic=self.topic, error=err.str())
                continue
            partition, offset = msg.partition(), msg.offset()
            assert partition is not None and offset is not None
            seq = _seq_of(msg.headers())
            key = msg.key()
            if seq is None or key is None:
                raise GB6Error(
                    INTERNAL,
                    f"Kafka topic {self.topic} [{partition}] @{offset}: not a log record"
                    " (no room key or seq header)",
                )
            entries.append(
                LogEntry(
                    room=key.decode(),
                    seq=seq,
                    payload=msg.value() or b"",
                    partition=partition,
                    offset=offset,
                )
            )
            resume[partition] = offset + 1
        return tuple(entries)

    def _deliver(self, token: trio.lowlevel.TrioToken, item: LogBatch | GB6Error) -> bool:
        """Block until Trio takes `item` (backpressure); False once the consumer is closed."""
        try:
            trio.from_thread.run(self._send.send, item, trio_token=token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
            return False
        except trio.Cancelled:
            return False
        return True


def _skip_to_positions(consumer: Consumer, resume: dict[int, int]) -> None:
    """Move `resume` past what the client skipped since (markers, aborted records): every
    record below its position was returned, so was in a batch already handed over."""
    for tp in consumer.position(consumer.assignment()):
        if tp.offset >= 0 and tp.offset > resume.get(tp.partition, -1):
            resume[tp.partition] = tp.offset


def _seq_of(headers: HeadersType | None) -> int | None:
    """The record's seq from its `seq` header; None when it has none (or a malformed one)."""
    pairs = headers.items() if isinstance(headers, dict) else headers or ()
    for name, value in pairs:
        if name == SEQ_HEADER and isinstance(value, bytes):
            try:
                return decode_seq(value)
            except struct.error:
                return None
    return None
