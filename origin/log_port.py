"""The log of record: the port an origin shard appends to and its consumers read from.

Rules (DESIGN §3):
- A shard is the only writer of its rooms. Its sequencer assigns per-room seqs and appends them
  as one batch; a batch is durable as a whole or not at all (one transaction).
- Records are keyed by room: one room's records stay in one partition, in append order. A
  position is (partition, offset); offsets grow within a partition but may have holes (Kafka's
  transaction markers and aborted records take offsets of their own).
- `LogWriter.append_batch` returns once the batch is durable. It raises, after checking the batch
  (`invalid`/`too_large`, nothing written):
  - `LogAborted`: the batch was rolled back and no consumer will ever see any of it; the
    sequencer reuses its seqs for the next batch.
  - `LogFenced`: a writer started later under the same writer id owns the log now; none of this
    batch is visible, and this writer refuses every later batch: its shard must stop.
  - any other `GB6Error` (`unavailable`): the outcome is unknown and the writer refuses every
    later batch; its owner restarts it (a restart settles the open transaction) and reads the
    log's tail before it assigns seqs again.
- Consumers see committed records only, in order within a partition, and keep their own
  offsets: every `LogBatch` carries `resume`, the offsets to start from to read what follows it.
  A consumer that stores `resume` in the same transaction as the batch's side effects neither
  replays a record twice nor misses one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Final, Protocol

import attrs
import trio

from node.errors import INVALID, TOO_LARGE, UNAVAILABLE, GB6Error

MAX_ROOM_CHARS: Final = 256
MAX_SEQ: Final = (1 << 63) - 1
# Below Kafka's default message.max.bytes (1 MB), leaving room for the key and headers.
MAX_PAYLOAD_BYTES: Final = 900 << 10
MAX_BATCH_RECORDS: Final = 10_000
MAX_BATCH_BYTES: Final = 32 << 20
MAX_PARTITIONS: Final = 4_096

Offsets = Mapping[int, int]
"""partition → the offset of the next record to read there (absent: from the beginning)."""


class LogAborted(GB6Error):
    """The batch was rolled back whole: nothing of it is visible; its seqs may be reused."""

    def __init__(self, message: str) -> None:
        super().__init__(UNAVAILABLE, message)


class LogFenced(GB6Error):
    """A newer writer with the same writer id took over: this one must stop appending."""

    def __init__(self, message: str) -> None:
        super().__init__(UNAVAILABLE, message)


def writer_id(shard: str) -> str:
    """The writer id (Kafka transactional id) of an origin shard: one per shard, stable."""
    return f"gb6-shard-{shard}"


def _check_room(_: object, __: object, room: str) -> None:
    if not isinstance(room, str) or not room or len(room) > MAX_ROOM_CHARS:
        raise GB6Error(INVALID, f"a log record's room must be 1..{MAX_ROOM_CHARS} characters")
    if not room.isascii():
        try:
            room.encode()  # it becomes a Kafka key: a lone surrogate must fail here, not there
        except UnicodeEncodeError:
            raise GB6Error(INVALID, "a log record's room must be valid Unicode") from None


def _check_seq(_: object, __: object, seq: int) -> None:
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise GB6Error(INVALID, f"a log record's seq must be an integer in 1..2**63-1, not {seq!r}")


def _check_payload(_: object, __: object, payload: bytes) -> None:
    if not isinstance(payload, bytes):
        raise GB6Error(INVALID, "a log record's payload must be bytes")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise GB6Error(
            TOO_LARGE,
            f"a log record's payload is {len(payload)} bytes; at most {MAX_PAYLOAD_BYTES}",
        )


@attrs.frozen
class LogRecord:
    """What the sequencer appends: the room (the key), its seq, and the event's bytes."""

    room: str = attrs.field(validator=_check_room)
    seq: int = attrs.field(validator=_check_seq)
    payload: bytes = attrs.field(validator=_check_payload)


@attrs.frozen
class LogEntry:
    """A committed record as a consumer reads it, with its position in the log."""

    room: str
    seq: int
    payload: bytes
    partition: int
    offset: int

    @property
    def record(self) -> LogRecord:
        return LogRecord(self.room, self.seq, self.payload)


def _frozen_offsets(offsets: Offsets) -> Mapping[int, int]:
    return MappingProxyType(dict(offsets))


@attrs.frozen
class LogBatch:
    """Records read in one go (at least one), in log order, and where to resume after them
    (on Kafka, past the transaction markers that follow them too, once the client skipped them).

    `resume` covers every partition this consumer has a position in, so storing it whole (and
    starting the next consumer from it) is all a consumer's owner has to do.
    """

    entries: tuple[LogEntry, ...]
    resume: Mapping[int, int] = attrs.field(converter=_frozen_offsets, hash=False)


def check_batch(records: Sequence[LogRecord]) -> int:
    """Raise `invalid`/`too_large` unless `records` is a batch a writer may append.

    A batch holds 1..MAX_BATCH_RECORDS records of at most MAX_BATCH_BYTES payload in total, and
    each room's seqs increase within it (a sequencer never does otherwise: catch the bug here
    rather than in every consumer). Returns the payload bytes.
    """
    if not records:
        raise GB6Error(INVALID, "an empty batch cannot be appended")
    if len(records) > MAX_BATCH_RECORDS:
        raise GB6Error(
            TOO_LARGE, f"a batch holds at most {MAX_BATCH_RECORDS} records, not {len(records)}"
        )
    size = 0
    last: dict[str, int] = {}
    for record in records:
        if not isinstance(record, LogRecord):
            raise GB6Error(INVALID, f"a batch holds LogRecords, not {type(record).__name__}")
        size += len(record.payload)
        if last.get(record.room, 0) >= record.seq:
            raise GB6Error(
                INVALID, f"room {record.room!r}: seq {record.seq} after {last[record.room]}"
            )
        last[record.room] = record.seq
    if size > MAX_BATCH_BYTES:
        raise GB6Error(TOO_LARGE, f"a batch holds at most {MAX_BATCH_BYTES} payload bytes")
    return size


def check_offsets(offsets: Offsets, partitions: int) -> dict[int, int]:
    """Raise `invalid` unless every entry names one of `partitions` and an offset >= 0."""
    out: dict[int, int] = {}
    for partition, offset in offsets.items():
        if type(partition) is not int or not 0 <= partition < partitions:
            raise GB6Error(INVALID, f"no partition {partition!r} (the log has {partitions})")
        if type(offset) is not int or offset < 0:
            raise GB6Error(INVALID, f"partition {partition}: offset {offset!r} is not >= 0")
        out[partition] = offset
    return out


@attrs.frozen
class WriterStatistics:
    """How full a writer's in-flight bound is, and how many batches it committed."""

    inflight: int
    max_inflight: int
    commits: int


class LogWriter(Protocol):
    """Appends batches for one writer id. A component: `await nursery.start(writer.run)`."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take the writer id (fencing any earlier holder), serve appends until cancelled."""
        ...

    async def append_batch(self, records: Sequence[LogRecord]) -> None:
        """Make `records` durable as one transaction; see the module docstring for errors.

        Once the batch is handed over, a cancelled caller still waits for its outcome (bounded
        by the adapter's transaction timeout), so the result it reports is always the truth.
        """
        ...

    def statistics(self) -> WriterStatistics: ...


class LogConsumer(Protocol):
    """Reads committed records from given offsets. A component: `await nursery.start(c.run)`.

    One task calls `next_batch`; the consumer reads ahead at most a few batches (bounded).
    """

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    async def next_batch(self) -> LogBatch:
        """Wait for the next records (time it out with a cancel scope).

        Raises `GB6Error` when the consumer cannot go on (e.g. its offsets point at records the
        log no longer holds) or has stopped.
        """
        ...

    def statistics(self) -> trio.MemoryChannelStatistics:
        """The read-ahead channel: how many batches wait (`current_buffer_used`)."""
        ...
