"""Billing models (origin/billing.py): an invoice for each model and their combination, against
amounts worked out by hand in the comments; half-even rounding once per line; bad tables.

Pricing tables are written as an operator writes them, in TOML (`[plans.NAME.pricing]`).
"""

from __future__ import annotations

import tomllib
from decimal import Decimal

import pytest

from node.errors import INVALID, GB6Error
from origin.billing import (
    Pricing,
    check_period,
    invoice,
    month_end_ms,
    next_month,
    parse_pricing,
    round_half_even,
)


def pricing(text: str) -> Pricing:
    return parse_pricing(tomllib.loads(text), "test")


def test_flat_fee_whatever_the_usage() -> None:
    p = pricing('currency = "EUR"\n[[components]]\nmodel = "flat"\nname = "Base"\namount = 4900')
    for usage in ({}, {"messages": 10**9, "seats": 500}):
        inv = invoice("ins_a", "2026-10", p, usage)
        # 49.00 EUR = 4900 cents, one line, whatever was used.
        assert inv.total == 4900
        assert [(line.name, line.amount) for line in inv.lines] == [("Base", 4900)]
    assert inv.currency == "EUR"
    assert inv.to_json()["lines"][0]["metric"] is None


def test_per_seat_with_a_minimum() -> None:
    p = pricing('[[components]]\nmodel = "per_seat"\nunit_price = 799\nminimum = 3')
    # 5 active seats x 7.99 = 39.95 → 3995
    inv = invoice("ins_a", "2026-10", p, {"seats": 5})
    assert inv.total == 3995 and inv.lines[0].quantity == 5
    # 2 active seats, but at least 3 are billed: 3 x 799 = 2397
    inv = invoice("ins_a", "2026-10", p, {"seats": 2})
    assert inv.total == 2397 and inv.lines[0].quantity == 3


TIERS = """
[[components]]
model = "{model}"
metric = "messages"
tiers = [
  {{up_to = 1000, unit_price = 0}},
  {{up_to = 10000, unit_price = "0.05"}},
  {{unit_price = "0.02", flat = 100}},
]
"""


def test_graduated_prices_each_tier_its_part() -> None:
    p = pricing(TIERS.format(model="graduated"))
    inv = invoice("ins_a", "2026-10", p, {"messages": 12_345})
    # 1..1000:       1000 x 0    =   0
    # 1001..10000:   9000 x 0.05 = 450
    # 10001..12345:  2345 x 0.02 =  46.9, + flat 100 = 146.9
    # line: 596.9 → 597 (rounded once, for the line)
    steps = [(s.first, s.last, s.units, s.subtotal) for s in inv.lines[0].steps]
    assert steps == [
        (1, 1000, 1000, Decimal(0)),
        (1001, 10000, 9000, Decimal("450")),
        (10001, 12345, 2345, Decimal("146.9")),
    ]
    assert inv.lines[0].exact == Decimal("596.9")
    assert inv.total == 597
    # Within the first tier only: 800 x 0 = 0; exactly at a bound: 10000 → 0 + 450 = 450.
    assert invoice("ins_a", "2026-10", p, {"messages": 800}).total == 0
    assert invoice("ins_a", "2026-10", p, {"messages": 10_000}).total == 450
    # No usage: no step, no flat fee of a tier that was not reached.
    assert invoice("ins_a", "2026-10", p, {}).total == 0


def test_volume_prices_every_unit_at_the_tier_reached() -> None:
    p = pricing(TIERS.format(model="volume"))
    # 12345 falls in the last tier: 12345 x 0.02 = 246.9, + flat 100 = 346.9 → 347
    assert invoice("ins_a", "2026-10", p, {"messages": 12_345}).total == 347
    # 5000 falls in the second: 5000 x 0.05 = 250
    assert invoice("ins_a", "2026-10", p, {"messages": 5_000}).total == 250
    # 1000 is still the first (up_to includes its bound): 1000 x 0 = 0
    assert invoice("ins_a", "2026-10", p, {"messages": 1_000}).total == 0
    # 1001 is the second: 1001 x 0.05 = 50.05 → 50
    assert invoice("ins_a", "2026-10", p, {"messages": 1_001}).total == 50


def test_a_combination_of_components() -> None:
    p = pricing(
        """
        currency = "USD"
        [[components]]
        model = "flat"
        name = "Platform"
        amount = 2900
        [[components]]
        model = "per_seat"
        unit_price = 500
        [[components]]
        model = "graduated"
        metric = "messages"
        tiers = [{up_to = 10000, unit_price = 0}, {unit_price = "0.1"}]
        [[components]]
        model = "volume"
        metric = "stored_bytes"
        per = 1000000000
        tiers = [{up_to = 10000000000, unit_price = 25}, {unit_price = 20}]
        """
    )
    usage = {"seats": 12, "messages": 25_005, "stored_bytes": 12_500_000_000}
    inv = invoice("ins_a", "2026-10", p, usage)
    # Platform: 2900
    # Seats: 12 x 500 = 6000
    # Messages: 10000 x 0 + 15005 x 0.1 = 1500.5 → 1500 (half to even)
    # Storage: 12.5 GB, past 10 GB, so every GB at 20: 12.5 x 20 = 250
    # Total: 2900 + 6000 + 1500 + 250 = 10650
    assert [line.amount for line in inv.lines] == [2900, 6000, 1500, 250]
    assert inv.total == 10650
    assert inv.currency == "USD"
    doc = inv.to_json()
    assert doc["total"] == 10650 and doc["lines"][2]["exact"] == "1500.5"


@pytest.mark.parametrize(
    ("exact", "rounded"),
    [("0.5", 0), ("1.5", 2), ("2.5", 2), ("3.5", 4), ("-2.5", -2), ("2.5000001", 3), ("2.49", 2)],
)
def test_round_half_even(exact: str, rounded: int) -> None:
    assert round_half_even(Decimal(exact)) == rounded


def test_half_a_minor_unit_goes_to_the_even_neighbour() -> None:
    p = pricing('[[components]]\nmodel = "per_seat"\nunit_price = "0.5"')
    # 5 x 0.5 = 2.5 → 2 (down to even); 7 x 0.5 = 3.5 → 4 (up to even)
    assert invoice("ins_a", "2026-10", p, {"seats": 5}).total == 2
    assert invoice("ins_a", "2026-10", p, {"seats": 7}).total == 4


def test_rounded_once_per_line_never_per_step() -> None:
    p = pricing(
        '[[components]]\nmodel = "graduated"\nmetric = "messages"\n'
        'tiers = [{up_to = 1, unit_price = "2.5"}, {unit_price = "0.5"}]'
    )
    # Steps 1 x 2.5 = 2.5 and 1 x 0.5 = 0.5. Rounded per step (half even) they would give
    # 2 + 0 = 2; the line is 3.0, rounded once: 3.
    inv = invoice("ins_a", "2026-10", p, {"messages": 2})
    assert inv.total == 3
    # One division per line: 1 message at 1 per 3 units would be 0.333...; 3 of them are 1.
    p = pricing(
        '[[components]]\nmodel = "graduated"\nmetric = "messages"\nper = 3\n'
        'tiers = [{up_to = 1, unit_price = "1"}, {up_to = 2, unit_price = "1"},'
        ' {unit_price = "1.5"}]'
    )
    # (1 x 1 + 1 x 1 + 1 x 1.5) / 3 = 3.5 / 3 = 1.1666... → 1; with 4 units: 5 / 3 → 2
    assert invoice("ins_a", "2026-10", p, {"messages": 3}).total == 1
    assert invoice("ins_a", "2026-10", p, {"messages": 4}).total == 2
    # 2 units per 4: (1 + 1) / 4 = 0.5 → 0, exactly on the half, seen exactly
    p = pricing(
        '[[components]]\nmodel = "volume"\nmetric = "messages"\nper = 4\n'
        'tiers = [{unit_price = "1"}]'
    )
    assert invoice("ins_a", "2026-10", p, {"messages": 2}).lines[0].exact == Decimal("0.5")
    assert invoice("ins_a", "2026-10", p, {"messages": 2}).total == 0
    assert invoice("ins_a", "2026-10", p, {"messages": 6}).total == 2  # 1.5 → 2


def test_no_pricing_is_free() -> None:
    inv = invoice("ins_a", "2026-10", parse_pricing(None), {"messages": 5})
    assert inv.total == 0 and inv.lines == ()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[[components]]\nmodel = "flat"\namount = 9.99', "floats are inexact"),
        ('[[components]]\nmodel = "barter"', "model must be one of"),
        ('[[components]]\nmodel = "flat"\namount = -1', "amount must be"),
        ('[[components]]\nmodel = "flat"\namount = "1e3"', "amount must be"),
        ('[[components]]\nmodel = "flat"', "amount must be"),
        ('currency = "euro"', "currency must be"),
        ('colour = "red"', "unknown key 'colour'"),
        ('[[components]]\nmodel = "flat"\namount = 1\nmetric = "x"', "unknown key 'metric'"),
        ('[[components]]\nmodel = "per_seat"\nmetric = "moods"\nunit_price = 1', "metric must"),
        (
            '[[components]]\nmodel = "volume"\nmetric = "messages"\n'
            "tiers = [{up_to = 10, unit_price = 1}]",
            "last tier must have no up_to",
        ),
        (
            '[[components]]\nmodel = "graduated"\nmetric = "messages"\n'
            "tiers = [{up_to = 10, unit_price = 1}, {up_to = 5, unit_price = 1},"
            " {unit_price = 1}]",
            "must increase",
        ),
        (
            '[[components]]\nmodel = "graduated"\nmetric = "messages"\n'
            "tiers = [{unit_price = 1}, {unit_price = 1}]",
            "only the last tier",
        ),
        ('[[components]]\nmodel = "graduated"\nmetric = "messages"\ntiers = []', "tiers must"),
        (
            '[[components]]\nmodel = "volume"\nmetric = "messages"\nper = 0\n'
            "tiers = [{unit_price = 1}]",
            "per must be",
        ),
    ],
)
def test_bad_tables_are_refused_with_a_clear_error(text: str, says: str) -> None:
    with pytest.raises(GB6Error) as err:
        pricing(text)
    assert err.value.code == INVALID
    assert says in err.value.message
    assert err.value.message.startswith("test")  # names where the table is


def test_periods() -> None:
    assert check_period("2026-02") == "2026-02"
    assert check_period("2024-02-29") == "2024-02-29"
    for bad in ("2026-13", "2025-02-29", "26-01", "2026-1", "", None, 202601):
        with pytest.raises(GB6Error):
            check_period(bad)
    assert next_month("2026-12") == "2027-01"
    assert next_month("2026-01") == "2026-02"
    assert month_end_ms("2026-12") == 1_798_761_600_000  # 2027-01-01T00:00:00Z
