"""Redis adapters of the edge ports in `edge.bus`: GCRA rate limits, sessions, pub/sub.

Rules:
- redis.asyncio runs only through trio-asyncio: the caller has opened
  `trio_asyncio.open_loop()` around these components. Each Trio→asyncio crossing carries a
  batch: concurrent rate checks and session writes are queued (bounded channels, so callers
  wait when the queue is full) and one worker task per component sends what is queued as one
  pipeline per crossing; pub/sub publishes are batched the same way and received signals are
  read in batches.
- Redis errors are translated here into GB6Error (`unavailable` when Redis cannot be reached,
  `internal` for anything else Redis refuses).
- Atomicity comes from Lua scripts (one script call per key), and every script reads Redis's
  own clock (`TIME`), so edges whose clocks differ still share one budget and one expiry.
- Keys and channels all start with the component's `prefix`; the session scripts touch keys
  they compute (an edge's liveness key), so they need a standalone Redis (or, in a Redis
  Cluster, a prefix that is one hash tag, e.g. "{gb6}:").

Keys:
    {prefix}rl:{key}           GCRA: the theoretical arrival time in µs (Redis clock); expires
                                when the budget is full again, so idle keys cost nothing.
    {prefix}edge:{incarnation} an edge is alive while this exists (PX ttl, refreshed every ttl/3)
    {prefix}user:{user}        hash session → incarnation; fields of dead incarnations are
                                dropped when met, the key expires `3 * ttl` after its last
                                heartbeat from any edge.
    {prefix}away:{user}        hash incarnation → 1 for the edges that have the user away
                                (`presence.set`); refreshed and expiring like the user's hash.
    {prefix}said:{user}        hash: s (the user's presence last decided: 0 offline, 1 online,
                                2 away), v (its version), i (the user's instance); refreshed
                                and expiring like the user's hash.
    {prefix}feed:{instance}    sorted set user → version of the instance's presence changes of
                                the last `FEED_KEEP_S` (see `edge.bus`).
Channels: {prefix}{channel} for signals; {prefix}ctl:{token} per subscriber, so that the
subscriber's connection exists (and its reader can block) before any real subscription.

Pub/sub: Redis delivers each signal to every subscribed connection; the reader task moves
signals into the subscriber's bounded `Inbox`, dropping (and counting) those that do not fit, so
a slow consumer loses ephemeral signals instead of holding memory. If the reader itself falls
behind, Redis's own pub/sub output limit disconnects the connection and redis-py reconnects and
resubscribes: signals in between are lost, which ephemeral signals may be. redis-py also
subscribes again to channels whose unsubscribe Redis had not confirmed, and a subscribe whose
caller gave up may reach Redis all the same: after either, the reader unsubscribes the channels
this edge does not follow.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import secrets
import socket
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, Generic, TypeVar

import attrs
import redis.asyncio as aioredis
import redis.exceptions as rex
import trio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from trio_asyncio import aio_as_trio

from edge.bus import (
    FEED_KEEP_S,
    MAX_FEED_READ,
    STATUSES,
    FeedRead,
    Inbox,
    Presence,
    PubSubStatistics,
    Signal,
    check_channels,
    check_edge,
    check_instances,
    check_name,
    check_signal,
    check_users,
    edge_of,
    new_incarnation,
)
from node.channels import take_all_waiting, take_waiting
from node.errors import INTERNAL, QUOTA_EXCEEDED, UNAVAILABLE, GB6Error
from node.log import log, without_password

_TIMEOUT_S = 2.0  # to connect, and for an answer
_KEEPALIVE: dict[int, int] = (
    {socket.TCP_KEEPIDLE: 10, socket.TCP_KEEPINTVL: 5, socket.TCP_KEEPCNT: 3}
    if hasattr(socket, "TCP_KEEPIDLE")
    else {}
)

__all__ = ["RedisPubSub", "RedisRateLimiter", "RedisSessions", "open_redis"]

Redis = aioredis.Redis


# --- plumbing: errors, scripts, batching -----------------------------------------------------


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Redis's exceptions → GB6Error, once, at this adapter's edge."""
    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        raise GB6Error(UNAVAILABLE, f"redis unavailable ({what}): {exc}") from exc
    except rex.RedisError as exc:
        raise GB6Error(INTERNAL, f"redis refused {what}: {exc}") from exc


@asynccontextmanager
async def open_redis(url: str) -> AsyncIterator[Redis]:
    """A redis.asyncio client for `url` that answered PING; closed on exit.

    Needs an open `trio_asyncio.open_loop()`. Raises GB6Error(unavailable) if Redis does not
    answer within 5 s. A command whose connection failed gets one quick retry on a new one,
    then `unavailable`; one that timed out is `unavailable` at once: it may have run, and run
    again it could charge a rate limit twice or publish a signal twice."""
    # One quick retry, then the caller's fallback: redis-py's default (retries with backoff
    # up to 10 s, 5 s timeouts) held every request of an edge for tens of seconds while Redis
    # was down or frozen. The health check and keepalives find a half-open connection.
    client = aioredis.Redis.from_url(
        url,
        socket_connect_timeout=_TIMEOUT_S,
        socket_timeout=_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1, supported_errors=(rex.ConnectionError,)),
        health_check_interval=15,
        socket_keepalive=True,
        # A host gone without a FIN: found within ~25 s, not the kernel's 2 h (the pub/sub
        # reader waits on its socket with no timeout).
        socket_keepalive_options=_KEEPALIVE,
    )
    try:
        with _translated("ping"), trio.move_on_after(5) as waited:
            await aio_as_trio(client.ping)()
        if waited.cancelled_caught:
            raise GB6Error(
                UNAVAILABLE, f"redis at {without_password(url)} did not answer within 5 s"
            )
        yield client
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await aio_as_trio(client.aclose)()


@attrs.frozen
class _Script:
    """A Lua script sent by its SHA1; `_pipeline` loads it again if Redis forgot it."""

    text: str
    sha: str

    @classmethod
    def of(cls, text: str) -> _Script:
        return cls(text, hashlib.sha1(text.encode()).hexdigest())


async def _pipeline(
    client: Redis, scripts: Sequence[_Script], build: Callable[[Any], None]
) -> list[Any]:
    """asyncio side: run the commands `build` queues on a pipeline, with results (errors as
    values). After a Redis restart or SCRIPT FLUSH, loads `scripts` and runs them once more:
    every command here may run twice (a refused EVALSHA did nothing). A command that answered
    the first time keeps that answer: run again, it saw what its first run did (a SET … GET
    would answer its own value, and a lapsed key would look alive)."""
    first: list[Any] | None = None
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        build(pipe)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        if first is not None:
            results = [
                a if not isinstance(a, rex.RedisError) else b
                for a, b in zip(first, results, strict=True)
            ]
        if attempt or not any(isinstance(r, rex.NoScriptError) for r in results):
            break
        first = results
        for script in scripts:
            await client.script_load(script.text)
    for r in results:
        if isinstance(r, rex.RedisError):
            raise r
    return results


T = TypeVar("T")
R = TypeVar("R")


@attrs.define(eq=False)
class _Slot(Generic[T, R]):
    item: T
    done: trio.Event = attrs.Factory(trio.Event)
    result: R | None = None
    error: GB6Error | None = None


class _Batcher(Generic[T, R]):
    """Callers queue items; one worker hands everything queued to `handle` in one call, in
    order, and gives each caller its result. The queue is bounded: callers wait when full.
    When the worker stops, queued and waiting callers get GB6Error(unavailable)."""

    def __init__(
        self,
        handle: Callable[[list[T]], Awaitable[list[R]]],
        *,
        queue: int,
        max_batch: int,
        what: str,
    ) -> None:
        if queue < 1 or max_batch < 1:
            raise ValueError("queue and max_batch must be >= 1")
        self.handle = handle
        self.queue = queue
        self.max_batch = max_batch
        self.what = what
        self._send: trio.MemorySendChannel[_Slot[T, R]] | None = None

    async def call(self, item: T) -> R:
        return await self.result(await self.submit(item))

    async def submit(self, item: T) -> _Slot[T, R]:
        """Queue `item` (waiting while the queue is full); `result` waits for its answer."""
        send = self._send
        if send is None:
            raise GB6Error(UNAVAILABLE, f"{self.what} is not running")
        slot: _Slot[T, R] = _Slot(item)
        try:
            await send.send(slot)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise GB6Error(UNAVAILABLE, f"{self.what} stopped") from None
        return slot

    async def result(self, slot: _Slot[T, R]) -> R:
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]  # set with `done`

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, recv = trio.open_memory_channel[_Slot[T, R]](self.queue)
        self._send = send
        batch: list[_Slot[T, R]] = []
        try:
            task_status.started()
            while True:
                batch = [await recv.receive()]
                batch += take_waiting(recv, self.max_batch - 1)
                try:
                    results = await self.handle([s.item for s in batch])
                except GB6Error as exc:
                    for slot in batch:
                        slot.error = exc
                else:
                    for slot, result in zip(batch, results, strict=True):
                        slot.result = result
                for slot in batch:
                    slot.done.set()
                batch = []
        finally:
            self._send = None
            batch += take_all_waiting(recv)
            recv.close()  # callers still blocked on a full queue get BrokenResourceError
            stopped = GB6Error(UNAVAILABLE, f"{self.what} stopped")
            for slot in batch:
                if not slot.done.is_set():
                    slot.error = stopped
                    slot.done.set()


# --- GCRA rate limits ------------------------------------------------------------------------

# KEYS[1] the key; ARGV: interval µs, tolerance µs (interval * (burst - 1)).
# Returns 0 if allowed (and counted), else the µs to wait. Same algorithm as node.ratelimit.Gcra,
# in integer µs (so an exact fit is never refused), on Redis's clock.
_GCRA = _Script.of("""
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local wait = tat - now - tolerance
if wait > 0 then return wait end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
return 0
""")


class RedisRateLimiter:
    """`RateLimiter` shared by every edge using the same Redis and `prefix` (GCRA, Lua).

    A component: checks are served while `run()` runs (it owns the batching worker); `check`
    waits while `queue` checks are already queued. Raises GB6Error(unavailable) if Redis is
    unreachable: the caller decides whether to fail open or closed.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        rate: float,
        burst: int,
        queue: int = 1024,
        max_batch: int = 256,
    ) -> None:
        if not 0 < rate <= 1_000_000 or burst < 1:
            raise ValueError("rate must be in (0, 1e6] and burst >= 1")
        self.client = client
        self.prefix = prefix
        self.rate = rate
        self.burst = burst
        self.interval_us = max(1, round(1_000_000 / rate))
        self.tolerance_us = self.interval_us * (burst - 1)
        self._batcher: _Batcher[str, float] = _Batcher(
            self._check_batch, queue=queue, max_batch=max_batch, what="rate limiter"
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._batcher.run(task_status=task_status)

    async def check(self, key: str) -> float:
        check_name("rate limit key", key)
        return await self._batcher.call(key)

    async def check_unbatched(self, key: str) -> float:
        """`check` in a Redis round trip of its own, without the batching worker (`run` need
        not be running): for callers that check rarely and have no nursery to run it in (the
        admin API). Same answers and errors as `check`."""
        check_name("rate limit key", key)
        waits = await self._check_batch([key])
        return waits[0]

    async def _check_batch(self, keys: list[str]) -> list[float]:
        def build(pipe: Any) -> None:
            for key in keys:
                pipe.evalsha(
                    _GCRA.sha, 1, self.prefix + "rl:" + key, self.interval_us, self.tolerance_us
                )

        with _translated("rate limit check"):
            waits = await aio_as_trio(_pipeline)(self.client, [_GCRA], build)
        return [int(w) / 1_000_000 for w in waits]


# --- sessions --------------------------------------------------------------------------------

# KEYS: user hashes; ARGV[1] edge key prefix. Per user: session, incarnation, ... of live edges;
# fields of dead edges are dropped on the way.
_LOCATE = _Script.of("""
local live = {}
local out = {}
for k = 1, #KEYS do
  local all = redis.call('HGETALL', KEYS[k])
  local found = {}
  for i = 1, #all, 2 do
    local inc = all[i + 1]
    local ok = live[inc]
    if ok == nil then
      ok = redis.call('EXISTS', ARGV[1] .. inc) == 1
      live[inc] = ok
    end
    if ok then
      found[#found + 1] = all[i]
      found[#found + 1] = inc
    else
      redis.call('HDEL', KEYS[k], all[i])
    end
  end
  out[k] = found
end
return out
""")

# Lua shared by the presence scripts (prepended to each).
# `live_state`: the user's status over the live edges (0 offline, 1 online, 2 away: every live
# edge holding a session of theirs has them away); drops the fields of dead incarnations.
# `decide`: that status, recorded in the user's `said` hash with a newer version (Redis's clock
# in µs, or the last version + 1) and in the instance's feed if it differs from the one
# recorded (or none is and `force`); returns {status, version, 1 if recorded now else 0}. Never
# "offline" for a user `here` (held by the calling edge: Redis lost their sessions, which its
# heartbeat writes again). `live` starts with the calling edge's incarnation: alive, even if
# its key lapsed before its next heartbeat writes it again.
# The presence scripts' ARGV start with: edge key prefix, feed key prefix, user key ttl ms,
# feed keep ms.
_PRESENCE_LUA = """
local function live_state(ukey, akey, live)
  local all = redis.call('HGETALL', ukey)
  local any, away = false, true
  for i = 1, #all, 2 do
    local inc = all[i + 1]
    local ok = live[inc]
    if ok == nil then
      ok = redis.call('EXISTS', ARGV[1] .. inc) == 1
      live[inc] = ok
    end
    if ok then
      any = true
      if away and redis.call('HEXISTS', akey, inc) == 0 then away = false end
    else
      redis.call('HDEL', ukey, all[i])
    end
  end
  if not any then return 0 elseif away then return 2 else return 1 end
end

local function decide(user, ukey, akey, skey, instance, force, here, live)
  local st = live_state(ukey, akey, live)
  local said = redis.call('HMGET', skey, 's', 'v', 'i')
  local s = tonumber(said[1])
  local v = tonumber(said[2]) or 0
  if here and st == 0 then return {s or 0, v, 0} end
  local inst = said[3]
  if instance ~= '' then inst = instance end
  if s == st or (s == nil and st == 0 and not force) then
    -- Its ttl is the holders' heartbeats' to refresh.
    if s ~= nil and instance ~= '' and said[3] ~= instance then
      redis.call('HSET', skey, 'i', instance)
    end
    return {st, v, 0}
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if now > v then v = now else v = v + 1 end
  local vs = string.format('%.0f', v)
  redis.call('HSET', skey, 's', st, 'v', vs)
  if inst then
    redis.call('HSET', skey, 'i', inst)
    local f = ARGV[2] .. inst
    redis.call('ZADD', f, vs, user)
    redis.call('ZREMRANGEBYSCORE', f, '-inf', string.format('(%.0f', now - ARGV[4] * 1000))
    redis.call('PEXPIRE', f, ARGV[4])
  end
  redis.call('PEXPIRE', skey, ARGV[3])
  return {st, v, 1}
end
"""

# KEYS: user hash, away hash, said hash; ARGV[5..]: user, session, incarnation, max sessions,
# instance, 1 if the edge has the user away else 0 (recorded either way). Returns {0} if the
# user already has `max` live sessions, else {1, decided...}.
_ADD = _Script.of(
    _PRESENCE_LUA
    + """
local max = tonumber(ARGV[8])
if redis.call('HEXISTS', KEYS[1], ARGV[6]) == 0 and redis.call('HLEN', KEYS[1]) >= max then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if redis.call('EXISTS', ARGV[1] .. all[i + 1]) == 0 then redis.call('HDEL', KEYS[1], all[i]) end
  end
  if redis.call('HLEN', KEYS[1]) >= max then return {0} end
end
redis.call('HSET', KEYS[1], ARGV[6], ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[10] == '1' then
  redis.call('HSET', KEYS[2], ARGV[7], 1)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
else
  redis.call('HDEL', KEYS[2], ARGV[7])
end
local r = decide(ARGV[5], KEYS[1], KEYS[2], KEYS[3], ARGV[9], false, false, {[ARGV[7]] = true})
return {1, r[1], r[2], r[3]}
"""
)

# KEYS: user hash, away hash, said hash; ARGV[5..]: user, session, incarnation, 1 if it was the
# edge's last session of the user else 0. Only the incarnation that holds the session removes
# it; with its last session goes its away.
_REMOVE = _Script.of(
    _PRESENCE_LUA
    + """
if redis.call('HGET', KEYS[1], ARGV[6]) == ARGV[7] then redis.call('HDEL', KEYS[1], ARGV[6]) end
local here = false
for _, inc in ipairs(redis.call('HVALS', KEYS[1])) do
  if inc == ARGV[7] then here = true break end
end
if ARGV[8] == '1' or not here then redis.call('HDEL', KEYS[2], ARGV[7]) end
return decide(ARGV[5], KEYS[1], KEYS[2], KEYS[3], '', false, false, {[ARGV[7]] = true})
"""
)

# KEYS: user hash, away hash, said hash; ARGV[5..]: user, incarnation, 1 (away) or 0 (back).
_AWAY = _Script.of(
    _PRESENCE_LUA
    + """
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[2], ARGV[6], 1)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
else
  redis.call('HDEL', KEYS[2], ARGV[6])
end
return decide(ARGV[5], KEYS[1], KEYS[2], KEYS[3], '', false, false, {[ARGV[6]] = true})
"""
)

# KEYS: user hash, away hash, said hash of each user; ARGV[5]: the calling incarnation, then
# user, instance, 1 if held by the calling edge else 0, for each user.
_SETTLE = _Script.of(
    _PRESENCE_LUA
    + """
local live = {[ARGV[5]] = true}
local out = {}
for k = 1, #KEYS / 3 do
  local b = 3 * (k - 1)
  local user, instance, here = ARGV[6 + b], ARGV[7 + b], ARGV[8 + b] == '1'
  out[k] = decide(user, KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], instance, true, here, live)
end
return out
"""
)

# KEYS: N user hashes, then the N users' away hashes; ARGV[1] edge key prefix.
# Per user: 0 offline, 1 online, 2 away.
_PRESENCE = _Script.of(
    _PRESENCE_LUA
    + """
local live = {}
local out = {}
local n = #KEYS / 2
for k = 1, n do out[k] = live_state(KEYS[k], KEYS[n + k], live) end
return out
"""
)

# KEYS: instances' feeds; ARGV: said key prefix, max users per feed, feed keep µs, then per
# feed the position to read from ('': none, only the position). Per feed: {next position, 1 if
# the position read from is older than the feed keeps (nothing read) else 0, then user,
# status, version for each user changed at or after the position}. Redis's clock is the
# position when a page is not full: each change's version is at least the clock's when
# decided, and what a feed drops is older than its keep by the clock then.
_FEED = _Script.of("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nows = string.format('%.0f', now)
local max = tonumber(ARGV[2])
local out = {}
for k = 1, #KEYS do
  local since = ARGV[k + 3]
  if since == '' then
    out[k] = {nows, 0}
  elseif tonumber(since) < now - tonumber(ARGV[3]) then
    out[k] = {nows, 1}
  else
    local page = redis.call('ZRANGEBYSCORE', KEYS[k], since, '+inf', 'WITHSCORES', 'LIMIT', 0, max)
    local row = {nows, 0}
    if #page >= 2 * max then row[1] = page[#page] end
    for i = 1, #page, 2 do
      local said = redis.call('HMGET', ARGV[1] .. page[i], 's', 'v')
      row[#row + 1] = page[i]
      row[#row + 1] = tonumber(said[1]) or 0
      row[#row + 1] = said[2] or page[i + 1]
    end
    out[k] = row
  end
end
return out
""")

_SESSION_SCRIPTS = (_ADD, _REMOVE, _AWAY, _SETTLE, _LOCATE, _PRESENCE, _FEED)


_STRAY_PER_BEAT: Final = 1000  # stray sessions removed per heartbeat
_MAX_STRAY: Final = 100_000
_STRAY_KEEP_S: Final = 30.0  # past the Redis client's timeouts and its retry


@attrs.frozen
class _SessionOp:
    kind: str  # "add" | "remove" | "beat" | "away" | "back"
    user: str = ""
    session: str = ""
    instance: str = ""
    flag: bool = False  # add: the edge has the user away; remove: its last session of theirs


def _presence(user: str, row: Sequence[Any]) -> Presence:
    """A `Presence` from a presence script's {status, version, changed}."""
    return Presence(user, STATUSES[int(row[0])], int(row[1]), bool(int(row[2])))


_UNKNOWN: Final = b"?"  # never a beat's token (see `RedisSessions._beat_token`)


def _op_result(op: _SessionOp, result: Any) -> Presence | None:
    """A session write's answer: the user's presence after it (None: a beat, or an add
    refused for the user's session limit)."""
    if op.kind == "beat":
        return None
    if op.kind == "add":
        return _presence(op.user, result[1:]) if int(result[0]) == 1 else None
    return _presence(op.user, result)


class RedisSessions:
    """`SessionRegistry` of one edge in Redis (see `edge.bus` for the contract).

    A component: `run()` starts a new incarnation of the edge, owns the worker that sends this
    registry's writes in order (batched), and heartbeats every `ttl / 3`. Each heartbeat
    refreshes the edge's liveness key and the TTL of the users it holds; if the liveness key
    had lapsed (Redis restarted, or the edge was cut off longer than `ttl`), it writes this
    edge's sessions again. When `run()` ends nothing is deleted: the sessions lapse after
    `ttl`, exactly as a killed edge's do. Writes go through one ordered queue, so a heartbeat
    never revives a session removed before it. A session whose removal failed is removed by
    the heartbeats after it: while this edge lives it would otherwise stay, a ghost that keeps
    its user online. One whose add failed or was given up is held all the same (its
    connection may go on without Redis), and the next heartbeat Redis answers writes it.
    """

    def __init__(
        self,
        client: Redis,
        edge: str,
        *,
        prefix: str,
        ttl: float = 15.0,
        max_sessions_per_user: int = 64,
        queue: int = 1024,
        max_batch: int = 256,
    ) -> None:
        if not ttl >= 0.01 or max_sessions_per_user < 1:
            raise ValueError("ttl must be >= 0.01 s and max_sessions_per_user >= 1")
        self.client = client
        self.edge = check_edge(edge)
        self.prefix = prefix
        self.ttl = ttl
        self.max_sessions_per_user = max_sessions_per_user
        self._ttl_ms = math.ceil(ttl * 1000)
        self._user_ttl_ms = 3 * self._ttl_ms
        self._incarnation = ""
        self._held: dict[str, set[str]] = {}  # user → sessions this incarnation holds
        self._away: set[str] = set()  # users this incarnation has away
        # (user, session) this incarnation may have written and must remove, oldest first,
        # each with the time until which it is removed again at each heartbeat.
        self._stray: dict[tuple[str, str], float] = {}
        # What this edge's liveness key holds after its last heartbeat that Redis answered:
        # each beat writes a new token and reads the one before (SET … GET). Anything else
        # read back (nothing: the key lapsed; an older token: Redis came back from a snapshot;
        # this beat's own: the client sent the pipeline twice) means its sessions may be
        # lost, and they are written again. `_UNKNOWN` after a failed write (of a beat or of
        # that rewrite): the next beat that Redis answers writes them again.
        self._beats = 0
        self._beat_token: bytes | None = None
        self._rewrite = False  # the next beat writes the sessions again (an add failed)
        self._writer: _Batcher[_SessionOp, Presence | None] = _Batcher(
            self._write_batch, queue=queue, max_batch=max_batch, what="session registry"
        )

    def _user_key(self, user: str) -> str:
        return self.prefix + "user:" + user

    def _away_key(self, user: str) -> str:
        return self.prefix + "away:" + user

    def _presence_keys(self, user: str) -> tuple[str, str, str]:
        return self._user_key(user), self._away_key(user), self.prefix + "said:" + user

    def _presence_args(self) -> tuple[str, str, int, int]:
        """The first ARGV of every presence script (see `_PRESENCE_LUA`)."""
        keep_ms = math.ceil(FEED_KEEP_S * 1000)
        return self._edge_prefix, self.prefix + "feed:", self._user_ttl_ms, keep_ms

    @property
    def _edge_prefix(self) -> str:
        return self.prefix + "edge:"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._incarnation = new_incarnation(self.edge)
        self._held = {}
        self._away = set()
        self._stray = {}  # the last incarnation's lapse with it
        self._beat_token = None  # a new incarnation's key does not exist yet
        async with trio.open_nursery() as nursery:
            await nursery.start(self._writer.run)
            await self._writer.call(_SessionOp("beat"))  # alive before the first add
            task_status.started()
            while True:
                await trio.sleep(self.ttl / 3)
                try:
                    await self._writer.call(_SessionOp("beat"))
                except GB6Error as exc:  # others see this edge lapse; the next beat may heal it
                    log("session_heartbeat_failed", edge=self.edge, error=exc.message)

    async def add(self, user: str, session: str, instance: str, *, away: bool = False) -> Presence:
        check_name("user", user)
        check_name("session", session)
        check_name("instance", instance)
        if away:
            self._away.add(user)
        else:
            self._away.discard(user)
        # Held from now on: an add that fails or is given up (the caller's bound, even while
        # queued), written or not, is written (again) by the next heartbeat Redis answers, and
        # removed by `remove` after it in the queue.
        self._held.setdefault(user, set()).add(session)
        try:
            slot = await self._writer.submit(_SessionOp("add", user, session, instance, away))
            now = await self._writer.result(slot)
        except BaseException:
            self._rewrite = True
            raise
        if now is None:  # no longer held (`_write_batch`)
            raise GB6Error(
                QUOTA_EXCEEDED,
                f"too many sessions for one user (limit {self.max_sessions_per_user})",
            )
        return now

    def _unhold(self, user: str, session: str) -> None:
        held = self._held.get(user, set())
        held.discard(session)
        if not held:
            self._held.pop(user, None)

    async def remove(self, user: str, session: str) -> Presence:
        check_name("user", user)
        check_name("session", session)
        # Forget it first: a heartbeat built from now on no longer writes it again.
        held = self._held.get(user)
        if held is not None:
            held.discard(session)
            if not held:
                del self._held[user]
                self._away.discard(user)  # the script forgets it with their last session here
        last = user not in self._held
        try:
            now = await self._writer.call(_SessionOp("remove", user, session, flag=last))
        except GB6Error:
            self._remove_later(user, session)
            raise
        assert now is not None
        return now

    async def set_away(self, user: str, away: bool) -> Presence:
        check_name("user", user)
        if away:
            self._away.add(user)
        else:
            self._away.discard(user)
        now = await self._writer.call(_SessionOp("away" if away else "back", user))
        assert now is not None
        return now

    async def settle(self, users: Mapping[str, str]) -> list[Presence]:
        wanted = check_users(users)
        for instance in users.values():
            check_name("instance", instance)
        if not wanted:
            return []
        keys = [k for u in wanted for k in self._presence_keys(u)]
        args = [a for u in wanted for a in (u, users[u], 1 if u in self._held else 0)]

        def build(pipe: Any) -> None:
            pipe.evalsha(
                _SETTLE.sha, len(keys), *keys, *self._presence_args(), self._incarnation, *args
            )

        with _translated("presence settle"):
            (rows,) = await aio_as_trio(_pipeline)(self.client, _SESSION_SCRIPTS, build)
        return [_presence(u, row) for u, row in zip(wanted, rows, strict=True)]

    async def changes(self, since: Mapping[str, int | None]) -> dict[str, FeedRead]:
        wanted = check_instances(since)
        if not wanted:
            return {}
        keys = [self.prefix + "feed:" + i for i in wanted]
        starts = ["" if since[i] is None else str(since[i]) for i in wanted]
        keep_us = math.ceil(FEED_KEEP_S * 1_000_000)

        def build(pipe: Any) -> None:
            said = self.prefix + "said:"
            pipe.evalsha(_FEED.sha, len(keys), *keys, said, MAX_FEED_READ, keep_us, *starts)

        with _translated("presence changes"):
            (rows,) = await aio_as_trio(_pipeline)(self.client, _SESSION_SCRIPTS, build)
        out: dict[str, FeedRead] = {}
        for instance, row in zip(wanted, rows, strict=True):
            got = tuple(
                Presence(row[i].decode(), STATUSES[int(row[i + 1])], int(float(row[i + 2])))
                for i in range(2, len(row), 3)
            )
            out[instance] = FeedRead(int(float(row[0])), got, missed=bool(int(row[1])))
        return out

    async def presence(self, users: Collection[str]) -> dict[str, str]:
        wanted = check_users(users)
        if not wanted:
            return {}
        keys = [self._user_key(u) for u in wanted] + [self._away_key(u) for u in wanted]

        def build(pipe: Any) -> None:
            pipe.evalsha(_PRESENCE.sha, len(keys), *keys, self._edge_prefix)

        with _translated("presence lookup"):
            (codes,) = await aio_as_trio(_pipeline)(self.client, _SESSION_SCRIPTS, build)
        statuses = {1: "online", 2: "away"}
        return {u: statuses[c] for u, c in zip(wanted, codes, strict=True) if c in statuses}

    def _remove_later(self, user: str, session: str) -> None:
        stray = self._stray
        stray.pop((user, session), None)
        # Removed at every heartbeat until then: a write of it sent on a connection the client
        # gave up on may still be read by Redis after a first removal.
        stray[user, session] = trio.current_time() + _STRAY_KEEP_S
        if len(stray) > _MAX_STRAY:  # Redis down for long: the oldest lapse with the edge
            del stray[next(iter(stray))]

    async def locate(self, users: Collection[str]) -> dict[str, dict[str, str]]:
        wanted = check_users(users)
        if not wanted:
            return {}
        keys = [self._user_key(u) for u in wanted]

        def build(pipe: Any) -> None:
            pipe.evalsha(_LOCATE.sha, len(keys), *keys, self._edge_prefix)

        with _translated("session lookup"):
            (rows,) = await aio_as_trio(_pipeline)(self.client, _SESSION_SCRIPTS, build)
        found: dict[str, dict[str, str]] = {}
        for user, row in zip(wanted, rows, strict=True):
            if row:
                found[user] = {
                    row[i].decode(): edge_of(row[i + 1].decode()) for i in range(0, len(row), 2)
                }
        return found

    async def edges_of(self, user: str) -> frozenset[str]:
        return frozenset((await self.locate([user])).get(user, {}).values())

    async def _write_batch(self, ops: list[_SessionOp]) -> list[Presence | None]:
        inc = self._incarnation
        # Strays (their ops' batches done: each is removed after what wrote it) go with beats.
        beat = any(op.kind == "beat" for op in ops)
        rewrite = False
        if beat:
            self._beats += 1
            rewrite, self._rewrite = self._rewrite, False
        token = b"%d" % self._beats
        stray = list(itertools.islice(self._stray.items(), _STRAY_PER_BEAT)) if beat else []
        started = trio.current_time()
        held = list(self._held)  # as the batch began: `build` may run twice (NOSCRIPT)
        away = list(self._away)
        # Where each op's (first) result is: a heartbeat also queues one PEXPIRE per held user,
        # and `_held` may change while the pipeline is out, so positions are noted as built.
        at: list[int] = []

        args = self._presence_args()

        def build(pipe: Any) -> None:
            at.clear()
            n = 0
            for op in ops:
                at.append(n)
                keys = self._presence_keys(op.user)
                if op.kind == "add":
                    pipe.evalsha(
                        _ADD.sha,
                        3,
                        *keys,
                        *args,
                        op.user,
                        op.session,
                        inc,
                        self.max_sessions_per_user,
                        op.instance,
                        1 if op.flag else 0,
                    )
                elif op.kind == "remove":
                    last = 1 if op.flag else 0
                    pipe.evalsha(_REMOVE.sha, 3, *keys, *args, op.user, op.session, inc, last)
                elif op.kind in ("away", "back"):
                    away_arg = 1 if op.kind == "away" else 0
                    pipe.evalsha(_AWAY.sha, 3, *keys, *args, op.user, inc, away_arg)
                else:
                    pipe.set(self._edge_prefix + inc, token, px=self._ttl_ms, get=True)
                    for user in held:
                        user_key, _, said_key = self._presence_keys(user)
                        pipe.pexpire(user_key, self._user_ttl_ms)
                        pipe.pexpire(said_key, self._user_ttl_ms)
                        n += 2
                    for user in away:
                        pipe.pexpire(self._away_key(user), self._user_ttl_ms)
                        n += 1
                n += 1
            for (user, session), _ in stray:  # last: after the ops of this batch
                keys = self._presence_keys(user)
                last = 0 if user in self._held else 1
                pipe.evalsha(_REMOVE.sha, 3, *keys, *args, user, session, inc, last)

        try:
            with _translated("session write"):
                results = await aio_as_trio(_pipeline)(self.client, _SESSION_SCRIPTS, build)
                answers = [_op_result(op, results[i]) for op, i in zip(ops, at, strict=True)]
                for op, answer in zip(ops, answers, strict=True):
                    if op.kind == "add" and answer is None:  # refused: before a rewrite below
                        self._unhold(op.user, op.session)
                if beat:
                    first = next(i for op, i in zip(ops, at, strict=True) if op.kind == "beat")
                    lapsed = rewrite or results[first] != self._beat_token
                    self._beat_token = token
                    if lapsed and (self._held or self._away):
                        await aio_as_trio(self._rewrite_held)()
        except BaseException:
            if beat:
                self._beat_token = _UNKNOWN
            raise
        for pair, until in stray:
            if self._stray.get(pair) == until:
                del self._stray[pair]
                if until > started:  # again at a later beat, behind the others
                    self._stray[pair] = until
        return answers

    async def _rewrite_held(self) -> None:
        """asyncio side: this edge's liveness key had lapsed; others may have dropped its
        sessions meanwhile, so write them all again."""
        pipe = self.client.pipeline(transaction=False)
        for user, sessions in self._held.items():
            key = self._user_key(user)
            pipe.hset(key, mapping=dict.fromkeys(sessions, self._incarnation))
            pipe.pexpire(key, self._user_ttl_ms)
        for user in self._away:
            pipe.hset(self._away_key(user), self._incarnation, b"1")
            pipe.pexpire(self._away_key(user), self._user_ttl_ms)
        await pipe.execute()


# --- pub/sub ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Waiter:
    """A subscribe/unsubscribe call: queued for the reader to send, then waiting for Redis to
    confirm each of its channels (or for the send's error)."""

    kind: str  # "subscribe" | "unsubscribe"
    names: set[bytes]
    done: trio.Event = attrs.Factory(trio.Event)
    abandoned: bool = False  # its caller stopped waiting: a subscribe not yet sent never is
    error: BaseException | None = None


class RedisPubSub:
    """`PubSub` over Redis PUBLISH/SUBSCRIBE for one edge (see `edge.bus` for the contract).

    A component: `run()` owns the subscriber connection, the reader task (Redis → inbox, in
    batches) and the publisher task (queue → Redis, one pipeline per batch). `publish` puts the
    signal on a bounded queue and returns at once; when the queue is full the signal is dropped
    (False). A failed publish batch is logged and dropped: these signals are ephemeral.
    `subscribe`/`unsubscribe` return once Redis has confirmed every channel, or raise
    GB6Error(unavailable) after `confirm_timeout` seconds.

    The subscriber connection has one user, the reader: redis-py reconnects a pub/sub
    connection from whichever coroutine finds it broken, and two at once (the reader and a
    subscribe, as Redis restarts) interleave their handshakes on it, which desynchronises it
    (seen as `readuntil() called while another coroutine is already waiting` and as replies
    read by the wrong command). So `subscribe`/`unsubscribe` queue their command and wake the
    reader with a message on the edge's control channel (published on another connection);
    the reader sends what is queued before each read.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        inbox_size: int = 1024,
        max_channels: int = 10_000,
        publish_queue: int = 4096,
        max_batch: int = 256,
        confirm_timeout: float = 10.0,
    ) -> None:
        if publish_queue < 1 or max_batch < 1:
            raise ValueError("publish_queue and max_batch must be >= 1")
        self.client = client
        self.prefix = prefix
        self._bprefix = prefix.encode()
        self.inbox = Inbox(inbox_size, max_channels)
        self.max_batch = max_batch
        self.confirm_timeout = confirm_timeout
        self.published = 0
        self.publish_dropped = 0
        self.publish_failed = 0
        self._running = False
        self._pubsub: Any = None
        self._waiters: list[_Waiter] = []
        self._queued: deque[_Waiter] = deque()  # for the reader to send
        self._control = trio.Lock()
        self._control_channel = b""
        # Redis may be subscribed to channels this edge no longer follows: redis-py subscribes
        # again, on a new connection, to those whose unsubscribe Redis had not confirmed, and a
        # subscribe its caller gave up on may still reach Redis. Set when that may be so: the
        # reader then unsubscribes what it finds.
        self._reconcile = False
        self._out_send, self._out_recv = trio.open_memory_channel[Signal](publish_queue)

    def _encode(self, channel: str) -> bytes:
        return self._bprefix + channel.encode()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        pubsub = self.client.pubsub()
        self._pubsub = pubsub
        control = self._encode("ctl:" + secrets.token_hex(8))
        self._control_channel = control
        try:
            with _translated("subscribe"), trio.move_on_after(self.confirm_timeout) as waited:
                await aio_as_trio(self._open)(control)
            if waited.cancelled_caught:
                raise GB6Error(UNAVAILABLE, "redis did not confirm a subscription")
            assert pubsub.connection is not None  # `_open` made it
            pubsub.connection.register_connect_callback(self._on_connect)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read)
                nursery.start_soon(self._publish_loop)
                self._running = True
                task_status.started()
        finally:
            self._running = False
            self.inbox.channels.clear()
            self._pubsub = None
            if pubsub.connection is not None:  # back to the pool without this edge's callback
                pubsub.connection.deregister_connect_callback(self._on_connect)
            stopped = GB6Error(UNAVAILABLE, "pub/sub stopped")
            for waiter in [*self._waiters, *self._queued]:  # their callers hear at once
                waiter.error = stopped
                waiter.done.set()
            self._queued.clear()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await aio_as_trio(pubsub.aclose)()

    async def _open(self, control: bytes) -> None:
        """asyncio side: subscribe to the private control channel and wait for Redis to
        confirm, so the connection exists before the reader starts blocking on it."""
        await self._pubsub.subscribe(control)
        while True:
            msg = await self._pubsub.get_message(timeout=None)
            if msg is not None and msg["type"] == "subscribe" and msg["channel"] == control:
                return

    async def _read_batch(self) -> list[dict[str, Any]]:
        """asyncio side: send the queued commands; block for one message, then take what else
        is already there. A command whose send failed ends the batch (the read would fail
        too: redis-py reconnects, and subscribes again, at the next)."""
        out: list[dict[str, Any]] = []
        while self._queued:
            waiter = self._queued.popleft()
            if waiter.abandoned and waiter.kind == "subscribe":
                continue  # its caller took it as failed; an unsubscribe is sent all the same
            send = (
                self._pubsub.subscribe if waiter.kind == "subscribe" else self._pubsub.unsubscribe
            )
            try:
                await send(*waiter.names)
            except Exception as exc:  # whatever redis-py raised: its caller hears of it
                waiter.error = exc
                return [{"type": "failed", "waiter": waiter}]
        if self._reconcile:
            await self._unsubscribe_strays()
        msg = await self._pubsub.get_message(timeout=None)
        while msg is not None:
            out.append(msg)
            if len(out) >= self.max_batch:
                break
            msg = await self._pubsub.get_message(timeout=0)
        return out

    async def _unsubscribe_strays(self) -> None:
        """asyncio side: unsubscribe the channels Redis sends this connection that this edge
        does not follow, once connected (a reconnect subscribes again first)."""
        self._reconcile = False  # set again meanwhile: done again
        try:
            await self._pubsub.connect()
            wanted = {self._encode(c) for c in self.inbox.channels}
            wanted.add(self._control_channel)
            pending = self._pubsub.pending_unsubscribe_channels  # under way
            strays = [c for c in self._pubsub.channels if c not in wanted and c not in pending]
            if strays:
                await self._pubsub.unsubscribe(*strays)
                log("pubsub_strays_unsubscribed", channels=len(strays))
        except BaseException:
            self._reconcile = True
            raise

    def _on_connect(self, connection: Any) -> None:
        """redis-py's callback at each (re)connect of the subscriber connection, which it may
        make inside a read without a word: it subscribes again to the channels whose
        unsubscribe Redis had not confirmed."""
        self._reconcile = True

    async def _read(self) -> None:
        prefix_len = len(self._bprefix)
        while True:
            try:
                with _translated("receive"):
                    messages = await aio_as_trio(self._read_batch)()
            except GB6Error as exc:  # redis-py reconnects and resubscribes on the next read
                self._reconcile = True
                log("pubsub_read_failed", error=exc.message)
                await trio.sleep(0.5)
                continue
            for msg in messages:
                kind = msg["type"]
                if kind == "message":
                    if msg["channel"] != self._control_channel:  # a wake-up: no signal
                        channel = msg["channel"][prefix_len:].decode()
                        self.inbox.offer(Signal(channel, msg["data"]))
                elif kind in ("subscribe", "unsubscribe"):
                    self._confirmed(kind, msg["channel"])
                elif kind == "failed":  # its channels may come back with the reconnect
                    self._reconcile = True
                    msg["waiter"].done.set()

    def _confirmed(self, kind: str, name: bytes) -> None:
        for waiter in self._waiters:
            if waiter.kind == kind and name in waiter.names:
                waiter.names.discard(name)
                if not waiter.names:
                    waiter.done.set()
                    self._waiters.remove(waiter)
                return

    async def _publish_loop(self) -> None:
        while True:
            batch = [await self._out_recv.receive()]
            batch += take_waiting(self._out_recv, self.max_batch - 1)
            try:
                with _translated("publish"):
                    await aio_as_trio(self._publish_batch)(batch)
            except GB6Error as exc:
                self.publish_failed += len(batch)
                log("pubsub_publish_failed", signals=len(batch), error=exc.message)
                await trio.sleep(0.1)  # do not spin against a Redis that is down

    async def _publish_batch(self, batch: list[Signal]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for signal in batch:
            pipe.publish(self._encode(signal.channel), signal.data)
        await pipe.execute()

    def _serving(self) -> None:
        if not self._running:
            raise GB6Error(UNAVAILABLE, "pub/sub is not running")

    def publish(self, channel: str, data: bytes) -> bool:
        check_signal(channel, data)
        self._serving()
        try:
            self._out_send.send_nowait(Signal(channel, data))
        except trio.WouldBlock:
            self.publish_dropped += 1
            return False
        self.published += 1
        return True

    async def subscribe(self, channels: Iterable[str]) -> None:
        names = check_channels(channels)
        self._serving()
        async with self._control:
            new = [c for c in names if c not in self.inbox.channels]
            if not new:
                return
            self.inbox.check_room_for(new)
            # Followed before Redis confirms: the first signals may arrive right after.
            self.inbox.channels.update(new)
            try:
                await self._command("subscribe", new)
            except BaseException:
                # Not known to be subscribed: unfollow, so that a retry subscribes again.
                self.inbox.channels.difference_update(new)
                raise

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        names = check_channels(channels)
        self._serving()
        async with self._control:
            gone = [c for c in names if c in self.inbox.channels]
            if not gone:
                return
            self.inbox.channels.difference_update(gone)  # receive() skips them from now on
            await self._command("unsubscribe", gone)

    async def _command(self, kind: str, channels: list[str]) -> None:
        """Have the reader send `kind` for `channels` (see the class doc); return once Redis
        confirmed each."""
        waiter = _Waiter(kind, {self._encode(c) for c in channels})
        self._waiters.append(waiter)
        self._queued.append(waiter)
        try:
            with trio.move_on_after(self.confirm_timeout) as waited:
                with _translated("wake the reader"):
                    await aio_as_trio(self.client.publish)(self._control_channel, b"")
                await waiter.done.wait()
        finally:
            waiter.abandoned = True
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if not waiter.done.is_set():  # it may reach Redis all the same
                self._reconcile = True
        if waiter.error is not None:
            why = waiter.error
            raise GB6Error(UNAVAILABLE, f"redis {kind}: connection lost ({why!r})") from why
        if waited.cancelled_caught:
            raise GB6Error(UNAVAILABLE, f"redis did not confirm {kind} in time")

    async def receive(self) -> Signal:
        return await self.inbox.receive()

    def statistics(self) -> PubSubStatistics:
        return self.inbox.statistics(self.published, self.publish_dropped)
