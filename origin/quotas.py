"""Quotas: counters per instance and resource, checked before anything is created or used.

The origin shard owns one `Quotas` (`shard.quotas`); every site where a resource is created or
used asks it first. Three ways to count (origin/plans.py `KINDS`):

- held (users, bots, rooms, stored bytes): `reserve(instance, resource, n)` before the write,
  then `commit()` once it is durable, or `cancel()` if it failed (a `Reservation` used as a
  context manager does either). A reservation counts against the limit at once, so two
  concurrent creators never both fit under the last slot. `remove` when one is deleted.
- concurrent (connections, media participants): `acquire(instance, resource)` when a session
  starts, `release(instance, resource)` exactly once when it ends.
- periodic (messages per UTC day, recording minutes per UTC month, webhook calls per UTC day):
  `charge(instance, resource, n)` counts usage that already happened and was allowed, or
  `take` / `settle` around a write whose outcome comes later (the shard's sends: `take` is a
  dict lookup, a comparison and an addition, nothing allocated). Counters restart at 0 when the
  period turns.

Rules:
- A refusal is `GB6Error("quota_exceeded")` naming the resource, the limit and the plan, raised
  before anything changed (the counter included). A limit of None is unlimited; 0 allows none.
- Limits are the instance's plan's, unless an operator set an override for that instance and
  resource (`set_override`; the shard persists overrides). A plan the config no longer has
  counts as `free`.
- Monitoring: a `QuotaEvent` goes to every listener when committed usage reaches 80 % and 100 %
  of a limit: once per crossing (per period for periodic resources), not per request. Held and
  concurrent levels re-arm once usage falls 10 points below them (no flapping at the edge).
  Counts loaded at start (`set_used`) are taken as already announced. Listeners are called
  synchronously on the shard's task and must not raise or block.
- Pending reservations count against the limit but are not "used" (usage and events show
  committed amounts only).

Pure: no I/O and no Trio; the clock is injected (ms since the epoch).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final

import attrs

from node.errors import QUOTA_EXCEEDED, GB6Error
from origin.plans import KINDS, RESOURCES, Plan, check_quota

DAY_MS: Final = 86_400_000
LEVELS: Final = (80, 100)  # percent of a limit at which a QuotaEvent is sent
_REARM: Final = 10  # a held/concurrent level re-arms this many points below it
_NEVER: Final = 1 << 63


@attrs.frozen
class QuotaEvent:
    """Committed usage of `resource` reached `level` % of `limit` (`period`: its day or month,
    None for held and concurrent resources)."""

    instance: str
    resource: str
    level: int
    used: int
    limit: int
    period: str | None
    ts: int

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Usage:
    resource: str
    used: int
    limit: int | None
    period: str | None  # "2026-11-26" (day) or "2026-11" (month); None: not periodic

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


QuotaListener = Callable[[QuotaEvent], None]


@attrs.define(slots=True, eq=False)
class _Counter:
    kind: str  # held | concurrent | day | month
    limit: int | None
    used: int = 0
    pending: int = 0
    period: int = 0  # day or month number, for periodic kinds
    announced: int = 0  # the highest level announced (0, 80, 100)
    next_alert: int = _NEVER  # `used` at which a higher level is reached


@attrs.define(eq=False)
class Reservation:
    """`amount` of a resource held for a write in flight. `commit()` once it is durable,
    `cancel()` otherwise; as a context manager: commit on a normal exit, cancel on an exception
    (cancellation included). Either happens once; later calls do nothing."""

    quotas: Quotas
    instance: str
    resource: str
    amount: int
    done: bool = False

    def commit(self) -> None:
        if not self.done:
            self.done = True
            self.quotas.settle(self.instance, self.resource, self.amount, keep=True)

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.quotas.settle(self.instance, self.resource, self.amount, keep=False)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.cancel()


def _month(ms: int) -> int:
    d = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return d.year * 12 + d.month - 1


def period_number(kind: str, ms: int) -> int:
    return ms // DAY_MS if kind == "day" else _month(ms)


def period_label(kind: str, number: int) -> str | None:
    if kind == "day":
        return datetime.date.fromordinal(datetime.date(1970, 1, 1).toordinal() + number).isoformat()
    if kind == "month":
        return f"{number // 12:04d}-{number % 12 + 1:02d}"
    return None


def day_start_ms(ms: int) -> int:
    """The first ms of the UTC day of `ms` (the store counts today's messages from there)."""
    return ms // DAY_MS * DAY_MS


class Quotas:
    """Counters and checks for every instance of one shard (see the module doc)."""

    def __init__(
        self,
        plans: Mapping[str, Plan],
        plan_of: Callable[[str], str | None],
        clock: Callable[[], int],
    ) -> None:
        self.plans = plans
        self._plan_of = plan_of  # instance → its plan's name (None: unknown instance)
        self._clock = clock
        self._accounts: dict[str, dict[str, _Counter]] = {}
        self.overrides: dict[str, dict[str, int | None]] = {}
        self.listeners: list[QuotaListener] = []

    # --- limits --------------------------------------------------------------------------

    def plan(self, instance: str) -> Plan:
        name = self._plan_of(instance)
        plan = self.plans.get(name) if name is not None else None
        return plan if plan is not None else self.plans["free"]

    def limit(self, instance: str, resource: str) -> int | None:
        mine = self.overrides.get(instance)
        if mine is not None and resource in mine:
            return mine[resource]
        return self.plan(instance).quotas[resource]

    def limits(self, instance: str) -> dict[str, int | None]:
        return {r: self.limit(instance, r) for r in RESOURCES}

    def check_override(self, resource: str, value: Any) -> int | None:
        return check_quota(resource, value, "quota override")

    def set_override(self, instance: str, resource: str, value: int | None) -> None:
        """This instance's limit for `resource` is `value` (None: unlimited) whatever its plan."""
        self.check_override(resource, value)
        self.overrides.setdefault(instance, {})[resource] = value
        self.refresh(instance)

    def clear_override(self, instance: str, resource: str) -> None:
        """Back to the plan's limit."""
        mine = self.overrides.get(instance)
        if mine is not None:
            mine.pop(resource, None)
            if not mine:
                del self.overrides[instance]
        self.refresh(instance)

    def refresh(self, instance: str) -> None:
        """The instance's plan or overrides changed: take the new limits. Levels now reached
        are taken as announced; levels no longer reached re-arm."""
        acct = self._accounts.get(instance)
        if acct is None:
            return
        for resource, c in acct.items():
            c.limit = self.limit(instance, resource)
            c.announced = _level(c.used, c.limit)
            c.next_alert = _next_alert(c)

    # --- counting ------------------------------------------------------------------------

    def _counter(self, instance: str, resource: str) -> _Counter:
        acct = self._accounts.get(instance)
        if acct is None:
            now = self._clock()
            acct = self._accounts[instance] = {}
            for r in RESOURCES:
                kind = KINDS[r]
                c = _Counter(kind, self.limit(instance, r))
                if kind in ("day", "month"):
                    c.period = period_number(kind, now)
                c.next_alert = _next_alert(c)
                acct[r] = c
        return acct[resource]

    def _roll(self, c: _Counter) -> None:
        """A new day or month: the periodic counter starts again (pending writes stay)."""
        if c.kind == "day":
            p = self._clock() // DAY_MS
        elif c.kind == "month":
            p = _month(self._clock())
        else:
            return
        if p != c.period:
            c.period, c.used, c.announced = p, 0, 0
            c.next_alert = _next_alert(c)

    def _refuse(self, instance: str, resource: str, c: _Counter) -> GB6Error:
        per = {"day": " per day", "month": " per month"}.get(c.kind, "")
        at_once = " at once" if c.kind == "concurrent" else ""
        return GB6Error(
            QUOTA_EXCEEDED,
            f"quota exceeded: {resource} is limited to {c.limit}{per}{at_once}"
            f" for this instance (plan {self.plan(instance).name})",
        )

    def check(self, instance: str, resource: str, n: int = 1) -> None:
        """Raise quota_exceeded if `n` more would not fit now; changes nothing."""
        c = self._counter(instance, resource)
        self._roll(c)
        if c.limit is not None and c.used + c.pending + n > c.limit:
            raise self._refuse(instance, resource, c)

    def take(self, instance: str, resource: str, n: int = 1) -> None:
        """Hold `n` (counted against the limit, not yet used) or raise quota_exceeded; every
        take is followed by exactly one `settle` of the same amount."""
        c = self._counter(instance, resource)
        if c.kind == "day" or c.kind == "month":
            self._roll(c)
        if c.limit is not None and c.used + c.pending + n > c.limit:
            raise self._refuse(instance, resource, c)
        c.pending += n

    def settle(self, instance: str, resource: str, n: int, *, keep: bool) -> None:
        """End a `take`: `keep` adds it to what is used, otherwise it is given back."""
        c = self._counter(instance, resource)
        c.pending -= n
        if keep:
            if c.kind == "day" or c.kind == "month":
                self._roll(c)
            c.used += n
            if c.used >= c.next_alert:
                self._announce(instance, resource, c)

    def count(self, instance: str, resource: str, n: int = 1) -> None:
        """Add `n` already used, whatever the limit: writes that happened (a batch the log
        committed after its ops were answered `unavailable`)."""
        self._counter(instance, resource).pending += n
        self.settle(instance, resource, n, keep=True)

    def reserve(self, instance: str, resource: str, n: int = 1) -> Reservation:
        """`take` wrapped in a Reservation (see its doc)."""
        self.take(instance, resource, n)
        return Reservation(self, instance, resource, n)

    def acquire(self, instance: str, resource: str, n: int = 1) -> None:
        """A concurrent resource (connections, media_participants) starts being used; pair
        with exactly one `release`."""
        self.take(instance, resource, n)
        self.settle(instance, resource, n, keep=True)

    def release(self, instance: str, resource: str, n: int = 1) -> None:
        """A concurrent resource stops being used."""
        self.remove(instance, resource, n)

    def charge(self, instance: str, resource: str, n: int = 1) -> None:
        """Count `n` of a periodic resource (recording_minutes, webhook_calls) if it fits the
        period's limit, else raise quota_exceeded (nothing counted)."""
        if n < 0:
            raise ValueError("a charge is not negative")
        self.take(instance, resource, n)
        self.settle(instance, resource, n, keep=True)

    def remove(self, instance: str, resource: str, n: int = 1) -> None:
        """`n` of a held resource were deleted (or a concurrent one released)."""
        c = self._counter(instance, resource)
        c.used = max(0, c.used - n)
        if c.announced and c.limit is not None and c.used * 100 < (c.announced - _REARM) * c.limit:
            c.announced = _level(c.used, c.limit)
            c.next_alert = _next_alert(c)

    def set_used(
        self, instance: str, resource: str, used: int, period_ms: int | None = None
    ) -> None:
        """At start: what the instance already holds (or used in the period of `period_ms`,
        ignored if that period is over). Levels it reaches count as announced."""
        c = self._counter(instance, resource)
        if c.kind in ("day", "month"):
            self._roll(c)
            if period_ms is not None and period_number(c.kind, period_ms) != c.period:
                return
        c.used = used
        c.announced = _level(used, c.limit)
        c.next_alert = _next_alert(c)

    # --- reading -------------------------------------------------------------------------

    def used(self, instance: str, resource: str) -> int:
        c = self._counter(instance, resource)
        self._roll(c)
        return c.used

    def usage_of(self, instance: str, resource: str) -> Usage:
        """One resource's committed usage, limit and current period for `instance`."""
        c = self._counter(instance, resource)
        self._roll(c)
        return Usage(resource, c.used, c.limit, period_label(c.kind, c.period))

    def usage(self, instance: str) -> list[Usage]:
        """Every resource's committed usage and limit for `instance`, in RESOURCES order."""
        return [self.usage_of(instance, r) for r in RESOURCES]

    def forget(self, instance: str) -> None:
        """Drop an instance's counters (it left this shard)."""
        self._accounts.pop(instance, None)
        self.overrides.pop(instance, None)

    # --- monitoring ----------------------------------------------------------------------

    def _announce(self, instance: str, resource: str, c: _Counter) -> None:
        assert c.limit is not None
        reached = _level(c.used, c.limit)
        now = self._clock()
        label = period_label(c.kind, c.period)
        for level in LEVELS:
            if c.announced < level <= reached:
                event = QuotaEvent(instance, resource, level, c.used, c.limit, label, now)
                for listener in self.listeners:
                    listener(event)
        c.announced = max(c.announced, reached)
        c.next_alert = _next_alert(c)


def _level(used: int, limit: int | None) -> int:
    if limit is None:
        return 0
    if used >= limit:
        return 100
    if used * 100 >= 80 * limit:
        return 80
    return 0


def _next_alert(c: _Counter) -> int:
    if c.limit is None or c.announced >= 100:
        return _NEVER
    if c.announced >= 80:
        return c.limit
    return max(1, (80 * c.limit + 99) // 100) if c.limit > 0 else _NEVER
