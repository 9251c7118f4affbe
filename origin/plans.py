"""Plans: what an instance may use (quotas), how fast its users may ask (rate), what it costs.

A plan is read from the config's `[plans.NAME]` tables (node/config.py calls `parse_plans`):

    [plans.team]
    rate = 50.0            # requests per second per user on the client socket (GCRA) ...
    burst = 100            # ... and at once; no `rate`: no rate limit
    [plans.team.quotas]    # a resource left out is unlimited
    users = 500
    messages = 200000      # per UTC day
    [plans.team.pricing]   # kept raw: origin/billing.py parses it
    ...

Rules:
- `free` and `unlimited` always exist (PROTOCOL.md). `unlimited` has no quotas and no rate limit
  and cannot be given any. `free` has the built-in quotas and rate below unless `[plans.free]`
  sets them (each key it sets replaces the built-in one; the others stay).
- Every resource of `RESOURCES` has one quota per plan: a non-negative integer, or None for
  unlimited. Periodic ones count per period (`PERIODS`: the UTC day or month); the others are
  amounts held now (users, rooms, stored bytes) or at once (connections, media participants).
- The older `[rate_plans.NAME]` tables (rate, burst) still set a plan's rate: there is one place
  a rate lives, the plan (`Config.rate_plans` is derived from `Config.plans`).

Pure: no I/O, no Trio.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from node.errors import invalid

# Every quota kind, in the order they are shown.
RESOURCES: Final = (
    "users",  # instance users other than bots
    "bots",  # instance users with role `bot`
    "rooms",
    "connections",  # client WebSocket sessions at once
    "media_participants",  # media sessions at once
    "messages",  # `send`s per UTC day (edits, deletes and reactions are not counted)
    "stored_bytes",  # files (and later recordings) kept
    "recording_minutes",  # per UTC month
    "webhook_calls",  # per UTC day
)
# How each resource is counted: "held" (created and kept), "concurrent" (acquired and released)
# or the period a counter runs for ("day", "month"; it starts at 0 each period).
KINDS: Final[Mapping[str, str]] = {
    "users": "held",
    "bots": "held",
    "rooms": "held",
    "stored_bytes": "held",
    "connections": "concurrent",
    "media_participants": "concurrent",
    "messages": "day",
    "recording_minutes": "month",
    "webhook_calls": "day",
}
PERIODS: Final = frozenset({"day", "month"})
BUILTIN: Final = ("free", "unlimited")

_FREE_QUOTAS: Final[Mapping[str, int | None]] = {
    "users": 100,
    "bots": 10,
    "rooms": 1_000,
    "connections": 200,
    "media_participants": 20,
    "messages": 50_000,
    "stored_bytes": 1 << 30,
    "recording_minutes": 60,
    "webhook_calls": 10_000,
}
_MAX_QUOTA: Final = 1 << 62  # anything above is a typo, not a limit
_PLAN_NAME_CHARS: Final = 64


@attrs.frozen
class Plan:
    """One plan. `quotas` has every resource of RESOURCES (None: unlimited)."""

    name: str
    quotas: Mapping[str, int | None]
    rate: float | None = None  # requests per second per user; None: no rate limit
    burst: int | None = None
    pricing: Mapping[str, Any] = attrs.field(factory=dict)  # `[plans.NAME.pricing]`, raw

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "quotas": {r: self.quotas[r] for r in RESOURCES},
            "rate": None if self.rate is None else {"rate": self.rate, "burst": self.burst},
        }


def unlimited_quotas() -> dict[str, int | None]:
    return dict.fromkeys(RESOURCES, None)


def builtin_plans() -> dict[str, Plan]:
    return {
        "free": Plan("free", dict(_FREE_QUOTAS), rate=50.0, burst=100),
        "unlimited": Plan("unlimited", unlimited_quotas()),
    }


def check_quota(resource: str, value: Any, where: str) -> int | None:
    """A quota value as configured or overridden: a non-negative int, or None (unlimited)."""
    if resource not in KINDS:
        raise invalid(f"{where}: unknown resource {resource!r}; resources: {', '.join(RESOURCES)}")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_QUOTA:
        raise invalid(f"{where}: {resource} must be an integer from 0 to {_MAX_QUOTA}")
    return value


def parse_plans(raw: Mapping[str, Any], rate_plans: Mapping[str, Any]) -> dict[str, Plan]:
    """Plans from the TOML tables `[plans.*]` and the older `[rate_plans.*]`, on top of the
    built-in ones. Raises `invalid` naming the bad key."""
    plans = builtin_plans()
    for name, table in raw.items():
        if not isinstance(table, Mapping):
            raise invalid(f"config [plans.{name}] must be a table")
        plans[name] = _parse_plan(name, table, plans.get(name))
    for name, table in rate_plans.items():
        rate, burst = _parse_rate(f"[rate_plans.{name}]", table)
        base = plans.get(name) or Plan(_plan_name(name), unlimited_quotas())
        if name == "unlimited":
            raise invalid("config [rate_plans.unlimited]: plan unlimited has no rate limit")
        plans[name] = attrs.evolve(base, rate=rate, burst=burst)
    return plans


def _plan_name(name: str) -> str:
    if (
        not name
        or len(name) > _PLAN_NAME_CHARS
        or not name.replace("_", "").replace("-", "").isalnum()
    ):
        raise invalid(f"config: plan name {name!r} must be 1-64 letters, digits, '-' or '_'")
    return name


def _parse_plan(name: str, table: Mapping[str, Any], base: Plan | None) -> Plan:
    where = f"config [plans.{_plan_name(name)}]"
    unknown = set(table) - {"rate", "burst", "quotas", "pricing"}
    if unknown:
        raise invalid(f"{where}: unknown keys {sorted(unknown)} (rate, burst, quotas, pricing)")
    if name == "unlimited" and (set(table) & {"rate", "burst", "quotas"}):
        raise invalid(f"{where}: plan unlimited has no quotas and no rate limit")
    quotas = dict(base.quotas) if base is not None else unlimited_quotas()
    raw_quotas = table.get("quotas", {})
    if not isinstance(raw_quotas, Mapping):
        raise invalid(f"{where}: quotas must be a table")
    for resource, value in raw_quotas.items():
        quotas[resource] = check_quota(resource, value, f"{where}.quotas")
    rate, burst = (base.rate, base.burst) if base is not None else (None, None)
    if "rate" in table or "burst" in table:
        rate, burst = _parse_rate(where, table)
    pricing = table.get("pricing", {})
    if not isinstance(pricing, Mapping):
        raise invalid(f"{where}: pricing must be a table")
    return Plan(name, quotas, rate, burst, dict(pricing))


def _parse_rate(where: str, table: Any) -> tuple[float, int]:
    try:
        rate, burst = float(table["rate"]), int(table["burst"])
    except (KeyError, TypeError, ValueError) as exc:
        raise invalid(f"config {where}: needs rate (a number) and burst (an integer)") from exc
    if not (rate > 0 and burst >= 1):
        raise invalid(f"config {where}: rate must be > 0 and burst >= 1")
    return rate, burst
