"""The log-of-record contract (origin/log_port.py), run against every adapter: SQLite and Kafka.

What the origin shard and the log's consumers rely on: a batch is all or nothing; an aborted
batch is never seen and its seqs, reused, appear once; a newer writer under the same id fences
the old one; consumers read each room in order and resume exactly after the offsets they
stored, across restarts. Kafka runs on the service from `scripts/services up`, each test on a
topic and transactional id of its own (the topic is deleted after).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import attrs
import pytest
import trio

from node.errors import INVALID, TOO_LARGE, GB6Error
from origin.log_port import (
    MAX_BATCH_RECORDS,
    MAX_PAYLOAD_BYTES,
    LogAborted,
    LogBatch,
    LogConsumer,
    LogEntry,
    LogFenced,
    LogRecord,
    Offsets,
    WriterStatistics,
)
from tests.services import require

READ_TIMEOUT_S = 20.0
KAFKA_PARTITIONS = 3


class Writer(Protocol):
    """A LogWriter with the adapters' test hook."""

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    async def append_batch(self, records: Sequence[LogRecord]) -> None: ...

    def statistics(self) -> WriterStatistics: ...

    def abort_next_batch_after(self, records: int) -> None: ...


@attrs.define
class Backend:
    name: str
    writer_id: str
    path: Path | None = None  # sqlite
    bootstrap: str = ""  # kafka
    topic: str = ""

    def writer(self) -> Writer:
        if self.name == "sqlite":
            from origin.sqlite_log import SqliteLog

            assert self.path is not None
            return SqliteLog(self.path, self.writer_id, max_inflight=4)
        from origin.kafka_log import KafkaLog

        return KafkaLog(
            self.bootstrap,
            self.topic,
            self.writer_id,
            partitions=KAFKA_PARTITIONS,
            max_inflight=4,
            commit_timeout_s=15.0,
        )

    def consumer(
        self, start: Offsets, *, max_batch: int = 1_000, writer: Writer | None = None
    ) -> LogConsumer:
        if self.name == "sqlite":
            from origin.sqlite_log import SqliteLog, SqliteLogConsumer

            assert self.path is not None
            if isinstance(writer, SqliteLog):
                return writer.consumer(start, max_batch=max_batch)  # woken by its commits
            return SqliteLogConsumer(self.path, start, max_batch=max_batch)
        from origin.kafka_consumer import KafkaLogConsumer

        return KafkaLogConsumer(
            self.bootstrap, self.topic, start, name="contract-test", max_batch=max_batch
        )


@pytest.fixture(params=["sqlite", "kafka"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    suffix = uuid.uuid4().hex[:12]
    if request.param == "sqlite":
        yield Backend("sqlite", f"gb6-shard-test-{suffix}", path=tmp_path / "log.db")
        return
    yield from kafka_backend_of(suffix)


@pytest.fixture
def kafka_backend() -> Iterator[Backend]:
    yield from kafka_backend_of(uuid.uuid4().hex[:12])


def kafka_backend_of(suffix: str) -> Iterator[Backend]:
    """A Kafka backend on a topic of its own, deleted after."""
    bootstrap = require("kafka")
    topic = f"gb6-test-log-{suffix}"
    yield Backend("kafka", f"gb6-shard-test-{suffix}", bootstrap=bootstrap, topic=topic)
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        admin.delete_topics([topic], operation_timeout=15)[topic].result(timeout=20)
    except Exception:  # a test that failed before creating the topic
        pass


C = TypeVar("C", bound=Any)


@asynccontextmanager
async def running(component: C) -> AsyncIterator[C]:
    """Run a component until the block ends (then cancel it and wait for it to stop)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(component.run)
        yield component
        nursery.cancel_scope.cancel()


def records(rooms: Sequence[str], seqs: range, tag: str) -> list[LogRecord]:
    """Interleaved rooms (a1 b1 a2 b2 …) so batches mix rooms as a sequencer's do."""
    return [LogRecord(room, seq, f"{tag}:{room}:{seq}".encode()) for seq in seqs for room in rooms]


async def read(consumer: LogConsumer, count: int) -> tuple[list[LogEntry], LogBatch]:
    """Read exactly `count` entries (more is a failure); returns them and the last batch."""
    entries: list[LogEntry] = []
    last: LogBatch | None = None
    with trio.fail_after(READ_TIMEOUT_S):
        while len(entries) < count:
            last = await consumer.next_batch()
            entries.extend(last.entries)
    assert len(entries) == count, f"read {len(entries)} entries, wanted {count}"
    assert last is not None
    return entries, last


def by_room(entries: Sequence[LogEntry | LogRecord]) -> dict[str, list[tuple[int, bytes]]]:
    out: dict[str, list[tuple[int, bytes]]] = {}
    for e in entries:
        out.setdefault(e.room, []).append((e.seq, e.payload))
    return out


async def test_batches_are_read_in_order_per_room(backend: Backend) -> None:
    rooms = [f"room-{i}" for i in range(5)]
    appended = [records(rooms, range(1 + 4 * b, 5 + 4 * b), f"b{b}") for b in range(3)]
    async with running(backend.writer()) as writer:
        for batch in appended:
            await writer.append_batch(batch)
        async with running(backend.consumer({}, writer=writer)) as consumer:
            entries, last = await read(consumer, 60)
    assert by_room(entries) == by_room([r for batch in appended for r in batch])
    # A room lives in one partition, in append order; resume points past what was read (on
    # Kafka, also past the transaction markers after it, once the client skipped them).
    for room in rooms:
        mine = [e for e in entries if e.room == room]
        assert len({e.partition for e in mine}) == 1
        assert [e.offset for e in mine] == sorted(e.offset for e in mine)
    tops: dict[int, int] = {}
    for e in entries:
        tops[e.partition] = max(tops.get(e.partition, -1), e.offset + 1)
    assert set(last.resume) == set(tops)
    assert all(last.resume[p] >= top for p, top in tops.items())


async def test_consumer_resumes_exactly_after_its_stored_offsets(backend: Backend) -> None:
    rooms = ["a", "b", "c"]
    first, second = records(rooms, range(1, 11), "one"), records(rooms, range(11, 16), "two")
    async with running(backend.writer()) as writer:
        for i in range(0, len(first), 10):
            await writer.append_batch(first[i : i + 10])
        # The owner applies two small batches and stores their resume offsets, then stops.
        async with running(backend.consumer({}, max_batch=4, writer=writer)) as consumer:
            applied = list((await consumer.next_batch()).entries)
            batch = await consumer.next_batch()
            applied += batch.entries
            stored = dict(batch.resume)
        await writer.append_batch(second)
        async with running(backend.consumer(stored, writer=writer)) as consumer:
            rest, _ = await read(consumer, len(first) + len(second) - len(applied))
    assert by_room(applied + rest) == by_room(first + second)  # none twice, none missed


async def test_aborted_batch_is_invisible_and_its_seqs_appear_once(backend: Backend) -> None:
    rooms = ["a", "b"]
    kept = records(rooms, range(1, 4), "kept")
    async with running(backend.writer()) as writer:
        await writer.append_batch(kept)
        # Half of the batch really reaches the log, then its transaction aborts.
        writer.abort_next_batch_after(3)
        with pytest.raises(LogAborted):
            await writer.append_batch(records(rooms, range(4, 7), "lost"))
        # The sequencer reuses the seqs.
        retried = records(rooms, range(4, 7), "retried")
        await writer.append_batch(retried)
        async with running(backend.consumer({}, writer=writer)) as consumer:
            entries, _ = await read(consumer, 12)
    assert by_room(entries) == by_room(kept + retried)
    assert not any(b"lost" in e.payload for e in entries)


async def test_a_second_writer_fences_the_first(backend: Backend) -> None:
    rooms = ["a", "b"]
    before = records(rooms, range(1, 3), "before")
    async with running(backend.writer()) as zombie:
        await zombie.append_batch(before)
        async with running(backend.writer()) as successor:
            with pytest.raises(LogFenced, match="fenced"):
                await zombie.append_batch(records(rooms, range(3, 5), "zombie"))
            # A fenced writer stays fenced: it refuses without trying again.
            with pytest.raises(LogFenced, match="fenced"):
                await zombie.append_batch(records(rooms, range(3, 5), "zombie"))
            after = records(rooms, range(3, 5), "successor")
            await successor.append_batch(after)
            async with running(backend.consumer({}, writer=successor)) as consumer:
                entries, _ = await read(consumer, 8)
    assert by_room(entries) == by_room(before + after)


async def test_records_survive_restarting_writer_and_consumer(backend: Backend) -> None:
    rooms = ["a", "b", "c"]
    old, new = records(rooms, range(1, 6), "old"), records(rooms, range(6, 9), "new")
    async with running(backend.writer()) as writer:
        await writer.append_batch(old)
    async with running(backend.consumer({})) as consumer:
        _, last = await read(consumer, len(old))
        stored = dict(last.resume)
    async with running(backend.writer()) as writer:
        await writer.append_batch(new)
        async with running(backend.consumer(stored, writer=writer)) as consumer:
            entries, _ = await read(consumer, len(new))
        assert by_room(entries) == by_room(new)
        async with running(backend.consumer({}, writer=writer)) as consumer:
            entries, _ = await read(consumer, len(old) + len(new))
        assert by_room(entries) == by_room(old + new)


async def test_concurrent_batches_all_land_in_order(backend: Backend) -> None:
    """More callers than in-flight slots: each waits its turn; every batch lands once."""
    rooms = [f"r{i}" for i in range(12)]
    seen_inflight: list[int] = []
    async with running(backend.writer()) as writer:

        async def sequencer_of(room: str) -> None:
            for b in range(2):
                seen_inflight.append(writer.statistics().inflight)
                await writer.append_batch(records([room], range(1 + 3 * b, 4 + 3 * b), "c"))

        async with trio.open_nursery() as nursery:
            for room in rooms:
                nursery.start_soon(sequencer_of, room)
        stats = writer.statistics()
        assert max(seen_inflight) == stats.max_inflight == 4  # the bound held, and was reached
        assert (stats.inflight, stats.commits) == (0, 24)
        async with running(backend.consumer({}, writer=writer)) as consumer:
            entries, _ = await read(consumer, 12 * 6)
    assert by_room(entries) == by_room(records(rooms, range(1, 7), "c"))


async def test_bad_input_is_refused_and_changes_nothing(backend: Backend) -> None:
    bad: list[tuple[str, Any, Any, str]] = [  # Any: wrong types are the point
        ("", 1, b"x", INVALID),
        ("r" * 300, 1, b"x", INVALID),
        ("\udc80", 1, b"x", INVALID),
        ("r", 0, b"x", INVALID),
        ("r", True, b"x", INVALID),
        ("r", 1, "text", INVALID),
        ("r", 1, b"x" * (MAX_PAYLOAD_BYTES + 1), TOO_LARGE),
    ]
    for room, seq, payload, code in bad:
        with pytest.raises(GB6Error) as caught:
            LogRecord(room, seq, payload)
        assert caught.value.code == code, (room[:5], seq, code)
    good = records(["a"], range(1, 3), "good")
    async with running(backend.writer()) as writer:
        for batch, code in (
            ([], INVALID),
            ([LogRecord("a", 2, b""), LogRecord("a", 1, b"")], INVALID),
            ([LogRecord("a", 1, b""), LogRecord("a", 1, b"")], INVALID),
            (records(["a"], range(1, MAX_BATCH_RECORDS + 2), "big"), TOO_LARGE),
        ):
            with pytest.raises(GB6Error) as caught:
                await writer.append_batch(batch)
            assert caught.value.code == code
        await writer.append_batch(good)
        for start in ({-1: 0}, {0: -5}, {10_000: 0}):
            # SQLite refuses at construction, Kafka (which must ask for the partition count)
            # when started, through the nursery that starts the consumer.
            with pytest.RaisesGroup(
                pytest.RaisesExc(GB6Error, check=lambda e: e.code == INVALID),
                allow_unwrapped=True,
            ):
                async with running(backend.consumer(start)):
                    pass
        async with running(backend.consumer({}, writer=writer)) as consumer:
            entries, _ = await read(consumer, 2)
    assert by_room(entries) == by_room(good)


async def test_a_restarted_kafka_writer_aborts_what_any_lane_of_its_zombie_left_open(
    kafka_backend: Backend,
) -> None:
    """The writer's lanes (origin/kafka_log.py) each have a transactional id; a zombie may hold
    an open transaction on any of them. Left open, it would hold every consumer back (they read
    only up to the first open transaction) until it timed out."""
    from confluent_kafka import KafkaException, Producer

    from origin.kafka_log import lane_id

    backend = kafka_backend
    async with running(backend.writer()):  # creates the topic
        pass
    zombie = Producer(
        {
            "bootstrap.servers": backend.bootstrap,
            "transactional.id": lane_id(backend.writer_id, 1),
            "transaction.timeout.ms": 300_000,
        }
    )
    zombie.init_transactions(15)
    zombie.begin_transaction()
    for record in records(["a", "b"], range(1, 3), "zombie"):
        zombie.produce(backend.topic, key=record.room.encode(), value=record.payload)
    assert zombie.flush(15) == 0  # on the broker, in an open transaction
    after = records(["a", "b"], range(1, 4), "successor")
    async with running(backend.writer()) as successor:
        await successor.append_batch(after[:2])
        await successor.append_batch(after[2:])  # the next lane
        async with running(backend.consumer({}, writer=successor)) as consumer:
            entries, _ = await read(consumer, len(after))
    assert by_room(entries) == by_room(after)
    with pytest.raises(KafkaException, match=r"(?i)fenced|epoch"):
        zombie.commit_transaction(15)


async def test_a_kafka_batch_on_condition_commits_only_if_confirmed(
    kafka_backend: Backend,
) -> None:
    """`confirm` runs while the batch's records are produced: no withdraws the transaction
    (nothing visible; its seqs reused), an error too (and goes on), yes commits it."""
    from origin.kafka_log import KafkaLog, LogWithdrawn

    rooms = ["a", "b"]
    answers: list[str] = []

    def answer(verdict: bool | None) -> Any:
        async def confirm() -> bool:
            await trio.sleep(0.05)  # the records reach the broker meanwhile
            answers.append(str(verdict))
            if verdict is None:
                raise RuntimeError("the check failed")
            return verdict

        return confirm

    writer = kafka_backend.writer()
    assert isinstance(writer, KafkaLog)
    async with running(writer):
        with pytest.raises(LogWithdrawn):
            await writer.append_batch(records(rooms, range(1, 3), "no"), confirm=answer(False))
        with pytest.raises(RuntimeError, match="check failed"):
            await writer.append_batch(records(rooms, range(1, 3), "err"), confirm=answer(None))
        kept = records(rooms, range(1, 3), "yes")
        await writer.append_batch(kept, confirm=answer(True))
        async with running(kafka_backend.consumer({})) as consumer:
            entries, _ = await read(consumer, len(kept))
        assert writer.commits == 1
    assert answers == ["False", "None", "True"]
    assert by_room(entries) == by_room(kept)


@pytest.mark.parametrize("waits_in", ["ensure_topic", "init_transactions"])
async def test_a_kafka_writer_stopped_while_its_start_waits_on_the_broker_stops_at_once(
    kafka_backend: Backend, monkeypatch: pytest.MonkeyPatch, waits_in: str
) -> None:
    """The broker does not answer a writer's start (frozen). Stopping the writer then (its
    origin shutting down, or a recovery given up) must not wait out the start's steps (the
    topic, then each lane's `init_transactions`, up to the commit timeout each: 15 s here), or
    it would hold the origin's shutdown past any grace period."""
    from origin import kafka_log
    from tests.conftest import broker_pid, frozen

    backend = kafka_backend
    if waits_in == "init_transactions":
        async with running(backend.writer()):  # the topic, made before the broker freezes
            pass
        monkeypatch.setattr(kafka_log, "ensure_topic", lambda *args: None)
    writer = backend.writer()
    with frozen(broker_pid(backend.bootstrap)):
        with trio.move_on_after(1.0) as waited:
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
        assert waited.cancelled_caught  # it was still starting
        assert trio.current_time() - waited.deadline < 5


async def test_a_kafka_writer_starts_once_a_broker_slow_to_answer_does(
    kafka_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker answers a writer's `init_transactions` only after a few seconds (frozen
    meanwhile): the call, made again slice after slice, goes on where it was and the writer
    serves."""
    from origin import kafka_log
    from tests.conftest import broker_pid, frozen

    backend = kafka_backend
    async with running(backend.writer()):  # the topic
        pass
    monkeypatch.setattr(kafka_log, "ensure_topic", lambda *args: None)
    writer = backend.writer()
    batch = records(["a"], range(1, 3), "slow")
    async with trio.open_nursery() as nursery:
        with frozen(broker_pid(backend.bootstrap)):
            nursery.start_soon(nursery.start, writer.run)
            await trio.sleep(2.5)
            assert not writer.serving
        with trio.fail_after(30):
            while not writer.serving:  # noqa: ASYNC110 - the writer has no event for it
                await trio.sleep(0.05)
        await writer.append_batch(batch)
        async with running(backend.consumer({})) as consumer:
            entries, _ = await read(consumer, len(batch))
        assert by_room(entries) == by_room(batch)
        nursery.cancel_scope.cancel()


async def test_a_kafka_log_keeps_its_records_and_a_consumer_never_skips_lost_ones(
    kafka_backend: Backend,
) -> None:
    """The log of record is made with no retention: the broker's default (24 h on the
    project's broker) would delete acknowledged records, persisted or not, and a consumer with
    no stored offset (a meter rebuilding a deleted billing store) would start after them, as if
    they never were. If records are gone all the same (an operator's retention, or
    `delete_records`), such a consumer refuses to start, naming the partition; one whose
    offsets are past them reads on."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient, ConfigResource

    from node.errors import INTERNAL

    written = records(["a", "b", "c"], range(1, 6), "kept")
    async with running(kafka_backend.writer()) as writer:
        await writer.append_batch(written)
        async with running(kafka_backend.consumer({})) as consumer:
            entries, last = await read(consumer, len(written))
    admin = AdminClient({"bootstrap.servers": kafka_backend.bootstrap})
    resource = ConfigResource(ConfigResource.Type.TOPIC, kafka_backend.topic)
    config = admin.describe_configs([resource])[resource].result(timeout=20)
    assert config["retention.ms"].value == "-1"
    assert config["retention.bytes"].value == "-1"
    partition = next(p for p, o in last.resume.items() if o > 1)
    (done,) = admin.delete_records([TopicPartition(kafka_backend.topic, partition, 1)]).values()
    done.result(timeout=20)
    with pytest.raises(GB6Error) as err:
        await kafka_backend.consumer({}).run()
    assert err.value.code == INTERNAL
    assert f"partition {partition} begins at offset 1" in err.value.message
    async with running(kafka_backend.consumer(dict(last.resume))) as consumer:
        async with running(kafka_backend.writer()) as writer:
            await writer.append_batch([LogRecord("a", 6, b"after")])
        more, _ = await read(consumer, 1)
    assert [(e.room, e.seq) for e in more] == [("a", 6)]
    assert len(entries) == len(written)


async def test_a_kafka_topic_made_with_a_retention_is_said_at_each_start(
    kafka_backend: Backend, capfd: pytest.CaptureFixture[str]
) -> None:
    """A topic made before this release (or by hand) keeps its retention: the writer leaves it
    as it is (records may be archived elsewhere) but says so at each start, for its operator,
    since records older than it are gone from the log of record."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka_backend.bootstrap})
    topic = NewTopic(
        kafka_backend.topic, num_partitions=KAFKA_PARTITIONS, config={"retention.ms": "3600000"}
    )
    admin.create_topics([topic])[kafka_backend.topic].result(timeout=20)
    async with running(kafka_backend.writer()) as writer:
        await writer.append_batch([LogRecord("a", 1, b"x")])
    said = [line for line in capfd.readouterr().err.splitlines() if "retention_limited" in line]
    assert len(said) == 1 and '"retention.ms":"3600000"' in said[0], said


async def test_a_compacted_kafka_topic_is_refused_at_start(kafka_backend: Backend) -> None:
    """A topic made by hand with `cleanup.policy=compact` keeps one record per key (a room's
    newest event): records of the log of record would go whether or not the persister had read
    them. The writer does not start on it, and says why; it does not change the topic."""
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka_backend.bootstrap})
    topic = NewTopic(
        kafka_backend.topic,
        num_partitions=KAFKA_PARTITIONS,
        config={"cleanup.policy": "compact,delete"},
    )
    admin.create_topics([topic])[kafka_backend.topic].result(timeout=20)
    with pytest.raises(GB6Error) as err, trio.fail_after(30):  # not serving
        await kafka_backend.writer().run()
    assert err.value.code == INVALID
    assert "cleanup.policy=compact,delete" in err.value.message
    resource = ConfigResource(ConfigResource.Type.TOPIC, kafka_backend.topic)
    config = admin.describe_configs([resource])[resource].result(timeout=20)
    assert config["cleanup.policy"].value == "compact,delete"
