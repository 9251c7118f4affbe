"""Tenancy end to end: the org tree and who administers it, instance lifecycles reaching live
sockets, users, API keys, regions.

The shard and gateway run in the test's own Trio process (real SQLite store, real WebSocket on
loopback), so the Python API that the admin HTTP API calls (origin/tenancy.py) is driven
directly; the cluster tests run edges and origins as processes (tests/test_cluster.py's pieces)
or in-process over a real link.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_asyncio
from trio_websocket import ConnectionClosed

from edge.gateway import Gateway
from node.config import Config, Limits
from node.errors import GB6Error
from origin.kv_sqlite import SqliteKv
from origin.rbac import OPERATOR, Actor
from origin.shard import OriginShard
from origin.tenancy import Tenancy
from replication.edge_link import RemoteOrigin
from replication.origin_link import LinkServer
from replication.shard_map import ShardMap
from tests.conftest import Node, Peer, connect
from tests.test_cluster import SECRET, _config

CLOSE_UNAUTHORIZED = 4003
peer_of = asynccontextmanager(connect)  # `async with peer_of(node, token) as peer:`


@asynccontextmanager
async def embedded(tmp: Path, **settings: Any) -> AsyncIterator[tuple[OriginShard, Node]]:
    """A shard and a gateway on `tmp`, serving on a free loopback port; a `Node` that only
    names the WebSocket URL, for tests/conftest.py's `connect`."""
    config = Config(data_dir=tmp, ws_port=0, **settings)
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        shard = OriginShard(config)
        await nursery.start(shard.run)
        port = await nursery.start(Gateway(config, shard).run)
        yield shard, Node(tmp, ws_url=f"ws://127.0.0.1:{port}/v1/ws")
        nursery.cancel_scope.cancel()


async def refused(code: str, call: Any) -> GB6Error:
    """`call` (awaitable or a thunk) fails with `code`."""
    with pytest.raises(GB6Error) as info:
        result = call() if callable(call) else call
        if hasattr(result, "__await__"):
            await result
    assert info.value.code == code, info.value
    return info.value


async def closed_with(peer: Peer) -> int:
    """Read until the server closes; its close code."""
    with trio.fail_after(5):
        while True:
            try:
                await peer.ws.get_message()
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return int(exc.reason.code)


async def member_actor(t: Tenancy, org: str, role: str) -> Actor:
    """An org member of `org` with `role`, as authenticate_admin resolves its token."""
    m = await t.add_member(OPERATOR, org, f"{role}-person", role)
    secret, _ = await t.issue_member_token(OPERATOR, m.id)
    assert secret.startswith("gb6o_")
    return await t.authenticate_admin(secret, "admin-secret")


# --- the org tree --------------------------------------------------------------------------


async def test_an_owner_of_a_parent_administers_its_descendants_and_no_one_else(
    tmp_path: Path,
) -> None:
    async with embedded(tmp_path) as (shard, _):
        t = shard.tenancy
        root = await t.create_org(OPERATOR, "acme", None)
        child = await t.create_org(OPERATOR, "acme-eu", root.id)
        other = await t.create_org(OPERATOR, "globex", None)
        owner = await member_actor(t, root.id, "owner")
        assert owner.org == root.id and owner.role == "org_owner"

        grandchild = await t.create_org(owner, "acme-eu-paris", child.id)
        inst = await t.create_instance(owner, grandchild.id, "prod", None, None)
        user = await t.create_user(owner, inst.id, "ann", "member")
        secret, _ = await t.issue_token(owner, inst.id, user.id)
        assert secret.startswith("gb6u_")
        assert (await t.rename_org(owner, child.id, "Acme Europe")).name == "Acme Europe"
        assert [o.id for o in t.list_orgs(owner, None).items] == [root.id]  # its own root

        # Another tenancy: every call is `not_found`, with the message a missing id gets.
        outside = await refused("not_found", lambda: t.get_org(owner, other.id))
        missing = await refused("not_found", lambda: t.get_org(owner, "org_nope"))
        assert outside.message == f"organization {other.id} not found"
        assert missing.message == "organization org_nope not found"
        await refused("not_found", t.create_instance(owner, other.id, "x", None, None))
        await refused("not_found", t.create_org(owner, "x", other.id))
        await refused("forbidden", t.create_org(owner, "new root", None))  # the operator's

        # A plain member of the child reads its subtree and changes nothing.
        reader = await member_actor(t, child.id, "member")
        assert t.get_instance(reader, inst.id) == inst
        assert [u.id for u in t.list_users(reader, inst.id).items] == [user.id]
        await refused("forbidden", t.create_instance(reader, child.id, "x", None, None))
        await refused("forbidden", t.suspend_instance(reader, inst.id))
        await refused("not_found", lambda: t.get_org(reader, root.id))  # above its org
        # An admin manages members, but makes no owner.
        admin = await member_actor(t, root.id, "admin")
        await refused("forbidden", t.add_member(admin, child.id, "eve", "owner"))
        m = await t.add_member(admin, child.id, "bob", "admin")
        await refused("forbidden", t.update_member(admin, m.id, role="owner"))
        assert (await t.update_member(owner, m.id, role="owner")).role == "owner"
        await refused("forbidden", t.remove_member(admin, m.id))  # an owner now
        await t.remove_member(owner, m.id)
        await refused("not_found", lambda: t.get_member(owner, m.id))


async def test_children_pages_limits_and_delete_rules_survive_a_restart(tmp_path: Path) -> None:
    limits = Limits(org_depth=3, org_children=3, org_members=2)
    async with embedded(tmp_path, limits=limits) as (shard, _):
        t = shard.tenancy
        root = await t.create_org(OPERATOR, "root", None)
        kids = [await t.create_org(OPERATOR, f"k{i}", root.id) for i in range(3)]
        await refused("quota_exceeded", t.create_org(OPERATOR, "k3", root.id))
        deep = await t.create_org(OPERATOR, "deep", kids[0].id)
        await refused("quota_exceeded", t.create_org(OPERATOR, "deeper", deep.id))
        await t.add_member(OPERATOR, root.id, "a", "owner")
        await t.add_member(OPERATOR, root.id, "b", "member")
        await refused("quota_exceeded", t.add_member(OPERATOR, root.id, "c", "member"))

        # Two at once for the last slot of a new org: one fits, the other is refused.
        last = await t.create_org(OPERATOR, "last", None)
        outcomes: list[str] = []

        async def add(name: str) -> None:
            try:
                await t.add_member(OPERATOR, last.id, name, "member")
                outcomes.append("ok")
            except GB6Error as exc:
                outcomes.append(exc.code)

        await t.add_member(OPERATOR, last.id, "first", "owner")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(add, "x")
            nursery.start_soon(add, "y")
        assert sorted(outcomes) == ["ok", "quota_exceeded"]

        seen, cursor = [], None
        while True:  # two per page: every child once, in order
            page = t.list_orgs(OPERATOR, root.id, 2, cursor)
            seen += [o.id for o in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == sorted(k.id for k in kids)  # id order
        for bad in (0, 201, True):
            await refused("invalid", lambda b=bad: t.list_orgs(OPERATOR, root.id, b))

        await refused("conflict", t.delete_org(OPERATOR, kids[0].id))  # has a child
        inst = await t.create_instance(OPERATOR, kids[1].id, "i", None, None)
        await refused("conflict", t.delete_org(OPERATOR, kids[1].id))  # a live instance
        await t.suspend_instance(OPERATOR, inst.id)
        await refused("conflict", t.delete_org(OPERATOR, kids[1].id))  # suspended is live
        await t.delete_instance(OPERATOR, inst.id)
        await t.delete_org(OPERATOR, kids[1].id)
        await t.delete_org(OPERATOR, deep.id)
        await t.rename_org(OPERATOR, kids[2].id, "renamed")
        _, key = await t.create_api_key(OPERATOR, root.id, "ci", ["org.read"])
    async with embedded(tmp_path, limits=limits) as (shard, _):
        t = shard.tenancy
        assert sorted(o.name for o in t.list_orgs(OPERATOR, root.id).items) == ["k0", "renamed"]
        assert t.list_orgs(OPERATOR, kids[0].id).items == ()
        await refused("not_found", lambda: t.get_org(OPERATOR, kids[1].id))
        assert t.get_instance(OPERATOR, inst.id).status == "deleted"
        assert sorted(m.name for m in t.list_members(OPERATOR, root.id).items) == ["a", "b"]
        assert [m.name for m in t.list_members(OPERATOR, root.id, role="owner").items] == ["a"]
        assert t.list_api_keys(OPERATOR, root.id).items == (key,)


# --- instances, users and live sockets -----------------------------------------------------


async def test_suspending_an_instance_closes_its_sockets_and_refuses_its_tokens(
    tmp_path: Path,
) -> None:
    async with embedded(tmp_path) as (shard, node):
        t = shard.tenancy
        org = await t.create_org(OPERATOR, "o", None)
        inst = await t.create_instance(OPERATOR, org.id, "i", None, None)
        other = await t.create_instance(OPERATOR, org.id, "other", None, None)
        ann = await t.create_user(OPERATOR, inst.id, "ann", "member")
        zed = await t.create_user(OPERATOR, other.id, "zed", "member")
        token, _ = await t.issue_token(OPERATOR, inst.id, ann.id)
        zed_token, _ = await t.issue_token(OPERATOR, other.id, zed.id)
        async with peer_of(node, token) as a, peer_of(node, zed_token) as z:
            await t.suspend_instance(OPERATOR, inst.id)
            assert await closed_with(a) == CLOSE_UNAUTHORIZED
            await z.ok("ping")  # another instance's socket is untouched
        async with peer_of(node) as p:
            reply = await p.request("hello", token=token)
            assert (reply["op"], reply["code"]) == ("error", "unauthorized")
            assert await closed_with(p) == CLOSE_UNAUTHORIZED
        await refused("conflict", t.suspend_instance(OPERATOR, inst.id))  # already
        await t.resume_instance(OPERATOR, inst.id)
        async with peer_of(node, token) as a:
            await a.ok("ping")
            renamed = await t.update_instance(OPERATOR, inst.id, name="prod", plan="unlimited")
            assert (renamed.name, renamed.plan, renamed.status) == ("prod", "unlimited", "active")
            await refused("invalid", t.update_instance(OPERATOR, inst.id, plan="gold"))
            await t.delete_instance(OPERATOR, inst.id)
            assert await closed_with(a) == CLOSE_UNAUTHORIZED
        for change in (
            t.resume_instance(OPERATOR, inst.id),
            t.delete_instance(OPERATOR, inst.id),
            t.update_instance(OPERATOR, inst.id, name="x"),
            t.create_user(OPERATOR, inst.id, "late", "member"),
        ):
            await refused("conflict", change)  # deleted is terminal
        assert [i.status for i in t.list_instances(OPERATOR, org.id, status="deleted").items] == [
            "deleted"
        ]


async def test_users_listed_updated_and_deleted(tmp_path: Path) -> None:
    async with embedded(tmp_path) as (shard, node):
        t = shard.tenancy
        org = await t.create_org(OPERATOR, "o", None)
        inst = await t.create_instance(OPERATOR, org.id, "i", None, "unlimited")
        ann = await t.create_user(OPERATOR, inst.id, "Ann", "member")
        bob = await t.create_user(OPERATOR, inst.id, "bob", "member")
        await t.create_user(OPERATOR, inst.id, "annex", "bot")
        await t.create_user(OPERATOR, inst.id, "carl", "guest")
        found = t.list_users(OPERATOR, inst.id, name_prefix="ann").items
        assert sorted(u.name for u in found) == ["Ann", "annex"]  # case-insensitive prefix
        assert [u.name for u in t.list_users(OPERATOR, inst.id, role="bot").items] == ["annex"]
        await refused("invalid", lambda: t.list_users(OPERATOR, inst.id, role="god"))
        ann_token, _ = await t.issue_token(OPERATOR, inst.id, ann.id)
        bob_token, _ = await t.issue_token(OPERATOR, inst.id, bob.id)
        async with peer_of(node, ann_token) as a, peer_of(node, bob_token) as b:
            room = (await b.ok("room.create", name="r", kind="chat", members=[]))["room"]["id"]
            await refused_op(a, "room.add", room=room, users=[ann.id])  # not its creator
            await t.update_user(OPERATOR, inst.id, ann.id, role="admin")  # live: no reconnect
            await a.ok("room.add", room=room, users=[ann.id])
            await a.ok("subscribe", room=room, after=0)
            await t.delete_user(OPERATOR, inst.id, bob.id)
            assert await closed_with(b) == CLOSE_UNAUTHORIZED
            assert (await a.event("members"))["removed"] == [bob.id]
            await a.ok("send", room=room, cid="c1", body={"text": "still here"})
        async with peer_of(node) as p:
            assert (await p.request("hello", token=bob_token))["code"] == "unauthorized"
        await refused("not_found", lambda: t.get_user(OPERATOR, inst.id, bob.id))
        await refused("not_found", t.delete_user(OPERATOR, inst.id, bob.id))
        await refused("not_found", t.issue_token(OPERATOR, inst.id, bob.id))
        assert bob.id not in {u.id for u in t.list_users(OPERATOR, inst.id).items}
        assert shard.rooms[room].members.keys() == {ann.id}


async def refused_op(peer: Peer, op: str, **fields: Any) -> None:
    reply = await peer.request(op, **fields)
    assert reply["op"] == "error" and reply["code"] in ("forbidden", "not_found"), reply


# --- API keys and credentials --------------------------------------------------------------


async def test_api_keys_are_scoped_bounded_by_their_creator_and_revocable(
    tmp_path: Path,
) -> None:
    async with embedded(tmp_path) as (shard, _):
        t = shard.tenancy
        org = await t.create_org(OPERATOR, "o", None)
        sub = await t.create_org(OPERATOR, "sub", org.id)
        inst = await t.create_instance(OPERATOR, sub.id, "i", None, None)
        inst2 = await t.create_instance(OPERATOR, sub.id, "i2", None, None)
        admin = await member_actor(t, org.id, "admin")
        await refused("forbidden", t.create_api_key(admin, org.id, "k", ["billing.close"]))
        await refused("invalid", t.create_api_key(admin, org.id, "k", []))
        await refused("invalid", t.create_api_key(admin, org.id, "k", ["root.everything"]))
        secret, key = await t.create_api_key(
            admin, org.id, "deployer", ["instance.read", "user.write"], instance=inst.id
        )
        assert secret.startswith("gb6k_") and secret not in repr(key)
        bot = await t.authenticate_admin(secret, "admin-secret")
        assert (bot.kind, bot.instance) == ("api_key", inst.id)
        assert t.get_instance(bot, inst.id) == inst
        await t.create_user(bot, inst.id, "deploy-bot", "bot")
        await refused("not_found", lambda: t.get_instance(bot, inst2.id))  # out of scope
        await refused("not_found", lambda: t.get_org(bot, sub.id))
        await refused("forbidden", t.suspend_instance(bot, inst.id))  # not given
        assert [k.id for k in t.list_api_keys(admin, org.id).items] == [key.id]
        assert (await t.revoke_api_key(admin, key.id)).revoked
        await refused("unauthorized", t.authenticate_admin(secret, "admin-secret"))

        wide_secret, _ = await t.create_api_key(OPERATOR, sub.id, "ro", ["org.read"], ttl_s=60)
        wide = await t.authenticate_admin(wide_secret, "admin-secret")
        assert t.get_org(wide, sub.id) == sub
        await refused("not_found", lambda: t.get_org(wide, org.id))  # above its scope
        # Credentials: the operator's token, nothing else unknown.
        assert await t.authenticate_admin("admin-secret", "admin-secret") == OPERATOR
        for bad in ("", "admin-secre", "gb6o_nope", "gb6k_nope", "gb6u_x.y"):
            await refused("unauthorized", t.authenticate_admin(bad, "admin-secret"))
        owner_m = await t.add_member(OPERATOR, org.id, "o", "owner")
        msecret, mtoken = await t.issue_member_token(OPERATOR, owner_m.id, ttl_s=60)
        await t.revoke_member_token(OPERATOR, owner_m.id, mtoken.id)
        await refused("unauthorized", t.authenticate_admin(msecret, "admin-secret"))


# --- regions -------------------------------------------------------------------------------


async def test_instances_only_in_regions_this_shard_serves(tmp_path: Path) -> None:
    regions = {"eu": ("s1",), "us": ("s2", "s3")}
    async with embedded(tmp_path, region="eu", shard="s1", regions=regions) as (shard, _):
        t = shard.tenancy
        org = await t.create_org(OPERATOR, "o", None)
        assert (await t.create_instance(OPERATOR, org.id, "i", None, None)).region == "eu"
        err = await refused("forbidden", t.create_instance(OPERATOR, org.id, "i", "us", None))
        assert "'us'" in err.message and err.http_status == 403
        await refused("invalid", t.create_instance(OPERATOR, org.id, "i", "mars", None))
        assert len(shard.instances) == 1  # nothing of a refused instance was kept
        # The shard map refuses a placement outside the region as well.
        async with trio.open_nursery() as nursery:
            kv = SqliteKv(tmp_path / "kv.db")
            await nursery.start(kv.run)
            smap = ShardMap(kv)
            await refused(
                "forbidden", smap.place("ins_x", "s1", region="us", region_shards=regions["us"])
            )
            await smap.place("ins_x", "s2", region="us", region_shards=regions["us"])
            assert await smap.shard_of("ins_x") == "s2"
            nursery.cancel_scope.cancel()


def test_cluster_origins_keep_instances_in_their_regions(tmp_path: Path) -> None:
    """Two `gb6 origin` of regions eu (s1) and us (s2), one `gb6 edge`: each origin refuses
    the other's region (403 naming it) and the instance it accepts serves through the edge."""
    regions = '[regions]\neu = ["s1"]\nus = ["s2"]\n'
    origins = []
    for shard, region in (("s1", "eu"), ("s2", "us")):
        conf = _config(tmp_path, [], regions, name=shard)
        conf.write_text(f'[node]\nregion = "{region}"\n' + conf.read_text())
        origins.append(
            Node(
                tmp_path / shard,
                extra_args=["--config", str(conf), "--shard", shard],
                command="origin",
            )
        )
    try:
        for o in origins:
            o.start()
        s1, s2 = origins
        org = s1.admin("POST", "/v1/orgs", {"name": "o"}).json()["id"]
        r = s1.admin("POST", f"/v1/orgs/{org}/instances", {"name": "i", "region": "us"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert "'us'" in r.json()["error"]["message"]
        tenant = s2.create_tenant()  # region us by default on s2
        assert s2.admin("GET", "/healthz").status_code == 200
        edge_conf = _config(tmp_path, [o.link for o in origins], name="edge")
        edge = Node(tmp_path / "e0", extra_args=["--config", str(edge_conf)], command="edge")
        origins.append(edge)
        edge.start()
        ann = tenant.user("ann")
        trio.run(_converse, edge, ann.token)
    finally:
        for n in origins:
            n.kill()


async def _converse(edge: Node, token: str) -> None:
    async with peer_of(edge, token) as peer:
        room = (await peer.ok("room.create", name="r", kind="chat", members=[]))["room"]["id"]
        assert (await peer.ok("send", room=room, cid="c", body={"text": "hi"}))["seq"] == 1


async def test_a_cluster_edge_closes_sockets_of_a_suspended_instance(tmp_path: Path) -> None:
    """Origin and edge apart (in this process, over a real link): the edge follows the
    shard's pushes and closes the instance's sockets with 4003."""
    origin_cfg = Config(data_dir=tmp_path / "o", link_port=0, link_secret=SECRET)
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        shard = OriginShard(origin_cfg)
        await nursery.start(shard.run)
        link_port = await nursery.start(LinkServer(origin_cfg, shard, SECRET).run)
        edge_cfg = attrs.evolve(
            origin_cfg, data_dir=tmp_path / "e", ws_port=0, origins=(f"127.0.0.1:{link_port}",)
        )
        remote = RemoteOrigin(edge_cfg)
        gateway = Gateway(edge_cfg, remote)
        await nursery.start(remote.run)
        ws_port = await nursery.start(gateway.run)
        node = Node(tmp_path, ws_url=f"ws://127.0.0.1:{ws_port}/v1/ws")
        pushed = trio.Event()
        remote.tenancy_listeners.append(lambda rec: pushed.set() if rec.name == "ann" else None)
        t = shard.tenancy
        org = await t.create_org(OPERATOR, "o", None)
        inst = await t.create_instance(OPERATOR, org.id, "i", None, None)
        ann = await t.create_user(OPERATOR, inst.id, "ann", "member")
        token, _ = await t.issue_token(OPERATOR, inst.id, ann.id)
        with trio.fail_after(5):
            await pushed.wait()  # the user reached the edge's replica
        async with peer_of(node, token) as a:
            await t.suspend_instance(OPERATOR, inst.id)
            assert await closed_with(a) == CLOSE_UNAUTHORIZED
        async with peer_of(node) as p:
            assert (await p.request("hello", token=token))["code"] == "unauthorized"
        nursery.cancel_scope.cancel()


# --- lifecycle holes (issue 4 part L) ------------------------------------------------------


async def test_a_deleted_instance_takes_no_change_and_outlives_its_deleted_org(
    tmp_path: Path,
) -> None:
    async with embedded(tmp_path) as (shard, _):
        t = shard.tenancy
        parent = await t.create_org(OPERATOR, "parent", None)
        org = await t.create_org(OPERATOR, "o", parent.id)
        inst = await t.create_instance(OPERATOR, org.id, "i", None, None)
        ann = await t.create_user(OPERATOR, inst.id, "ann", "member")
        _, tok = await t.issue_token(OPERATOR, inst.id, ann.id)
        await t.set_quota_override(OPERATOR, inst.id, "rooms", 5)
        parent_owner = await member_actor(t, parent.id, "owner")
        org_reader = await member_actor(t, org.id, "member")
        await t.delete_instance(OPERATOR, inst.id)
        for change in (
            t.set_quota_override(OPERATOR, inst.id, "rooms", 9),
            t.clear_quota_override(OPERATOR, inst.id, "rooms"),
            t.delete_user(OPERATOR, inst.id, ann.id),
            t.revoke_token(OPERATOR, inst.id, ann.id, tok.id),
            t.create_api_key(OPERATOR, org.id, "k", ["user.read"], instance=inst.id),
        ):
            await refused("conflict", change)
        assert shard.quota_usage(inst.id)["overrides"] == {"rooms": 5}  # unchanged

        # The org goes; its deleted instance stays, the operator's alone.
        await t.delete_org(OPERATOR, org.id)
        await refused("not_found", lambda: t.get_instance(parent_owner, inst.id))
        assert org_reader.id not in t.members
    async with embedded(tmp_path) as (shard, _):
        t = shard.tenancy
        assert t.get_instance(OPERATOR, inst.id).status == "deleted"
        assert shard.quota_usage(inst.id)["instance"] == inst.id
        assert (await shard.billing.preview(inst.id)).instance == inst.id
        await refused("conflict", t.set_quota_override(OPERATOR, inst.id, "rooms", 9))
        owner = await member_actor(t, parent.id, "owner")
        await refused("not_found", lambda: t.get_instance(owner, inst.id))
        await refused("not_found", lambda: t.get_org(OPERATOR, org.id))


async def test_an_org_keeps_an_owner(tmp_path: Path) -> None:
    async with embedded(tmp_path) as (shard, _):
        t = shard.tenancy
        root = await t.create_org(OPERATOR, "root", None)
        child = await t.create_org(OPERATOR, "child", root.id)
        first = await t.add_member(OPERATOR, root.id, "first", "owner")
        await refused("conflict", t.remove_member(OPERATOR, first.id))
        await refused("conflict", t.update_member(OPERATOR, first.id, role="admin"))
        assert (await t.update_member(OPERATOR, first.id, name="renamed")).role == "owner"
        second = await t.add_member(OPERATOR, root.id, "second", "owner")
        assert (await t.update_member(OPERATOR, first.id, role="member")).role == "member"
        await refused("conflict", t.remove_member(OPERATOR, second.id))  # the last one again
        # A child's only owner may go: the root's owner administers the child still.
        kid_owner = await t.add_member(OPERATOR, child.id, "kid", "owner")
        await t.remove_member(OPERATOR, kid_owner.id)
        assert t.list_members(OPERATOR, root.id, role="owner").items == (t.members[second.id],)


async def test_api_keys_hold_at_use_what_their_creator_still_holds(tmp_path: Path) -> None:
    async with embedded(tmp_path) as (shard, _):
        t = shard.tenancy
        org = await t.create_org(OPERATOR, "o", None)
        inst = await t.create_instance(OPERATOR, org.id, "i", None, None)
        await t.add_member(OPERATOR, org.id, "keeper", "owner")  # so the other may be demoted
        m = await t.add_member(OPERATOR, org.id, "maker", "owner")
        secret, _ = await t.issue_member_token(OPERATOR, m.id)
        maker = await t.authenticate_admin(secret, "admin-secret")
        wanted = ["instance.read", "instance.lifecycle", "quota.write", "apikey.write"]
        key_secret, key = await t.create_api_key(maker, org.id, "ci", wanted)
        # A key made by that key: bounded by it, hence by the member too.
        sub_secret, _ = await t.create_api_key(
            await t.authenticate_admin(key_secret, "admin-secret"), org.id, "sub", wanted[:3]
        )

        async def key_actor(s: str) -> Actor:
            return await t.authenticate_admin(s, "admin-secret")

        assert (await key_actor(key_secret)).permissions == frozenset(wanted)
        await t.set_quota_override(await key_actor(sub_secret), inst.id, "rooms", 3)

        await t.update_member(OPERATOR, m.id, role="admin")  # admins set no quota overrides
        for s in (key_secret, sub_secret):
            k = await key_actor(s)
            assert "quota.write" not in k.permissions and "instance.lifecycle" in k.permissions
            await refused("forbidden", t.set_quota_override(k, inst.id, "rooms", 4))
        await t.suspend_instance(await key_actor(sub_secret), inst.id)
        await t.update_member(OPERATOR, m.id, role="member")  # reads only
        k = await key_actor(key_secret)
        assert k.permissions == frozenset({"instance.read"})
        await refused("forbidden", t.resume_instance(k, inst.id))
        assert t.get_instance(k, inst.id).status == "suspended"
        # Promoted again, the key gets back what it was given (never more).
        await t.update_member(OPERATOR, m.id, role="owner")
        assert (await key_actor(key_secret)).permissions == frozenset(wanted)
        # Removed: the member's keys, and the keys those made, stop authenticating.
        await t.remove_member(OPERATOR, m.id)
        for s in (key_secret, sub_secret):
            await refused("unauthorized", key_actor(s))
        assert t.get_api_key(OPERATOR, key.id).revoked is False  # kept, for the record
