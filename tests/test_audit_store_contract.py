"""The audit store's contract (origin/audit_store.py), run against both adapters.

SQLite on the test's own directory; PostgreSQL on the service scripts/services starts, in a fresh
schema per test, dropped afterwards. Each test opens its own trio-asyncio loop, as the node's
supervisor does at process start. `Backend.sql` runs raw SQL on the store's storage the way an
operator or an attacker with database access would (tests/test_audit.py tampers through it).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_asyncio
from services import require
from trio_asyncio import aio_as_trio

from node.errors import CONFLICT, INVALID, GB6Error
from origin.audit import GENESIS, Anchor, AuditLimits, AuditRecord, entry, seal, verify
from origin.audit_pg import PgAuditStore
from origin.audit_sqlite import SqliteAuditStore
from origin.audit_store import AuditQuery, AuditStore


@attrs.frozen
class Backend:
    """How to make an adapter on one test's own storage, and to reach that storage raw."""

    name: str
    make: Callable[[], AuditStore]
    sql: Callable[[str], Awaitable[list[tuple[Any, ...]]]]  # inside a trio-asyncio loop
    table: str  # the records' table, for raw SQL


async def _pg_sql(dsn: str, schema: str, sql: str) -> list[tuple[Any, ...]]:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    conn = await aio_as_trio(asyncpg.connect)(
        dsn, timeout=10, server_settings={"search_path": schema}
    )
    try:
        if sql.lstrip().upper().startswith("SELECT"):
            return [tuple(r) for r in await aio_as_trio(conn.fetch)(sql)]
        await aio_as_trio(conn.execute)(sql)
        return []
    finally:
        await aio_as_trio(conn.close)()


def _sqlite_sql(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        if sql.lstrip().upper().startswith("SELECT"):
            return [tuple(r) for r in conn.execute(sql).fetchall()]
        conn.executescript(sql)
        return []
    finally:
        conn.close()


def make_backend(name: str, base: Path) -> Iterator[Backend]:
    """A backend on fresh storage (a generator: its end drops what it made)."""
    if name == "sqlite":
        path = base / "audit.db"

        async def sqlite_sql(sql: str) -> list[tuple[Any, ...]]:
            return await trio.to_thread.run_sync(_sqlite_sql, path, sql)

        yield Backend(name, lambda: SqliteAuditStore(path), sqlite_sql, "audit")
        return
    dsn = require("postgres")
    schema = f"gb6_audit_test_{uuid.uuid4().hex[:12]}"

    async def pg_sql(sql: str) -> list[tuple[Any, ...]]:
        return await _pg_sql(dsn, schema, sql)

    try:
        yield Backend(name, lambda: PgAuditStore(dsn, schema=schema), pg_sql, "audit_log")
    finally:

        async def drop() -> None:
            async with trio_asyncio.open_loop():
                await _pg_sql(dsn, "public", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        trio.run(drop)


# A sync fixture, so that require()'s skip keeps its reason (see tests/services.py).
@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from make_backend(request.param, tmp_path)


@asynccontextmanager
async def running(backend: Backend) -> AsyncIterator[AuditStore]:
    """An adapter serving inside a trio-asyncio loop; closed (run cancelled) on exit."""
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        store = backend.make()
        with trio.fail_after(20):
            await nursery.start(store.run)
        try:
            yield store
        finally:
            nursery.cancel_scope.cancel()


def chain(specs: list[dict[str, Any]], start: int = 1, prev: bytes = GENESIS) -> list[AuditRecord]:
    """Sealed records from entry keyword dicts (ts defaults to 1000 * seq)."""
    out: list[AuditRecord] = []
    for i, spec in enumerate(specs):
        seq = start + i
        ts = spec.pop("ts", 1000 * seq)
        r = seal(entry(**spec), seq, ts, prev)
        out.append(r)
        prev = r.hash
    return out


def _sample() -> list[AuditRecord]:
    return chain(
        [
            dict(actor="admin", action="org.create", org="org_a", target="org_a"),
            dict(actor="admin", action="instance.create", org="org_a", instance="ins_a"),
            dict(actor="usr_1", action="token.issue", org="org_a", instance="ins_a"),
            dict(actor="admin", action="org.create", org="org_b", target="org_b"),
            dict(actor="usr_2", action="token.issue", org="org_b", instance="ins_b"),
            dict(
                actor="anonymous",
                action="auth.hello_refused",
                outcome="denied",
                details={"reason": "unknown token", "count": 1},
            ),
            dict(actor="admin", action="token.revoke", org="org_a", instance="ins_a"),
        ]
    )


async def test_records_round_trip_byte_for_byte(backend: Backend) -> None:
    """What is appended comes back exactly (details text, hashes, nulls, non-ASCII), and the
    chain read back verifies."""
    records = chain(
        [
            dict(
                actor="admin", action="org.create", org="org_ü", details={"b": [1, None], "a": "é"}
            ),
            dict(actor="usr_x", action="token.issue", details={"n": -(2**53)}),
        ]
    )
    async with running(backend) as store:
        assert await store.head() is None
        assert await store.scan(0, 10) == []
        await store.append(records[:1])
        await store.append(records[1:])
        assert await store.scan(0, 10) == records
        assert await store.scan(1, 10) == records[1:]
        assert await store.scan(0, 1) == records[:1]
        assert await store.head() == records[-1]
    assert records[0].details == '{"a":"é","b":[1,null]}'  # canonical: sorted, no spaces
    assert verify(records, Anchor.head(2, records[-1].hash, None)).ok


async def test_a_taken_seq_is_a_conflict_and_writes_nothing(backend: Backend) -> None:
    records = _sample()
    async with running(backend) as store:
        await store.append(records[:3])
        clash = chain([dict(actor="x", action="y")], start=4, prev=records[2].hash)
        with pytest.raises(GB6Error) as err:
            await store.append([clash[0], records[2]])  # seq 4 is new, seq 3 is taken
        assert err.value.code == CONFLICT
        assert await store.scan(0, 10) == records[:3]  # seq 4 was not written either
        await store.append(records[3:])  # and the store still serves
        assert await store.scan(0, 10) == records


async def test_records_survive_reopening(backend: Backend) -> None:
    records = _sample()
    async with running(backend) as store:
        await store.append(records)
    async with running(backend) as store:
        assert await store.scan(0, 100) == records
        assert await store.head() == records[-1]


async def test_query_filters_scope_and_pages(backend: Backend) -> None:
    records = _sample()

    def seqs(rs: list[AuditRecord]) -> list[int]:
        return [r.seq for r in rs]

    async with running(backend) as store:
        await store.append(records)
        assert seqs(await store.query(AuditQuery())) == [7, 6, 5, 4, 3, 2, 1]  # newest first
        assert seqs(await store.query(AuditQuery(actor="admin"))) == [7, 4, 2, 1]
        assert seqs(await store.query(AuditQuery(action="token.issue"))) == [5, 3]
        assert seqs(await store.query(AuditQuery(org="org_a"))) == [7, 3, 2, 1]
        assert seqs(await store.query(AuditQuery(instance="ins_b"))) == [5]
        assert seqs(await store.query(AuditQuery(since=2000, until=5000))) == [4, 3, 2]
        assert seqs(await store.query(AuditQuery(limit=2))) == [7, 6]
        assert seqs(await store.query(AuditQuery(limit=2, before=6))) == [5, 4]
        both = AuditQuery(actor="admin", org="org_a", before=7)
        assert seqs(await store.query(both)) == [2, 1]
        # Tenancy: a scoped caller sees its orgs' and instances' records, never another
        # tenant's, never node-wide ones (org None); an empty scope sees nothing.
        assert seqs(await store.query(AuditQuery(orgs=frozenset({"org_b"})))) == [5, 4]
        scoped = AuditQuery(orgs=frozenset(), instances=frozenset({"ins_a"}))
        assert seqs(await store.query(scoped)) == [7, 3, 2]
        assert await store.query(AuditQuery(orgs=frozenset())) == []
        leak = AuditQuery(org="org_a", orgs=frozenset({"org_b"}))  # a filter cannot widen it
        assert await store.query(leak) == []


@pytest.mark.parametrize(
    "query",
    [
        AuditQuery(limit=0),
        AuditQuery(limit=AuditLimits().page + 2),
        AuditQuery(actor=""),
        AuditQuery(org="x" * 201),
        AuditQuery(before=-1),
        AuditQuery(since=True),
        AuditQuery(orgs=frozenset(str(i) for i in range(10_001))),
    ],
)
async def test_bad_queries_are_invalid(backend: Backend, query: AuditQuery) -> None:
    async with running(backend) as store:
        with pytest.raises(GB6Error) as err:
            await store.query(query)
        assert err.value.code == INVALID


async def test_the_storage_refuses_updates_and_deletes(backend: Backend) -> None:
    """Append-only is the storage's rule too, not only the code's: a raw UPDATE, DELETE (and on
    PostgreSQL TRUNCATE) fails and changes nothing."""
    records = _sample()
    t = backend.table
    async with running(backend) as store:
        await store.append(records)
        statements = [
            f"UPDATE {t} SET actor = 'mallory' WHERE seq = 2",
            f"DELETE FROM {t} WHERE seq = 7",
        ]
        if backend.name == "postgres":
            statements.append(f"TRUNCATE {t}")
        for sql in statements:
            with pytest.raises(Exception, match=r"append-only|permission denied"):
                await backend.sql(sql)
        assert await store.scan(0, 100) == records
