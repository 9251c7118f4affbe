"""Rate limits of the admin HTTP API: per credential, and per client address for failed
authentication (GCRA, node/ratelimit.py).

Rules (`admin_routes._serve` applies them, in this order):
1. An address whose failed authentications went over `limits.admin_auth_failures_rate` /
   `admin_auth_failures_burst` is refused (429 `rate_limited`, `Retry-After`) before its
   credential is even looked at, until the wait is over: a guesser gets no answer to a guess.
   Every 401 counts as a failure; the failure that goes over the budget is itself answered 429.
   Loopback clients are exempt unless `limits.admin_auth_loopback` (PROTOCOL.md: limits per IP
   address do not apply to loopback clients unless configured).
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

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from node.errors import RATE_LIMITED, UNAVAILABLE, GB6Error, invalid
from node.ids import secret_digest
from node.listen import is_loopback
from node.log import log
from node.ratelimit import Gcra, RateLimiter

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from edge.redis_bus import RedisRateLimiter
    from node.config import Config, Limits

__all__ = ["AdminLimiter", "admin_limiter", "rate_limited"]

_MAX_BLOCKED: Final = 100_000  # addresses remembered as blocked, LRU


def rate_limited(wait_s: float, what: str) -> GB6Error:
    """The 429 answer for a wait of `wait_s` seconds (`Retry-After` in whole seconds, >= 1)."""
    ms = max(1, math.ceil(wait_s * 1000))
    return GB6Error(RATE_LIMITED, f"too many {what}; retry in {ms} ms", retry_after_ms=ms)


class _LocalGcra:
    """`RateLimiter` over an in-process `Gcra` on Trio's clock (keys are ours: no check)."""

    def __init__(self, gcra: Gcra) -> None:
        self.gcra = gcra

    async def check(self, key: str) -> float:
        return self.gcra.check(key, trio.current_time())


class _RedisGcra:
    """`RateLimiter` in Redis for a cluster's origins; falls back to `local` when Redis does
    not answer. The admin API has no nursery of its own to run `RedisRateLimiter`'s batching
    worker in, and its rate is low: each check is a round trip of its own (`check_unbatched`)."""

    def __init__(self, url: str, prefix: str, rate: float, burst: int, local: RateLimiter) -> None:
        self.url = url
        self.prefix = prefix
        self.rate = rate
        self.burst = burst
        self.local = local
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
        try:
            with trio.fail_after(3):
                wait = await self._limiter.check_unbatched(key)
            return wait
        except (GB6Error, trio.TooSlowError) as exc:
            if isinstance(exc, GB6Error) and exc.code != UNAVAILABLE:
                raise
            log("admin_rate_limit_local", reason=repr(exc))
            return await self.local.check(key)

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
        self.per_address = per_address
        self.loopback = loopback
        self._clock = clock
        self._blocked: OrderedDict[str, float] = OrderedDict()  # address → blocked until

    def _counted(self, address: str) -> bool:
        if self.loopback:
            return True
        return not is_loopback(address)  # not an IP address (a Unix socket): counted

    def blocked(self, address: str) -> float:
        """Seconds this address must still wait after too many failed authentications (0.0:
        it may try). Counts nothing."""
        until = self._blocked.get(address)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._blocked[address]
            return 0.0
        return left

    async def failed(self, address: str) -> float:
        """Count a failed authentication from `address`; the wait if that went over budget
        (the address is then blocked for it), else 0.0."""
        if not self._counted(address):
            return 0.0
        wait = await self.per_address.check("fail:" + address)
        if wait > 0:
            self._blocked[address] = self._clock() + wait
            self._blocked.move_to_end(address)
            if len(self._blocked) > _MAX_BLOCKED:
                self._blocked.popitem(last=False)
        return wait

    async def admit(self, actor_key: str) -> float:
        """Count one request of the credential `actor_key`; 0.0 if allowed, else the wait."""
        return await self.per_credential.check("cred:" + actor_key)

    async def aclose(self) -> None:
        for limiter in (self.per_credential, self.per_address):
            if isinstance(limiter, _RedisGcra):
                await limiter.aclose()


def _number(limits: Limits, name: str, kind: type) -> Any:
    value: Any = getattr(limits, name)
    number = not isinstance(value, bool) and isinstance(value, (kind, int))
    if not number or value <= 0:
        raise invalid(f"config [limits] {name} must be a {kind.__name__} above 0")
    return kind(value)


def admin_limiter(config: Config, admin_token: str) -> AdminLimiter:
    """The limiter the config asks for: in process, or shared through `[cluster] redis_url`.
    Raises `invalid` for a bad `[limits] admin_*` value."""
    limits = config.limits
    rate, burst = _number(limits, "admin_rate", float), _number(limits, "admin_burst", int)
    frate = _number(limits, "admin_auth_failures_rate", float)
    fburst = _number(limits, "admin_auth_failures_burst", int)
    cred: RateLimiter = _LocalGcra(Gcra(rate, burst))
    addr: RateLimiter = _LocalGcra(Gcra(frate, fburst))
    if config.redis_url:
        prefix = f"gb6:admin:{secret_digest(admin_token)[:16]}:"
        cred = _RedisGcra(config.redis_url, prefix, rate, burst, cred)
        addr = _RedisGcra(config.redis_url, prefix, frate, fburst, addr)
    return AdminLimiter(cred, addr, loopback=bool(limits.admin_auth_loopback))
