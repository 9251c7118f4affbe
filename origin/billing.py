"""Billing models and invoices: a pure core (no I/O, no clock).

Rules:
- Money is an integer of minor units (cents) with a currency (ISO 4217 letters). Prices may be
  fractions of a minor unit (`"0.05"` per message); they are `Decimal`s, written in TOML as
  integers or strings, never floats (a float such as 0.1 is not the price the operator wrote).
- An invoice line is computed exactly in `Decimal` and rounded ONCE, half to even, to whole
  minor units; tier steps are never rounded on their own. The total is the sum of the lines.
- A plan's price is a list of components, each billing one metric with one model:
  - `flat`: `amount` per period, whatever the usage;
  - `per_seat`: `unit_price` per active seat (distinct users who sent in the period), at
    least `minimum` seats;
  - `graduated`: each tier prices the units that fall inside it (1-100 at one price, 101-1000
    at the next, ...);
  - `volume`: the tier the whole quantity falls in prices every unit.
  A tier is `{up_to = N, unit_price = P, flat = F}`; `up_to` counts the metric's units (bytes,
  messages); the last tier has no `up_to`; `flat` (optional) is added once when the tier is
  used. `per` (optional, default 1) says how many units one `unit_price` buys (e.g. `per =
  1000000000` prices stored bytes per GB).
- Periods are UTC: a month `YYYY-MM` (what invoices bill) or a day `YYYY-MM-DD` (usage only).

The TOML table (what `[plans.NAME.pricing]` holds):

    currency = "EUR"
    [[components]]
    model = "flat"
    amount = 4900
    [[components]]
    model = "graduated"
    metric = "messages"
    tiers = [{up_to = 1000, unit_price = 0}, {unit_price = "0.05"}]
"""

from __future__ import annotations

import datetime
import decimal
import itertools
import re
from collections.abc import Mapping
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Final

import attrs

from node.errors import invalid

# What the meter counts from the log, and what other parts record (`record_usage`).
LOG_METRICS: Final = ("messages", "edits", "deletes", "reactions", "seats")
RECORDED_METRICS: Final = ("stored_bytes", "recording_minutes", "webhook_calls", "media_minutes")
METRICS: Final = LOG_METRICS + RECORDED_METRICS
MODELS: Final = ("flat", "per_seat", "graduated", "volume")

MAX_COMPONENTS: Final = 32
MAX_TIERS: Final = 32
MAX_MONEY: Final = Decimal(10) ** 15  # minor units: any price or amount above is a typo
MAX_QUANTITY: Final = 10**18
_PRICE_DIGITS: Final = 9  # fractional digits a unit price may have
_CURRENCY = re.compile(r"[A-Z]{3}")
_MONTH = re.compile(r"(\d{4})-(\d{2})")
_DAY = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_PRICE = re.compile(r"\d{1,16}(\.\d{1,9})?")  # 9: _PRICE_DIGITS
# Wide enough that no product or sum of valid prices and quantities is ever rounded; the one
# division of a line (by `per`) is exact whenever its result has a finite decimal expansion,
# so a result that lies exactly on a half minor unit is seen exactly there.
_EXACT = decimal.Context(prec=80, rounding=ROUND_HALF_EVEN)

# --- periods ------------------------------------------------------------------------------


def month_of(ts_ms: int) -> str:
    """The UTC month (`YYYY-MM`) of a timestamp in ms."""
    return _utc(ts_ms).strftime("%Y-%m")


def day_of(ts_ms: int) -> str:
    """The UTC day (`YYYY-MM-DD`) of a timestamp in ms."""
    return _utc(ts_ms).strftime("%Y-%m-%d")


def _utc(ts_ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts_ms / 1000, tz=datetime.UTC)


def check_period(period: object) -> str:
    """`period` if it is a valid month or day, else `invalid`."""
    if isinstance(period, str):
        m = _MONTH.fullmatch(period) or _DAY.fullmatch(period)
        if m is not None:
            try:
                datetime.date(int(m[1]), int(m[2]), int(m[3]) if m.lastindex == 3 else 1)
                return period
            except ValueError:
                pass
    raise invalid(f"a period is a UTC month YYYY-MM or day YYYY-MM-DD, not {period!r}")


def check_month(period: object) -> str:
    month = check_period(period)
    if len(month) != 7:
        raise invalid(f"invoices bill a month (YYYY-MM), not {period!r}")
    return month


def next_month(month: str) -> str:
    year, mon = int(month[:4]), int(month[5:7])
    return f"{year + mon // 12:04d}-{mon % 12 + 1:02d}"


def month_end_ms(month: str) -> int:
    """The first ms after `month` (UTC)."""
    nxt = next_month(month)
    start = datetime.datetime(int(nxt[:4]), int(nxt[5:7]), 1, tzinfo=datetime.UTC)
    return int(start.timestamp()) * 1000


# --- pricing ------------------------------------------------------------------------------


@attrs.frozen
class Tier:
    up_to: int | None  # units up to and including this many; None: no bound (the last tier)
    unit_price: Decimal  # minor units per `per` units
    flat: Decimal = Decimal(0)  # minor units, once if the tier is used


@attrs.frozen
class Component:
    name: str
    model: str
    metric: str  # "" for a flat fee
    amount: Decimal = Decimal(0)  # flat
    unit_price: Decimal = Decimal(0)  # per_seat
    minimum: int = 0  # per_seat
    tiers: tuple[Tier, ...] = ()  # graduated, volume
    per: int = 1


@attrs.frozen
class Pricing:
    currency: str
    components: tuple[Component, ...]


FREE: Final = Pricing("EUR", ())  # a plan without a pricing table costs nothing


def parse_pricing(table: Mapping[str, Any] | None, where: str = "pricing") -> Pricing:
    """A plan's pricing from its TOML table; `invalid` naming the bad field otherwise."""
    if table is None:
        return FREE
    if not isinstance(table, Mapping):
        raise invalid(f"{where} must be a table")
    _only(table, ("currency", "components"), where)
    currency = table.get("currency", "EUR")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise invalid(
            f"{where}.currency must be three capital letters (ISO 4217), not {currency!r}"
        )
    raw = table.get("components", [])
    if not isinstance(raw, list):
        raise invalid(f"{where}.components must be an array of tables")
    if len(raw) > MAX_COMPONENTS:
        raise invalid(f"{where} has at most {MAX_COMPONENTS} components, not {len(raw)}")
    comps = tuple(_component(c, f"{where}.components[{i}]") for i, c in enumerate(raw))
    return Pricing(currency, comps)


def _only(table: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    extra = sorted(set(table) - set(keys))
    if extra:
        raise invalid(f"{where}: unknown key {extra[0]!r} (known: {', '.join(keys)})")


def _component(raw: object, where: str) -> Component:
    if not isinstance(raw, Mapping):
        raise invalid(f"{where} must be a table")
    model = raw.get("model")
    if model not in MODELS:
        raise invalid(f"{where}.model must be one of {', '.join(MODELS)}, not {model!r}")
    name = raw.get("name", model)
    if not isinstance(name, str) or not 1 <= len(name) <= 200:
        raise invalid(f"{where}.name must be 1-200 characters")
    per = _count(raw.get("per", 1), f"{where}.per", low=1)
    if model == "flat":
        _only(raw, ("model", "name", "amount"), where)
        return Component(name, model, "", amount=_money(raw.get("amount"), f"{where}.amount"))
    metric = raw.get("metric", "seats" if model == "per_seat" else None)
    if metric not in METRICS:
        raise invalid(f"{where}.metric must be one of {', '.join(METRICS)}, not {metric!r}")
    assert isinstance(metric, str)
    if model == "per_seat":
        _only(raw, ("model", "name", "metric", "unit_price", "minimum"), where)
        price = _money(raw.get("unit_price"), f"{where}.unit_price")
        minimum = _count(raw.get("minimum", 0), f"{where}.minimum", low=0)
        return Component(name, model, metric, unit_price=price, minimum=minimum)
    _only(raw, ("model", "name", "metric", "tiers", "per"), where)
    tiers = raw.get("tiers")
    if not isinstance(tiers, list) or not 1 <= len(tiers) <= MAX_TIERS:
        raise invalid(f"{where}.tiers must be an array of 1-{MAX_TIERS} tables")
    parsed = tuple(_tier(t, f"{where}.tiers[{i}]") for i, t in enumerate(tiers))
    bounds = [t.up_to for t in parsed]
    if bounds[-1] is not None:
        raise invalid(f"{where}.tiers: the last tier must have no up_to (it prices the rest)")
    if any(b is None for b in bounds[:-1]):
        raise invalid(f"{where}.tiers: only the last tier may have no up_to")
    ups = [b for b in bounds if b is not None]
    if any(a >= b for a, b in itertools.pairwise(ups)):
        raise invalid(f"{where}.tiers: up_to must increase from tier to tier")
    return Component(name, model, metric, tiers=parsed, per=per)


def _tier(raw: object, where: str) -> Tier:
    if not isinstance(raw, Mapping):
        raise invalid(f"{where} must be a table")
    _only(raw, ("up_to", "unit_price", "flat"), where)
    up_to = raw.get("up_to")
    if up_to is not None:
        up_to = _count(up_to, f"{where}.up_to", low=1)
    price = _money(raw.get("unit_price"), f"{where}.unit_price")
    flat = _money(raw.get("flat", 0), f"{where}.flat")
    return Tier(up_to, price, flat)


def _count(value: object, where: str, *, low: int) -> int:
    if type(value) is not int or not low <= value <= MAX_QUANTITY:
        raise invalid(f"{where} must be an integer in {low}..{MAX_QUANTITY}, not {value!r}")
    return value


def _money(value: object, where: str) -> Decimal:
    """A non-negative amount of minor units: an integer or a decimal string."""
    if isinstance(value, float):
        raise invalid(f'{where}: write {value!r} as a string ("{value}"); floats are inexact')
    if type(value) is int or (isinstance(value, str) and _PRICE.fullmatch(value)):
        amount = Decimal(value)
    else:
        raise invalid(
            f"{where} must be minor units as an integer or a decimal string with at most"
            f" {_PRICE_DIGITS} fractional digits, not {value!r}"
        )
    if not 0 <= amount <= MAX_MONEY:
        raise invalid(f"{where} must be between 0 and {MAX_MONEY} minor units")
    return amount


# --- invoices -----------------------------------------------------------------------------


@attrs.frozen
class Step:
    """One tier's part of a line: `units` of the metric in `first..last` at `unit_price`."""

    first: int
    last: int
    units: int
    unit_price: Decimal
    flat: Decimal
    subtotal: Decimal  # never rounded to minor units (shown; the line sums its own way)

    def to_json(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "last": self.last,
            "units": self.units,
            "unit_price": str(self.unit_price),
            "flat": str(self.flat),
            "subtotal": str(self.subtotal),
        }


@attrs.frozen
class Line:
    name: str
    model: str
    metric: str
    quantity: int  # the metric's units in the period (seats billed, for per_seat)
    exact: Decimal  # before rounding
    amount: int  # minor units: `exact` rounded half to even
    steps: tuple[Step, ...] = ()
    per: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "metric": self.metric or None,
            "quantity": self.quantity,
            "per": self.per,
            "steps": [s.to_json() for s in self.steps],
            "exact": str(self.exact),
            "amount": self.amount,
        }


@attrs.frozen
class Invoice:
    instance: str
    period: str
    currency: str
    lines: tuple[Line, ...]
    total: int

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "period": self.period,
            "currency": self.currency,
            "lines": [line.to_json() for line in self.lines],
            "total": self.total,
        }


def round_half_even(amount: Decimal) -> int:
    """Whole minor units, ties to the even neighbour (2.5 → 2, 3.5 → 4)."""
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_EVEN, context=_EXACT))


def price_line(comp: Component, usage: Mapping[str, int]) -> Line:
    """One component's line for a period's usage (metric → quantity; absent is 0)."""
    with decimal.localcontext(_EXACT):
        if comp.model == "flat":
            return Line(comp.name, comp.model, "", 1, comp.amount, round_half_even(comp.amount))
        quantity = max(0, int(usage.get(comp.metric, 0)))
        if comp.model == "per_seat":
            seats = max(quantity, comp.minimum)
            exact = comp.unit_price * seats
            step = Step(1, seats, seats, comp.unit_price, Decimal(0), exact)
            return Line(
                comp.name, comp.model, comp.metric, seats, exact, round_half_even(exact), (step,)
            )
        steps = _graduated(comp, quantity) if comp.model == "graduated" else _volume(comp, quantity)
        # One division per line, not per step: see _EXACT.
        units = sum((s.unit_price * s.units for s in steps), Decimal(0))
        exact = units / comp.per + sum((s.flat for s in steps), Decimal(0))
        return Line(
            comp.name,
            comp.model,
            comp.metric,
            quantity,
            exact,
            round_half_even(exact),
            steps,
            comp.per,
        )


def _graduated(comp: Component, quantity: int) -> tuple[Step, ...]:
    steps = []
    below = 0  # units priced by earlier tiers
    for tier in comp.tiers:
        top = quantity if tier.up_to is None else min(quantity, tier.up_to)
        units = top - below
        if units <= 0:
            break
        subtotal = tier.unit_price * units / comp.per + tier.flat
        steps.append(Step(below + 1, top, units, tier.unit_price, tier.flat, subtotal))
        below = top
    return tuple(steps)


def _volume(comp: Component, quantity: int) -> tuple[Step, ...]:
    if quantity == 0:
        return ()
    tier = next(t for t in comp.tiers if t.up_to is None or quantity <= t.up_to)
    subtotal = tier.unit_price * quantity / comp.per + tier.flat
    return (Step(1, quantity, quantity, tier.unit_price, tier.flat, subtotal),)


def invoice(instance: str, period: str, pricing: Pricing, usage: Mapping[str, int]) -> Invoice:
    """The invoice of `usage` (metric → quantity for the period) under `pricing`."""
    lines = tuple(price_line(c, usage) for c in pricing.components)
    return Invoice(instance, period, pricing.currency, lines, sum(line.amount for line in lines))
