"""Edges and origins as separate processes: two `gb6 origin`, two `gb6 edge`, over sockets.

Tenancy is made on the origins' admin HTTP APIs (an instance lives on the shard that created
it); clients only ever talk to edges.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import secrets
import signal
import socket
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import attrs
import httpx
import psutil
import pytest
import trio
import trio_asyncio
from services import require
from trio_asyncio import aio_as_trio

from node.client import Client
from tests.conftest import (
    Node,
    OwnRedis,
    Peer,
    Tenant,
    broker_pid,
    close_code,
    connect,
    connect_from,
    frozen,
    restart_service,
    restartable_broker,
    restartable_postgres,
    start_side_by_side,
    wait_uncommitted,
)
from tests.pg_proxy import PgProxy, pg_proxy
from tests.tcp_proxy import tcp_proxy

SECRET = "test-link-secret-0123456789"
S1_PARTITIONS = 3


def _config(
    base: Path,
    origins: list[str],
    store: str = "",
    name: str = "cluster",
    redis: str = "",
    kv: str = "",
    cluster_toml: str = "",
) -> Path:
    path = base / f"{name}.toml"
    quoted = ", ".join(f'"{o}"' for o in origins)
    cluster = (
        f'link_secret = "{SECRET}"\norigins = [{quoted}]\nredis_url = "{redis}"\nkv = "{kv}"\n'
        + cluster_toml
    )
    path.write_text(f"[cluster]\n{cluster}{store}")
    return path


class Cluster:
    """Two origin shards on SQLite, or (`pg_dsn`) on PostgreSQL, each in a schema of its own,
    or (`pg_dsn` and `kafka`) with Kafka as log of record, each on a topic of its own."""

    def __init__(
        self,
        base: Path,
        pg_dsn: str | None = None,
        redis_url: str = "",
        kv: str = "",
        kafka: str | None = None,
        origin_toml: str = "",
        edge_cluster_toml: str = "",
    ) -> None:
        """`edge_cluster_toml`: lines of the edges' `[cluster]` table."""
        self.base = base
        self.pg_dsn = pg_dsn
        self.kafka = kafka
        suffix = uuid.uuid4().hex[:10]
        self.schemas = [f"t{suffix}_s{i}" for i in (1, 2)]
        self.topics = [f"gb6-cluster-{suffix}-s{i}" for i in (1, 2)]
        self.origins = []
        for i, schema, topic in zip((1, 2), self.schemas, self.topics, strict=True):
            store = ""
            if pg_dsn is not None:
                backend = "postgres" if kafka is None else "kafka"
                store = (
                    f'[store]\nbackend = "{backend}"\npg_dsn = "{pg_dsn}"\npg_schema = "{schema}"\n'
                )
            if kafka is not None:
                store += f'kafka_bootstrap = "{kafka}"\nkafka_topic = "{topic}"\n'
                if i == 1:  # s1 on several partitions, s2 on the default (one)
                    store += f"kafka_partitions = {S1_PARTITIONS}\n"
            conf = _config(base, [], store + origin_toml, name=f"s{i}", kv=kv)
            self.origins.append(
                Node(
                    base / f"s{i}",
                    extra_args=["--config", str(conf), "--shard", f"s{i}"],
                    command="origin",
                )
            )
        start_side_by_side(self.origins)
        # With a shard map in kv, edges find the origins there: no list to keep up to date.
        listed = [] if kv else [o.link for o in self.origins]
        self.config = _config(base, listed, redis=redis_url, kv=kv, cluster_toml=edge_cluster_toml)
        self.edges: list[Node] = []

    def edge(self, extra_toml: str = "") -> Node:
        return self.add_edges(1, extra_toml)[0]

    def add_edges(self, count: int, extra_toml: str = "") -> list[Node]:
        """`count` more edges, started side by side."""
        added = []
        for _ in range(count):
            n = len(self.edges)
            config = self.config
            if extra_toml:
                config = self.base / f"e{n}.toml"
                config.write_text(self.config.read_text() + extra_toml)
            e = Node(self.base / f"e{n}", extra_args=["--config", str(config)], command="edge")
            self.edges.append(e)
            added.append(e)
        start_side_by_side(added)
        return added

    def stop(self) -> None:
        for n in [*self.edges, *self.origins]:
            n.kill()
        if self.pg_dsn is not None:
            drops = "; ".join(f"DROP SCHEMA IF EXISTS {s} CASCADE" for s in self.schemas)
            asyncio.run(_pg(self.pg_dsn, drops))
        if self.kafka is not None:
            _delete_topics(self.kafka, self.topics)

    def stored(self, shard: int, room: str) -> list[tuple[int, str]]:
        """(seq, cid) of the room's events as the shard's store holds them, in seq order."""
        if self.pg_dsn is None:
            path = self.origins[shard].data_dir / "gb6.db"
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                q = "SELECT seq, cid FROM events WHERE room=? ORDER BY seq"
                return [(r[0], r[1]) for r in db.execute(q, (room,))]
            finally:
                db.close()
        q = f"SELECT seq, cid FROM {self.schemas[shard]}.events WHERE room = $1 ORDER BY seq"
        return [(r[0], r[1]) for r in asyncio.run(_pg(self.pg_dsn, q, room))]


def _delete_topics(bootstrap: str, topics: list[str]) -> None:
    """The topics and their usage topics (one an origin never started on has none)."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AdminClient

    from origin.kafka_records import usage_topic

    usage = [usage_topic(t) for t in topics]
    admin = AdminClient({"bootstrap.servers": bootstrap})  # alive until the answers came
    for topic, future in admin.delete_topics(topics + usage, operation_timeout=10).items():
        try:
            future.result(timeout=15)
        except Exception as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if topic not in usage or err is None or err.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise


async def _pg(dsn: str, query: str, *args: Any) -> list[Any]:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args)) if args else [await conn.execute(query)]
    finally:
        await conn.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres", "kafka"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    dsn = require("postgres") if request.param in ("postgres", "kafka") else None
    kafka = require("kafka") if request.param == "kafka" else None
    c = Cluster(Path(tmp_path_factory.mktemp("cluster")), dsn, kafka=kafka)
    try:
        c.add_edges(2)
        yield c
    finally:
        c.stop()


async def _until_hello(edge: Node, token: str, seconds: float) -> None:
    """Until `edge` takes a hello with `token`; `unavailable` (its shard not reached yet)
    meanwhile, never anything else."""
    with trio.fail_after(seconds):
        while True:
            async with _peer(edge, None) as p:
                reply = await p.request("hello", token=token)
            if reply["op"] == "ok":
                return
            assert reply["code"] == "unavailable", reply
            await trio.sleep(0.2)


def _peer(edge: Node, token: str | None) -> Any:
    from contextlib import asynccontextmanager

    return asynccontextmanager(lambda: connect(edge, token))()


async def test_clients_on_two_edges_converse(cluster: Cluster) -> None:
    tenant = cluster.origins[0].create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    e1, e2 = cluster.edges[0], cluster.edges[1]
    async with _peer(e1, alice.token) as a, _peer(e2, bob.token) as b:
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]["id"]
        # bob's edge learns of the room from the origin's push, not from bob.
        with trio.fail_after(5):
            while not any(r["id"] == room for r in (await b.ok("rooms"))["rooms"]):  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert (await b.ok("subscribe", room=room, after=0))["head"] == 0
        await a.ok("subscribe", room=room, after=0)
        s1 = (await a.ok("send", room=room, cid="c1", body={"text": "hi bob"}))["seq"]
        ev = await b.event("message")
        assert (ev["seq"], ev["sender"], ev["body"]) == (s1, alice.id, {"text": "hi bob"})
        s2 = (await b.ok("send", room=room, cid="c2", body={"text": "hi alice"}))["seq"]
        assert s2 == s1 + 1
        mine, theirs = await a.event("message"), await a.event("message")
        assert [mine["seq"], theirs["seq"]] == [s1, s2]
        # A repeated cid answers with the original seq, across edges too.
        assert (await a.ok("send", room=room, cid="c1", body={"text": "again"}))["seq"] == s1
        hist = (await b.ok("history", room=room, limit=10))["messages"]
        assert [m["seq"] for m in hist] == [s1, s2]
        await b.ok("receipt", room=room, read=s2)
        rooms = (await b.ok("rooms"))["rooms"]
        assert [(r["id"], r["head"], r["read"]) for r in rooms] == [(room, s2, s2)]
        hits = (await a.ok("search", query="alice"))["hits"]
        assert [h["seq"] for h in hits] == [s2]
        # A late subscriber on the other edge catches up from the origin's store.
        async with _peer(e1, bob.token) as b2:
            await b2.ok("subscribe", room=room, after=0)
            got = [await b2.event("message"), await b2.event("message")]
            assert [g["seq"] for g in got] == [s1, s2]


async def test_two_instances_live_on_two_shards(cluster: Cluster) -> None:
    t1 = cluster.origins[0].create_tenant()
    t2 = cluster.origins[1].create_tenant()
    u1, u2 = t1.user("one"), t2.user("two")
    e1, e2 = cluster.edges
    async with _peer(e2, u1.token) as p1, _peer(e1, u2.token) as p2:
        r1 = (await p1.ok("room.create", name="a", kind="chat", members=[]))["room"]["id"]
        r2 = (await p2.ok("room.create", name="b", kind="chat", members=[]))["room"]["id"]
        assert (await p1.ok("send", room=r1, cid="x", body={"text": "on s1"}))["seq"] == 1
        assert (await p2.ok("send", room=r2, cid="x", body={"text": "on s2"}))["seq"] == 1
        # Each room's log is in its own shard's store only; neither is seen by the other tenant.
        for shard, room, other in ((0, r1, r2), (1, r2, r1)):
            assert [cid for _, cid in await _stored_when_persisted(cluster, shard, room, 1)] == [
                "x"
            ]
            assert await trio.to_thread.run_sync(cluster.stored, shard, other) == []
        refused = await p1.request("subscribe", room=r2, after=0)
        assert refused["op"] == "error" and refused["code"] == "not_found", refused
        refused = await p2.request("history", room=r1, limit=5)
        assert refused["op"] == "error" and refused["code"] == "not_found", refused
        # A receipt on another tenant's room answers as one on a room that does not exist.
        for room in (r1, "room_doesnotexist"):
            refused = await p2.request("receipt", room=room, read=1)
            assert refused["op"] == "error" and refused["code"] == "not_found", refused
        assert (await p1.ok("search", query="on"))["hits"][0]["room"] == r1
        assert [h["room"] for h in (await p2.ok("search", query="on"))["hits"]] == [r2]


async def _storm(
    urls: Callable[[], str], token: str, room: str, name: str, n: int, acked: dict[str, int]
) -> None:
    """Send `n` messages through the SDK, which resends unanswered cids after reconnects."""
    async with Client(urls, token, backoff_initial=0.05, backoff_max=0.5, seed=1) as client:
        for i in range(n):
            cid = f"{name}-{i}"
            ack = await client.send(room, f"m {cid}", cid=cid)
            acked[cid] = ack.seq
            if i % 10 == 9:
                await trio.sleep(0.005)


async def _read_room(edge: Node, token: str, room: str, expect: int) -> list[dict[str, Any]]:
    async with _peer(edge, token) as p:
        head = (await p.ok("subscribe", room=room, after=0))["head"]
        assert head >= expect
        events: list[dict[str, Any]] = []
        p.timeout = 20
        while len(events) < head:
            ev = await p.event("message")
            events.append(ev)
        return events


def _check_log(events: list[dict[str, Any]], acked: dict[str, int]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "gap or disorder"
    cids = [e["cid"] for e in events]
    assert len(cids) == len(set(cids)), "a message was stored twice"
    stored = {e["cid"]: e["seq"] for e in events}
    for cid, seq in acked.items():
        assert stored.get(cid) == seq, f"acknowledged {cid} (seq {seq}) missing or moved"


async def test_an_edge_cut_off_from_a_shard_keeps_its_clients_and_brings_what_they_missed(
    tmp_path: Path,
) -> None:
    """A network partition between an edge and an origin shard (the origin goes on serving the
    other edge): the cut-off edge's clients stay connected, and once the partition heals they
    get the events sent meanwhile, in seq order, then live ones, without reconnecting."""
    c = Cluster(tmp_path)
    try:
        s1, s2 = c.origins
        with tcp_proxy(s1.link) as proxy:
            config = _config(tmp_path, [proxy.address, s2.link], name="cut")
            cut_off = Node(tmp_path / "cut", extra_args=["--config", str(config)], command="edge")
            cut_off.start()
            c.edges.append(cut_off)
            other = c.edge()
            tenant = s1.create_tenant()
            alice, bob = tenant.user("alice"), tenant.user("bob")
            async with _peer(cut_off, alice.token) as a, _peer(other, bob.token) as b:
                room = await b.ok("room.create", name="r", kind="chat", members=[alice.id])
                room_id = room["room"]["id"]
                with trio.fail_after(5):
                    while not any(r["id"] == room_id for r in (await a.ok("rooms"))["rooms"]):  # noqa: ASYNC110
                        await trio.sleep(0.05)
                await a.ok("subscribe", room=room_id, after=0)
                await b.ok("send", room=room_id, cid="m1", body={"text": "1"})
                assert (await a.event("message"))["seq"] == 1
                gaps = _metrics(cut_off)["gb6_hub_gaps_total"]
                proxy.cut()
                assert proxy.cuts == 1
                for i in (2, 3):
                    await b.ok("send", room=room_id, cid=f"m{i}", body={"text": f"{i}"})
                await a.ok("ping")  # the cut-off edge still serves its client
                proxy.heal()
                got = [await a.event("message") for _ in range(2)]
                assert [(e["seq"], e["cid"]) for e in got] == [(2, "m2"), (3, "m3")]
                assert _metrics(cut_off)["gb6_hub_gaps_total"] == gaps + 1  # read from the store
                await b.ok("send", room=room_id, cid="m4", body={"text": "4"})
                assert (await a.event("message"))["seq"] == 4
    finally:
        c.stop()


async def test_kill9_edge_mid_stream_clients_resume_on_the_other(
    cluster: Cluster, tmp_path: Path
) -> None:
    tenant: Tenant = cluster.origins[0].create_tenant()
    users = [tenant.user(f"k{i}") for i in range(3)]
    doomed = cluster.edge()  # an edge of this test's own, killed mid-stream
    survivor = cluster.edges[0]
    async with _peer(survivor, users[0].token) as owner:
        room = (
            await owner.ok("room.create", name="k", kind="chat", members=[u.id for u in users])
        )["room"]["id"]
    urls = itertools.chain([doomed.ws_url], itertools.repeat(survivor.ws_url))
    url_of: dict[str, Iterator[str]] = {u.id: iter(urls) for u in users}
    acked: dict[str, int] = {}

    async def watcher() -> None:
        """A subscriber on the doomed edge: after the kill it resumes on the survivor and
        sees every event once, in order."""
        seen: list[int] = []
        it = itertools.chain([doomed.ws_url], itertools.repeat(survivor.ws_url))
        async with Client(lambda: next(it), users[2].token, backoff_initial=0.05) as c:
            await c.subscribe(room, after=0)
            with trio.fail_after(30):
                async for ev in c.events():
                    if ev.get("type") == "message":
                        seen.append(ev["seq"])
                        if len(seen) == 2 * 150:
                            break
        assert seen == list(range(1, 301)), "the watcher missed or repeated events"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher)
        for u in users[:2]:
            nursery.start_soon(
                _storm, lambda uid=u.id: next(url_of[uid]), u.token, room, u.id, 150, acked
            )
        with trio.fail_after(20):
            while len(acked) < 60:  # noqa: ASYNC110 - polling the storm's progress
                await trio.sleep(0.01)
        doomed.kill()
    assert len(acked) == 300
    _check_log(await _read_room(survivor, users[0].token, room, 300), acked)


async def test_kill9_origin_mid_stream_restart_continues_gapless(cluster: Cluster) -> None:
    origin = cluster.origins[1]
    tenant: Tenant = origin.create_tenant()
    users = [tenant.user(f"o{i}") for i in range(2)]
    e1, e2 = cluster.edges[0], cluster.edges[1]
    async with _peer(e1, users[0].token) as owner:
        room = (
            await owner.ok("room.create", name="o", kind="chat", members=[u.id for u in users])
        )["room"]["id"]
    acked: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        for u, e in zip(users, (e1, e2), strict=True):
            nursery.start_soon(_storm, lambda e=e: e.ws_url, u.token, room, u.id, 200, acked)
        with trio.fail_after(20):
            while len(acked) < 80:  # noqa: ASYNC110 - polling the storm's progress
                await trio.sleep(0.01)
        assert origin.proc is not None
        # Kafka: the shard's persister, a child process. It must die with its origin.
        children = psutil.Process(origin.proc.pid).children()
        assert len(children) == (1 if cluster.kafka else 0)
        origin.kill()
        await trio.sleep(0.3)
        origin.start()  # same data, same link port: the edges reconnect
    _, alive = psutil.wait_procs(children, timeout=15)
    assert alive == []
    assert len(acked) == 400
    _check_log(await _read_room(e2, users[1].token, room, 400), acked)
    # And in the shard's own store (PostgreSQL in the postgres and kafka runs, where the
    # persister wrote it from the log): each acknowledged
    # message exactly once, at its seq, gapless.
    stored = await _stored_when_persisted(cluster, 1, room, len(acked))
    assert [seq for seq, _ in stored] == list(range(1, len(stored) + 1))
    assert len({cid for _, cid in stored}) == len(stored)
    assert {cid: seq for seq, cid in stored if cid in acked} == acked


async def test_an_origin_reports_its_metrics(cluster: Cluster) -> None:
    """`/metrics` of an origin: its commits, its appends by outcome, and with Kafka its log's
    and persister's figures."""
    origin = cluster.origins[0]
    alice = origin.create_tenant().user("alice")
    before = _metrics(origin)
    async with _peer(cluster.edges[0], alice.token) as a:
        room = (await a.ok("room.create", name="m", kind="chat", members=[]))["room"]["id"]
        first = await a.ok("send", room=room, cid="m1", body={"text": "counted"})
        again = await a.ok("send", room=room, cid="m1", body={"text": "counted"})
        assert again["seq"] == first["seq"]
        refused = await a.request("edit", room=room, cid="e1", target=999, body={"text": "x"})
        assert refused["op"] == "error"
    after = _metrics(origin)
    assert after["gb6_commits_total"] > before["gb6_commits_total"]
    assert after["gb6_appends_total"] - before["gb6_appends_total"] == 1
    assert after["gb6_append_repeats_total"] - before["gb6_append_repeats_total"] == 1
    assert after["gb6_append_refusals_total"] - before["gb6_append_refusals_total"] == 1
    kafka = cluster.kafka is not None
    for name in ("gb6_persister_restarts_total", "gb6_log_withdrawn_total", "gb6_key_filter_bytes"):
        assert (name in after) == kafka
    assert after.get("gb6_persister_restarts_total", 0) == 0
    if kafka:
        # The resend was a possible one: PostgreSQL was asked. The new room gets its filter.
        assert after["gb6_key_lookups_total"] > before["gb6_key_lookups_total"]
        assert after["gb6_key_filter_bytes"] > 0
        assert after["gb6_key_filters_given_up_total"] == 0  # 64 MiB: room for every filter
        deadline = trio.current_time() + 20
        while _metrics(origin)["gb6_key_filter_rooms"] <= before["gb6_key_filter_rooms"]:
            assert trio.current_time() < deadline, "the room's key filter was not loaded"
            await trio.sleep(0.05)
        # The persister catches up: nothing committed stays out of PostgreSQL.
        deadline = trio.current_time() + 20
        while _metrics(origin)["gb6_persister_rooms_behind"] > 0:
            assert trio.current_time() < deadline, "the persister did not catch up"
            await trio.sleep(0.05)


def _metrics(node: Node) -> dict[str, float]:
    res = httpx.get(node.http_url + "/metrics", timeout=10)
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    samples = [line.split() for line in res.text.splitlines() if not line.startswith("#")]
    return {name: float(value) for name, value in samples}


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, redis_url=require("redis"))
    try:
        c.add_edges(2)
        yield c
    finally:
        c.stop()


async def test_typing_and_presence_cross_edges_through_redis(redis_cluster: Cluster) -> None:
    tenant = redis_cluster.origins[0].create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    e1, e2 = redis_cluster.edges
    async with _peer(e2, bob.token) as b:
        room = (await b.ok("room.create", name="t", kind="chat", members=[alice.id]))["room"]["id"]
        await b.ok("subscribe", room=room, after=0)
        async with _peer(e1, alice.token) as a1:
            ev = await b.event("presence")
            assert (ev["user"], ev["status"]) == (alice.id, "online")
            got = (await b.ok("presence.get", users=[alice.id]))["presence"]
            assert got == {alice.id: "online"}  # her session is on the other edge
            await a1.ok("typing", room=room)
            ev = await b.event("typing")
            assert (ev["room"], ev["user"]) == (room, alice.id)
            await a1.ok("presence.set", status="away")
            assert (await b.event("presence"))["status"] == "away"
            got = (await b.ok("presence.get", users=[alice.id]))["presence"]
            assert got == {alice.id: "away"}  # said on her edge, asked on another
            await a1.ok("presence.set", status="online")
            assert (await b.event("presence"))["status"] == "online"
            # A second session of alice's on the other edge: she stays online when the first
            # one ends.
            async with _peer(e2, alice.token) as a2:
                await a1.ws.aclose()
                await trio.sleep(0.5)
                await b.ok("ping")
                assert [e for e in b.events if e.get("type") == "presence"] == []
                await a2.ok("typing", room=room)
                assert (await b.event("typing"))["user"] == alice.id
        # Her last session ended: now she is offline, once.
        ev = await b.event("presence")
        assert (ev["user"], ev["status"]) == (alice.id, "offline")


async def test_a_user_on_two_edges_is_away_once_both_have_them_away(
    redis_cluster: Cluster,
) -> None:
    """Presence is the user's, not each edge's: with a phone and a desktop on two edges, the
    idle desktop does not make them away to their roommates, nor its return online again;
    both idle does, once."""
    tenant = redis_cluster.origins[0].create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    e1, e2 = redis_cluster.edges

    async def no_presence_event(peer: Any) -> None:
        await trio.sleep(0.5)  # what another edge would say has arrived by now
        await peer.ok("ping")
        assert [e for e in peer.events if e.get("type") == "presence"] == []

    async with _peer(e2, bob.token) as b:
        await b.ok("room.create", name="t", kind="chat", members=[alice.id])
        async with _peer(e1, alice.token) as desktop:
            assert (await b.event("presence"))["status"] == "online"
            async with _peer(e2, alice.token) as phone:
                await desktop.ok("presence.set", status="away")
                await no_presence_event(b)
                got = (await b.ok("presence.get", users=[alice.id]))["presence"]
                assert got == {alice.id: "online"}
                await desktop.ok("presence.set", status="online")  # online all along
                await no_presence_event(b)
                await desktop.ok("presence.set", status="away")
                await no_presence_event(b)
                await phone.ok("presence.set", status="away")
                assert (await b.event("presence"))["status"] == "away"
                await phone.ok("presence.set", status="online")
                assert (await b.event("presence"))["status"] == "online"
            # The phone, the one session that had her online, is gone.
            assert (await b.event("presence"))["status"] == "away"
            got = (await b.ok("presence.get", users=[alice.id]))["presence"]
            assert got == {alice.id: "away"}
            async with _peer(e1, alice.token):  # a second tab where she is away: still away
                await no_presence_event(b)
                got = (await b.ok("presence.get", users=[alice.id]))["presence"]
                assert got == {alice.id: "away"}
        assert (await b.event("presence"))["status"] == "offline"
        await no_presence_event(b)


async def test_rate_limit_is_shared_by_the_edges(redis_cluster: Cluster) -> None:
    """Plan `free`: bursts of 100 per user, 50/s after. 90 requests on each of two edges fit
    each edge's own budget, but not the user's one budget across both. Sent at once, then read:
    the edges check them within a fraction of the 1.6 s the budget would take to refill."""
    tenant = redis_cluster.origins[0].create_tenant(plan="free")
    carol = tenant.user("carol")
    refused: list[dict[str, Any]] = []

    async def burst(edge: Node) -> None:
        async with _peer(edge, carol.token) as p:
            for i in range(90):
                await p.send({"op": "ping", "id": f"b{i}"})
            for _ in range(90):
                reply = await p.recv()
                if reply["op"] == "error":
                    refused.append(reply)

    async with trio.open_nursery() as nursery:
        for edge in redis_cluster.edges:
            nursery.start_soon(burst, edge)
    assert refused, "two edges let one user exceed the plan's burst"
    assert all(r["code"] == "rate_limited" and r["retry_after_ms"] > 0 for r in refused)


async def test_failed_hellos_are_counted_across_the_edges(tmp_path: Path) -> None:
    """An address's failed hellos count against one budget in Redis: after it is spent on one
    edge, another edge evaluates one more failure (it has no verdict of its own yet), then
    refuses the address `rate_limited`, even with a valid token."""
    limits = "[limits]\nper_ip_loopback = true\nws_auth_failures_rate = 0.5\n"
    limits += "ws_auth_failures_burst = 2\n"
    c = Cluster(tmp_path, redis_url=require("redis"))
    try:
        e1, e2 = c.edge(limits), c.edge(limits)
        alice = c.origins[0].create_tenant().user("alice")
        # An address of this test's own: the budget in Redis outlives the test.
        address = str(ipaddress.IPv4Address((127 << 24) + 256 + secrets.randbelow(1 << 23)))

        async def hello(edge: Node, token: str) -> tuple[int, dict[str, Any]]:
            async with connect_from(edge, address) as peer:
                await peer.send({"op": "hello", "id": "h", "token": token})
                code, frames = await close_code(peer, 10)
            assert len(frames) == 1, frames
            return code, frames[0]

        for edge in (e1, e1, e1, e2):  # e1: the budget, then over; e2: one more failure
            code, reply = await hello(edge, "gb6u_guess")
            assert (code, reply["code"]) == (4003, "unauthorized"), reply
        code, reply = await hello(e2, alice.token)
        assert (code, reply["code"]) == (1013, "rate_limited"), reply
        assert reply["retry_after_ms"] > 0
    finally:
        c.stop()


async def test_shard_map_in_kv_edges_find_shards_there(tmp_path: Path) -> None:
    """Origins register in the kv shard map and place their instances there; edges that list
    no origin find every shard in it, a shard started after them included."""
    kv_path = tmp_path / "kv.db"
    c = Cluster(tmp_path, kv=f"sqlite:{kv_path}")
    try:
        edge = c.edge()
        tenant = c.origins[1].create_tenant()
        alice, bob = tenant.user("alice"), tenant.user("bob")
        async with _peer(edge, alice.token) as a, _peer(edge, bob.token) as b:
            room = (await a.ok("room.create", name="m", kind="chat", members=[bob.id]))["room"]
            await b.ok("subscribe", room=room["id"], after=0)
            await a.ok("send", room=room["id"], cid="k1", body={"text": "via the map"})
            assert (await b.event("message"))["body"] == {"text": "via the map"}
        # A third shard, started after the edge: the edge finds it within a few seconds.
        late = Node(
            tmp_path / "s3",
            extra_args=["--config", str(tmp_path / "s1.toml"), "--shard", "s3"],
            command="origin",
        )
        late.start()
        c.origins.append(late)
        carol = late.create_tenant().user("carol")
        with trio.fail_after(15):
            while True:  # until the edge has found the new shard; before, `unavailable`
                async with _peer(edge, None) as p:
                    reply = await p.request("hello", token=carol.token)
                if reply["op"] == "ok":
                    break
                assert reply["code"] == "unavailable", reply  # never `unauthorized`: retry
                await trio.sleep(0.2)
        entries = await trio.to_thread.run_sync(_read_map, kv_path)
        assert entries[f"shardmap/instance/{tenant.instance}"] == "s2"
        assert entries["shardmap/shard/s3"] == late.link
        # s3 starts again at another address (a new host, say): the edge follows it there and
        # gives up the old one, so a token of no instance is `unauthorized` again, not
        # `unavailable` for good (the edge would wait for a shard no longer there).
        # Her socket kept through the old link's loss is closed to resume once the edge gives
        # that link up: nothing would bring it back there.
        old = late.link
        async with _peer(edge, carol.token) as kept:
            late.kill()
            late.link = ""  # a new port
            late.start()
            assert late.link != old
            with trio.fail_after(20):
                while True:
                    async with _peer(edge, None) as p, _peer(edge, None) as q:
                        carol_hello = await p.request("hello", token=carol.token)
                        unknown = await q.request("hello", token="gb6u_ins_nowhere.x")
                    if carol_hello["op"] == "ok" and unknown.get("code") == "unauthorized":
                        break
                    await trio.sleep(0.2)
            code, _ = await close_code(kept, 10)
            assert code == 1011
    finally:
        c.stop()


async def test_a_listed_shard_that_moves_hands_its_clients_to_its_new_address(
    tmp_path: Path,
) -> None:
    """An edge lists shard s1's address and also reads the shard map, and s1 starts again at
    another address (a standby on a new host): the edge keeps the listed link (it may come
    back), and follows s1 to the new one. A socket subscribed before the move is closed to
    resume (1011), and its resumed client gets what is sent after. Before, the socket and the
    room's hub stayed with the old link, and the subscriber got nothing more, with no error."""
    kv = f"sqlite:{tmp_path / 'kv.db'}"
    c = Cluster(tmp_path, kv=kv)
    try:
        c.config = _config(tmp_path, [o.link for o in c.origins], kv=kv)
        edge = c.edge()
        s1 = c.origins[0]
        alice = s1.create_tenant().user("alice")
        async with _peer(edge, alice.token) as kept:
            room = (await kept.ok("room.create", name="m", kind="chat", members=[]))["room"]["id"]
            await kept.ok("subscribe", room=room, after=0)
            await kept.ok("send", room=room, cid="before", body={"text": "before"})
            assert (await kept.event("message"))["seq"] == 1
            old = s1.link
            s1.kill()
            s1.link = ""  # a new port, registered in the shard map as it starts
            await trio.to_thread.run_sync(s1.start)
            assert s1.link != old
            code, _ = await close_code(kept, 20)
            assert code == 1011
        await _until_hello(edge, alice.token, 20)  # the edge has the new link
        async with _peer(edge, alice.token) as again:
            await again.ok("subscribe", room=room, after=1)
            await again.ok("send", room=room, cid="after", body={"text": "after"})
            assert (await again.event("message"))["seq"] == 2
    finally:
        c.stop()


@pytest.fixture
def kv_database() -> Iterator[str]:
    """A PostgreSQL database of its own for a `postgres:` shard map: the DSN to it."""
    dsn = require("postgres")
    name = f"gb6_kv_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg(dsn, f"CREATE DATABASE {name}"))
    try:
        yield urllib.parse.urlsplit(dsn)._replace(path=f"/{name}").geturl()
    finally:
        asyncio.run(_pg(dsn, f"DROP DATABASE {name} WITH (FORCE)"))


async def test_an_edge_whose_shard_map_does_not_answer_at_start_serves_once_it_does(
    tmp_path: Path, kv_database: str
) -> None:
    """An edge whose kv (the shard map) does not answer when it starts still starts, as one
    whose origins do not answer: its /readyz says `unreachable`, a hello is `unavailable`
    (retry; never `unauthorized`), and once the kv answers the edge finds the shards there
    and serves, with no restart."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here until the proxy does
    url = urllib.parse.urlsplit(kv_database)
    who = url.netloc.rpartition("@")[0]
    later = url._replace(netloc=f"{who}@127.0.0.1:{port}" if who else f"127.0.0.1:{port}")
    c = await trio.to_thread.run_sync(lambda: Cluster(tmp_path, kv=f"postgres:{kv_database}"))
    edge = Node(
        tmp_path / "late-kv-edge",
        extra_args=[
            "--config",
            str(_config(tmp_path, [], name="e", kv=f"postgres:{later.geturl()}")),
        ],
        command="edge",
    )
    try:
        await trio.to_thread.run_sync(edge.start)
        ready = await trio.to_thread.run_sync(lambda: httpx.get(edge.http_url + "/readyz"))
        assert ready.status_code == 503 and ready.json()["status"] == "unreachable", ready.text
        alice = c.origins[1].create_tenant().user("alice")
        async with _peer(edge, None) as p:
            reply = await p.request("hello", token=alice.token)
            assert reply["op"] == "error" and reply["code"] == "unavailable", reply
        with pg_proxy(kv_database, port):
            await _until_hello(edge, alice.token, 30)
            ready = await trio.to_thread.run_sync(lambda: httpx.get(edge.http_url + "/readyz"))
            assert ready.status_code == 200, ready.text
            edge.kill()
    finally:
        edge.kill()
        await trio.to_thread.run_sync(c.stop)


def _read_map(path: Path) -> dict[str, str]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT key, value FROM kv").fetchall()  # SqliteKv's one table
    finally:
        db.close()
    return {bytes(k).decode(): bytes(v).decode() for k, v in rows}


async def test_an_evicted_room_is_watched_again_without_a_gap(cluster: Cluster) -> None:
    """An edge that keeps one idle room stops watching the other (the origin then sends it
    heads only); subscribing to it again starts from the right head, nothing missed."""
    edge = cluster.edge("\n[limits]\nidle_room_cache_rooms = 1\n")
    tenant = cluster.origins[0].create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with _peer(edge, bob.token) as b, _peer(cluster.edges[0], alice.token) as a:
        r1 = (await a.ok("room.create", name="1", kind="chat", members=[bob.id]))["room"]["id"]
        r2 = (await a.ok("room.create", name="2", kind="chat", members=[bob.id]))["room"]["id"]
        s1 = (await a.ok("send", room=r1, cid="a", body={"text": "one"}))["seq"]
        for room in (r1, r2):  # each becomes idle on the edge in turn; r1 is evicted
            await b.ok("subscribe", room=room, after=0)
            await b.ok("unsubscribe", room=room)
        s2 = (await a.ok("send", room=r1, cid="b", body={"text": "two"}))["seq"]
        b.events.clear()
        await b.ok("subscribe", room=r1, after=0)
        got = [await b.event("message"), await b.event("message")]
        assert [(e["seq"], e["cid"]) for e in got] == [(s1, "a"), (s2, "b")]
        s3 = (await a.ok("send", room=r1, cid="c", body={"text": "three"}))["seq"]
        assert (await b.event("message"))["seq"] == s3


async def test_a_resume_ahead_of_this_edge_waits_for_its_pushes(cluster: Cluster) -> None:
    """A client that resumes on another edge may have seen seqs that edge's pushes of the room
    have not brought yet: its subscribe waits for them (bounded) instead of refusing `after`,
    which would lose the room for the client. Here the seq comes after the subscribe."""
    tenant = cluster.origins[0].create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    e1, e2 = cluster.edges[0], cluster.edges[1]
    async with (
        _peer(e1, alice.token) as a,
        _peer(e2, bob.token) as b,
        _peer(e2, bob.token) as resumed,
    ):
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]["id"]
        with trio.fail_after(5):
            while not any(r["id"] == room for r in (await b.ok("rooms"))["rooms"]):  # noqa: ASYNC110
                await trio.sleep(0.02)
        await b.ok("subscribe", room=room, after=0)  # e2 follows the room
        s1 = (await a.ok("send", room=room, cid="c1", body={"text": "one"}))["seq"]
        assert (await b.event("message"))["seq"] == s1
        heads: list[int] = []

        async def resume() -> None:
            heads.append((await resumed.ok("subscribe", room=room, after=s1 + 1))["head"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(resume)
            await trio.sleep(0.1)  # the subscribe reaches e2 first (it passes either way)
            s2 = (await a.ok("send", room=room, cid="c2", body={"text": "two"}))["seq"]
        assert heads == [s2] == [s1 + 1]
        s3 = (await a.ok("send", room=room, cid="c3", body={"text": "three"}))["seq"]
        assert (await resumed.event("message"))["seq"] == s3  # live from s2 on, s2 not again


@pytest.mark.parametrize("cluster", ["kafka"], indirect=True)  # fencing is the Kafka log's
async def test_a_second_origin_of_a_shard_fences_the_first(cluster: Cluster) -> None:
    """Start another `gb6 origin` with shard s1's name and config: its producer takes the
    shard's transactional id, so the first origin (a zombie now) refuses every send and writes
    nothing; a restarted s1 takes the shard back and continues gapless."""
    c = cluster
    first = c.origins[0]
    tenant = first.create_tenant()
    alice = tenant.user("alice")
    edge = c.edges[0]
    async with _peer(edge, alice.token) as a:
        room = (await a.ok("room.create", name="f", kind="chat", members=[]))["room"]["id"]
        assert (await a.ok("send", room=room, cid="before", body={"text": "x"}))["seq"] == 1
    twin = Node(
        c.base / "s1-twin",
        extra_args=["--config", str(c.base / "s1.toml"), "--shard", "s1"],
        command="origin",
    )
    await trio.to_thread.run_sync(twin.start)
    try:
        async with _peer(edge, alice.token) as a:
            reply = await a.request("send", room=room, cid="zombie", body={"text": "z"})
        assert reply["op"] == "error" and reply["code"] == "unavailable", reply
        ready = await trio.to_thread.run_sync(first.admin, "GET", "/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "stopped", ready.text
        assert "fenced" in ready.json()["reason"]  # for its operator: restart it, or not
        metrics = (await trio.to_thread.run_sync(first.admin, "GET", "/metrics")).text
        assert "gb6_store_stopped 1" in metrics
    finally:
        twin.kill()
    # The zombie wrote nothing: PostgreSQL (fed from the log) holds the first message only.
    assert await trio.to_thread.run_sync(c.stored, 0, room) == [(1, "before")]
    # Restarted, s1 fences the twin in turn and goes on from the log's head.
    await trio.to_thread.run_sync(first.restart)
    with trio.fail_after(20):
        while True:  # until the edge's link to the restarted origin is back
            async with _peer(edge, None) as a:
                reply = await a.request("hello", token=alice.token)
                if reply["op"] == "ok":
                    reply = await a.request("send", room=room, cid="after", body={"text": "y"})
            if reply["op"] == "ok":
                break
            assert reply["code"] == "unavailable", reply
            await trio.sleep(0.2)
    assert reply["seq"] == 2
    async with _peer(edge, alice.token) as a:  # history waits for the persister
        assert [m["seq"] for m in (await a.ok("history", room=room, limit=10))["messages"]] == [
            1,
            2,
        ]
    assert await trio.to_thread.run_sync(c.stored, 0, room) == [(1, "before"), (2, "after")]


@pytest.mark.parametrize("cluster", ["kafka"], indirect=True)
def test_each_shard_creates_its_topic_with_the_configured_partitions(cluster: Cluster) -> None:
    """`kafka_partitions` reaches the topic a shard creates (s1: 3; s2: the default, one),
    and the shards above already conversed, resumed and restarted on them."""
    from confluent_kafka.admin import AdminClient

    assert cluster.kafka is not None
    topics = AdminClient({"bootstrap.servers": cluster.kafka}).list_topics(timeout=10).topics
    assert [len(topics[t].partitions) for t in cluster.topics] == [S1_PARTITIONS, 1]


@pytest.mark.parametrize("value", ["0", "4097", '"8"', "2.5"])
def test_a_bad_kafka_partitions_is_refused_when_the_config_loads(
    tmp_path: Path, value: str
) -> None:
    from node.config import load
    from node.errors import GB6Error

    path = tmp_path / "bad.toml"
    path.write_text(f'[store]\nbackend = "kafka"\nkafka_partitions = {value}\n')
    with pytest.raises(GB6Error, match="kafka_partitions"):
        load(path, {})


async def _stored_when_persisted(
    cluster: Cluster, shard: int, room: str, at_least: int
) -> list[tuple[int, str]]:
    """The shard's stored events of `room` once it holds `at_least` of them: with Kafka as the
    log, an ok comes at the log's commit and the persister writes PostgreSQL a moment later."""
    with trio.fail_after(15):
        while True:
            stored = await trio.to_thread.run_sync(cluster.stored, shard, room)
            if len(stored) >= at_least:
                return stored
            await trio.sleep(0.05)


async def test_a_frozen_redis_does_not_hold_up_the_edges_requests(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    """Redis stops answering (frozen, or its host gone): a rate-limit check gives up after
    `LIMIT_WAIT_S` and lets its request through, and so do the checks of the pause after it,
    instead of each request waiting out the Redis client's timeouts (5 s or more each)."""
    c = Cluster(tmp_path, redis_url=own_redis.url)
    try:
        edge = c.edge()
        tenant = c.origins[0].create_tenant(plan="free")  # rate-limited: checks Redis
        carol = tenant.user("carol")
        async with _peer(edge, carol.token) as p:
            await p.ok("ping")
            own_redis.freeze()
            with trio.fail_after(3):  # the first waits 0.5 s, the next ones not at all
                for _ in range(3):
                    await p.ok("ping")
    finally:
        own_redis.stop()
        c.stop()


# Edges that sweep often, for the tests that wait for a sweep (10 s by default).
FAST_SWEEP_S = 1.0
FAST_SWEEP = f"presence_sweep_s = {FAST_SWEEP_S}\n"


async def _told_at_the_next_sweep(peer: Any, user: str, status: str) -> None:
    """Redis is back: the next sweep (once the edge reconnected) tells `peer` that `user` is
    `status`, and `presence.get` says so too."""
    peer.timeout = 10 * FAST_SWEEP_S  # the edge reconnects to Redis first
    ev = await peer.event("presence")
    assert (ev["user"], ev["status"]) == (user, status)
    got = await peer.ok("presence.get", users=[user])
    assert got["presence"] == {user: status}


async def test_presence_while_redis_is_down_is_unavailable_not_offline(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    """Without Redis an edge cannot know who is connected elsewhere: asked for a user not
    connected to it, it says `unavailable`, not `offline`. A user whose last session closes
    meanwhile is told `offline` to their roommates once Redis answers again (the next sweep)."""
    c = Cluster(tmp_path, redis_url=own_redis.url, edge_cluster_toml=FAST_SWEEP)
    try:
        edge = c.edge()
        tenant = c.origins[0].create_tenant()
        alice, bob = tenant.user("alice"), tenant.user("bob")
        async with _peer(edge, bob.token) as b:
            await b.ok("room.create", name="t", kind="chat", members=[alice.id])
            async with _peer(edge, alice.token) as a:
                ev = await b.event("presence")
                assert (ev["user"], ev["status"]) == (alice.id, "online")
                own_redis.stop()
                got = await b.ok("presence.get", users=[alice.id])  # she is on this edge
                assert got["presence"] == {alice.id: "online"}
                await a.ws.aclose()
            with trio.fail_after(10):
                while True:
                    reply = await b.request("presence.get", users=[alice.id])
                    if reply.get("code") == "unavailable":  # her close reached the edge
                        break
                    assert reply["presence"] == {alice.id: "online"}, reply
                    await trio.sleep(0.05)
            assert not [e for e in b.events if e.get("type") == "presence"]
            own_redis.start()
            await _told_at_the_next_sweep(b, alice.id, "offline")
    finally:
        own_redis.stop()
        c.stop()


async def test_a_user_connects_and_converses_while_redis_is_down(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    """Redis holds only what is shared between edges (presence, typing, rate limits): while it
    is down a user still connects and converses. Their session is written once Redis is back,
    and their roommates are told they are online then (the next sweep)."""
    c = Cluster(tmp_path, redis_url=own_redis.url, edge_cluster_toml=FAST_SWEEP)
    try:
        edge = c.edge()
        tenant = c.origins[0].create_tenant()
        alice, bob = tenant.user("alice"), tenant.user("bob")
        async with _peer(edge, bob.token) as b:
            room = (await b.ok("room.create", name="t", kind="chat", members=[alice.id]))["room"]
            await b.ok("subscribe", room=room["id"], after=0)
            own_redis.stop()
            async with _peer(edge, alice.token) as a:
                await a.ok("send", room=room["id"], cid="c1", body={"text": "hi"})
                assert (await b.event("message"))["body"] == {"text": "hi"}
                assert not [e for e in b.events if e.get("type") == "presence"]
                own_redis.start()
                await _told_at_the_next_sweep(b, alice.id, "online")
    finally:
        own_redis.stop()
        c.stop()


async def test_a_room_followed_while_redis_was_down_is_followed_once_it_is_back(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    """An edge follows a room's Redis channel (typing from other edges) when a client
    subscribes. A follow that failed while Redis was down is tried again at the next
    subscribe, though the room's hub lives on: typing crosses the edges again."""
    c = Cluster(tmp_path, redis_url=own_redis.url)
    try:
        e1, e2 = c.add_edges(2)
        tenant = c.origins[0].create_tenant()
        alice, bob = tenant.user("alice"), tenant.user("bob")
        async with _peer(e1, alice.token) as a, _peer(e2, bob.token) as b:
            room = (await a.ok("room.create", name="t", kind="chat", members=[bob.id]))["room"]
            room_id = room["id"]
            with trio.fail_after(5):
                while not any(r["id"] == room_id for r in (await b.ok("rooms"))["rooms"]):  # noqa: ASYNC110
                    await trio.sleep(0.02)
            own_redis.stop()
            await b.ok("subscribe", room=room_id, after=0)  # its follow fails
            own_redis.start()
            await a.ok("subscribe", room=room_id, after=0)
            with trio.fail_after(20):
                while True:
                    await b.ok("subscribe", room=room_id, after=0)
                    await a.ok("typing", room=room_id)
                    with trio.move_on_after(0.5):
                        if (await b.event("typing"))["user"] == alice.id:
                            break
    finally:
        own_redis.stop()
        c.stop()


def _kafka_cluster(tmp_path: Path, origin_toml: str = "") -> Iterator[Cluster]:
    """Kafka shards (with `origin_toml` added to their config) and one edge."""
    c = Cluster(tmp_path, require("postgres"), kafka=require("kafka"), origin_toml=origin_toml)
    try:
        c.edge()
        yield c
    finally:
        c.stop()


@pytest.fixture
def kafka_cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from _kafka_cluster(tmp_path)


@pytest.fixture
def slow_commit_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Kafka shards that give up on a commit after 4 s, and ask PostgreSQL about every cid (no
    resend filter), with one edge."""
    yield from _kafka_cluster(
        tmp_path, "kafka_commit_timeout_s = 4\n[limits]\nkey_filter_bytes = 0\n"
    )


async def test_an_origin_serves_again_once_kafka_answers_and_publishes_what_it_committed(
    slow_commit_cluster: Cluster,
) -> None:
    """The broker holds a send's record and stops answering before the commit reaches it: the
    send is `unavailable` and the origin says it stopped (/readyz). Once the broker is back (and
    commits it), the origin serves again without a restart: the message reaches the room's
    subscriber in place, a resend of its cid gets its seq, and seqs go on gapless."""
    c = slow_commit_cluster
    assert c.kafka is not None and c.pg_dsn is not None
    s1, edge = c.origins[0], c.edges[0]
    tenant = s1.create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    pid = broker_pid(c.kafka)
    async with trio_asyncio.open_loop(), _peer(edge, alice.token) as a, _peer(edge, bob.token) as b:
        room = (await a.ok("room.create", name="k", kind="chat", members=[bob.id]))["room"]["id"]
        await b.ok("subscribe", room=room, after=0)
        assert (await a.ok("send", room=room, cid="m1", body={"text": "1"}))["seq"] == 1
        assert (await b.event("message"))["seq"] == 1
        lock = await aio_as_trio(asyncpg.connect)(c.pg_dsn, timeout=10)
        try:
            await aio_as_trio(lock.execute)("BEGIN")
            # The send's check (a resend?) waits on this lock; its record is written meanwhile.
            await aio_as_trio(lock.execute)(
                f'LOCK TABLE "{c.schemas[0]}".event_keys IN ACCESS EXCLUSIVE MODE'
            )
            await a.send({"op": "send", "id": "u", "room": room, "cid": "u", "body": {"text": "2"}})
            await trio.to_thread.run_sync(wait_uncommitted, c.kafka, c.topics[0], room, 2)
            with frozen(pid):
                await aio_as_trio(lock.execute)("ROLLBACK")  # the check says: commit
                a.timeout = 30.0  # the commit's 4 s, then the abort's
                reply = await a.recv()
                assert (reply["op"], reply["re"], reply["code"]) == ("error", "u", "unavailable")
                ready = await trio.to_thread.run_sync(s1.admin, "GET", "/readyz")
                assert ready.status_code == 503 and ready.json()["status"] == "stopped"
        finally:
            await aio_as_trio(lock.close)()
        with trio.fail_after(120):
            while (await trio.to_thread.run_sync(s1.admin, "GET", "/readyz")).status_code != 200:  # noqa: ASYNC110 - polled
                await trio.sleep(0.2)
        metrics = await trio.to_thread.run_sync(_metrics, s1)
        assert (metrics["gb6_log_recoveries_total"], metrics["gb6_store_stopped"]) == (1, 0)
        b.timeout = 30.0
        event = await b.event("message")  # in place: bob's connection was not closed
        assert (event["seq"], event["cid"]) == (2, "u")
        assert (await a.ok("send", room=room, cid="u", body={"text": "2"}))["seq"] == 2
        assert (await a.ok("send", room=room, cid="m3", body={"text": "3"}))["seq"] == 3
        assert (await b.event("message"))["seq"] == 3
        history = (await a.ok("history", room=room, limit=10))["messages"]
        assert [(m["seq"], m["cid"]) for m in history] == [(1, "m1"), (2, "u"), (3, "m3")]
        quotas = s1.admin("GET", f"/v1/instances/{tenant.instance}/quotas").json()
        used = {u["resource"]: u["used"] for u in quotas["usage"]}
        assert used["messages"] == 3  # the one refused, then found committed, counts


@attrs.define
class _Sends:
    """One client's sends through an outage: each cid sent until it is acknowledged (what a
    client does with `unavailable`), then `after` more once `back` is set. `listener` (a
    subscriber that sends nothing meanwhile) is pinged every 10 s, so that the edge does not
    close it for silence (two missed heartbeats: 60 s) while a service comes back."""

    peer: Peer
    listener: Peer
    room: str
    after: int = 20
    back: trio.Event = attrs.Factory(trio.Event)
    acked: dict[str, int] = attrs.Factory(dict)
    refused: int = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_listener)
            await self._send()
            nursery.cancel_scope.cancel()

    async def _send(self) -> None:
        i = after = 0
        while after < self.after:
            cid = f"m{i}"
            while True:
                reply = await self.peer.request("send", room=self.room, cid=cid, body={"text": cid})
                if reply["op"] == "ok":
                    self.acked[cid] = reply["seq"]
                    break
                assert reply["code"] == "unavailable", reply
                self.refused += 1
                await trio.sleep(0.2)
            i += 1
            after += self.back.is_set()
            await trio.sleep(0.01)

    async def _keep_listener(self) -> None:
        for n in itertools.count():
            await trio.sleep(10)
            await self.listener.send({"op": "ping", "id": f"keep{n}"})  # its answer is dropped

    async def started(self, n: int) -> None:
        """Once `n` are acknowledged."""
        while len(self.acked) < n:  # noqa: ASYNC110 - polling the sender's progress
            await trio.sleep(0.01)


async def _check_room(c: Cluster, edge: Node, token: str, sends: _Sends) -> None:
    """Every acknowledged send is in the room once, at its seq, gapless: in what the listener
    (subscribed from seq 0) got live, with nothing after, in what a new subscriber reads, and in
    the shard's store."""
    acked, b = sends.acked, sends.listener
    b.timeout = 30.0
    _check_log([(await b.event("message")) for _ in acked], acked)
    with trio.move_on_after(0.5):
        extra = await b.event("message")
        raise AssertionError(f"pushed twice, or never acknowledged: {extra}")
    _check_log(await _read_room(edge, token, sends.room, len(acked)), acked)
    stored = await _stored_when_persisted(c, 0, sends.room, len(acked))
    assert [seq for seq, _ in stored] == list(range(1, len(acked) + 1))
    assert {cid: seq for seq, cid in stored} == acked


async def _filter_ready(origin: Node) -> None:
    """Once a room's resend filter on `origin` holds all its keys."""
    while not (await trio.to_thread.run_sync(_metrics, origin))["gb6_key_filter_rooms"]:  # noqa: ASYNC110
        await trio.sleep(0.05)


async def _through_outage(
    c: Cluster, service: str, outage: Callable[[_Sends], Awaitable[None]]
) -> _Sends:
    """Alice sends to a room of the first origin that Bob follows from seq 0 (both on the first
    edge), each cid until it is acknowledged. Once 20 are, `outage` takes `service` down (and
    returns once it is); `scripts/services up` starts it again (in any case: the rest of the
    suite needs it), 20 more are sent, and the room is checked (`_check_room`)."""
    tenant = c.origins[0].create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with _peer(c.edges[0], alice.token) as a, _peer(c.edges[0], bob.token) as b:
        room = (await a.ok("room.create", name="o", kind="chat", members=[bob.id]))["room"]["id"]
        await b.ok("subscribe", room=room, after=0)
        a.timeout = 60.0  # a send in flight when the service went waits out its timeouts
        sends = _Sends(a, b, room)
        try:
            with trio.fail_after(240):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sends.run)
                    await sends.started(20)
                    await outage(sends)
                    await trio.to_thread.run_sync(restart_service, service)
                    sends.back.set()
        finally:  # quick when it is up
            await trio.to_thread.run_sync(restart_service, service)
        await _check_room(c, c.edges[0], bob.token, sends)
    return sends


async def test_a_broker_killed_mid_stream_and_restarted_loses_nothing(
    slow_commit_cluster: Cluster,
) -> None:
    """kill -9 of the Kafka broker while a client sends, then `scripts/services up kafka`: the
    sends meanwhile are `unavailable`, the origin recovers in place (no restart), the same cids
    sent again are acknowledged once the broker is back, and every acknowledged message is in
    the room once, at its seq, gapless: in what a subscriber received live, in what a new
    subscriber reads, and in PostgreSQL."""
    c = slow_commit_cluster
    assert c.kafka is not None
    broker = psutil.Process(restartable_broker(c.kafka))

    async def kill(sends: _Sends) -> None:
        broker.kill()
        await trio.to_thread.run_sync(broker.wait, 30)

    sends = await _through_outage(c, "kafka", kill)
    assert sends.refused > 0, "no send met the broker gone"
    metrics = await trio.to_thread.run_sync(_metrics, c.origins[0])
    assert metrics["gb6_log_recoveries_total"] >= 1 and metrics["gb6_store_stopped"] == 0


async def test_a_postgres_crash_under_a_kafka_shard_loses_nothing(kafka_cluster: Cluster) -> None:
    """PostgreSQL crashes (an immediate shutdown: every backend gone, the WAL replayed at the
    next start) under a Kafka shard while a client sends, and `scripts/services up postgres`
    starts it again: sends to a room whose resend filter is ready are acknowledged meanwhile
    (Kafka is the log of record), any other is `unavailable` and acknowledged when sent again;
    once PostgreSQL is back the persister writes what it missed, and every acknowledged message
    is in the room once, at its seq, gapless (live, read back, and in PostgreSQL)."""
    c = kafka_cluster
    assert c.pg_dsn is not None
    postmaster = psutil.Process(restartable_postgres(c.pg_dsn))
    during = 0

    async def crash(sends: _Sends) -> None:
        nonlocal during
        await _filter_ready(c.origins[0])
        # Immediate shutdown: the postmaster ends once every backend has.
        postmaster.send_signal(signal.SIGQUIT)
        await trio.to_thread.run_sync(postmaster.wait, 30)
        before = len(sends.acked)
        await trio.sleep(2)
        during = len(sends.acked) - before

    await _through_outage(c, "postgres", crash)
    assert during > 0, "no send was acknowledged while PostgreSQL was down"


@pytest.fixture
def postgres_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Shards on PostgreSQL alone (it is their log of record), and one edge."""
    c = Cluster(tmp_path, require("postgres"))
    try:
        c.edge()
        yield c
    finally:
        c.stop()


async def test_a_postgres_crash_under_a_postgres_shard_loses_nothing(
    postgres_cluster: Cluster,
) -> None:
    """PostgreSQL, the log of record of a `postgres` shard, crashes (an immediate shutdown) while
    a client sends, and starts again: the sends meanwhile are `unavailable`, the shard serves
    again without a restart once its connections are made anew, and every acknowledged message
    is in the room once, at its seq, gapless (live, read back, and in PostgreSQL)."""
    c = postgres_cluster
    assert c.pg_dsn is not None
    postmaster = psutil.Process(restartable_postgres(c.pg_dsn))

    async def crash(sends: _Sends) -> None:
        postmaster.send_signal(signal.SIGQUIT)
        await trio.to_thread.run_sync(postmaster.wait, 30)
        await trio.sleep(1)

    sends = await _through_outage(c, "postgres", crash)
    assert sends.refused > 0, "no send met PostgreSQL gone"


@pytest.fixture
def proxied_postgres_cluster(tmp_path: Path) -> Iterator[tuple[Cluster, PgProxy]]:
    """`postgres_cluster` whose connections to PostgreSQL go through a `PgProxy`."""
    with pg_proxy(require("postgres")) as proxy:
        c = Cluster(tmp_path, proxy.dsn)
        try:
            c.edge()
            yield c, proxy
        finally:
            c.stop()


async def test_a_commit_whose_answer_is_lost_reaches_live_subscribers_in_order(
    proxied_postgres_cluster: tuple[Cluster, PgProxy],
) -> None:
    """PostgreSQL commits a batch of a `postgres` shard, and the connection breaks before the
    origin hears so (a crash at that moment; here a proxy cuts it): its sender is told
    `unavailable`, the next send takes the seq after it, and a subscriber following the room
    live is not closed (the edge sees a gap in the room's pushed seqs) but gets the committed
    message in its place, from the store. Its resend under the same cid gets the original
    seq, and nothing more reaches the subscriber."""
    c, proxy = proxied_postgres_cluster
    tenant = c.origins[0].create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with _peer(c.edges[0], alice.token) as a, _peer(c.edges[0], bob.token) as b:
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]["id"]
        await b.ok("subscribe", room=room, after=0)
        for cid in ("m1", "m2", "m3"):
            await a.ok("send", room=room, cid=cid, body={"text": cid})
        proxy.lose_next_commit_answer()
        reply = await a.request("send", room=room, cid="lost", body={"text": "lost"})
        assert reply["op"] == "error" and reply["code"] == "unavailable", reply
        assert proxy.cut.is_set()
        after = await a.ok("send", room=room, cid="m5", body={"text": "m5"})
        assert after["seq"] == 5  # "lost" was committed, at 4
        expected = [(1, "m1"), (2, "m2"), (3, "m3"), (4, "lost"), (5, "m5")]
        got = [await b.event("message") for _ in expected]
        assert [(e["seq"], e["cid"]) for e in got] == expected
        again = await a.ok("send", room=room, cid="lost", body={"text": "lost"})
        assert again["seq"] == 4
        with trio.move_on_after(0.5):
            extra = await b.event("message")
            raise AssertionError(f"pushed twice: {extra}")
        await b.ok("ping")  # still connected
    assert await trio.to_thread.run_sync(c.stored, 0, room) == expected
    assert (await trio.to_thread.run_sync(_metrics, c.edges[0]))["gb6_hub_gaps_total"] == 1


def test_an_edge_whose_origins_do_not_answer_is_not_ready(tmp_path: Path) -> None:
    """An edge whose origin shards are all unreachable starts (they may come later), but its
    /readyz says so: a load balancer must not send it clients, whose every hello would be
    `unavailable`. Its links wait for their origins together, not one after another."""
    closed = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed.append(f"127.0.0.1:{s.getsockname()[1]}")
    edge = Node(
        tmp_path / "edge",
        extra_args=[f"--origin={a}" for a in closed],
        command="edge",
        env={"GB6_LINK_SECRET": SECRET},
    )
    started = time.monotonic()
    edge.start(timeout=18)  # each link gives up waiting after 10 s: in turn, 20 s
    try:
        assert time.monotonic() - started < 18
        ready = httpx.get(edge.http_url + "/readyz", timeout=10)
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "unreachable"
    finally:
        edge.kill()
