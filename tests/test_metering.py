"""Usage metering from the log of record (origin/metering.py) and invoices (origin/invoicing.py).

Through a real origin shard (in process, on its embedded store: the ops go through the same
`append` the gateway calls and are committed to gb6.db) and through a real `gb6 run` process
spoken to over its WebSocket and killed with SIGKILL.
"""

from __future__ import annotations

import itertools
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trio_asyncio
from conftest import Node, make_room
from services import require
from test_store_contract import _delete_topic, _drop_schema

from node.config import Config, load
from node.errors import CONFLICT, INTERNAL, INVALID, NOT_FOUND, GB6Error
from origin import metering
from origin.billing import (
    day_of,
    invoice,
    month_end_ms,
    month_of,
    next_month,
    parse_pricing,
)
from origin.billing_sqlite import SqliteBillingStore
from origin.invoicing import Billing, open_billing, plan_pricing
from origin.membership import Principal
from origin.metering import (
    POLL_S,
    EventSource,
    KafkaEventSource,
    MeterEvent,
    PgEventSource,
    SqliteEventSource,
)
from origin.shard import OriginShard
from origin.sqlite_store import AppendResult, now_ms

# Each reads "today's" or "this month's" usage after sending.
pytestmark = pytest.mark.usefixtures("within_one_utc_day")

SEAT_PRICE = parse_pricing(
    {
        "currency": "EUR",
        "components": [
            {"model": "per_seat", "unit_price": 100},
            {
                "model": "graduated",
                "metric": "messages",
                "tiers": [{"up_to": 2, "unit_price": 0}, {"unit_price": "0.5"}],
            },
        ],
    }
)


@asynccontextmanager
async def shard_on(data_dir: Path, config: Config | None = None) -> AsyncIterator[OriginShard]:
    """A shard serving on `data_dir` (or `config`); drained and stopped on exit."""
    shard = OriginShard(config or Config(data_dir=data_dir))
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        with trio.fail_after(30):
            await nursery.start(shard.run)
        try:
            yield shard
            await shard.drain()
        finally:
            nursery.cancel_scope.cancel()


# A sync fixture, so that require()'s skip keeps its reason (see tests/services.py).
@pytest.fixture(params=["sqlite", "postgres", "kafka"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Config]:
    """A shard's config on each store backend: the meter reads gb6.db's events (sqlite),
    PostgreSQL's (postgres) or the Kafka log of record (kafka)."""
    data = tmp_path / "data"
    if request.param == "sqlite":
        yield Config(data_dir=data)
        return
    dsn = require("postgres")
    suffix = uuid.uuid4().hex[:12]
    schema = f"gb6_meter_test_{suffix}"
    extra: dict[str, Any] = {}
    if request.param == "kafka":
        extra = {
            "kafka_bootstrap": require("kafka"),
            "kafka_topic": f"gb6-meter-test-{suffix}",
            "shard": f"m{suffix}",
        }
    try:
        yield Config(
            data_dir=data, store_backend=request.param, pg_dsn=dsn, pg_schema=schema, **extra
        )
    finally:
        trio.run(_drop_schema, dsn, schema)
        if request.param == "kafka":
            _delete_topic(extra["kafka_bootstrap"], extra["kafka_topic"])


async def op(shard: OriginShard, who: Principal, room: str, type_: str, cid: str, **kw: Any) -> int:
    """One seq-taking op through the shard, as the gateway does it; its seq once durable."""
    done = trio.Event()
    box: list[AppendResult] = []

    def reply(result: AppendResult) -> None:
        box.append(result)
        done.set()

    await shard.append(who, room, type_, cid, reply, **kw)
    with trio.fail_after(10):
        await done.wait()
    if isinstance(box[0], GB6Error):
        raise box[0]
    return box[0].event.seq


async def tenant(shard: OriginShard, *names: str) -> tuple[str, str, list[Principal]]:
    """An instance with users `names`, and a room they are all members of."""
    org = await shard.create_org("org", None)
    inst = await shard.create_instance(org.id, "i", None, "unlimited")
    who = []
    for name in names:
        user = await shard.create_user(inst.id, name, "member")
        principal = shard.state.principal(user.id)
        assert principal is not None
        who.append(principal)
    room = await shard.create_room(who[0], "r", "chat", [p.id for p in who[1:]], False)
    return inst.id, room.record.id, who


def test_a_log_read_folded_per_user_and_day_counts_as_its_events() -> None:
    """The Kafka meter folds a read per (instance, UTC day, type, sender) before counting it:
    the same counts and seats as the events one by one, each in the day and month of its own
    ts (the 1st of a month's midnight included)."""
    from origin.metering import Usage, fold

    day = 86_400_000
    may_31, jun_1 = 1_780_185_600_000, 1_780_272_000_000  # 2026-05-31, 2026-06-01 UTC
    assert jun_1 - may_31 == day
    usages = [
        ("i1", may_31 + 5, "message", "ann"),
        ("i1", jun_1 - 1, "message", "ann"),  # May's last ms
        ("i1", jun_1, "message", "ann"),
        ("i1", jun_1 + 9, "edit", "ann"),
        ("i1", jun_1 + 7, "message", "ann"),
        ("i2", jun_1 + 8, "message", "ann"),
        ("i1", jun_1 + 9, "message", "bob"),
        ("i1", jun_1 + 10, "join", "cat"),  # not billed: no count, no seat
    ]
    one_by_one, folded = Usage(), Usage()
    one_by_one.add(MeterEvent(*u) for u in usages)
    events = fold(usages)
    folded.add(events)
    assert len(events) == 6 and folded.events == one_by_one.events == len(usages)
    assert folded.counts == one_by_one.counts and folded.seats == one_by_one.seats
    assert one_by_one.counts[("i1", "2026-06", "messages")] == 3
    assert one_by_one.counts[("i1", "2026-05-31", "messages")] == 2


async def test_usage_counts_sends_edits_deletes_reactions_and_seats(config: Config) -> None:
    async with shard_on(config.data_dir, config) as shard:
        inst, room, (alice, bob, _carol) = await tenant(shard, "alice", "bob", "carol")
        other, other_room, (dave,) = await tenant(shard, "dave")
        first = await op(shard, alice, room, "message", "a1", body={"text": "hi"})
        await op(shard, alice, room, "message", "a2", body={"text": "hi"})
        await op(shard, alice, room, "message", "a2", body={"text": "again"})  # a repeat: no event
        await op(shard, bob, room, "message", "b1", body={"text": "yo"})
        await op(shard, bob, room, "react", "b2", target=first, emoji="👍")
        await op(shard, alice, room, "edit", "a3", target=first, body={"text": "hello"})
        await op(shard, alice, room, "delete", "a4", target=first)
        await op(shard, dave, other_room, "message", "d1", body={"text": "x"})
        with pytest.raises(GB6Error):  # refused ops take no seq and are not usage
            await op(shard, bob, room, "edit", "b3", target=first, body={"text": "no"})
        month, day = month_of(now_ms()), day_of(now_ms())
        # 3 sends (the repeat is not an event), 1 edit, 1 delete, 1 reaction; alice and bob
        # were active, carol was not.
        expected = {"messages": 3, "edits": 1, "deletes": 1, "reactions": 1, "seats": 2}
        assert await shard.billing.usage(inst, month) == expected
        assert await shard.billing.usage(inst, day) == expected
        assert await shard.billing.usage(other, month) == {"messages": 1, "seats": 1}
        assert await shard.billing.usage(inst, next_month(month)) == {}
        # Each backend meters its own log of record, from offsets kept with the usage.
        source = shard.billing.meter.source
        kind = {"sqlite": SqliteEventSource, "postgres": PgEventSource, "kafka": KafkaEventSource}
        assert isinstance(source, kind[config.store_backend])
        assert await shard.billing.store.offset(source.name) is not None


@pytest.mark.parametrize("config", ["kafka"], indirect=True)
async def test_a_pass_gathers_many_log_transactions_into_one_billing_transaction(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each op below commits a Kafka transaction of its own, and the meter's consumer hands
    them over one by one; a pass still applies them as one transaction of the billing store."""
    monkeypatch.setattr(KafkaEventSource, "poll_s", 3600.0)  # only the passes asked for here
    async with shard_on(config.data_dir, config) as shard:
        inst, room, (alice,) = await tenant(shard, "alice")
        await shard.billing.meter.catch_up()
        before = shard.billing.meter.applied
        for i in range(30):
            await op(shard, alice, room, "message", f"c{i}", body={"text": "m"})
        await shard.billing.meter.catch_up()
        assert shard.billing.meter.applied == before + 1
        assert await shard.billing.usage(inst, month_of(now_ms())) == {"messages": 30, "seats": 1}


@pytest.mark.parametrize("config", ["kafka"], indirect=True)
@pytest.mark.parametrize("partitions", [1, 2])
async def test_a_shard_whose_log_began_without_usage_records_counts_each_event_once(
    config: Config, monkeypatch: pytest.MonkeyPatch, partitions: int
) -> None:
    """A shard whose origins once wrote no usage records (the version before them): its meter
    counted part of the log from the events, and stored an offset of the log of record. The
    first origin that writes usage records starts: the meter counts the rest of the old events
    from the log, up to where that origin began, then the usage records; a later restart keeps
    that point. Every event is counted exactly once."""
    from origin.kafka_store import KafkaStore

    monkeypatch.setattr(KafkaEventSource, "poll_s", 3600.0)  # only the passes asked for here
    config = attrs.evolve(config, kafka_partitions=partitions)
    month = month_of(now_ms())

    async def claims_nothing(store: KafkaStore, end: Any) -> None:
        pass

    with monkeypatch.context() as old:  # an origin of the version before
        old.setattr("origin.kafka_store.encode_usage", lambda ts, counts: [])
        old.setattr(KafkaStore, "_claim_usage_from", claims_nothing)
        async with shard_on(config.data_dir, config) as shard:
            inst, room, (alice, bob) = await tenant(shard, "alice", "bob")
            for i in range(3):
                await op(shard, alice, room, "message", f"a{i}", body={"text": "m"})
            # What that version's meter stored: these three counted, and the log's offsets.
            ends = await trio.to_thread.run_sync(_ends, config)
            old_offset = "{" + ", ".join(f'"{p}": {e}' for p, e in enumerate(ends)) + "}"
            counted = metering.Usage()
            counted.add([MeterEvent(inst, now_ms(), "message", alice.id, 3)])
            assert await shard.billing.store.apply(
                KafkaEventSource.name, None, old_offset, counted.delta()
            )
            await op(shard, bob, room, "message", "b0", body={"text": "m"})
            await op(shard, bob, room, "react", "b1", target=1, emoji="x")
    async with shard_on(config.data_dir, config) as shard:
        assert isinstance(shard.store, KafkaStore) and shard.store.usage_from
        began = shard.store.usage_from
        # The claim wrapped the stored offset: a meter of the version before, still running
        # in the origin this one fenced, can no longer read it (and count past `began`).
        assert await shard.billing.store.offset(KafkaEventSource.name) == (
            f'{{"events":{old_offset}}}'
        )
        for i in range(4):
            await op(shard, alice, room, "message", f"c{i}", body={"text": "m"})
        await shard.billing.meter.catch_up()
        expected = {"messages": 8, "reactions": 1, "seats": 2}
        assert await shard.billing.usage(inst, month) == expected
        stored = await shard.billing.store.offset(KafkaEventSource.name)
        assert stored is not None and stored.startswith('{"usage"')
    async with shard_on(config.data_dir, config) as shard:
        assert isinstance(shard.store, KafkaStore) and shard.store.usage_from == began
        await op(shard, bob, room, "message", "d0", body={"text": "m"})
        await shard.billing.meter.catch_up()
        expected = {"messages": 9, "reactions": 1, "seats": 2}
        assert await shard.billing.usage(inst, month) == expected


@pytest.mark.parametrize("config", ["kafka"], indirect=True)
async def test_a_transaction_aborted_and_appended_again_is_counted_once(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's usage records travel in its transaction: the aborted try leaves none, the
    retry that commits leaves one."""
    from origin.kafka_store import KafkaStore

    monkeypatch.setattr(KafkaEventSource, "poll_s", 3600.0)  # only the passes asked for here
    async with shard_on(config.data_dir, config) as shard:
        inst, room, (alice,) = await tenant(shard, "alice")
        await op(shard, alice, room, "message", "a0", body={"text": "m"})
        assert isinstance(shard.store, KafkaStore)
        commits = shard.store.log.commits
        shard.store.log.abort_next_batch_after(1)
        await op(shard, alice, room, "message", "a1", body={"text": "m"})
        assert shard.store.log.commits == commits + 1
        await shard.billing.meter.catch_up()
        assert await shard.billing.usage(inst, month_of(now_ms())) == {"messages": 2, "seats": 1}


@pytest.mark.parametrize("config", ["kafka"], indirect=True)
async def test_a_batch_the_meter_failed_to_count_is_read_again(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that fails once its consumer took a batch (a record it cannot decode) leaves
    that batch uncounted: the next pass reads it again, instead of going on after it."""
    import origin.kafka_records

    monkeypatch.setattr(KafkaEventSource, "poll_s", 3600.0)  # only the passes asked for here
    async with shard_on(config.data_dir, config) as shard:
        inst, room, (alice,) = await tenant(shard, "alice")
        await shard.billing.meter.catch_up()
        for i in range(3):
            await op(shard, alice, room, "message", f"c{i}", body={"text": "m"})
        decode = origin.kafka_records.decode_usage_record

        def fails(entry: Any) -> Any:
            raise GB6Error(INTERNAL, "cannot decode")

        monkeypatch.setattr(origin.kafka_records, "decode_usage_record", fails)
        with pytest.raises(GB6Error, match="cannot decode"):
            await shard.billing.meter.catch_up()
        monkeypatch.setattr(origin.kafka_records, "decode_usage_record", decode)
        with trio.fail_after(20):
            await shard.billing.meter.catch_up()
        assert await shard.billing.usage(inst, month_of(now_ms())) == {"messages": 3, "seats": 1}


def _ends(config: Config) -> list[int]:
    """The high watermark of each partition of the shard's topic."""
    from confluent_kafka import Consumer, TopicPartition

    assert config.kafka_bootstrap and config.kafka_topic
    consumer = Consumer({"bootstrap.servers": config.kafka_bootstrap, "group.id": "gb6-test"})
    try:
        return [
            consumer.get_watermark_offsets(TopicPartition(config.kafka_topic, p), 10)[1]
            for p in range(config.kafka_partitions)
        ]
    finally:
        consumer.close()


@pytest.mark.parametrize("config", ["kafka"], indirect=True)
async def test_an_exact_pass_ends_while_one_partition_is_busy_and_another_quiet(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two partitions, one busy and one quiet: the quiet one ends with a transaction
    marker after its last record, so a reading of it never reaches the log's end by records
    alone, and reads never come back empty while the other is busy. (The meter reads usage
    records, one partition whose every record is followed by a marker, while sends go on.)
    The pass must still end (a usage read waited as long as sends went on)."""
    monkeypatch.setattr(KafkaEventSource, "poll_s", 3600.0)  # only the passes asked for here
    config = attrs.evolve(config, kafka_partitions=2)
    async with shard_on(config.data_dir, config) as shard:
        inst, busy, (alice,) = await tenant(shard, "alice")
        before = await trio.to_thread.run_sync(_ends, config)
        await op(shard, alice, busy, "message", "b0", body={"text": "m"})
        after = await trio.to_thread.run_sync(_ends, config)
        busy_partition = next(p for p in range(2) if after[p] > before[p])
        for i in range(50):  # a room of the other partition
            quiet = (await shard.create_room(alice, f"q{i}", "chat", [], False)).record.id
            before = after
            await op(shard, alice, quiet, "message", f"q{i}", body={"text": "m"})
            after = await trio.to_thread.run_sync(_ends, config)
            if after[busy_partition] == before[busy_partition]:
                break
        else:
            raise AssertionError("no room of the other partition in 50")
        sent = 1 + i + 1
        stop = trio.Event()

        async def keep_busy() -> None:
            nonlocal sent
            n = 0
            while not stop.is_set():
                n += 1
                await op(shard, alice, busy, "message", f"load{n}", body={"text": "m"})
                sent += 1
                await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_busy)
            await trio.sleep(0.5)
            counted_before = sent
            with trio.fail_after(20):
                await shard.billing.meter.catch_up()
            stop.set()
        usage = await shard.billing.store.usage(inst, month_of(now_ms()))
        assert counted_before <= usage["messages"] <= sent


@pytest.mark.parametrize("config", ["kafka"], indirect=True)
async def test_background_passes_hold_their_usage_under_load_until_it_is_due(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a steady load a background pass reads a second's worth and keeps it (applies are
    one row per active user: under load, every `APPLY_S`); a usage read applies it with the
    rest, and nothing is lost or counted twice."""
    monkeypatch.setattr(KafkaEventSource, "poll_s", 3600.0)  # only the passes asked for here
    # A read finding nothing for this long ends a pass's gathering: one sender's pauses on a
    # slow machine must not pass for the load ending.
    monkeypatch.setattr(metering, "_IDLE_S", 2.0)
    async with shard_on(config.data_dir, config) as shard:
        inst, room, (alice,) = await tenant(shard, "alice")
        meter = shard.billing.meter
        await meter.catch_up()
        acked = 0
        sending = True

        async def send_until_told() -> None:
            nonlocal acked
            for i in itertools.count():
                if not sending:
                    return
                await op(shard, alice, room, "message", f"c{i}", body={"text": "m"})
                acked += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_until_told)
            await trio.sleep(0.3)
            before = meter.applied
            await meter.catch_up(exact=False)
            await meter.catch_up(exact=False)
            assert meter.applied == before
            counted = acked
            usage = await shard.billing.usage(inst, month_of(now_ms()))
            assert meter.applied == before + 1
            assert usage["messages"] >= counted > 0
            sending = False
        assert await shard.billing.usage(inst, month_of(now_ms())) == {
            "messages": acked,
            "seats": 1,
        }


async def test_usage_answers_while_sends_go_on_and_counts_every_earlier_one(
    config: Config,
) -> None:
    """A usage read catches the meter up to the call, not to a log that never stops growing
    (on Kafka a read always finds the next transaction: the pass used to go on forever)."""
    async with shard_on(config.data_dir, config) as shard:
        inst, room, (alice,) = await tenant(shard, "alice")
        acked = 0

        async def send_forever() -> None:
            nonlocal acked
            for i in itertools.count():
                await op(shard, alice, room, "message", f"c{i}", body={"text": "m"})
                acked += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_forever)
            await trio.sleep(0.5)
            # A background pass runs meanwhile: it ends too.
            nursery.start_soon(partial(shard.billing.meter.catch_up, exact=False))
            for _ in range(3):
                await trio.sleep(0.5)
                before = acked
                with trio.fail_after(15):
                    usage = await shard.billing.usage(inst, month_of(now_ms()))
                assert usage["messages"] >= before > 0
            nursery.cancel_scope.cancel()


async def test_replaying_the_log_into_a_fresh_store_gives_the_same_totals(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with shard_on(data) as shard:
        inst, room, (alice, bob) = await tenant(shard, "alice", "bob")
        for i in range(30):
            await op(shard, (alice, bob)[i % 2], room, "message", f"c{i}", body={"text": "m"})
        month = month_of(now_ms())
        before = await shard.billing.usage(inst, month)
        assert before == {"messages": 30, "seats": 2}
        # Metering again from where it is counts nothing twice.
        await shard.billing.meter.catch_up()
        assert await shard.billing.usage(inst, month) == before
    for path in data.glob("billing.db*"):
        path.unlink()
    async with shard_on(data) as shard:  # the meter starts from offset 0 of the same log
        assert await shard.billing.usage(inst, month) == before
        assert await shard.billing.store.offset("meter") is not None


class Stopping:
    """An event source that ends after `batches` reads: a meter stopped mid-stream."""

    name = "meter"
    poll_s = POLL_S

    def __init__(self, source: SqliteEventSource, batches: int) -> None:
        self.source = source
        self.batches = batches

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.source.run(task_status=task_status)

    async def read(self, after: str | None, limit: int) -> tuple[list[MeterEvent], str] | None:
        if self.batches == 0:
            return None
        self.batches -= 1
        return await self.source.read(after, limit)

    async def drained(self, after: str | None) -> bool:
        return True

    async def end(self) -> Callable[[str], bool] | None:
        return None


async def meter_once(data: Path, source: EventSource, batch: int) -> Billing:
    store = SqliteBillingStore(data / "billing.db")
    billing = Billing(store, source, lambda _: None, lambda _: SEAT_PRICE)
    billing.meter.batch = batch
    async with trio.open_nursery() as nursery:
        await nursery.start(billing.run)
        await billing.meter.catch_up()
        nursery.cancel_scope.cancel()
    return billing


async def log_of(data: Path, sends: int) -> str:
    """A shard's log in `data` with `sends` messages of one user, and no billing store yet (the
    meter starts from the log's beginning): the instance."""
    async with shard_on(data) as shard:
        inst, room, (alice,) = await tenant(shard, "alice")
        for i in range(sends):
            await op(shard, alice, room, "message", f"c{i}", body={"text": "m"})
    _no_billing_store(data)
    return inst


def _no_billing_store(data: Path) -> None:
    for path in data.glob("billing.db*"):
        path.unlink()


async def test_a_meter_stopped_mid_stream_resumes_without_double_counting(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    inst = await log_of(data, 25)
    month = month_of(now_ms())
    # Two batches of 4 events, then the meter stops: 8 counted, the offset after the 8th.
    await meter_once(data, Stopping(SqliteEventSource(data / "gb6.db"), 2), 4)
    billing = await meter_once(data, Stopping(SqliteEventSource(data / "gb6.db"), 0), 4)
    assert billing.meter.applied == 0
    async with trio.open_nursery() as nursery:
        await nursery.start(billing.store.run)
        assert await billing.store.usage(inst, month) == {"messages": 8, "seats": 1}
        nursery.cancel_scope.cancel()
    # Restarted, it carries on from there (batches of 7 this time): 25, none twice.
    billing = await meter_once(data, SqliteEventSource(data / "gb6.db"), 7)
    assert billing.meter.applied == 3  # 7 + 7 + 3
    async with shard_on(data) as shard:
        assert await shard.billing.usage(inst, month) == {"messages": 25, "seats": 1}


class EndFailsOnce(Stopping):
    """A source whose first exact pass fails where it asks where the log ends."""

    def __init__(self, source: SqliteEventSource) -> None:
        super().__init__(source, batches=1_000)
        self.failed = False

    async def end(self) -> Callable[[str], bool] | None:
        if not self.failed:
            self.failed = True
            raise GB6Error("unavailable", "made by the test")
        return None


async def test_a_catch_up_waiting_behind_a_failed_pass_makes_its_own(tmp_path: Path) -> None:
    """Callers of `catch_up` waiting together share one exact pass, but not one that failed:
    the next makes a pass of its own, and usage then counts every event committed before it
    was called (an invoice closed on it lacks nothing)."""
    data = tmp_path / "data"
    inst = await log_of(data, 3)
    source = EndFailsOnce(SqliteEventSource(data / "gb6.db"))
    billing = Billing(
        SqliteBillingStore(data / "billing.db"), source, lambda _: None, lambda _: SEAT_PRICE
    )
    outcomes: list[str] = []

    async def catch_up() -> None:
        try:
            await billing.meter.catch_up()
            outcomes.append("ok")
        except GB6Error as exc:
            outcomes.append(exc.code)

    async with trio.open_nursery() as nursery:
        await nursery.start(billing.run)
        async with billing.meter._lock:  # both callers wait behind it, together
            nursery.start_soon(catch_up)
            nursery.start_soon(catch_up)
            await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(10):
            while len(outcomes) < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert outcomes == ["unavailable", "ok"]
        usage = await billing.store.usage(inst, month_of(now_ms()))
        assert usage == {"messages": 3, "seats": 1}
        nursery.cancel_scope.cancel()


async def test_an_exact_pass_after_a_failed_apply_of_a_whole_batch_counts_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass read a whole batch and failed to apply it (the billing store did not answer):
    the meter holds it, and the next exact pass applies it, then reads on to the end, instead
    of taking its first read (for no more events) for the end."""
    data = tmp_path / "data"
    inst = await log_of(data, 8)
    store = SqliteBillingStore(data / "billing.db")
    billing = Billing(
        store, SqliteEventSource(data / "gb6.db"), lambda _: None, lambda _: SEAT_PRICE
    )
    billing.meter.batch = 4
    apply, failures = store.apply, [GB6Error("unavailable", "made by the test")]

    async def failing_once(*args: Any) -> bool:
        if failures:
            raise failures.pop()
        return await apply(*args)

    monkeypatch.setattr(store, "apply", failing_once)
    async with trio.open_nursery() as nursery:
        await nursery.start(billing.run)
        with pytest.raises(GB6Error):
            await billing.meter.catch_up(exact=False)
        await billing.meter.catch_up()
        usage = await store.usage(inst, month_of(now_ms()))
        assert usage == {"messages": 8, "seats": 1}
        nursery.cancel_scope.cancel()


async def test_preview_close_and_late_usage(tmp_path: Path) -> None:
    async with shard_on(tmp_path / "data") as shard:
        billing = shard.billing
        billing.pricing_of = lambda plan: SEAT_PRICE
        inst, room, (alice, bob, _carol) = await tenant(shard, "alice", "bob", "carol")
        for i in range(5):
            await op(shard, (alice, bob)[i % 2], room, "message", f"c{i}", body={"text": "m"})
        month = month_of(now_ms())
        preview = await billing.preview(inst)
        # seats: 2 x 100 = 200; messages: 2 free, then 3 x 0.5 = 1.5 → 2 (half to even)
        assert (preview.period, [line.amount for line in preview.lines]) == (month, [200, 2])
        assert preview.total == 202
        assert await billing.invoices(inst) == []  # a preview is not stored
        with pytest.raises(GB6Error) as err:
            await billing.close(inst, month)  # the month is still running
        assert err.value.code == CONFLICT
        billing.clock = lambda: month_end_ms(month) + 1  # the month has ended
        with pytest.raises(GB6Error) as err:  # the instance did not exist then
            await billing.close(inst, "2020-01")
        assert err.value.code == INVALID
        assert await billing.invoices(inst) == []
        closed = await billing.close(inst, month)
        assert (closed.number, closed.total, closed.period) == (1, 202, month)
        assert await billing.close(inst, month) == closed
        # A send committed now (still `month` by its timestamp) after the month was closed is
        # billed on the next month, and the closed invoice does not change.
        await op(shard, alice, room, "message", "late", body={"text": "m"})
        assert await billing.usage(inst, month) == {"messages": 5, "seats": 2}
        assert await billing.usage(inst, next_month(month)) == {"messages": 1, "seats": 1}
        late = await billing.preview(inst)
        assert (late.period, late.total) == (next_month(month), 100)  # 1 seat, 1 free message
        assert await billing.invoice(inst, month) == closed
        assert [i.number for i in await billing.invoices(inst)] == [1]
        with pytest.raises(GB6Error) as err:
            await billing.preview("ins_nope")
        assert err.value.code == NOT_FOUND
        # Usage recorded by other parts (quotas, recorder), once per key.
        assert await billing.record_usage(inst, "stored_bytes", 2048, "file_1")
        assert not await billing.record_usage(inst, "stored_bytes", 2048, "file_1")
        assert (await billing.usage(inst, next_month(month)))["stored_bytes"] == 2048


async def test_gb6_run_meters_its_log_and_survives_kill_9(node: Node, peer_factory: Any) -> None:
    t = node.create_tenant()
    alice, bob = t.user("alice"), t.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        for i in range(10):
            await a.ok("send", room=room, cid=f"a{i}", body={"text": "m"})
        await b.ok("send", room=room, cid="b0", body={"text": "m"})
    node.kill()  # SIGKILL: nothing drained
    assert (node.data_dir / "billing.db").exists()  # the node's own meter made its store
    node.start()
    async with peer_factory(bob.token) as b:
        await b.ok("send", room=room, cid="b1", body={"text": "m"})
    node.kill()
    with sqlite3.connect(node.data_dir / "gb6.db") as conn:
        sends = conn.execute("SELECT COUNT(*) FROM events WHERE type='message'").fetchone()[0]
    assert sends == 12
    billing = open_billing(Config(data_dir=node.data_dir), lambda _: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(billing.run)
        usage = await billing.usage(t.instance, month_of(now_ms()))
        nursery.cancel_scope.cancel()
    assert usage == {"messages": 12, "seats": 2}


def test_prices_come_from_the_plans_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "gb6.toml"
    path.write_text(
        '[plans.team.pricing]\ncurrency = "USD"\n'
        '[[plans.team.pricing.components]]\nmodel = "per_seat"\nunit_price = 700\n'
    )
    config = load(path, {"data_dir": str(tmp_path)})
    team = plan_pricing(config, "team")
    # 3 seats x 700 = 2100
    assert invoice("ins_a", "2026-10", team, {"seats": 3}).total == 2100
    assert team.currency == "USD"
    assert plan_pricing(config, "free").components == ()  # no pricing: free
    path.write_text('[plans.team.pricing]\n[[plans.team.pricing.components]]\nmodel = "gift"\n')
    with pytest.raises(GB6Error) as err:
        open_billing(load(path, {"data_dir": str(tmp_path)}), lambda _: None)
    assert err.value.code == INVALID
    assert "plans.team.pricing.components[0].model" in err.value.message


class ReadsFail(Stopping):
    """A log source every read of which fails (the billing store's offset older than the log,
    a record it cannot decode), until `healed`; quick background passes, as Kafka's."""

    poll_s = 0.05

    def __init__(self, source: SqliteEventSource) -> None:
        super().__init__(source, batches=1_000)
        self.reads = 0
        self.healed = False

    async def read(self, after: str | None, limit: int) -> tuple[list[MeterEvent], str] | None:
        self.reads += 1
        if not self.healed:
            raise GB6Error("unavailable", "made by the test")
        return await super().read(after, limit)


async def test_background_passes_that_keep_failing_back_off(tmp_path: Path) -> None:
    """A pass that fails may have opened a consumer of the log (a thread, connections): the
    meter does not try again every 50 ms for as long as the failure lasts, but pauses longer
    after each (0.5 s, doubling, up to 10 s), and counts as soon as a pass works again."""
    data = tmp_path / "data"
    inst = await log_of(data, 3)
    source = ReadsFail(SqliteEventSource(data / "gb6.db"))
    billing = Billing(
        SqliteBillingStore(data / "billing.db"), source, lambda _: None, lambda _: SEAT_PRICE
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(billing.run)
        await trio.sleep(2.0)  # passes at about 0.05, 0.55, 1.55 s (25 or so without pauses)
        assert 2 <= source.reads <= 4
        source.healed = True
        with trio.fail_after(10):
            while await billing.store.usage(inst, month_of(now_ms())) != {  # noqa: ASYNC110
                "messages": 3,
                "seats": 1,
            }:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
