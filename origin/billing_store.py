"""The billing store port: usage aggregates, consumer offsets, usage records and invoices.

Adapters: `origin.billing_sqlite.SqliteBillingStore` (embedded: `billing.db` in the data
directory) and `origin.billing_pg.PgBillingStore` (PostgreSQL, `billing_*` tables in the
store's schema). `tests/test_billing_store_contract.py` runs one suite against both.

The contract, for every adapter:
- A component: `await nursery.start(store.run)`; it serves once its schema exists. Every call
  is durable on return (one transaction each) and is not undone by cancelling the caller.
- Usage is kept per (instance, period, metric): periods are UTC days and months, both kept,
  each counted once. `seats` is not added up: it is the number of distinct users recorded as
  active in that period.
- `apply(consumer, expected, resume, delta)` is how a consumer of the log adds what it read:
  in ONE transaction it checks that the consumer's stored offset is still `expected`, adds
  `delta` and stores `resume`. If the offset moved on (a replay of a batch already applied, or
  a second consumer under the same name), nothing changes and it returns False. So usage and
  offset never disagree, and replaying the log never counts an event twice.
- `record(instance, metric, quantity, key, ts)` adds non-log usage once per (instance, key):
  a repeat of the key changes nothing and returns False.
- A closed month is frozen: usage that arrives for it later (the meter lagged, a late record)
  is added to the instance's next month that is not closed, so an invoice never changes once
  issued and nothing is lost. Days are never shifted (they report when usage happened).
- `close(instance, month, make, closed_at)` issues the month's invoice once: in one
  transaction it reads the month's usage, calls `make(usage)` (pure) and stores the result
  under the next invoice number (1, 2, ... per store). Closing again returns the stored invoice.
- Storage failures are `unavailable`; bad arguments are `invalid` before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import trio

from node.errors import invalid
from origin.billing import RECORDED_METRICS, Invoice, check_month, check_period, next_month

MAX_KEY_CHARS: Final = 200
MAX_RECORD_QUANTITY: Final = 10**15
MAX_LIST: Final = 1_000


@attrs.frozen
class UsageDelta:
    """What one batch of the log adds: counts per (instance, period, metric), and the users
    active per (instance, period). Periods are days and months."""

    counts: Mapping[tuple[str, str, str], int] = attrs.field(factory=dict)
    seats: frozenset[tuple[str, str, str]] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.counts) or bool(self.seats)


@attrs.frozen
class StoredInvoice:
    """An issued invoice: immutable, numbered, with the document `billing.Invoice.to_json`
    gave when it was issued."""

    number: int
    instance: str
    period: str
    currency: str
    total: int
    closed_at: int  # ms
    document: Mapping[str, Any] = attrs.field(eq=False)

    def to_json(self) -> dict[str, Any]:
        from origin.records import iso

        return {**self.document, "number": self.number, "closed_at": iso(self.closed_at)}


InvoiceMaker = Callable[[Mapping[str, int]], Invoice]


def shift_closed(delta: UsageDelta, closed: Callable[[str, str], bool]) -> UsageDelta:
    """`delta` with every month that `closed(instance, month)` moved to the next open month."""

    def move(instance: str, period: str) -> str:
        if len(period) != 7:
            return period  # a day
        while closed(instance, period):
            period = next_month(period)
        return period

    counts: dict[tuple[str, str, str], int] = {}
    for (inst, period, metric), n in delta.counts.items():
        key = (inst, move(inst, period), metric)
        counts[key] = counts.get(key, 0) + n
    seats = frozenset((inst, move(inst, period), user) for inst, period, user in delta.seats)
    return UsageDelta(counts, seats)


def check_record(instance: str, metric: str, quantity: int, key: str) -> None:
    """`invalid` unless a usage record's fields are acceptable."""
    if not isinstance(instance, str) or not 1 <= len(instance) <= MAX_KEY_CHARS:
        raise invalid("a usage record needs an instance id")
    if metric not in RECORDED_METRICS:
        raise invalid(f"usage records are for {', '.join(RECORDED_METRICS)}, not {metric!r}")
    if type(quantity) is not int or not 0 <= quantity <= MAX_RECORD_QUANTITY:
        raise invalid(f"a usage record's quantity is an integer in 0..{MAX_RECORD_QUANTITY}")
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_CHARS:
        raise invalid(f"a usage record's idempotency key is 1..{MAX_KEY_CHARS} characters")


MAX_TS: Final = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


def check_ts(ts: int) -> int:
    """`invalid` unless `ts` is a time in ms between 1970 and 9999."""
    if type(ts) is not int or not 0 <= ts <= MAX_TS:
        raise invalid(f"a usage record's ts is ms since 1970 (0..{MAX_TS}), not {ts!r}")
    return ts


def check_list(limit: int, after: str | None) -> None:
    if type(limit) is not int or not 1 <= limit <= MAX_LIST:
        raise invalid(f"limit must be 1..{MAX_LIST}")
    if after is not None:
        check_month(after)


class BillingStore(Protocol):
    """Usage, offsets, usage records and invoices (see the module docstring)."""

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    async def offset(self, consumer: str) -> str | None:
        """The consumer's stored offset (opaque text), None before its first batch."""
        ...

    async def apply(
        self, consumer: str, expected: str | None, resume: str, delta: UsageDelta
    ) -> bool:
        """Add `delta` and move the offset from `expected` to `resume`, in one transaction;
        False (nothing changed) if the stored offset is not `expected`."""
        ...

    async def record(self, instance: str, metric: str, quantity: int, key: str, ts: int) -> bool:
        """Add `quantity` of `metric` at `ts` (ms) once per (instance, key); True if added."""
        ...

    async def usage(self, instance: str, period: str) -> dict[str, int]:
        """metric → quantity for a day or month (metrics without usage are absent)."""
        ...

    async def close(
        self, instance: str, month: str, make: InvoiceMaker, closed_at: int
    ) -> StoredInvoice:
        """Issue the month's invoice, or return the one issued before."""
        ...

    async def invoice(self, instance: str, month: str) -> StoredInvoice | None: ...

    async def invoices(
        self, instance: str, *, after: str | None = None, limit: int = 100
    ) -> list[StoredInvoice]:
        """The instance's invoices, oldest month first, months after `after` only."""
        ...


def usage_key_check(instance: str, period: str) -> None:
    if not isinstance(instance, str) or not 1 <= len(instance) <= MAX_KEY_CHARS:
        raise invalid("an instance id is 1..200 characters")
    check_period(period)


if TYPE_CHECKING:

    def _fits() -> None:
        from origin.billing_pg import PgBillingStore
        from origin.billing_sqlite import SqliteBillingStore

        def sqlite(store: SqliteBillingStore) -> BillingStore:
            return store

        def pg(store: PgBillingStore) -> BillingStore:
            return store
