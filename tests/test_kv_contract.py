"""The kv port's contract (origin/kv.py), run against every adapter.

SQLite always; PostgreSQL against the service scripts/services starts (a fresh schema per test,
dropped afterwards); TiKV only when GB6_TIKV_PD names a placement driver: no TiKV server can be
installed on these machines, so there it is skipped, saying so, even under GB6_REQUIRE_SERVICES=1.
Each test opens its own trio-asyncio loop, as the node's supervisor does at process start.
"""

from __future__ import annotations

import random
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio_asyncio
from services import require
from trio_asyncio import aio_as_trio

from node.errors import INTERNAL, INVALID, UNAVAILABLE, GB6Error
from origin.kv import KV, MAX_KEY_BYTES, MAX_VALUE_BYTES, Entry, KvLimits, prefix_end
from origin.kv_postgres import PostgresKv
from origin.kv_sqlite import SqliteKv
from origin.kv_tikv import TikvKv


@attrs.frozen
class Backend:
    """How to make an adapter on one test's own storage (again, to test reopening)."""

    name: str
    make: Callable[[], KV]


@asynccontextmanager
async def running(backend: Backend) -> AsyncIterator[KV]:
    """An adapter serving inside a trio-asyncio loop; closed (run cancelled) on exit."""
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        kv = backend.make()
        with trio.fail_after(20):
            await nursery.start(kv.run)
        try:
            yield kv
        finally:
            nursery.cancel_scope.cancel()


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    async with trio_asyncio.open_loop():
        conn = await aio_as_trio(asyncpg.connect)(dsn, timeout=10)
        try:
            await aio_as_trio(conn.execute)(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await aio_as_trio(conn.close)()


async def _clear_namespace(backend: Backend) -> None:
    async with running(backend) as kv:
        while entries := await kv.scan(b"", 1000):
            for entry in entries:
                await kv.delete(entry.key)


# A sync fixture, so that require()'s skip keeps its reason (see tests/services.py).
@pytest.fixture(params=["sqlite", "postgres", "tikv"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    name: str = request.param
    if name == "sqlite":
        yield Backend(name, lambda: SqliteKv(tmp_path / "kv.db"))
    elif name == "postgres":
        dsn = require("postgres")
        schema = f"gb6_kv_test_{uuid.uuid4().hex[:12]}"
        try:
            yield Backend(name, lambda: PostgresKv(dsn, schema=schema))
        finally:
            trio.run(_drop_schema, dsn, schema)
    else:
        pd = require("tikv")
        namespace = f"gb6-test/{uuid.uuid4().hex[:12]}/".encode()
        made = Backend(name, lambda: TikvKv(pd.split(","), namespace=namespace))
        try:
            yield made
        finally:
            trio.run(_clear_namespace, made)


async def test_round_trip_and_missing_keys(backend: Backend) -> None:
    """What is put comes back byte for byte; a missing key is None, not an error."""
    async with running(backend) as kv:
        binary = bytes(range(256))
        await kv.put(b"cursor/alice", b"41")
        await kv.put(b"bin\x00\xff", binary)
        await kv.put(b"empty", b"")
        assert await kv.get(b"cursor/alice") == b"41"
        assert await kv.get(b"bin\x00\xff") == binary
        assert await kv.get(b"empty") == b""  # an empty value is a value, not absence
        assert await kv.get(b"cursor/bob") is None
        got = await kv.get_many([b"cursor/bob", b"cursor/alice", b"empty", b"cursor/alice"])
        assert dict(got) == {b"cursor/alice": b"41", b"empty": b""}
        assert dict(await kv.get_many([])) == {}


async def test_overwrite_and_delete(backend: Backend) -> None:
    async with running(backend) as kv:
        await kv.put(b"shard/inst_1", b"origin-a")
        await kv.put(b"shard/inst_1", b"origin-b")
        assert await kv.get(b"shard/inst_1") == b"origin-b"
        await kv.delete(b"shard/inst_1")
        assert await kv.get(b"shard/inst_1") is None
        await kv.delete(b"shard/inst_1")  # deleting a missing key is a no-op
        await kv.put(b"shard/inst_1", b"origin-c")  # and the key can come back
        assert await kv.get(b"shard/inst_1") == b"origin-c"


async def test_scan_is_ordered_bounded_and_pages(backend: Backend) -> None:
    """A prefix scan returns only that prefix, in bytewise key order, at most `limit`."""
    inside = [b"room/", b"room/a", b"room/a\x00", b"room/b", b"room/\x7f", b"room/\xff\xff"]
    outside = [b"roo", b"room", b"room0", b"rooms/x", b"\xff\xffz"]
    keys = inside + outside
    random.Random(6).shuffle(keys)
    async with running(backend) as kv:
        for i, key in enumerate(keys):
            await kv.put(key, b"v%d" % i)
        values = dict(await kv.get_many(keys))
        want = [Entry(k, values[k]) for k in sorted(inside)]
        assert await kv.scan(b"room/", 100) == want
        assert await kv.scan(b"room/", 2) == want[:2]
        # Paging with `after` visits every entry once, in order.
        pages: list[Entry] = []
        after: bytes | None = None
        while page := await kv.scan(b"room/", 4, after=after):
            pages += page
            after = page[-1].key
        assert pages == want
        assert await kv.scan(b"room/", 5, after=b"a") == want[:5]  # `after` before the prefix
        assert await kv.scan(b"room/", 5, after=b"zzz") == []  # and past it
        # An empty prefix is every key; a prefix of 0xff bytes has no upper bound to compute.
        everything = await kv.scan(b"", 100)
        assert [e.key for e in everything] == sorted(keys)
        assert await kv.scan(b"\xff\xff", 10) == [Entry(b"\xff\xffz", values[b"\xff\xffz"])]
        assert await kv.scan(b"nothing/", 10) == []


async def test_compare_and_set(backend: Backend) -> None:
    """Absent→value, value→value, value→absent; a stale expectation is refused, changing
    nothing. (None, None) only says whether the key is absent."""
    key = b"epoch/shard-7"
    async with running(backend) as kv:
        assert await kv.compare_and_set(key, None, None) is True
        assert await kv.compare_and_set(key, None, b"1") is True
        assert await kv.get(key) == b"1"
        assert await kv.compare_and_set(key, None, b"x") is False  # it is no longer absent
        assert await kv.compare_and_set(key, None, None) is False
        assert await kv.compare_and_set(key, b"1", b"2") is True
        assert await kv.compare_and_set(key, b"1", b"3") is False  # stale
        assert await kv.compare_and_set(key, b"1", None) is False  # stale delete
        assert await kv.get(key) == b"2"
        assert await kv.compare_and_set(key, b"2", b"2") is True  # same value: still a match
        assert await kv.compare_and_set(key, b"2", None) is True
        assert await kv.get(key) is None
        assert await kv.compare_and_set(key, b"2", b"3") is False  # expected a value, absent
        assert await kv.get(key) is None
        assert await kv.compare_and_set(key, None, b"") is True
        assert await kv.compare_and_set(key, None, b"4") is False  # b"" is present, not absent
        assert await kv.get(key) == b""


async def test_concurrent_compare_and_set_has_one_winner_per_round(backend: Backend) -> None:
    """Many tasks racing to move the same epoch from one value: exactly one wins each round,
    and the stored value is the winner's."""
    tasks, rounds = 12, 6
    key = b"leader/room-shard"
    async with running(backend) as kv:
        current: bytes | None = None

        async def contend(i: int, r: int, expected: bytes | None, winners: list[int]) -> None:
            if await kv.compare_and_set(key, expected, b"epoch-%d-by-%d" % (r, i)):
                winners.append(i)

        for r in range(rounds):
            winners: list[int] = []
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for i in range(tasks):
                        nursery.start_soon(contend, i, r, current, winners)
            assert len(winners) == 1, f"round {r}: winners {winners}"
            current = b"epoch-%d-by-%d" % (r, winners[0])
            assert await kv.get(key) == current


async def test_bad_input_is_refused_and_changes_nothing(backend: Backend) -> None:
    big_key = b"k" * (MAX_KEY_BYTES + 1)
    big_value = b"v" * (MAX_VALUE_BYTES + 1)
    async with running(backend) as kv:
        await kv.put(b"keep", b"old")
        assert await kv.get(b"k" * MAX_KEY_BYTES) is None  # the limits themselves are allowed
        await kv.put(b"max", b"v" * MAX_VALUE_BYTES)
        bad_calls: list[Callable[[], Awaitable[object]]] = [
            lambda: kv.put(big_key, b"x"),
            lambda: kv.put(b"keep", big_value),
            lambda: kv.put(b"", b"x"),
            lambda: kv.put("keep", b"x"),  # type: ignore[arg-type]
            lambda: kv.put(b"keep", "new"),  # type: ignore[arg-type]
            lambda: kv.get(big_key),
            lambda: kv.delete(big_key),
            lambda: kv.get_many([b"a"] * 1001),
            lambda: kv.get_many(b"keep"),  # type: ignore[arg-type]  # not a list of keys
            lambda: kv.scan(b"", 0),
            lambda: kv.scan(b"", 1001),
            lambda: kv.scan(big_key, 10),
            lambda: kv.compare_and_set(b"keep", b"old", big_value),
            lambda: kv.compare_and_set(b"keep", big_value, b"new"),
            lambda: kv.compare_and_set(big_key, None, b"x"),
        ]
        for call in bad_calls:
            with pytest.raises(GB6Error) as info:
                await call()
            assert info.value.code == INVALID, info.value
            assert "kv" in info.value.message
        assert await kv.get(b"keep") == b"old"
        assert [e.key for e in await kv.scan(b"", 10)] == [b"keep", b"max"]


async def test_persistence_across_reopening(backend: Backend) -> None:
    async with running(backend) as kv:
        await kv.put(b"idem/room-1/alice/c-17", b"seq=40")
        assert await kv.compare_and_set(b"epoch/0", None, b"3") is True
    async with running(backend) as kv:
        assert await kv.get(b"idem/room-1/alice/c-17") == b"seq=40"
        assert await kv.get(b"epoch/0") == b"3"
        assert await kv.compare_and_set(b"epoch/0", b"3", b"4") is True


async def test_calls_outside_run_are_refused(backend: Backend) -> None:
    kv = backend.make()
    with pytest.raises(GB6Error) as info:
        await kv.get(b"a")
    assert info.value.code == UNAVAILABLE
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(kv.run)
        await kv.put(b"a", b"1")
        nursery.cancel_scope.cancel()
    with pytest.raises(GB6Error) as info:
        await kv.put(b"a", b"2")
    assert info.value.code == UNAVAILABLE


# --- adapter edges -------------------------------------------------------------------------


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_postgres_unreachable_is_unavailable() -> None:
    dsn = f"postgresql://gb6:gb6@127.0.0.1:{_closed_port()}/gb6"
    kv = PostgresKv(dsn, schema="gb6_kv_unreachable", op_timeout_s=5)
    with trio.fail_after(10):
        async with trio_asyncio.open_loop():
            with pytest.raises(GB6Error) as info:
                await kv.run()
    assert info.value.code == UNAVAILABLE


async def test_tikv_unreachable_is_unavailable() -> None:
    """Runs without a TiKV server: the pinned tikv-client loads under trio-asyncio and its
    failure to reach a placement driver becomes a clear `unavailable`."""
    kv = TikvKv([f"127.0.0.1:{_closed_port()}"], op_timeout_s=5)
    with trio.fail_after(10):
        async with trio_asyncio.open_loop():
            with pytest.raises(GB6Error) as info:
                await kv.run()
    assert info.value.code == UNAVAILABLE
    assert "tikv" in info.value.message


def test_adapter_settings_are_checked() -> None:
    for schema in ["", "Gb6", "a-b", 'x"; DROP SCHEMA public; --', "a" * 64]:
        with pytest.raises(GB6Error) as info:
            PostgresKv("postgresql://127.0.0.1/gb6", schema=schema)
        assert info.value.code == INVALID
    for namespace in [b"", b"\xff\xff", b"n" * 65]:
        with pytest.raises(GB6Error):
            TikvKv(["127.0.0.1:2379"], namespace=namespace)
    with pytest.raises(GB6Error):
        TikvKv("127.0.0.1:2379")
    with pytest.raises(ValueError):
        KvLimits(max_key_bytes=0)


def test_prefix_end() -> None:
    assert prefix_end(b"room/") == b"room0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") is None
    assert prefix_end(b"") is None


@pytest.fixture
def pg_dsn() -> str:
    return require("postgres")


async def test_postgres_concurrent_starts_migrate_once(pg_dsn: str) -> None:
    """Several processes starting on a new schema at once: each step is applied once."""
    dsn = pg_dsn
    schema = f"gb6_kv_test_{uuid.uuid4().hex[:12]}"
    try:
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            kvs = [PostgresKv(dsn, schema=schema) for _ in range(3)]
            with trio.fail_after(20):
                async with trio.open_nursery() as starting:
                    for kv in kvs:
                        starting.start_soon(nursery.start, kv.run)
            await kvs[0].put(b"k", b"v")
            assert [await kv.get(b"k") for kv in kvs] == [b"v"] * 3
            nursery.cancel_scope.cancel()
    finally:
        await _drop_schema(dsn, schema)


async def test_postgres_kv_commits_durably_whatever_the_role_default(pg_dsn: str) -> None:
    """A kv write that returned is durable (leadership epochs, placements): its connections
    ask for `synchronous_commit=on` even where the role's default is off."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    schema = f"gb6_kv_test_{uuid.uuid4().hex[:12]}"

    async def set_role_default(value: str | None) -> None:
        conn = await aio_as_trio(asyncpg.connect)(pg_dsn, timeout=10)
        try:
            sql = "ALTER ROLE CURRENT_USER " + (
                f"SET synchronous_commit = {value}" if value else "RESET synchronous_commit"
            )
            await aio_as_trio(conn.execute)(sql)
        finally:
            await aio_as_trio(conn.close)()

    try:
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            await set_role_default("off")
            try:
                kv = PostgresKv(pg_dsn, schema=schema)
                await nursery.start(kv.run)
                assert kv._pool is not None
                got = await aio_as_trio(kv._pool.fetchval)(
                    "SELECT current_setting('synchronous_commit')"
                )
                assert got == "on"
            finally:
                await set_role_default(None)
            nursery.cancel_scope.cancel()
    finally:
        await _drop_schema(pg_dsn, schema)


async def test_postgres_kv_a_refused_statement_is_unavailable_and_a_fault_internal(
    pg_dsn: str,
) -> None:
    """The server cancels a kv statement (a timeout of its, an operator's cancel): the caller
    may retry, so it is `unavailable`, as a lost connection is. A fault a retry does not get
    past is `internal`: a caller retrying it would retry for good."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    schema = f"gb6_kv_test_{uuid.uuid4().hex[:12]}"
    try:
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            kv = PostgresKv(pg_dsn, schema=schema)
            await nursery.start(kv.run)
            locker = await aio_as_trio(asyncpg.connect)(pg_dsn, timeout=10)
            try:
                await aio_as_trio(locker.execute)(
                    f'BEGIN; LOCK TABLE "{schema}".kv IN ACCESS EXCLUSIVE MODE'
                )

                cancelled = trio.Event()

                async def cancel_the_waiting_put() -> None:
                    with trio.fail_after(10):
                        while not await aio_as_trio(locker.fetchval)(  # noqa: ASYNC110 (polls the server)
                            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                            " WHERE wait_event_type = 'Lock' AND query LIKE '%kv%'"
                            " AND pid <> pg_backend_pid()"
                        ):
                            await trio.sleep(0.02)
                    cancelled.set()

                nursery.start_soon(cancel_the_waiting_put)
                with pytest.raises(GB6Error) as err:
                    await kv.put(b"k", b"v")
                assert err.value.code == UNAVAILABLE, err.value.message
                # The put may hear of its cancel before the poll hears its answer: the locker
                # is closed only once the poll is done with it.
                with trio.fail_after(10):
                    await cancelled.wait()
            finally:
                await aio_as_trio(locker.close)()
            assert await kv.get(b"k") is None  # nothing written, and it serves on
            await kv.put(b"k", b"v")
            # A fault no retry gets past (here its table dropped) is not `unavailable`.
            admin = await aio_as_trio(asyncpg.connect)(pg_dsn, timeout=10)
            try:
                await aio_as_trio(admin.execute)(f'DROP TABLE "{schema}".kv')
            finally:
                await aio_as_trio(admin.close)()
            with pytest.raises(GB6Error) as err:
                await kv.get(b"k")
            assert err.value.code == INTERNAL, err.value.message
            nursery.cancel_scope.cancel()
    finally:
        await _drop_schema(pg_dsn, schema)
