"""GCRA (generic cell rate algorithm) limiter: one timestamp per key, O(1) per check.

`Gcra` is the in-process algorithm (the caller passes the clock). `RateLimiter` is the port an
edge checks through, so that limits can be shared across edges: `edge.bus.LocalRateLimiter`
wraps a `Gcra`, `edge.redis_bus.RedisRateLimiter` runs the same algorithm atomically in Redis.
Both keep these semantics: `rate` events per second sustained, `burst` at once, per key.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import trio

from node.errors import INVALID, GB6Error
from node.log import log


class RateLimiter(Protocol):
    """Where an edge asks whether `key` (a user, usually) may act now."""

    async def check(self, key: str) -> float:
        """0.0 if allowed (and counted), else the seconds to wait before a retry.

        Raises GB6Error (`invalid`) for a bad key, (`unavailable`) when the backing store is
        unreachable."""
        ...


class Gcra:
    """Allows `rate` events per second with bursts of `burst`, per key.

    Keys are kept in LRU order up to `max_keys`; a forgotten key starts with a full burst, which
    only ever errs towards allowing.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.interval = 1.0 / rate
        self.tolerance = self.interval * (burst - 1)
        self.max_keys = max_keys
        self._tat: OrderedDict[str, float] = OrderedDict()  # theoretical arrival time

    def check(self, key: str, now: float) -> float:
        """0.0 if allowed (and counted), else the seconds to wait before a retry."""
        tat = self._tat.get(key, now)
        tat = max(tat, now)
        if tat - now > self.tolerance + 1e-9:  # float sums must not refuse an exact fit
            return tat - now - self.tolerance
        self._tat[key] = tat + self.interval
        self._tat.move_to_end(key)
        if len(self._tat) > self.max_keys:
            self._tat.popitem(last=False)
        return 0.0


class GcraLimiter:
    """`RateLimiter` over an in-process `Gcra` on Trio's clock, for keys the caller makes (no
    check; `edge.bus.LocalRateLimiter` checks keys that come from clients)."""

    def __init__(self, gcra: Gcra) -> None:
        self.gcra = gcra

    async def check(self, key: str) -> float:
        return self.gcra.check(key, trio.current_time())


class FallbackLimiter:
    """`RateLimiter` that asks `shared` (Redis, say) and, when it cannot answer (`unavailable`,
    a refusal such as a Redis out of memory, or no answer within `wait_s`), `local`: the limit
    then holds per process rather than failing open or refusing everyone. Each fallback is
    logged as `event`. A bad key (`invalid`) is the caller's error, raised."""

    def __init__(self, shared: RateLimiter, local: RateLimiter, wait_s: float, event: str) -> None:
        self.shared = shared
        self.local = local
        self.wait_s = wait_s
        self.event = event

    async def check(self, key: str) -> float:
        try:
            with trio.fail_after(self.wait_s):
                return await self.shared.check(key)
        except (GB6Error, trio.TooSlowError) as exc:
            if isinstance(exc, GB6Error) and exc.code == INVALID:
                raise
            log(self.event, reason=repr(exc))
            return await self.local.check(key)
