"""The batch lookups by idempotency key stay index probes while `event_keys` grows from empty.

The Kafka sequencer looks up every batch's keys (pg_append.KEYS_AT, then the events of those
found with `fetch_events_at`). In a fresh schema the
tables start empty, and PostgreSQL plans with statistics from when they were small: a cached
generic plan scanned both tables per key, and even a fresh plan probed `events` by room alone.
A lookup then grew with the log, the sequencer's batches grew with the lookup, and a bench run
ran away (seconds per batch). These tests build that state: statistics taken at 100 events,
then 40,000 more without an ANALYZE.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio_asyncio
from services import require
from trio_asyncio import aio_as_trio

from origin.pg_append import _EVENTS_AT, KEYS_AT, fetch_priors
from origin.pg_schema import migrate
from origin.pg_store import open_pool

STALE_AT = 100
GROWN_TO = 40_000


@pytest.fixture
def pg_dsn() -> str:
    return require("postgres")


def _keys(n: int) -> tuple[list[str], list[str], list[str]]:
    """`n` keys, half of them stored (c<g>), half not (x<g>)."""
    gs = range(1, n + 1)
    return (
        [f"r{g % 100}" for g in gs],
        [f"u{g % 1000}" for g in gs],
        [f"c{g}" if g % 2 else f"x{g}" for g in gs],
    )


async def _events(conn: Any, first: int, last: int) -> None:
    await conn.execute(
        "INSERT INTO event_keys SELECT 'r' || (g % 100), g, 'u' || (g % 1000), 'c' || g, 'i1', 500"
        f" FROM generate_series({first}, {last}) g"
    )
    await conn.execute(
        "INSERT INTO events(instance, room, seq, ts, type, sender, cid)"
        " SELECT 'i1', 'r' || (g % 100), g, 500, 'message', 'u' || (g % 1000), 'c' || g"
        f" FROM generate_series({first}, {last}) g"
    )


@asynccontextmanager
async def _schema(dsn: str) -> AsyncIterator[str]:
    """A migrated schema with one instance's partition, analyzed at STALE_AT events."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    schema = f"plans_{uuid.uuid4().hex[:10]}"
    conn = await aio_as_trio(asyncpg.connect)(dsn, server_settings={"search_path": schema})
    try:
        await aio_as_trio(migrate)(conn, schema)
        await aio_as_trio(conn.execute)(
            "CREATE TABLE events_i1 PARTITION OF events FOR VALUES IN ('i1')"
            " PARTITION BY RANGE (ts);"
            " CREATE TABLE events_i1_0 PARTITION OF events_i1 FOR VALUES FROM (0) TO (1000)"
        )
        await aio_as_trio(_events)(conn, 1, STALE_AT)
        await aio_as_trio(conn.execute)(f'ANALYZE "{schema}".event_keys, "{schema}".events')
        yield schema
    finally:
        await aio_as_trio(conn.execute)(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await aio_as_trio(conn.close)()


async def _plan_after_growth(pool: Any) -> str:
    """The key lookup and the events' read prepared and run while the tables are small
    (PostgreSQL may settle on a generic plan after five runs), then the plans they would run
    with once the tables have grown."""
    keys = _keys(200)
    # EXECUTE takes no bind parameters: the arrays as literals (the keys are plain words).
    args = ", ".join("ARRAY[" + ",".join(f"'{v}'" for v in col) + "]" for col in keys)
    stored = [g for g in range(1, 201) if g % 2]
    at = (
        "'i1', ARRAY[500]::bigint[], ARRAY["
        + ",".join(f"'r{g % 100}'" for g in stored)
        + "], ARRAY["
        + ",".join(str(g) for g in stored)
        + "]::bigint[]"
    )

    async def go() -> str:
        async with pool.acquire() as conn:
            await conn.execute(f"PREPARE keys(text[], text[], text[]) AS {KEYS_AT}")
            await conn.execute(f"PREPARE at(text, bigint[], text[], bigint[]) AS {_EVENTS_AT}")
            for _ in range(8):
                await conn.fetch(f"EXECUTE keys({args})")
                await conn.fetch(f"EXECUTE at({at})")
            await _events(conn, STALE_AT + 1, GROWN_TO)
            # The lookup still finds what it should.
            found = await conn.fetch(f"EXECUTE keys({args})")
            assert sorted(r["cid"] for r in found) == sorted(c for c in keys[2] if c[0] == "c")
            assert len(await conn.fetch(f"EXECUTE at({at})")) == len(stored)
            plans = []
            for name, params in (("keys", args), ("at", at)):
                rows = await conn.fetch(f"EXPLAIN EXECUTE {name}({params})")
                plans += [r[0] for r in rows]
                await conn.execute(f"DEALLOCATE {name}")
            return "\n".join(plans)

    plan: str = await aio_as_trio(go)()
    return plan


async def test_the_log_pools_lookup_probes_indexes_after_the_tables_grew(pg_dsn: str) -> None:
    """On a pool of ours (custom plans), each key is one probe of each table's index: no scan
    of a table, no filter of a room's events. (On a pool that lets PostgreSQL cache a generic
    plan, it keeps the one it made while the tables were small, which scans them per key.)"""
    async with trio_asyncio.open_loop(), _schema(pg_dsn) as schema:
        pool = await open_pool(pg_dsn, schema, "gb6-test-plans", 1)
        try:
            plan = await _plan_after_growth(pool)
        finally:
            await aio_as_trio(pool.close)()
    assert "Seq Scan" not in plan, plan
    # `events` is probed by the key's row: one index entry, not every event of the room.
    assert "Index Cond: ((room = q.room) AND (seq = q.seq))" in plan, plan
    assert "Join Filter" not in plan, plan


async def test_a_lookup_reads_only_the_partitions_of_the_events_it_finds(pg_dsn: str) -> None:
    """`events` has a partition per instance and month, which only grow. A lookup by key (a
    resend, an edit's target) opens and locks only the partitions of the events it finds: one
    that locked them all grew with every instance and month, until it overflowed the lock table
    ("out of shared memory") and every resend on the shard failed."""
    from origin.pg_schema import Partitions

    month_ms = 31 * 86_400_000
    async with trio_asyncio.open_loop(), _schema(pg_dsn) as schema:
        pool = await open_pool(pg_dsn, schema, "gb6-test-plans", 1)

        async def go() -> tuple[int, list[Any]]:
            async with pool.acquire() as conn:
                partitions = Partitions(schema)
                for month in range(6):
                    instances = {f"j{i}" for i in range(20)}
                    await partitions.ensure(conn, instances, 1_700_000_000_000 + month * month_ms)
                async with conn.transaction():
                    found = await fetch_priors(conn, [("r5", "u5", "c5"), ("r1", "u1", "x1")])
                    locks = await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid()"
                    )
                return locks, list(found.values())

        try:
            locks, found = await aio_as_trio(go)()
        finally:
            await aio_as_trio(pool.close)()
    assert [(e.room, e.seq, e.cid) for e in found] == [("r5", 5, "c5")]
    assert locks < 40, f"{locks} locks: more partitions read than the event's"
