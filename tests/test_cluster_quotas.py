"""The `connections` quota across the edges of a cluster: counted by the instance's origin shard.

Each `gb6 edge` asks the shard that owns the instance for a slot at `hello` and gives it back
when the socket ends; when an edge's link ends (the edge killed) the shard frees all it held.
Real processes: two `gb6 origin` (tests/test_cluster.py's Cluster) and three `gb6 edge`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

import pytest
import trio

from tests.conftest import Node, Peer, connect
from tests.test_cluster import Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two origins, three edges; the third edge is killed by the first test (the others use
    the first two), and each test has instances of its own."""
    c = Cluster(tmp_path_factory.mktemp("quotas"))
    try:
        c.add_edges(3)
        yield c
    finally:
        c.stop()


def _connections_used(origin: Node, instance: str) -> int:
    r = origin.admin("GET", f"/v1/instances/{instance}/quotas")
    assert r.status_code == 200, r.text
    (usage,) = [u for u in r.json()["usage"] if u["resource"] == "connections"]
    return int(usage["used"])


async def _until_used(origin: Node, instance: str, n: int) -> None:
    """Releases travel to the origin after the socket ends: wait until it counts `n`."""
    with trio.fail_after(10):
        while await trio.to_thread.run_sync(_connections_used, origin, instance) != n:  # noqa: ASYNC110 - the count lives in another process
            await trio.sleep(0.05)


_connect = asynccontextmanager(connect)  # a raw socket (`hello` with a token when given)


def _socket(edge: Node) -> AbstractAsyncContextManager[Peer]:
    return _connect(edge)


async def test_connections_are_counted_across_edges(cluster: Cluster) -> None:
    origin = cluster.origins[0]
    tenant = origin.create_tenant(plan="free")
    # The operator's override reaches every edge: the limit is the origin's, not the plan's.
    r = origin.admin("PUT", f"/v1/instances/{tenant.instance}/quotas/connections", {"limit": 3})
    assert r.status_code == 200, r.text
    alice = tenant.user("alice")
    e0, e1, doomed = cluster.edges
    async with AsyncExitStack() as stack:
        held = {}
        for name, edge in (("e0", e0), ("e1", e1), ("doomed", doomed)):
            peer = await stack.enter_async_context(_socket(edge))
            await peer.ok("hello", token=alice.token)
            held[name] = peer
        assert await trio.to_thread.run_sync(_connections_used, origin, tenant.instance) == 3

        # The 4th across the edges is refused, on either edge, and its socket stays open.
        extra = await stack.enter_async_context(_socket(e1))
        refused = await extra.request("hello", token=alice.token)
        assert refused["op"] == "error" and refused["code"] == "quota_exceeded", refused
        assert "connections" in refused["message"]
        other = await stack.enter_async_context(_socket(e0))
        refused = await other.request("hello", token=alice.token)
        assert refused["code"] == "quota_exceeded", refused

        # Closing one on e0 frees a slot that the refused socket on e1 then takes.
        await held.pop("e0").ws.aclose()
        await _until_used(origin, tenant.instance, 2)
        await extra.ok("hello", token=alice.token)
        assert (await other.request("hello", token=alice.token))["code"] == "quota_exceeded"

        # kill -9 of an edge: the origin frees every slot that edge held.
        doomed.kill()
        await _until_used(origin, tenant.instance, 2)
        await other.ok("hello", token=alice.token)
        await other.ok("ping")
        await held["e1"].ok("ping")  # the others were never disturbed
        assert await trio.to_thread.run_sync(_connections_used, origin, tenant.instance) == 3


async def test_a_refused_hello_changes_nothing_and_other_instances_are_apart(
    cluster: Cluster,
) -> None:
    """Instances count apart, on their own shards; a bad token takes no slot."""
    t1 = cluster.origins[0].create_tenant(plan="free")
    t2 = cluster.origins[1].create_tenant(plan="free")
    for t in (t1, t2):
        r = t.node.admin("PUT", f"/v1/instances/{t.instance}/quotas/connections", {"limit": 1})
        assert r.status_code == 200, r.text
    u1, u2 = t1.user("a"), t2.user("b")
    e0, e1, _ = cluster.edges
    async with _connect(e0, u1.token) as a, _connect(e1, u2.token) as b:
        async with _connect(e1) as bad:
            assert (await bad.request("hello", token=u1.token + "x"))["code"] == "unauthorized"
        async with _connect(e1) as late:
            assert (await late.request("hello", token=u1.token))["code"] == "quota_exceeded"
        await a.ok("ping")
        await b.ok("ping")
        assert await trio.to_thread.run_sync(_connections_used, t1.node, t1.instance) == 1
        assert await trio.to_thread.run_sync(_connections_used, t2.node, t2.instance) == 1
    await _until_used(t1.node, t1.instance, 0)
    await _until_used(t2.node, t2.instance, 0)


async def test_an_origin_restart_keeps_the_sockets_and_counts_them_again(cluster: Cluster) -> None:
    """The origin's counts live in memory: when it restarts (kill -9), the edges keep the
    sockets of its instances, and each takes its slot again once its link is back, so the
    restarted shard's count matches the sockets actually open."""
    origin = cluster.origins[0]
    tenant = origin.create_tenant(plan="free")
    r = origin.admin("PUT", f"/v1/instances/{tenant.instance}/quotas/connections", {"limit": 2})
    assert r.status_code == 200, r.text
    alice = tenant.user("alice")
    e0, e1, _ = cluster.edges
    async with _connect(e0, alice.token) as a, _connect(e1, alice.token) as b:
        origin.kill()
        origin.start()  # same data and link port: the edges reconnect
        await _until_used(origin, tenant.instance, 2)
        await a.ok("ping")
        await b.ok("ping")
        async with _socket(e0) as extra:
            assert (await extra.request("hello", token=alice.token))["code"] == "quota_exceeded"
    await _until_used(origin, tenant.instance, 0)
