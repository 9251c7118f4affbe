"""Rate limits of the admin HTTP API: per credential, and per client address for failed
authentication (GCRA, node/ratelimit.py).

Rules (`admin_routes._serve` applies them, in this order):
1. An address whose failed authentications went over `limits.admin_auth_failures_rate` /
   `admin_auth_failures_burst` (node/auth_failures.py) is refused (429 `rate_limited`,
   `Retry-After`) before its credential is even looked at, until the wait is over: a guesser
   gets no answer to a guess.
   Every 401 counts as a failure; the failure that goes over the budget is itself answered 429.
   Loopback clients are exempt unless `limits.admin_auth_loopback` (PROTOCOL.md: limits per IP
   address do not apply to loopback clients unless configured). An IPv6 client counts by its
   /64.
2. Every authenticated request counts against its credential's actor (the operator, an org
   member whatever token it uses, an API key): `limits.admin_rate` per second sustained,
   `admin_burst` at once; past it, 429 `rate_limited` with `Retry-After`. Loopback included.
3. Refusals are audited only in aggregate (origin/audit_log.py `admin_refused`).

Sharing: with `[cluster] redis_url`, the counts live in Redis (edge/redis_bus.py's GCRA script),
so every origin of the cluster spends from one budget per credential and per address; the keys
are prefixed by a digest of the admin token, so clusters sharing a Redis do not share budgets.
The "address is blocked" verdict of rule 1 is remembered per process (bounded), so another
origin evaluates at most one more failure before it learns the shared count is over. When Redis
cannot answer, each process falls back to its own in-process limiter (logged): the limit holds
per origin rather than failing open or locking the operator out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from node.auth_failures import AuthFailures, positive_limit, rate_limited
from node.ids import secret_digest
from node.ratelimit import FallbackLimiter, Gcra, GcraLimiter, RateLimiter

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from edge.redis_bus import RedisRateLimiter
    from node.config import Config

__all__ = ["AdminLimiter", "admin_limiter", "rate_limited"]


class _RedisGcra:
    """`RateLimiter` in Redis for a cluster's origins (behind a `FallbackLimiter`). The admin API
    has no nursery of its own to run `RedisRateLimiter`'s batching worker in, and its rate is
    low: each check is a round trip of its own (`check_unbatched`)."""

    def __init__(self, url: str, prefix: str, rate: float, burst: int) -> None:
        self.url = url
        self.prefix = prefix
        self.rate = rate
        self.burst = burst
        self._client: aioredis.Redis | None = None
        self._limiter: RedisRateLimiter | None = None

    async def check(self, key: str) -> float:
        from edge.redis_bus import RedisRateLimiter

        if self._limiter is None:
            import redis.asyncio as aioredis

            # No I/O here: connections are made by the first command, on the asyncio loop.
            self._client = aioredis.Redis.from_url(
                self.url, socket_connect_timeout=2, socket_timeout=2
            )
            self._limiter = RedisRateLimiter(
                self._client, prefix=self.prefix, rate=self.rate, burst=self.burst
            )
        return await self._limiter.check_unbatched(key)

    async def aclose(self) -> None:
        if self._client is not None:
            from trio_asyncio import aio_as_trio

            client, self._client, self._limiter = self._client, None, None
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await aio_as_trio(client.aclose)()


class AdminLimiter:
    """The admin API's limits (see the module doc); one per admin blueprint."""

    def __init__(
        self,
        per_credential: RateLimiter,
        per_address: RateLimiter,
        *,
        loopback: bool = False,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.per_credential = per_credential
        self.failures = AuthFailures(per_address, loopback=loopback, clock=clock)
        self.redis: list[_RedisGcra] = []  # closed by `aclose`

    async def admit(self, actor_key: str) -> float:
        """Count one request of the credential `actor_key`; 0.0 if allowed, else the wait."""
        return await self.per_credential.check("cred:" + actor_key)

    async def aclose(self) -> None:
        for limiter in self.redis:
            await limiter.aclose()


def admin_limiter(config: Config, admin_token: str) -> AdminLimiter:
    """The limiter the config asks for: in process, or shared through `[cluster] redis_url`.
    Raises `invalid` for a bad `[limits] admin_*` value."""
    limits = config.limits
    rate = positive_limit(limits, "admin_rate", float)
    burst = positive_limit(limits, "admin_burst", int)
    frate = positive_limit(limits, "admin_auth_failures_rate", float)
    fburst = positive_limit(limits, "admin_auth_failures_burst", int)
    cred: RateLimiter = GcraLimiter(Gcra(rate, burst))
    addr: RateLimiter = GcraLimiter(Gcra(frate, fburst))
    redis: list[_RedisGcra] = []
    if config.redis_url:
        prefix = f"gb6:admin:{secret_digest(admin_token)[:16]}:"
        redis = [
            _RedisGcra(config.redis_url, prefix, rate, burst),
            _RedisGcra(config.redis_url, prefix, frate, fburst),
        ]
        cred = FallbackLimiter(redis[0], cred, 3.0, "admin_rate_limit_local")
        addr = FallbackLimiter(redis[1], addr, 3.0, "admin_rate_limit_local")
    limiter = AdminLimiter(cred, addr, loopback=bool(limits.admin_auth_loopback))
    limiter.redis = redis
    return limiter
