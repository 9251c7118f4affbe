"""Contract tests of the edge bus ports (`edge/bus.py`), one suite run against every adapter.

Each test runs twice: on the in-process adapters (what `gb6 run` uses; "edges" share objects)
and on the Redis adapters of `edge/redis_bus.py` (each "edge" with its own client, all on one
key prefix unique to the test, deleted afterwards). The Redis runs skip without Redis (fail
under GB6_REQUIRE_SERVICES=1). Waits are explicit and bounded (`fail_after`); sleeps only let
time pass (TTLs, refills), they never stand in for an event.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio_asyncio
from conftest import Netns, OwnRedis
from services import require
from trio_asyncio import aio_as_trio

from edge.bus import (
    MAX_SIGNAL_BYTES,
    LocalBroker,
    LocalPubSub,
    LocalRateLimiter,
    LocalSessions,
    Presence,
    PubSub,
    RateLimiter,
    SessionRegistry,
    SessionTable,
    Signal,
    room_channel,
    user_channel,
)
from edge.redis_bus import RedisPubSub, RedisRateLimiter, RedisSessions, open_redis
from edge.shared_signals import SharedSignals
from node.errors import INVALID, QUOTA_EXCEEDED, TOO_LARGE, UNAVAILABLE, GB6Error
from node.ratelimit import Gcra


@pytest.fixture(params=["local", "redis"])
def where(request: pytest.FixtureRequest) -> str:
    """The adapter: "local", or the Redis URL (a sync fixture: see tests/services.py)."""
    return "local" if request.param == "local" else require("redis")


@pytest.fixture
def redis_url() -> str:
    return require("redis")


class Harness:
    """Makes "edges" of one adapter that share one backing store, and runs their components."""

    def __init__(
        self, nursery: trio.Nursery, url: str | None, prefix: str, admin: Any = None
    ) -> None:
        self.nursery = nursery
        self.admin = admin  # Redis only: a client of the test's own
        self.url = url
        self.prefix = prefix
        self.stack = AsyncExitStack()
        self.gcras: dict[tuple[float, int], Gcra] = {}
        self.table = SessionTable()
        self.broker = LocalBroker()

    async def _client(self) -> Any:
        assert self.url is not None
        return await self.stack.enter_async_context(open_redis(self.url))

    async def start(self, component: Any) -> trio.CancelScope:
        """Start `component.run` in its own cancel scope (cancel it to stop that edge)."""
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await component.run(task_status=task_status)

        await self.nursery.start(run)
        return scope

    async def limiter(self, rate: float, burst: int) -> RateLimiter:
        if self.url is None:
            gcra = self.gcras.setdefault((rate, burst), Gcra(rate, burst))
            return LocalRateLimiter(gcra)
        limiter = RedisRateLimiter(await self._client(), prefix=self.prefix, rate=rate, burst=burst)
        await self.start(limiter)
        return limiter

    async def sessions(
        self, edge: str, *, ttl: float, max_sessions_per_user: int = 64, start: bool = True
    ) -> tuple[SessionRegistry, trio.CancelScope]:
        registry: SessionRegistry
        if self.url is None:
            registry = LocalSessions(
                self.table, edge, ttl=ttl, max_sessions_per_user=max_sessions_per_user
            )
        else:
            registry = RedisSessions(
                await self._client(),
                edge,
                prefix=self.prefix,
                ttl=ttl,
                max_sessions_per_user=max_sessions_per_user,
            )
        scope = await self.start(registry) if start else trio.CancelScope()
        return registry, scope

    async def signals(self, edge: str) -> tuple[SharedSignals, SessionRegistry, trio.CancelScope]:
        """An edge's `SharedSignals` (not started), its session registry (started), and the
        registry's scope (cancel it: the edge "dies")."""
        sessions, scope = await self.sessions(edge, ttl=TTL)
        return SharedSignals(await self.pubsub(), sessions, edge), sessions, scope

    async def pubsub(
        self, *, inbox_size: int = 1024, max_channels: int = 100, start: bool = True
    ) -> PubSub:
        bus: PubSub
        if self.url is None:
            bus = LocalPubSub(self.broker, inbox_size=inbox_size, max_channels=max_channels)
        else:
            bus = RedisPubSub(
                await self._client(),
                prefix=self.prefix,
                inbox_size=inbox_size,
                max_channels=max_channels,
            )
        if start:
            await self.start(bus)
        return bus


async def _delete_prefixed(client: Any, prefix: str) -> int:
    """asyncio side: delete every key of this test."""
    keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await client.delete(*keys)
    return len(keys)


@asynccontextmanager
async def open_harness(where: str) -> AsyncIterator[Harness]:
    if where == "local":
        async with trio.open_nursery() as nursery:
            yield Harness(nursery, None, "")
            nursery.cancel_scope.cancel()
        return
    prefix = f"gb6test:{uuid.uuid4().hex[:12]}:"
    async with trio_asyncio.open_loop(), open_redis(where) as admin:
        try:
            async with trio.open_nursery() as nursery:
                harness = Harness(nursery, where, prefix, admin)
                async with harness.stack:
                    yield harness
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(10):
                await aio_as_trio(_delete_prefixed)(admin, prefix)


async def eventually(predicate: Callable[[], Awaitable[bool] | bool], within: float = 5.0) -> None:
    """Wait until `predicate()` holds, failing after `within` seconds. This polls: the state
    it looks at lives in another edge's registry or in Redis, with nothing to wait on."""
    with trio.fail_after(within):
        while True:
            result = predicate()
            if await result if inspect.isawaitable(result) else result:
                return
            await trio.sleep(0.02)


async def receive(bus: PubSub) -> Signal:
    with trio.fail_after(5):
        return await bus.receive()


# --- GCRA rate limits ------------------------------------------------------------------------

RATE = 4.0  # per second: an interval of 0.25 s, long next to a few checks on a busy machine
INTERVAL = 1 / RATE


async def test_gcra_allows_the_burst_then_refuses_with_retry_after_and_refills(where: str) -> None:
    async with open_harness(where) as h:
        limiter = await h.limiter(RATE, 3)
        assert [await limiter.check("alice") for _ in range(3)] == [0.0, 0.0, 0.0]
        wait = await limiter.check("alice")
        assert 0 < wait <= INTERVAL + 1e-6
        assert await limiter.check("bob") == 0.0  # keys do not share a budget
        # After the advertised wait, one more request fits (the rate), and then none.
        await trio.sleep(wait + 0.005)
        assert await limiter.check("alice") == 0.0
        again = await limiter.check("alice")
        assert 0 < again <= INTERVAL + 1e-6


async def test_gcra_budget_is_shared_by_two_edges(where: str) -> None:
    async with open_harness(where) as h:
        edge_a = await h.limiter(RATE, 3)
        edge_b = await h.limiter(RATE, 3)
        assert await edge_a.check("alice") == 0.0
        assert await edge_a.check("alice") == 0.0
        assert await edge_b.check("alice") == 0.0
        assert await edge_b.check("alice") > 0  # the burst was spent across both edges
        assert await edge_a.check("alice") > 0
        assert await edge_b.check("carol") == 0.0


async def test_gcra_concurrent_checks_count_each_once(where: str) -> None:
    """Many checks at once (one batch for Redis): exactly `burst` of them are allowed."""
    async with open_harness(where) as h:
        limiter = await h.limiter(RATE, 5)
        results: list[float] = []

        async def one() -> None:
            results.append(await limiter.check("alice"))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
        assert sum(r == 0.0 for r in results) == 5
        assert all(0 < r <= 5 * INTERVAL for r in results if r)


async def test_gcra_bad_input(where: str) -> None:
    async with open_harness(where) as h:
        limiter = await h.limiter(RATE, 3)
        for key in ("", "x" * 201, "a\nb"):
            with pytest.raises(GB6Error) as err:
                await limiter.check(key)
            assert err.value.code == INVALID
    with pytest.raises(ValueError):
        Gcra(0, 3)
    with pytest.raises(ValueError):
        RedisRateLimiter(None, prefix="p:", rate=1.0, burst=0)  # type: ignore[arg-type]


# --- sessions --------------------------------------------------------------------------------

TTL = 0.5


async def test_sessions_are_found_from_another_edge(where: str) -> None:
    async with open_harness(where) as h:
        a, _ = await h.sessions("edge-a", ttl=TTL)
        b, _ = await h.sessions("edge-b", ttl=TTL)
        await a.add("alice", "ses_1", "ins_1")
        await b.add("alice", "ses_2", "ins_1")
        await b.add("bob", "ses_3", "ins_1")
        assert await a.locate(["alice", "bob", "carol"]) == {
            "alice": {"ses_1": "edge-a", "ses_2": "edge-b"},
            "bob": {"ses_3": "edge-b"},
        }
        assert await a.edges_of("alice") == {"edge-a", "edge-b"}
        assert await b.presence(["bob", "carol"]) == {"bob": "online"}  # carol: offline
        assert await b.locate([]) == {}
        # An edge removes only what it holds; removing twice is harmless.
        await a.remove("alice", "ses_2")
        assert await b.edges_of("alice") == {"edge-a", "edge-b"}
        await a.remove("alice", "ses_1")
        await a.remove("alice", "ses_1")
        assert await b.locate(["alice"]) == {"alice": {"ses_2": "edge-b"}}
        await b.remove("alice", "ses_2")
        assert "alice" not in await a.presence(["alice"])


async def test_sessions_expire_when_their_edge_stops_heartbeating(where: str) -> None:
    async with open_harness(where) as h:
        a, a_scope = await h.sessions("edge-a", ttl=TTL, max_sessions_per_user=2)
        b, _ = await h.sessions("edge-b", ttl=TTL, max_sessions_per_user=2)
        await a.add("alice", "ses_1", "ins_1")
        await a.add("bob", "ses_2", "ins_1")
        await b.add("bob", "ses_3", "ins_1")
        for _ in range(6):  # heartbeats keep them alive, all along, well past the TTL
            await trio.sleep(TTL / 2)
            assert await b.locate(["alice", "bob"]) == {
                "alice": {"ses_1": "edge-a"},
                "bob": {"ses_2": "edge-a", "ses_3": "edge-b"},
            }
        with pytest.raises(GB6Error) as err:
            await b.add("bob", "ses_4", "ins_1")
        assert err.value.code == QUOTA_EXCEEDED

        a_scope.cancel()  # edge-a "dies": nobody removes its sessions

        async def alice_gone() -> bool:
            return "alice" not in await b.presence(["alice"])

        await eventually(alice_gone, within=10 * TTL)
        assert await b.locate(["bob"]) == {"bob": {"ses_3": "edge-b"}}
        await b.add("bob", "ses_4", "ins_1")  # the dead edge's session no longer counts
        with pytest.raises(GB6Error) as err:
            await a.add("alice", "ses_5", "ins_1")
        assert err.value.code == UNAVAILABLE

        # edge-a comes back under the same name: a new incarnation revives nothing.
        a2, _ = await h.sessions("edge-a", ttl=TTL)
        assert "alice" not in await a2.presence(["alice"])
        await a2.add("alice", "ses_6", "ins_1")
        assert await b.locate(["alice"]) == {"alice": {"ses_6": "edge-a"}}


async def test_redis_sessions_are_written_again_after_redis_lost_them(redis_url: str) -> None:
    """Redis only (in-process state cannot be lost behind an edge's back): if Redis loses the
    keys (restart without persistence, eviction), the edge's next heartbeat finds its liveness
    key gone and writes its sessions again."""
    async with open_harness(redis_url) as h:
        a, _ = await h.sessions("edge-a", ttl=TTL)
        await a.add("alice", "ses_1", "ins_1")
        await a.add("alice", "ses_2", "ins_1")
        await a.remove("alice", "ses_2")
        # The edge's key, the user's, her presence decided and her instance's feed.
        assert await aio_as_trio(_delete_prefixed)(h.admin, h.prefix) == 4
        assert "alice" not in await a.presence(["alice"])

        async def back() -> bool:
            return await a.locate(["alice"]) == {"alice": {"ses_1": "edge-a"}}

        await eventually(back, within=10 * TTL)


async def test_redis_sessions_lost_while_their_rewrite_failed_are_written_again(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis loses the keys, and the heartbeat that finds the edge's key gone fails to write
    the sessions again (a timeout, say) after its SET brought the key back: the next
    heartbeats must still write them, not take the key they find for a live one."""
    import redis.exceptions as rex

    from edge.redis_bus import RedisSessions

    rewrite = RedisSessions._rewrite_held
    failures = [rex.TimeoutError("made by the test")]

    async def failing_once(self: RedisSessions) -> None:
        if failures:
            raise failures.pop()
        await rewrite(self)

    monkeypatch.setattr(RedisSessions, "_rewrite_held", failing_once)
    async with open_harness(redis_url) as h:
        a, _ = await h.sessions("edge-a", ttl=TTL)
        await a.add("alice", "ses_1", "ins_1")
        # The edge's key, the user's, her presence decided and her instance's feed.
        assert await aio_as_trio(_delete_prefixed)(h.admin, h.prefix) == 4

        async def back() -> bool:
            return await a.locate(["alice"]) == {"alice": {"ses_1": "edge-a"}}

        await eventually(back, within=10 * TTL)
        assert not failures  # the rewrite did fail once


async def test_sessions_bad_input(where: str) -> None:
    async with open_harness(where) as h:
        a, _ = await h.sessions("edge-a", ttl=TTL)
        bad = (("", "s", "i"), ("u", "", "i"), ("u\x00", "s", "i"), ("u", "s" * 201, "i"))
        for user, session, instance in (*bad, ("u", "s", ""), ("u", "s", "i\n")):
            with pytest.raises(GB6Error) as err:
                await a.add(user, session, instance)
            assert err.value.code == INVALID
        for since in ({"i": -1}, {"i": "0"}, {f"i{n}": 0 for n in range(1001)}, {"": 0}):
            with pytest.raises(GB6Error) as err:
                await a.changes(since)  # type: ignore[arg-type]
            assert err.value.code == INVALID
        with pytest.raises(GB6Error) as err:
            await a.settle({f"u{i}": "ins_1" for i in range(1001)})
        assert err.value.code == INVALID
        with pytest.raises(GB6Error) as err:
            await a.locate("alice")
        assert err.value.code == INVALID
        with pytest.raises(GB6Error) as err:
            await a.locate([f"u{i}" for i in range(1001)])
        assert err.value.code == INVALID
        with pytest.raises(GB6Error) as err:
            await h.sessions("edge~1", ttl=TTL, start=False)
        assert err.value.code == INVALID
        idle, _ = await h.sessions("edge-c", ttl=TTL, start=False)
        with pytest.raises(GB6Error) as err:
            await idle.add("alice", "ses_1", "ins_1")
        assert err.value.code == UNAVAILABLE


# --- pub/sub ---------------------------------------------------------------------------------

ROOM1, ROOM2, ALICE = room_channel("r1"), room_channel("r2"), user_channel("alice")


async def test_pubsub_delivers_to_every_subscribed_edge(where: str) -> None:
    async with open_harness(where) as h:
        publisher = await h.pubsub()
        edge_a = await h.pubsub()
        edge_b = await h.pubsub()
        await edge_a.subscribe([ROOM1, ALICE])
        await edge_b.subscribe([ROOM1, ROOM2])
        assert publisher.publish(ROOM1, b"typing:bob")
        assert publisher.publish(ROOM2, b"typing:carol")
        assert publisher.publish(ALICE, b"presence:away")
        assert await receive(edge_a) == Signal(ROOM1, b"typing:bob")
        assert await receive(edge_a) == Signal(ALICE, b"presence:away")  # not ROOM2's
        assert await receive(edge_b) == Signal(ROOM1, b"typing:bob")
        assert await receive(edge_b) == Signal(ROOM2, b"typing:carol")
        # The publisher is an edge too: it gets what it subscribes to, its own signals included.
        await publisher.subscribe([ROOM2])
        assert edge_a.publish(ROOM2, b"x")
        assert await receive(publisher) == Signal(ROOM2, b"x")
        assert await receive(edge_b) == Signal(ROOM2, b"x")
        assert edge_a.statistics().channels == 2


async def test_pubsub_follows_subscription_changes(where: str) -> None:
    async with open_harness(where) as h:
        publisher = await h.pubsub()
        edge = await h.pubsub()
        await edge.subscribe([ROOM1])
        await edge.subscribe([ROOM2, ROOM1])  # adding, and already following, are both fine
        publisher.publish(ROOM2, b"a")
        assert await receive(edge) == Signal(ROOM2, b"a")

        await edge.unsubscribe([ROOM1])
        publisher.publish(ROOM1, b"lost")
        publisher.publish(ROOM2, b"fence")  # signals of one publisher arrive in order
        assert await receive(edge) == Signal(ROOM2, b"fence")

        # Signals already buffered for a channel are not delivered after unsubscribing from it.
        publisher.publish(ROOM2, b"buffered")
        await eventually(lambda: edge.statistics().buffered == 1)
        await edge.unsubscribe([ROOM2])
        await edge.subscribe([ROOM1])
        publisher.publish(ROOM1, b"back")
        assert await receive(edge) == Signal(ROOM1, b"back")
        assert edge.statistics().channels == 1


async def test_pubsub_slow_subscriber_drops_instead_of_blocking(where: str) -> None:
    n = 100
    async with open_harness(where) as h:
        publisher = await h.pubsub()
        slow = await h.pubsub(inbox_size=4)
        fast = await h.pubsub()
        await slow.subscribe([ROOM1])
        await fast.subscribe([ROOM1])
        # publish() is synchronous: all of it happens while `slow` reads nothing.
        assert all(publisher.publish(ROOM1, b"m%d" % i) for i in range(n))
        with trio.fail_after(10):
            got = [await fast.receive() for _ in range(n)]
        assert [s.data for s in got] == [b"m%d" % i for i in range(n)]

        await eventually(lambda: slow.statistics().accepted + slow.statistics().dropped == n)
        stats = slow.statistics()
        assert (stats.accepted, stats.dropped, stats.buffered, stats.max_buffer) == (4, 96, 4, 4)
        assert [(await receive(slow)).data for _ in range(4)] == [b"m0", b"m1", b"m2", b"m3"]
        assert publisher.statistics().published == n
        assert publisher.statistics().publish_dropped == 0
        # Once drained, the slow subscriber gets new signals again.
        publisher.publish(ROOM1, b"later")
        assert await receive(slow) == Signal(ROOM1, b"later")


async def test_pubsub_bad_input(where: str) -> None:
    async with open_harness(where) as h:
        bus = await h.pubsub(max_channels=3)
        cases: list[tuple[Callable[[], Any], str]] = [
            (lambda: bus.publish("", b"x"), INVALID),
            (lambda: bus.publish(ROOM1, "text"), INVALID),  # type: ignore[arg-type]
            (lambda: bus.publish(ROOM1, b"x" * (MAX_SIGNAL_BYTES + 1)), TOO_LARGE),
        ]
        for call, code in cases:
            with pytest.raises(GB6Error) as err:
                call()
            assert err.value.code == code
        assert bus.publish(ROOM1, b"x" * MAX_SIGNAL_BYTES)
        with pytest.raises(GB6Error) as err:
            await bus.subscribe(ROOM1)
        assert err.value.code == INVALID
        with pytest.raises(GB6Error) as err:
            await bus.subscribe(["a", "b", "c", "d"])
        assert err.value.code == TOO_LARGE
        assert bus.statistics().channels == 0
        idle = await h.pubsub(start=False)
        with pytest.raises(GB6Error) as err:
            idle.publish(ROOM1, b"x")
        assert err.value.code == UNAVAILABLE


# --- Redis errors become the project's errors --------------------------------------------------

NOBODY = "redis://127.0.0.1:1/0"  # loopback, a port nothing listens on


_BUSY = """
local t = redis.call('TIME')
local till = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1])
repeat t = redis.call('TIME') until tonumber(t[1]) + tonumber(t[2]) / 1e6 > till
return 1
"""


async def test_redis_a_rate_check_that_timed_out_is_not_sent_again(tmp_path: Path) -> None:
    """Redis is busy past the client's timeout (a slow script, a fork): the rate check times out
    (`unavailable`), and Redis runs it once it is free. Sent again on a new connection, it
    would run twice and charge the user's budget twice for one request."""
    import redis.asyncio as aioredis

    from tests.conftest import OwnRedis

    redis = OwnRedis(tmp_path)
    redis.start()
    try:
        async with open_harness(redis.url) as h:
            limiter = await h.limiter(0.001, 5)  # no refill during the test
            assert await limiter.check("alice") == 0
            busy = aioredis.Redis.from_url(redis.url)  # no timeout: it waits for its script
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(aio_as_trio(busy.eval), _BUSY, 0, 3.0)
                    await trio.sleep(0.3)  # Redis is busy
                    with pytest.raises(GB6Error) as err, trio.fail_after(10):
                        await limiter.check("alice")
                    assert err.value.code == UNAVAILABLE
            finally:
                await aio_as_trio(busy.aclose)()
            allowed = 0
            while await limiter.check("alice") == 0:
                allowed += 1
            assert allowed == 3  # 5, less the first check and the one that timed out
    finally:
        redis.stop()


async def test_redis_unreachable_is_unavailable() -> None:
    import redis.asyncio as aioredis

    async with trio_asyncio.open_loop():
        with pytest.raises(GB6Error) as err:
            async with open_redis(NOBODY):
                pass
        assert err.value.code == UNAVAILABLE
        # A limiter whose Redis goes away answers `unavailable`, and keeps serving.
        client = aioredis.Redis.from_url(NOBODY, socket_connect_timeout=1)
        try:
            limiter = RedisRateLimiter(client, prefix="gb6test:", rate=RATE, burst=3)
            async with trio.open_nursery() as nursery:
                await nursery.start(limiter.run)
                for _ in range(2):
                    with pytest.raises(GB6Error) as err, trio.fail_after(10):
                        await limiter.check("alice")
                    assert err.value.code == UNAVAILABLE
                nursery.cancel_scope.cancel()
            with pytest.raises(GB6Error) as err:
                await limiter.check("alice")
            assert err.value.code == UNAVAILABLE  # stopped
        finally:
            await aio_as_trio(client.aclose)()


async def test_presence_shown_from_a_dead_edge_goes_offline(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice's edge dies (kill -9: nobody says "offline"). Edge b, which told its clients she was
    online, finds her sessions gone once they lapse, and tells them she is offline, once."""
    from edge import shared_signals

    monkeypatch.setattr(shared_signals, "SWEEP_S", TTL / 2)
    async with open_harness(where) as h:
        a, a_sessions, a_scope = await h.signals("edge-a")
        b, _, _ = await h.signals("edge-b")
        shown: list[tuple[str, str]] = []
        b.on_presence = lambda user, status: shown.append((user, status))
        await h.start(a)
        await h.start(b)
        await b.follow_instance("ins_1")
        now = await a_sessions.add("alice", "ses_1", "ins_1")
        assert (now.status, now.changed) == ("online", True)  # her first session
        a.announce("ins_1", now)
        await eventually(lambda: shown == [("alice", "online")])
        for _ in range(4):  # alive: her sessions are heartbeated, no sweep says otherwise
            await trio.sleep(TTL / 2)
        assert shown == [("alice", "online")]
        a_scope.cancel()  # edge-a "dies"
        await eventually(lambda: shown == [("alice", "online"), ("alice", "offline")], 10 * TTL)
        await trio.sleep(TTL)
        assert shown == [("alice", "online"), ("alice", "offline")]  # once


async def test_presence_is_decided_once_by_the_call_that_changes_it(where: str) -> None:
    """Each add, remove or away decides the user's presence over every edge in one atomic step
    and says whether it changed it, with a version that orders her statuses. So a reconnect on
    edge b racing the close of her old socket on edge a ends online, in either order: the
    close never decides "offline" from a read made before the new session was there."""
    async with open_harness(where) as h:
        a, _ = await h.sessions("edge-a", ttl=TTL)
        b, _ = await h.sessions("edge-b", ttl=TTL)
        seen: list[Presence] = []

        async def did(call: Awaitable[Presence]) -> tuple[str, bool]:
            now = await call
            assert now.user == "alice"
            if seen:  # a newer version when decided, the same one otherwise
                assert now.version > seen[-1].version if now.changed else now == seen[-1]
            seen.append(attrs.evolve(now, changed=False))
            return now.status, now.changed

        assert await did(a.add("alice", "ses_1", "ins_1")) == ("online", True)
        assert await did(a.remove("alice", "ses_1")) == ("offline", True)  # the old socket
        assert await did(b.add("alice", "ses_2", "ins_1")) == ("online", True)  # then her new
        assert await did(b.add("alice", "ses_3", "ins_1")) == ("online", False)  # her new one
        assert await did(b.remove("alice", "ses_2")) == ("online", False)  # then her old one
        assert await did(a.add("alice", "ses_4", "ins_1")) == ("online", False)
        assert await did(a.set_away("alice", True)) == ("online", False)  # online on b
        assert await did(b.set_away("alice", True)) == ("away", True)
        assert await did(a.remove("alice", "ses_4")) == ("away", False)  # b has her away
        assert await did(b.set_away("alice", False)) == ("online", True)
        assert await did(b.remove("alice", "ses_3")) == ("offline", True)
        assert await did(b.remove("alice", "ses_3")) == ("offline", False)
        assert await did(a.remove("alice", "ses_1")) == ("offline", False)
        assert await a.settle({"alice": "ins_1"}) == [seen[-1]]  # as decided: nothing to do
        (bob,) = await a.settle({"bob": "ins_1"})  # never decided: now offline, with a version
        assert (bob.status, bob.changed) == ("offline", True) and bob.version > 0
        assert await a.settle({"bob": "ins_1"}) == [attrs.evolve(bob, changed=False)]


async def test_redis_a_session_added_after_redis_lost_the_keys_is_online(redis_url: str) -> None:
    """Redis lost its keys, the edge's liveness key with them, and a hello comes before the
    edge's next heartbeat writes it again: the edge adding the session is alive all the same,
    so its user is online (not the session dropped as a dead edge's, and nobody told)."""
    async with open_harness(redis_url) as h:
        a, _ = await h.sessions("edge-a", ttl=10.0)  # no heartbeat during the test
        await a.add("alice", "ses_1", "ins_1")
        await aio_as_trio(_delete_prefixed)(h.admin, h.prefix)
        now = await a.add("bob", "ses_2", "ins_1")
        assert (now.status, now.changed) == ("online", True)
        assert await a.locate(["bob"]) == {}  # the edge's key is back only at its heartbeat
        assert (await a.settle({"bob": "ins_1"}))[0].status == "online"  # held here


async def test_an_edge_settles_its_own_users_too(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice is online on edge c and away on edge a. Edge c dies: she is away now, and edge a,
    whose clients were told she is online, tells them so (nobody else may be there to)."""
    from edge import shared_signals

    monkeypatch.setattr(shared_signals, "SWEEP_S", 3600)  # the test sweeps by hand
    async with open_harness(where) as h:
        a, a_sessions, _ = await h.signals("edge-a")
        c_sessions, c_scope = await h.sessions("edge-c", ttl=TTL)
        shown: list[tuple[str, str]] = []
        a.on_presence = lambda user, status: shown.append((user, status))
        a.users_here = lambda: {"alice": "ins_1"}
        await h.start(a)
        assert (await c_sessions.add("alice", "ses_1", "ins_1")).changed
        a.announce("ins_1", await a_sessions.add("alice", "ses_2", "ins_1"))
        a.announce("ins_1", await a_sessions.set_away("alice", True))
        assert shown == [("alice", "online")]  # online on edge c
        c_scope.cancel()  # edge c dies

        async def away() -> bool:
            await a.sweep()
            return shown == [("alice", "online"), ("alice", "away")]

        await eventually(away, 10 * TTL)


async def test_an_edge_tells_a_users_statuses_in_the_order_they_were_decided(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signals from different edges may arrive out of order: one older than what an edge told
    its clients last is not told. One without a version (an edge of an older release) is told
    as it comes."""
    from edge import shared_signals
    from edge.shared_signals import instance_channel

    monkeypatch.setattr(shared_signals, "SWEEP_S", 3600)  # no sweep: only the signals tell
    async with open_harness(where) as h:
        b, _, _ = await h.signals("edge-b")
        shown: list[tuple[str, str]] = []
        b.on_presence = lambda user, status: shown.append((user, status))
        await h.start(b)
        await b.follow_instance("ins_1")
        other = await h.pubsub()
        for status, version in (("online", 5), ("offline", 3), ("away", 7), ("online", 7)):
            signal = {"edge": "x", "kind": "presence", "user": "alice", "status": status}
            other.publish(instance_channel("ins_1"), orjson.dumps({**signal, "version": version}))
        old = {"edge": "x", "kind": "presence", "user": "bob", "status": "online"}
        other.publish(instance_channel("ins_1"), orjson.dumps(old))
        await eventually(lambda: len(shown) == 3)
        assert shown == [("alice", "online"), ("alice", "away"), ("bob", "online")]


async def test_a_presence_change_whose_signal_was_lost_is_told_by_the_sweep(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signals are ephemeral: the one that said a change may be lost (a publish queue full, a
    subscriber's inbox full, Redis cut off). The next sweep tells it: users shown online or
    away are settled, and each instance followed has its change feed read on from where the
    last read ended (from where it was when the edge began to follow the instance)."""
    from edge import shared_signals

    monkeypatch.setattr(shared_signals, "SWEEP_S", 3600)  # the test sweeps by hand
    async with open_harness(where) as h:
        a, _ = await h.sessions("edge-a", ttl=TTL)
        b, _, _ = await h.signals("edge-b")
        shown: list[tuple[str, str]] = []
        b.on_presence = lambda user, status: shown.append((user, status))
        await h.start(b)
        assert (await a.add("carol", "ses_0", "ins_1")).changed  # before b follows ins_1
        await b.follow_instance("ins_1")
        await b.sweep()
        assert shown == []  # told by the signal b did not follow, if anyone needed it
        # Each change below is decided on edge a and said by no signal.
        assert (await a.add("alice", "ses_1", "ins_1")).changed
        assert (await a.add("dave", "ses_2", "ins_2")).changed  # an instance b does not follow
        await b.sweep()
        assert shown == [("alice", "online")]
        assert (await a.set_away("alice", True)).changed
        assert (await a.remove("carol", "ses_0")).changed
        await b.sweep()
        assert shown[1:] == [("alice", "away"), ("carol", "offline")]
        assert (await a.remove("alice", "ses_1")).changed
        await b.unfollow_unused()
        await b.unfollow_unused()  # ins_1 is no longer in use: its feed is not read
        await b.sweep()  # but alice, shown away, is settled
        assert shown[3:] == [("alice", "offline")]
        await b.sweep()
        assert len(shown) == 4  # each once


async def test_an_edge_that_missed_changes_of_the_feed_asks_its_users_presence(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edge that could not read an instance's change feed for longer than the feed keeps
    changes (Redis unreachable for over a minute, say) may have missed some: the read says so,
    and the edge asks the presence of the users its clients may be shown (`users_seen`: those
    sharing a room with them) and tells what changed, asking again at each sweep until that
    is answered. One it never told of, and offline, is not told. Its reads go on from there."""
    from edge import bus, redis_bus, shared_signals

    keep = 0.5
    monkeypatch.setattr(shared_signals, "SWEEP_S", 3600)  # the test reads by hand
    monkeypatch.setattr(bus, "FEED_KEEP_S", keep)
    monkeypatch.setattr(redis_bus, "FEED_KEEP_S", keep)
    async with open_harness(where) as h:
        a, _ = await h.sessions("edge-a", ttl=TTL)
        b, _, _ = await h.signals("edge-b")
        shown: list[tuple[str, str]] = []
        b.on_presence = lambda user, status: shown.append((user, status))
        seen = {"ins_1": ["alice", "bob", "carol", "alice"]}
        b.users_seen = lambda instance: seen.get(instance, [])
        await h.start(b)
        assert (await a.add("carol", "ses_0", "ins_1")).changed
        await b.follow_instance("ins_1")
        assert (await a.add("alice", "ses_1", "ins_1")).changed
        await b.read_feeds(["ins_1"])
        assert shown == [("alice", "online")]
        # Changes b does not read in time: gone from the feed once a later change trims it.
        assert (await a.set_away("alice", True)).changed
        assert (await a.add("bob", "ses_2", "ins_1")).changed
        assert (await a.remove("carol", "ses_0")).changed
        await trio.sleep(2 * keep)
        assert (await a.add("erin", "ses_3", "ins_1")).changed  # nobody here is shown erin
        ask = b.sessions.presence
        failures = [GB6Error(UNAVAILABLE, "Redis is back, not yet for this")]

        async def presence(users: Any) -> dict[str, str]:
            if failures:
                raise failures.pop()
            return await ask(users)

        monkeypatch.setattr(b.sessions, "presence", presence)
        await b.read_feeds(["ins_1"])  # it missed changes
        await b.resync_missed()  # and the resync fails: the next sweep asks again
        assert shown == [("alice", "online")]
        await b.read_feeds(["ins_1"])  # nothing missed since
        await b.resync_missed()
        assert shown == [("alice", "online"), ("alice", "away"), ("bob", "online")]
        assert (await a.remove("bob", "ses_2")).changed
        await b.read_feeds(["ins_1"])
        await b.resync_missed()
        assert shown[3:] == [("bob", "offline")]


async def test_redis_an_edge_says_its_users_online_again_after_redis_lost_them(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis loses its keys (restarted without persistence): the other edges' sweeps find
    alice's sessions gone and may tell their clients she is offline. Once her edge has written
    its sessions again, its own sweep decides she is online again, and says so."""
    from edge import shared_signals

    monkeypatch.setattr(shared_signals, "SWEEP_S", 3600)  # the test sweeps by hand
    async with open_harness(redis_url) as h:
        a, a_sessions, _ = await h.signals("edge-a")
        b, b_sessions, _ = await h.signals("edge-b")
        shown: list[tuple[str, str]] = []
        b.on_presence = lambda user, status: shown.append((user, status))
        a.users_here = lambda: {"alice": "ins_1"}
        await h.start(a)
        await h.start(b)
        await a.follow_instance("ins_1")  # as an edge does for its users' instances
        await b.follow_instance("ins_1")
        a.announce("ins_1", await a_sessions.add("alice", "ses_1", "ins_1"))
        await eventually(lambda: shown == [("alice", "online")])
        await aio_as_trio(_delete_prefixed)(h.admin, h.prefix)
        await b.sweep()  # before edge a wrote her session again: offline, as far as b knows
        assert shown[-1] == ("alice", "offline")

        async def online_again() -> bool:
            await a.sweep()
            return shown[-1] == ("alice", "online")

        await eventually(online_again, 10 * TTL)
        assert await b_sessions.presence(["alice"]) == {"alice": "online"}


async def test_an_edge_stops_following_the_channels_its_clients_left(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edge follows a room's channel while a client of its subscribes to the room, an
    instance's while a user of the instance is connected to it. The sweep unfollows the others
    (at most `_MAX_FOLLOWED` are followed: unused ones would crowd out new ones), but not one
    followed again since the sweep before, whose subscribe may not have made its hub yet."""
    from edge import shared_signals

    monkeypatch.setattr(shared_signals, "SWEEP_S", 3600)  # the test sweeps by hand
    async with open_harness(where) as h:
        a, _, _ = await h.signals("edge-a")
        b, _, _ = await h.signals("edge-b")
        typed: list[tuple[str, str]] = []
        b.on_typing = lambda room, user: typed.append((room, user))
        b.rooms_in_use = lambda: ["r1"]
        b.instances_in_use = lambda: {"ins_1"}
        await h.start(a)
        await h.start(b)
        for room in ("r1", "r2"):
            await b.follow_room(room)
        for instance in ("ins_1", "ins_2"):
            await b.follow_instance(instance)
        await b.unfollow_unused()  # each was followed since the sweep before
        assert b.pubsub.statistics().channels == 4
        await b.follow_room("r2")  # a subscribe to r2 under way: kept one more sweep
        await b.unfollow_unused()
        assert b.pubsub.statistics().channels == 3
        await b.unfollow_unused()
        assert b.pubsub.statistics().channels == 2  # r1 and ins_1, in use
        a.typing("r2", "bob")
        a.typing("r1", "carol")
        await eventually(lambda: typed == [("r1", "carol")])
        await b.follow_room("r2")  # a client subscribes to r2 again
        a.typing("r2", "bob")
        await eventually(lambda: typed == [("r1", "carol"), ("r2", "bob")])


async def test_a_user_is_away_once_every_edge_of_theirs_has_them_away(where: str) -> None:
    """`presence.set away` on one edge: other edges answer `presence.get` with `away` only once
    every edge holding a live session of the user has them away."""
    async with open_harness(where) as h:
        a, _ = await h.sessions("edge-a", ttl=TTL)
        b, b_scope = await h.sessions("edge-b", ttl=TTL)
        await a.add("alice", "ses_1", "ins_1")
        await b.add("alice", "ses_2", "ins_1")
        await a.add("bob", "ses_3", "ins_1")
        assert await a.presence(["alice", "bob", "carol"]) == {"alice": "online", "bob": "online"}
        await a.set_away("alice", True)
        assert await b.presence(["alice"]) == {"alice": "online"}  # her session on b is not
        await b.set_away("alice", True)
        assert await b.presence(["alice"]) == {"alice": "away"}
        await b.set_away("alice", False)
        assert await a.presence(["alice"]) == {"alice": "online"}
        await b.remove("alice", "ses_2")  # her last session on b
        assert await b.presence(["alice"]) == {"alice": "away"}
        await b.add("alice", "ses_4", "ins_1")  # back on b: b does not have her away
        assert await a.presence(["alice"]) == {"alice": "online"}
        b_scope.cancel()  # edge b dies: its sessions lapse

        async def away_on_a_only() -> bool:
            return await a.presence(["alice"]) == {"alice": "away"}

        await eventually(away_on_a_only, 10 * TTL)
        await a.remove("alice", "ses_1")
        assert await a.presence(["alice", "bob"]) == {"bob": "online"}


async def test_a_reconnect_on_the_same_edge_is_as_away_as_that_edge_says(where: str) -> None:
    """Alice, away on edge a, reconnects to it. The edge forgets her away with her old socket
    (her last session there), but the registry may get her new session before that socket's
    removal: she is online everywhere all the same, as edge a shows her. A new session on an
    edge that has her away keeps her away."""
    async with open_harness(where) as h:
        a, _ = await h.sessions("edge-a", ttl=TTL)
        b, _ = await h.sessions("edge-b", ttl=TTL)
        await a.add("alice", "ses_1", "ins_1")
        assert (await a.set_away("alice", True)).status == "away"
        now = await a.add("alice", "ses_2", "ins_1", away=False)  # before ses_1's removal
        assert (now.status, now.changed) == ("online", True)
        now = await a.remove("alice", "ses_1")
        assert (now.status, now.changed) == ("online", False)
        assert await b.presence(["alice"]) == {"alice": "online"}
        await a.set_away("alice", True)
        now = await a.add("alice", "ses_3", "ins_1", away=True)  # a second tab, away here
        assert (now.status, now.changed) == ("away", False)
        assert (await a.remove("alice", "ses_2")).status == "away"
        assert await b.presence(["alice"]) == {"alice": "away"}


async def test_redis_a_session_whose_removal_failed_is_removed_by_the_heartbeats(
    tmp_path: Path,
) -> None:
    """Redis is down as a session closes: its removal fails. Redis comes back with the session
    (from its snapshot), the edge lives on, and the user has another session, which keeps the
    user's key alive: the closed session would stay for good, a ghost session keeping the user
    online. The edge's heartbeats remove it once Redis answers."""
    from tests.conftest import OwnRedis

    redis = OwnRedis(tmp_path)
    redis.start()
    try:
        async with open_harness(redis.url) as h:
            sessions, _ = await h.sessions("edge-a", ttl=TTL)
            for session in ("ses_1", "ses_2"):
                await sessions.add("alice", session, "ins_1")
            await aio_as_trio(h.admin.save)()
            redis.stop()
            with pytest.raises(GB6Error) as err:
                await sessions.remove("alice", "ses_1")
            assert err.value.code == UNAVAILABLE
            redis.start()

            async def only_the_live_one() -> bool:
                try:
                    return await sessions.locate(["alice"]) == {"alice": {"ses_2": "edge-a"}}
                except GB6Error:  # reconnecting
                    return False

            await eventually(only_the_live_one, 10 * TTL)
    finally:
        redis.stop()


async def test_redis_commands_run_again_for_lost_scripts_keep_their_first_answers(
    redis_url: str,
) -> None:
    """After a Redis restart the scripts are gone: a pipeline runs again once they are loaded,
    and every command in it runs twice. A command that answered the first time keeps that
    answer: the heartbeat's SET … GET must still say the edge's key had lapsed, or the edge
    would not write its sessions again (they would stay lost until their users reconnect)."""
    from edge.redis_bus import _GCRA, _pipeline

    async with open_harness(redis_url) as h:
        key = h.prefix + "edge:test"
        await aio_as_trio(h.admin.script_flush)()

        def build(pipe: Any) -> None:
            pipe.set(key, b"1", px=10_000, get=True)
            pipe.evalsha(_GCRA.sha, 1, h.prefix + "rl:test", 1_000_000, 1_000_000)

        results = await aio_as_trio(_pipeline)(h.admin, [_GCRA], build)
        assert results[0] is None  # the key did not exist before this pipeline
        assert int(results[1]) == 0  # the script ran (the second time): no wait


async def test_redis_pubsub_follows_again_after_redis_restarts(tmp_path: Path) -> None:
    """Redis restarts under an edge's pub/sub: its reader reconnects while a follow runs. The
    follow either works or fails `unavailable` (the caller tries again later), never with an
    internal error; once Redis is back, follows work and signals arrive."""
    from tests.conftest import OwnRedis

    redis = OwnRedis(tmp_path)
    redis.start()
    try:
        async with open_harness(redis.url) as h:
            publisher, edge = await h.pubsub(), await h.pubsub()
            for round_ in range(5):
                redis.stop()
                redis.start()
                channel = f"room:r{round_}"
                with trio.fail_after(20):
                    while True:
                        try:
                            await edge.subscribe([channel])
                            break
                        except GB6Error as exc:
                            assert exc.code == UNAVAILABLE, exc
                            await trio.sleep(0.05)
                    while True:
                        publisher.publish(channel, b"hi")
                        with trio.move_on_after(0.2):
                            assert await receive(edge) == Signal(channel, b"hi")
                            break
    finally:
        redis.stop()


async def test_redis_an_unsubscribe_given_up_on_is_sent_once_redis_answers(
    tmp_path: Path,
) -> None:
    """Redis does not answer an unsubscribe in time: the caller hears `unavailable` and has
    dropped the channel already, so nothing would ask again. The edge's connection must still
    leave the channel once Redis answers, or it would receive (and drop) its signals for good."""
    from tests.conftest import OwnRedis

    redis = OwnRedis(tmp_path)
    redis.start()
    try:
        async with open_harness(redis.url) as h:
            bus = RedisPubSub(await h._client(), prefix=h.prefix, confirm_timeout=1.0)
            await h.start(bus)
            await bus.subscribe(["room:a"])
            await trio.sleep(0.2)  # the reader waits on its socket again: the queue is not read
            redis.freeze()
            try:
                with pytest.raises(GB6Error) as err:
                    await bus.unsubscribe(["room:a"])
                assert err.value.code == UNAVAILABLE
            finally:
                redis.thaw()

            async def subscribed(channel: str) -> int:
                rows = await aio_as_trio(h.admin.pubsub_numsub)(h.prefix + channel)
                return int(rows[0][1])

            async def followed_b() -> bool:
                try:
                    await bus.subscribe(["room:b"])  # wakes the edge's reader, if need be
                except GB6Error:  # reconnecting
                    return False
                return True

            await eventually(followed_b, 20)
            assert await subscribed("room:b") == 1
            assert await subscribed("room:a") == 0
    finally:
        redis.stop()


async def test_redis_pubsub_leaves_the_channels_the_edge_gave_up_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ways Redis could keep sending an edge a channel it no longer follows, for good: a
    subscribe that reached Redis after its caller gave up (here its confirmation is held back),
    and an unsubscribe Redis never read before the connection dropped (redis-py subscribes
    again, on its new connection, to every channel whose unsubscribe was not confirmed). The
    edge's reader unsubscribes both."""
    from tests.conftest import OwnRedis

    redis = OwnRedis(tmp_path)
    redis.start()
    try:
        async with open_harness(redis.url) as h:
            bus = RedisPubSub(await h._client(), prefix=h.prefix, confirm_timeout=0.5)
            await h.start(bus)

            async def subscribed(channel: str) -> int:
                rows = await aio_as_trio(h.admin.pubsub_numsub)(h.prefix + channel)
                return int(rows[0][1])

            async def left(channel: str) -> bool:
                try:
                    await bus.subscribe(["room:wake"])  # a message for the edge's reader
                    await bus.unsubscribe(["room:wake"])
                    return await subscribed(channel) == 0
                except GB6Error:  # reconnecting
                    return False

            confirmed = RedisPubSub._confirmed

            def slow(self: RedisPubSub, kind: str, name: bytes) -> None:
                if name != (h.prefix + "room:a").encode():
                    confirmed(self, kind, name)

            monkeypatch.setattr(RedisPubSub, "_confirmed", slow)
            with pytest.raises(GB6Error) as err:
                await bus.subscribe(["room:a"])
            assert err.value.code == UNAVAILABLE
            assert await subscribed("room:a") == 1  # it reached Redis all the same
            monkeypatch.setattr(RedisPubSub, "_confirmed", confirmed)
            await eventually(lambda: left("room:a"))

            await bus.subscribe(["room:b"])
            pubsub = bus._pubsub
            unsubscribe = pubsub.unsubscribe

            async def never_read(*channels: bytes) -> None:  # asyncio side
                # As if written to a connection about to drop: pending, never confirmed.
                monkeypatch.setattr(pubsub, "unsubscribe", unsubscribe)
                pubsub.pending_unsubscribe_channels.update(channels)

            monkeypatch.setattr(pubsub, "unsubscribe", never_read)
            with pytest.raises(GB6Error):
                await bus.unsubscribe(["room:b"])
            redis.stop()
            redis.start()
            await eventually(lambda: left("room:b"), 20)
    finally:
        redis.stop()


async def test_redis_a_follow_under_way_when_the_pubsub_stops_fails_at_once(
    redis_url: str,
) -> None:
    """The edge's pub/sub stops (the edge drains, or its Redis task fails) while a follow waits
    for Redis's confirmation: the caller hears `unavailable` then, not after the confirmation's
    timeout (a minute here), and the channel is not left followed."""
    async with open_harness(redis_url) as h:
        bus = RedisPubSub(await h._client(), prefix=h.prefix, confirm_timeout=60.0)
        scope = await h.start(bus)
        failed: list[GB6Error] = []

        async def follow() -> None:
            with pytest.raises(GB6Error) as err:
                await bus.subscribe(["room:a"])
            failed.append(err.value)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                # Once the follow has queued its command, it waits on Redis: its confirmation
                # takes round trips (the wake-up, the reader's SUBSCRIBE) that no tick completes.
                while not bus._waiters:
                    await trio.lowlevel.checkpoint()
                scope.cancel()
        assert failed[0].code == UNAVAILABLE
        assert "pub/sub stopped" in failed[0].message
        assert not bus.inbox.channels
        with pytest.raises(GB6Error) as err:
            await bus.subscribe(["room:b"])
        assert err.value.code == UNAVAILABLE  # a stopped pub/sub says so at once


async def test_redis_pubsub_finds_a_redis_host_lost_without_a_word(
    tmp_path: Path, netns: Netns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis's host drops off the network (no FIN, no RST reaches the edge) and comes back with
    a new Redis. The edge's pub/sub reader, blocked on its socket, learns it from TCP keepalives
    and follows its channels on the new Redis; without them it would wait on the dead
    connection for the kernel's default of 2 h, hearing nothing of those rooms meanwhile. The
    keepalives are shortened here (in production a lost host is found within ~25 s)."""
    import socket

    from edge import redis_bus

    quick = {socket.TCP_KEEPIDLE: 1, socket.TCP_KEEPINTVL: 1, socket.TCP_KEEPCNT: 2}
    monkeypatch.setattr(redis_bus, "_KEEPALIVE", quick)
    redis = OwnRedis(tmp_path, netns=netns)
    redis.start()
    try:
        async with open_harness(redis.url) as h:
            publisher, edge = await h.pubsub(), await h.pubsub()
            await edge.subscribe(["room:a"])

            async def heard(data: bytes, within: float) -> None:
                with trio.fail_after(within):
                    while True:
                        publisher.publish("room:a", data)
                        with trio.move_on_after(0.2):
                            while (await edge.receive()).data != data:
                                pass
                            return

            await heard(b"before", 5)
            netns.cut()  # what Redis sends from now on is lost, its FIN too
            redis.stop()
            netns.delete()  # and its TCP state with it: no FIN will ever come
            netns.create()
            redis.start()
            await heard(b"after", 20)
    finally:
        redis.stop()
