"""The billing store's contract (origin/billing_store.py), run against every adapter.

SQLite on the test's own directory; PostgreSQL in a fresh schema per test, dropped afterwards.
Each test opens its own trio-asyncio loop, as the node's supervisor does at process start.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_asyncio
from services import require
from trio_asyncio import aio_as_trio

from node.errors import INVALID, NOT_FOUND, GB6Error
from origin.billing import Invoice, invoice, parse_pricing
from origin.billing_pg import PgBillingStore
from origin.billing_sqlite import SqliteBillingStore
from origin.billing_store import BillingStore, UsageDelta

OCT_5 = 1_791_201_600_000  # 2026-10-05T12:00:00Z
NOV_2 = 1_793_620_800_000  # 2026-11-02T12:00:00Z
PRICING = parse_pricing({"components": [{"model": "per_seat", "unit_price": 100}]})


@attrs.frozen
class Backend:
    name: str
    make: Callable[[], BillingStore]


@asynccontextmanager
async def serving(backend: Backend) -> AsyncIterator[BillingStore]:
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        store = backend.make()
        with trio.fail_after(20):
            await nursery.start(store.run)
        try:
            yield store
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", lambda: SqliteBillingStore(tmp_path / "billing.db"))
        return
    dsn = require("postgres")
    schema = f"gb6_billing_test_{uuid.uuid4().hex[:12]}"
    try:
        yield Backend("postgres", lambda: PgBillingStore(dsn, schema=schema))
    finally:
        trio.run(_drop_schema, dsn, schema)


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    async with trio_asyncio.open_loop():
        conn = await aio_as_trio(asyncpg.connect)(dsn, timeout=10)
        try:
            await aio_as_trio(conn.execute)(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await aio_as_trio(conn.close)()


def delta(inst: str, sends: Mapping[str, int], month: str = "2026-10") -> UsageDelta:
    """`sends` (user → messages) on 2026-10-05 (or the 5th of `month`)."""
    day = f"{month}-05"
    total = sum(sends.values())
    counts = {(inst, day, "messages"): total, (inst, month, "messages"): total}
    seats = frozenset((inst, p, u) for u in sends for p in (day, month))
    return UsageDelta(counts, seats)


def maker(inst: str, month: str) -> Callable[[Mapping[str, int]], Invoice]:
    return lambda usage: invoice(inst, month, PRICING, usage)


async def test_apply_moves_offset_and_usage_together(backend: Backend) -> None:
    async with serving(backend) as store:
        assert await store.offset("meter") is None
        assert await store.apply("meter", None, "10", delta("ins_a", {"u1": 3, "u2": 1}))
        # A replay of the same batch (its offset is no longer the stored one) changes nothing.
        assert not await store.apply("meter", None, "10", delta("ins_a", {"u1": 3, "u2": 1}))
        assert not await store.apply("meter", "7", "12", delta("ins_a", {"u1": 3}))
        assert await store.offset("meter") == "10"
        assert await store.apply("meter", "10", "15", delta("ins_a", {"u1": 2, "u3": 1}))
        assert await store.offset("meter") == "15"
        assert await store.offset("other") is None  # offsets are per consumer
        month = await store.usage("ins_a", "2026-10")
        # 4 + 3 messages; seats: u1, u2, u3 once each, whichever batches they were in
        assert month == {"messages": 7, "seats": 3}
        assert await store.usage("ins_a", "2026-10-05") == {"messages": 7, "seats": 3}
        assert await store.usage("ins_a", "2026-10-06") == {}
        assert await store.usage("ins_b", "2026-10") == {}
    async with serving(backend) as store:  # durable: reopened, all still there
        assert await store.offset("meter") == "15"
        assert await store.usage("ins_a", "2026-10") == {"messages": 7, "seats": 3}


async def test_records_count_once_per_key(backend: Backend) -> None:
    async with serving(backend) as store:
        assert await store.record("ins_a", "stored_bytes", 1000, "file_1", OCT_5)
        assert not await store.record("ins_a", "stored_bytes", 1000, "file_1", OCT_5)
        assert not await store.record("ins_a", "stored_bytes", 5, "file_1", NOV_2)  # same key
        assert await store.record("ins_a", "stored_bytes", 500, "file_2", OCT_5)
        assert await store.record("ins_b", "stored_bytes", 7, "file_1", OCT_5)  # keys per instance
        assert await store.record("ins_a", "recording_minutes", 30, "rec_1", OCT_5)
        assert await store.usage("ins_a", "2026-10") == {
            "stored_bytes": 1500,
            "recording_minutes": 30,
        }
        assert await store.usage("ins_a", "2026-10-05") == {
            "stored_bytes": 1500,
            "recording_minutes": 30,
        }
        assert await store.usage("ins_b", "2026-10") == {"stored_bytes": 7}
        for bad in (
            ("ins_a", "messages", 1, "k"),  # the log's metrics are not recorded by hand
            ("ins_a", "stored_bytes", -1, "k"),
            ("ins_a", "stored_bytes", 1, ""),
            ("ins_a", "stored_bytes", 1, "k" * 201),
            ("", "stored_bytes", 1, "k"),
        ):
            with pytest.raises(GB6Error) as err:
                await store.record(*bad, OCT_5)
            assert err.value.code == INVALID
        for ts in (-1, 10**20, "2026-10-05"):
            with pytest.raises(GB6Error) as err:
                await store.record("ins_a", "stored_bytes", 1, "k", ts)  # type: ignore[arg-type]
            assert err.value.code == INVALID
        assert await store.record("ins_a", "stored_bytes", 1, "k", OCT_5)  # "k" was never used


async def test_close_issues_one_numbered_immutable_invoice(backend: Backend) -> None:
    async with serving(backend) as store:
        await store.apply("meter", None, "1", delta("ins_a", {"u1": 1, "u2": 1, "u3": 1}))
        await store.apply("meter", "1", "2", delta("ins_b", {"u9": 1}))
        first = await store.close("ins_a", "2026-10", maker("ins_a", "2026-10"), NOV_2)
        # 3 seats x 100 = 300
        assert (first.number, first.total, first.currency) == (1, 300, "EUR")
        assert first.document["lines"][0]["quantity"] == 3
        # Closing again gives the same invoice, even with other prices now.
        again = await store.close(
            "ins_a", "2026-10", lambda u: invoice("ins_a", "2026-10", parse_pricing(None), u), 9
        )
        assert again == first and again.to_json() == first.to_json()
        other = await store.close("ins_b", "2026-10", maker("ins_b", "2026-10"), NOV_2)
        assert (other.number, other.total) == (2, 100)
        assert await store.invoice("ins_a", "2026-10") == first
        assert await store.invoice("ins_a", "2026-09") is None
        nov = await store.close("ins_a", "2026-11", maker("ins_a", "2026-11"), NOV_2)
        assert (nov.number, nov.total) == (3, 0)
        assert [i.period for i in await store.invoices("ins_a")] == ["2026-10", "2026-11"]
        assert [i.period for i in await store.invoices("ins_a", after="2026-10")] == ["2026-11"]
        assert [i.period for i in await store.invoices("ins_a", limit=1)] == ["2026-10"]
        assert [i.number for i in await store.invoices("ins_b")] == [2]
        with pytest.raises(GB6Error) as err:
            await store.invoices("ins_a", limit=0)
        assert err.value.code == INVALID
    async with serving(backend) as store:
        assert await store.invoice("ins_a", "2026-10") == first
        assert first.to_json()["closed_at"] == "2026-11-02T12:00:00.000Z"


async def test_late_usage_of_a_closed_month_goes_to_the_next_open_month(backend: Backend) -> None:
    async with serving(backend) as store:
        await store.apply("meter", None, "1", delta("ins_a", {"u1": 2}))
        closed = await store.close("ins_a", "2026-10", maker("ins_a", "2026-10"), NOV_2)
        # October's events read after October was closed, and a late October record:
        await store.apply("meter", "1", "2", delta("ins_a", {"u1": 1, "u2": 4}))
        await store.record("ins_a", "webhook_calls", 3, "hook_1", OCT_5)
        assert await store.usage("ins_a", "2026-10") == {"messages": 2, "seats": 1}
        assert await store.usage("ins_a", "2026-11") == {
            "messages": 5,
            "seats": 2,
            "webhook_calls": 3,
        }
        # The day still says when it happened.
        assert (await store.usage("ins_a", "2026-10-05"))["messages"] == 7
        assert await store.invoice("ins_a", "2026-10") == closed
        # Another instance's October is still open.
        await store.apply("meter", "2", "3", delta("ins_b", {"u9": 1}))
        assert await store.usage("ins_b", "2026-10") == {"messages": 1, "seats": 1}


async def test_a_failing_invoice_maker_stores_nothing(backend: Backend) -> None:
    async with serving(backend) as store:

        def broken(usage: Mapping[str, int]) -> Invoice:
            raise GB6Error(NOT_FOUND, "no such plan")

        with pytest.raises(GB6Error) as err:
            await store.close("ins_a", "2026-10", broken, NOV_2)
        assert err.value.code == NOT_FOUND
        assert await store.invoice("ins_a", "2026-10") is None
        inv = await store.close("ins_a", "2026-10", maker("ins_a", "2026-10"), NOV_2)
        assert inv.number == 1


async def test_bad_periods_are_invalid(backend: Backend) -> None:
    async with serving(backend) as store:
        for call in (
            lambda: store.usage("ins_a", "2026-13"),
            lambda: store.usage("ins_a", "October"),
            lambda: store.invoice("ins_a", "2026-10-01"),  # invoices bill months
            lambda: store.close("ins_a", "2026", maker("ins_a", "2026"), NOV_2),
            lambda: store.invoices("ins_a", after="yesterday"),
        ):
            with pytest.raises(GB6Error) as err:
                await call()
            assert err.value.code == INVALID


async def test_pg_usage_added_while_its_month_closes_is_in_the_invoice() -> None:
    """PostgreSQL only (SQLite's writes take the database in turn): usage added while the
    month closes (here its insert is held by a table lock) is either counted by the invoice
    or moved to the next month, never left in a month whose invoice lacks it."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    dsn = require("postgres")
    schema = f"gb6_billing_test_{uuid.uuid4().hex[:12]}"
    try:
        async with serving(Backend("postgres", lambda: PgBillingStore(dsn, schema=schema))) as s:
            await s.apply("meter", None, "1", delta("ins_a", {"u1": 2}))
            lock = await aio_as_trio(asyncpg.connect)(
                dsn, timeout=10, server_settings={"search_path": schema}
            )
            watcher = await aio_as_trio(asyncpg.connect)(dsn, timeout=10)
            held = "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
            closed: list[Any] = []

            async def close() -> None:
                closed.append(await s.close("ins_a", "2026-10", maker("ins_a", "2026-10"), NOV_2))

            try:
                await aio_as_trio(lock.execute)("BEGIN; LOCK TABLE billing_usage IN SHARE MODE")
                async with trio.open_nursery() as nursery:
                    # A new seat in October: the invoice's total says whether it counted it.
                    nursery.start_soon(s.apply, "meter", "1", "2", delta("ins_a", {"u2": 1}))
                    with trio.fail_after(10):
                        while not await aio_as_trio(watcher.fetchval)(held, lock.get_server_pid()):  # noqa: ASYNC110
                            await trio.sleep(0.02)
                    nursery.start_soon(close)
                    await trio.sleep(0.5)  # the close goes as far as it may meanwhile
                    await aio_as_trio(lock.execute)("ROLLBACK")
            finally:
                for conn in (lock, watcher):
                    await aio_as_trio(conn.close)()
            october = await s.usage("ins_a", "2026-10")
            assert closed[0].total == maker("ins_a", "2026-10")(october).total
            assert await s.usage("ins_a", "2026-10-05") == {"messages": 3, "seats": 2}
    finally:
        await _drop_schema(dsn, schema)
