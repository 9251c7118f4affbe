"""Failed authentications per client address: past a budget the address is blocked for a while,
and its next attempts are refused before their credentials are even looked at (a guesser gets
no answer to a guess). Used by the admin API (origin/admin_limits.py) and the WebSocket hello
(edge/gateway.py).

Rules:
- Every failed authentication counts against the address (GCRA, node/ratelimit.py); the one
  that goes over the budget blocks the address for the wait the limiter gave.
- At most `max_pending` authentications of one address are under way at once (`attempt`), 4
  once it failed in the last minute: each passes `blocked` before the failures ahead of it are
  counted, so a burst of guesses at once would otherwise all be looked at.
- For user tokens (`authenticate`) only tokens nobody issued count (`UNKNOWN_TOKEN`): an
  expired or revoked token, or one of a suspended instance, is no guess.
- An IPv6 client counts by its /64 (one host usually holds the whole /64, and could rotate
  through it). Clients behind one NAT or proxy share its address, and its budget.
- Loopback clients are exempt unless configured (PROTOCOL.md: limits per IP address do not
  apply to loopback clients unless configured). Anything that is not an IP address (a Unix
  socket's peer, "unknown") is counted.
- The limiter may be shared (Redis, between processes); the "is blocked" verdict is remembered
  per process (bounded, LRU), so another process evaluates at most one more failure before it
  learns the shared count is over.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeVar

import trio

from node.errors import RATE_LIMITED, UNAUTHORIZED, UNKNOWN_TOKEN, GB6Error, invalid
from node.listen import is_loopback
from node.log import log
from node.ratelimit import FallbackLimiter, Gcra, GcraLimiter, RateLimiter

__all__ = [
    "AuthFailures",
    "UserAuth",
    "positive_limit",
    "rate_limited",
    "user_auth",
    "user_auth_failures",
]

T = TypeVar("T")
# (secret, client address) → the user; for HTTP handlers (files, WHIP/WHEP) to share the limits.
UserAuth = Callable[[str, str], Awaitable[Any]]

_MAX_BLOCKED: Final = 100_000  # addresses remembered as blocked (and as failing), LRU
_FAILING_S: Final = 60.0  # an address that failed this recently ...
_FAILING_PENDING: Final = 4  # ... has at most this many authentications under way


def rate_limited(wait_s: float, what: str) -> GB6Error:
    """The `rate_limited` answer for a wait of `wait_s` seconds (`retry_after_ms` >= 1)."""
    ms = max(1, math.ceil(wait_s * 1000))
    return GB6Error(RATE_LIMITED, f"too many {what}; retry in {ms} ms", retry_after_ms=ms)


def address_key(address: str) -> str:
    """What an address counts as: itself, or for IPv6 its /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


def positive_limit(limits: Any, name: str, kind: type) -> Any:
    """`limits.name` as a `kind` above 0; `invalid` naming the setting otherwise."""
    value: Any = getattr(limits, name)
    number = not isinstance(value, bool) and isinstance(value, (kind, int))
    if not number or value <= 0:
        raise invalid(f"config [limits] {name} must be a {kind.__name__} above 0")
    return kind(value)


class AuthFailures:
    """Counts failed authentications per address (see the module doc)."""

    def __init__(
        self,
        per_address: RateLimiter,
        *,
        loopback: bool = False,
        max_pending: int = 64,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.per_address = per_address
        self.loopback = loopback
        self.max_pending = max_pending
        self._clock = clock
        self._blocked: OrderedDict[str, float] = OrderedDict()  # address → blocked until
        self._pending: dict[str, int] = {}  # address → authentications under way
        self._failing: OrderedDict[str, float] = OrderedDict()  # address → failed until

    def _counted(self, address: str) -> bool:
        return self.loopback or not is_loopback(address)

    async def authenticate(self, address: str, check: Callable[[], Awaitable[T]], what: str) -> T:
        """`await check()` for a client at `address`, within these rules: `rate_limited`
        (naming `what`) if the address is blocked or has too many under way, and a failure
        (`unauthorized`) counted. The failure's own answer stays `unauthorized`."""
        wait = self.blocked(address)
        if wait > 0:  # the credential is not even looked at
            raise rate_limited(wait, f"{what} from this address")
        with self.attempt(address):  # counted before the slot is free again
            try:
                return await check()
            except GB6Error as exc:
                if exc.code == UNAUTHORIZED and exc.message == UNKNOWN_TOKEN:
                    try:
                        await self.failed(address)
                    except GB6Error as uncounted:  # the limiter's store refused: logged
                        log("auth_failure_uncounted", address=address, error=uncounted.message)
                raise

    @contextmanager
    def attempt(self, address: str) -> Iterator[None]:
        """One authentication from `address` under way; `rate_limited` past `max_pending`."""
        if not self._counted(address):
            yield
            return
        key = address_key(address)
        pending = self._pending.get(key, 0)
        failing = self._failing.get(key)
        if failing is not None and failing <= self._clock():
            del self._failing[key]
            failing = None
        if pending >= (self.max_pending if failing is None else _FAILING_PENDING):
            raise rate_limited(1.0, "authentications at once from this address")
        self._pending[key] = pending + 1
        try:
            yield
        finally:
            left = self._pending[key] - 1
            if left:
                self._pending[key] = left
            else:
                del self._pending[key]

    def blocked(self, address: str) -> float:
        """Seconds this address must still wait (0.0: it may try). Counts nothing."""
        address = address_key(address)
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
        address = address_key(address)
        self._failing[address] = self._clock() + _FAILING_S
        self._failing.move_to_end(address)
        if len(self._failing) > _MAX_BLOCKED:
            self._failing.popitem(last=False)
        wait = await self.per_address.check("fail:" + address)
        if wait > 0:
            self._blocked[address] = self._clock() + wait
            self._blocked.move_to_end(address)
            if len(self._blocked) > _MAX_BLOCKED:
                self._blocked.popitem(last=False)
        return wait


def user_auth_failures(
    limits: Any, shared: RateLimiter | None = None, shared_wait_s: float = 0.5
) -> AuthFailures:
    """The counting of failed user-token authentications `limits` asks for (`[limits]
    ws_auth_failures_*`, `auth_pending_per_ip`, `per_ip_loopback`), in process or in `shared`
    (Redis) with the process's own as fallback. Raises `invalid` for a bad setting."""
    local: RateLimiter = GcraLimiter(
        Gcra(
            positive_limit(limits, "ws_auth_failures_rate", float),
            positive_limit(limits, "ws_auth_failures_burst", int),
        )
    )
    per_address = local
    if shared is not None:
        per_address = FallbackLimiter(shared, local, shared_wait_s, "auth_rate_limit_local")
    return AuthFailures(
        per_address,
        loopback=bool(limits.per_ip_loopback),
        max_pending=positive_limit(limits, "auth_pending_per_ip", int),
    )


def user_auth(failures: AuthFailures, authenticate: Callable[[str], Awaitable[Any]]) -> UserAuth:
    """`authenticate` (a user token to its user) for HTTP clients, counted by `failures`."""

    async def counted(secret: str, address: str) -> Any:
        check = functools.partial(authenticate, secret)
        return await failures.authenticate(address, check, "failed authentications")

    return counted
