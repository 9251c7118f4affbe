"""Usage and invoices of an origin shard's instances: the Python API the admin HTTP API calls.

`Billing` is a component (`await nursery.start(billing.run)`) that owns the billing store and
the meter. Its calls:

- `usage(instance, period)`: metric → quantity for a UTC day (`YYYY-MM-DD`) or month
  (`YYYY-MM`), counted up to now (it catches the meter up first).
- `preview(instance)`: the running month's invoice under the instance's current plan, as it
  would be if the month ended now; not stored, no number.
- `close(instance, month)`: issue the invoice of a month that has ended (`conflict` for the
  running or a future month, `invalid` for one that ended before the instance existed):
  numbered, stored, immutable. Closing again returns the same
  invoice. Usage that reaches a closed month later goes to the next open month (see
  origin/billing_store.py), so it is billed once, on the next invoice.
- `invoices(instance, after=None, limit=100)`, `invoice(instance, month)`: issued invoices.
- `record_usage(instance, metric, quantity, key, ts=None)`: usage that is not in the log
  (`stored_bytes`, `recording_minutes`, `webhook_calls`, `media_minutes`), once per key.

Prices come from the instance's plan (`[plans.NAME.pricing]`, origin/billing.py), looked up when
an invoice is made: a month is billed at the plan the instance has when it is closed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import trio

from node.config import Config
from node.errors import CONFLICT, GB6Error, invalid, not_found
from origin.billing import (
    FREE,
    Invoice,
    Pricing,
    check_month,
    check_period,
    invoice,
    month_end_ms,
    month_of,
    parse_pricing,
)
from origin.billing_store import BillingStore, StoredInvoice, check_record
from origin.metering import (
    EventSource,
    KafkaEventSource,
    Meter,
    PgEventSource,
    SqliteEventSource,
)
from origin.records import Instance
from origin.sqlite_store import now_ms

InstanceOf = Callable[[str], Instance | None]  # the shard's instance record; None: not here


def plan_pricing(config: Config, plan: str) -> Pricing:
    """The pricing of `plan` from the config's plans (`[plans.NAME.pricing]`); FREE if none."""
    plans: Mapping[str, Any] = getattr(config, "plans", None) or {}
    found = plans.get(plan)
    table = getattr(found, "pricing", None)
    return parse_pricing(table or None, f"plans.{plan}.pricing")


class Billing:
    """Usage, previews and invoices (see the module docstring). `clock` gives ms (tests move
    it to close a month)."""

    def __init__(
        self,
        store: BillingStore,
        source: EventSource,
        instance_of: InstanceOf,
        pricing_of: Callable[[str], Pricing],
        *,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.meter = Meter(store, source)
        self._instance_of = instance_of
        self.pricing_of = pricing_of  # plan → Pricing
        self.clock = clock

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store.run)
            await nursery.start(self.meter.run)
            task_status.started()

    def _instance(self, instance: str) -> Instance:
        found = self._instance_of(instance)
        if found is None:
            raise not_found(f"instance {instance} not found")
        return found

    async def usage(self, instance: str, period: str, *, metered: bool = True) -> dict[str, int]:
        """metric → quantity; `metered=False` skips catching the meter up first (enough for
        recorded metrics, and cheaper: on Kafka a catch-up asks the broker for its end)."""
        check_period(period)
        if metered:
            await self.meter.catch_up()
        return await self.store.usage(instance, period)

    async def preview(self, instance: str) -> Invoice:
        pricing = self.pricing_of(self._instance(instance).plan)
        month = month_of(self.clock())
        return invoice(instance, month, pricing, await self.usage(instance, month))

    async def close(self, instance: str, month: str) -> StoredInvoice:
        check_month(month)
        now = self.clock()
        if now < month_end_ms(month):
            raise GB6Error(CONFLICT, f"{month} has not ended yet: only past months are closed")
        inst = self._instance(instance)
        if month_end_ms(month) <= inst.created_at:
            raise invalid(f"instance {instance} did not exist in {month}")
        pricing = self.pricing_of(inst.plan)
        await self.meter.catch_up()  # what the log holds for the month is on its invoice

        def make(usage: Mapping[str, int]) -> Invoice:
            return invoice(instance, month, pricing, usage)

        return await self.store.close(instance, month, make, now)

    async def invoice(self, instance: str, month: str) -> StoredInvoice:
        found = await self.store.invoice(instance, check_month(month))
        if found is None:
            raise not_found(f"no invoice for {month}")
        return found

    async def invoices(
        self, instance: str, *, after: str | None = None, limit: int = 100
    ) -> list[StoredInvoice]:
        return await self.store.invoices(instance, after=after, limit=limit)

    async def record_usage(
        self, instance: str, metric: str, quantity: int, key: str, ts: int | None = None
    ) -> bool:
        """Add usage that the log does not carry, once per (instance, key); True if added."""
        check_record(instance, metric, quantity, key)
        return await self.store.record(
            instance, metric, quantity, key, self.clock() if ts is None else ts
        )


def open_billing(
    config: Config,
    instance_of: InstanceOf,
    *,
    clock: Callable[[], int] = now_ms,
    usage_from: Callable[[], Mapping[int, int] | None] = lambda: None,
) -> Billing:
    """The billing of an origin shard on `config`'s backend: `billing.db` beside `gb6.db` for
    the embedded store; `billing_*` tables in the store's schema for postgres and kafka. The
    meter reads gb6.db's events, PostgreSQL's events, or the Kafka usage records (and the log
    of record before `usage_from`, which the kafka store says once it serves).
    Raises `invalid` if a plan's pricing table is bad."""
    plans: Mapping[str, Any] = getattr(config, "plans", None) or {}
    for plan in plans:  # a bad price list stops the start, with the table's name
        plan_pricing(config, plan)
    store: BillingStore
    source: EventSource
    if config.store_backend == "sqlite":
        from origin.billing_sqlite import SqliteBillingStore

        store = SqliteBillingStore(config.data_dir / "billing.db")
        source = SqliteEventSource(config.data_dir / "gb6.db")
    else:
        from origin.billing_pg import PgBillingStore

        store = PgBillingStore(config.pg_dsn, schema=config.pg_schema)
        if config.store_backend == "kafka":  # the log of record itself, from our own offsets
            from origin.kafka_store import default_topic

            topic = config.kafka_topic or default_topic(config.shard)
            source = KafkaEventSource(config.kafka_bootstrap, topic, usage_from)
        else:
            source = PgEventSource(config.pg_dsn, config.pg_schema)
    return Billing(store, source, instance_of, lambda plan: plan_pricing(config, plan), clock=clock)


__all__ = ["FREE", "Billing", "open_billing", "plan_pricing"]
