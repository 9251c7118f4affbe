"""Smoke tests: each service that `scripts/services up` starts does what GB6 needs of it.

Skipped (each saying which service it missed) when the services are not up; failed instead
under GB6_REQUIRE_SERVICES=1, as in CI.
"""

from __future__ import annotations

import time
import uuid

import pytest
import trio
import trio_asyncio
from services import check, require
from trio_asyncio import aio_as_trio


# In an async (trio) test, call require() from a sync fixture: a skip raised inside the trio run
# reaches pytest wrapped in an exception group and loses its reason.
@pytest.fixture
def pg_dsn() -> str:
    return require("postgres")


@pytest.fixture
def redis_url() -> str:
    return require("redis")


@pytest.mark.parametrize("service", ["postgres", "redis", "kafka"])
def test_probe_answers(service: str) -> None:
    require(service)
    ok, why = check(service)
    assert ok, why


async def test_postgres_partitions_and_search(pg_dsn: str) -> None:
    """asyncpg through trio-asyncio: a partitioned table, tsvector + GIN search, a transaction."""
    dsn = pg_dsn
    import asyncpg

    async with trio_asyncio.open_loop():
        conn = await aio_as_trio(asyncpg.connect)(dsn, timeout=10)
        try:
            assert await aio_as_trio(conn.fetchval)("SELECT 1") == 1
            await aio_as_trio(conn.execute)(
                """
                CREATE TEMP TABLE smoke_messages (
                    customer int NOT NULL, seq bigint NOT NULL, body text NOT NULL,
                    tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', body)) STORED,
                    PRIMARY KEY (customer, seq)
                ) PARTITION BY LIST (customer);
                CREATE TEMP TABLE smoke_messages_1 PARTITION OF smoke_messages FOR VALUES IN (1);
                CREATE TEMP TABLE smoke_messages_2 PARTITION OF smoke_messages FOR VALUES IN (2);
                CREATE INDEX ON smoke_messages USING gin (tsv);
                """
            )
            async with trio_asyncio.aio_as_trio(conn.transaction()):
                await aio_as_trio(conn.executemany)(
                    "INSERT INTO smoke_messages (customer, seq, body) VALUES ($1, $2, $3)",
                    [(1, 1, "hello orbit"), (1, 2, "lunch at noon"), (2, 1, "orbit insertion")],
                )
            rows = await aio_as_trio(conn.fetch)(
                "SELECT customer, seq FROM smoke_messages"
                " WHERE tsv @@ plainto_tsquery('simple', $1) ORDER BY customer, seq",
                "orbit",
            )
            assert [tuple(r) for r in rows] == [(1, 1), (2, 1)]
            n2 = await aio_as_trio(conn.fetchval)("SELECT count(*) FROM smoke_messages_2")
            assert n2 == 1
        finally:
            await aio_as_trio(conn.close)()


async def test_redis_ping_and_pubsub(redis_url: str) -> None:
    """redis.asyncio through trio-asyncio: PING, SET/GET, PUBLISH reaches a SUBSCRIBEr."""
    url = redis_url
    import redis.asyncio as aioredis

    channel = f"gb6-smoke-{uuid.uuid4().hex}"
    async with trio_asyncio.open_loop():
        client = aioredis.Redis.from_url(url)
        pubsub = client.pubsub()
        try:
            assert await aio_as_trio(client.ping)() is True
            await aio_as_trio(client.set)(channel, b"v", ex=30)
            assert await aio_as_trio(client.get)(channel) == b"v"
            await aio_as_trio(pubsub.subscribe)(channel)
            got = []
            with trio.fail_after(10):
                while not got:
                    assert await aio_as_trio(client.publish)(channel, b"typing:alice") >= 1
                    msg = await aio_as_trio(pubsub.get_message)(
                        ignore_subscribe_messages=True, timeout=1.0
                    )
                    if msg is not None:
                        got.append(msg)
            assert got[0]["channel"] == channel.encode()
            assert got[0]["data"] == b"typing:alice"
        finally:
            await aio_as_trio(pubsub.aclose)()
            await aio_as_trio(client.delete)(channel)
            await aio_as_trio(client.aclose)()


def test_kafka_transactions_read_committed() -> None:
    """An idempotent transactional producer: committed batches are read back under
    read_committed, an aborted one never is, and a second producer with the same
    transactional id fences the first."""
    bootstrap = require("kafka")
    from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"gb6-smoke-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    futures[topic].result(timeout=30)
    txn_id = f"gb6-smoke-shard-{uuid.uuid4().hex[:8]}"
    pconf = {
        "bootstrap.servers": bootstrap,
        "transactional.id": txn_id,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
    }
    try:
        producer = Producer(pconf)
        producer.init_transactions(30)

        def batch(tag: str, n: int) -> list[tuple[bytes, bytes]]:
            return [(f"room-{i % 3}".encode(), f"{tag}-{i}".encode()) for i in range(n)]

        committed: list[tuple[bytes, bytes]] = []
        for tag, commit in (("a", True), ("b", False), ("c", True)):
            msgs = batch(tag, 20)
            producer.begin_transaction()
            for key, value in msgs:
                producer.produce(topic, key=key, value=value)
            if commit:
                producer.commit_transaction(30)
                committed += msgs
            else:
                producer.flush(30)
                producer.abort_transaction(30)

        # A zombie: a new producer with the same transactional id fences the old one.
        successor = Producer(pconf)
        successor.init_transactions(30)
        producer.begin_transaction()
        producer.produce(topic, key=b"room-0", value=b"zombie")
        with pytest.raises(KafkaException):
            producer.commit_transaction(30)
        successor.begin_transaction()
        successor.produce(topic, key=b"room-0", value=b"d-0")
        successor.commit_transaction(30)
        committed.append((b"room-0", b"d-0"))

        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"gb6-smoke-{uuid.uuid4().hex[:8]}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            consumer.assign([TopicPartition(topic, p, 0) for p in range(2)])
            seen: list[tuple[bytes, bytes]] = []
            deadline = time.monotonic() + 30
            while len(seen) < len(committed) and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                assert msg.error() is None, msg.error()
                seen.append((msg.key(), msg.value()))
            # Anything after the last committed record would show up here.
            for _ in range(3):
                msg = consumer.poll(0.3)
                if msg is not None and msg.error() is None:
                    seen.append((msg.key(), msg.value()))
        finally:
            consumer.close()
        assert sorted(seen) == sorted(committed)
        # Order within a key (one partition) is the produce order.
        room0 = [v for k, v in seen if k == b"room-0"]
        assert room0 == [v for k, v in committed if k == b"room-0"]
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)
