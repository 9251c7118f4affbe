"""The store contract's tenancy part (origin/store_port.py): the org tree, lifecycles, org
members and their tokens, API keys. Every adapter (SQLite, PostgreSQL, Kafka + PostgreSQL), on
the adapter fixture of tests/test_store_contract.py, each test on storage of its own."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from node.errors import CONFLICT, NOT_FOUND, GB6Error
from node.ids import new_id
from origin.records import ApiKey, Instance, Org, OrgMember, RoomRecord, Token
from origin.sqlite_store import now_ms
from tests import test_store_contract as contract
from tests.test_store_contract import Backend, serving, tenant

backend = contract.backend  # the adapter fixture: every test runs on each adapter


async def fails(code: str, write: Any) -> None:
    with pytest.raises(GB6Error) as info:
        await write
    assert info.value.code == code, info.value


async def test_org_rename_and_soft_delete_survive_reopening(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        child = Org(new_id("org"), "child", t.org, now_ms())
        await store.create_org(child)
        await store.update_org(attrs.evolve(child, name="renamed"))
        member = OrgMember(new_id("mem"), child.id, "ann", "owner", now_ms())
        await store.create_org_member(member)
        await store.create_member_token(Token(new_id("tok"), member.id, now_ms() + 9, False), "d1")
        key = ApiKey(new_id("key"), child.id, None, "ci", ("org.read",), "operator", None, False, 1)
        await store.create_api_key(key, "k1")
        await store.delete_org(child.id)
        await fails(NOT_FOUND, store.delete_org(child.id))
        await fails(NOT_FOUND, store.update_org(child))
        await fails(NOT_FOUND, store.update_org(Org("org_nope", "x", None, 0)))
    async with serving(backend) as store:
        orgs, _, _ = await store.load_tenancy()
        assert [o.id for o in orgs] == [t.org]  # the deleted one is gone, its data with it
        assert await store.member_token("d1") is None
        assert await store.api_key("k1") is None
        assert await store.load_access() == ([], [])


async def test_instance_and_user_updates_and_user_deletion(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        _, (inst,), _ = await store.load_tenancy()
        await store.update_instance(attrs.evolve(inst, name="n2", plan="unlimited"))
        await store.update_instance(attrs.evolve(inst, name="n2", plan="unlimited", status="x"))
        await fails(
            NOT_FOUND, store.update_instance(Instance("ins_nope", t.org, "i", "r", "p", "s", 0))
        )
        _, _, users = await store.load_tenancy()
        alice = next(u for u in users if u.id == t.alice)
        await store.update_user(attrs.evolve(alice, name="Alice", role="admin"))
        room = RoomRecord(new_id("room"), t.instance, "r", "chat", False, t.alice, now_ms())
        await store.create_room(room, [t.alice, t.bob])
        tok = Token(new_id("tok"), t.bob, now_ms() + 60_000, False)
        await store.create_token(tok, "bob-digest")
        await store.delete_user(t.bob)
        await fails(NOT_FOUND, store.delete_user(t.bob))
        bob = next(u for u in users if u.id == t.bob)
        await fails(NOT_FOUND, store.update_user(bob))
        assert await store.token("bob-digest") == attrs.evolve(tok, revoked=True)
    async with serving(backend) as store:
        _, (inst2,), users = await store.load_tenancy()
        assert (inst2.name, inst2.plan, inst2.status) == ("n2", "unlimited", "x")
        assert {(u.name, u.role) for u in users} == {("Alice", "admin"), ("carol", "member")}
        assert all(u.status == "active" for u in users)
        ((_, _, members),) = await store.load_rooms()
        assert members == {t.alice: 0}  # Bob left the room with his deletion


async def test_org_members_and_their_tokens(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        m = OrgMember(new_id("mem"), t.org, "ann", "admin", now_ms())
        await store.create_org_member(m)
        await fails(CONFLICT, store.create_org_member(m))
        await fails(CONFLICT, store.create_org_member(attrs.evolve(m, id="mem_x", org="org_no")))
        await store.update_org_member(attrs.evolve(m, role="owner"))
        await fails(NOT_FOUND, store.update_org_member(attrs.evolve(m, id="mem_nope")))
        tok = Token(new_id("tok"), m.id, now_ms() + 60_000, False)
        await store.create_member_token(tok, "mdigest")
        await fails(CONFLICT, store.create_member_token(attrs.evolve(tok, id="tok_2"), "mdigest"))
        await fails(
            CONFLICT, store.create_member_token(attrs.evolve(tok, id="t3", user="mem_no"), "x")
        )
        assert await store.member_token("mdigest") == tok
        assert await store.member_token("nope") is None
        assert not await store.revoke_member_token("mem_other", tok.id)
        assert await store.revoke_member_token(m.id, tok.id)
        assert await store.revoke_member_token(m.id, tok.id)  # twice is still True
    async with serving(backend) as store:
        assert await store.member_token("mdigest") == attrs.evolve(tok, revoked=True)
        members, keys = await store.load_access()
        assert members == [attrs.evolve(m, role="owner")] and keys == []
        await store.delete_org_member(m.id)
        await fails(NOT_FOUND, store.delete_org_member(m.id))
        assert await store.member_token("mdigest") is None
        assert await store.load_access() == ([], [])


async def test_api_keys_are_found_by_digest_and_revoked(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        scoped = ApiKey(
            new_id("key"),
            t.org,
            t.instance,
            "deploy bot",
            ("instance.read", "user.write"),
            "mem_x",
            now_ms() + 60_000,
            False,
            now_ms(),
        )
        wide = ApiKey(new_id("key"), t.org, None, "ci", ("org.read",), "operator", None, False, 5)
        await store.create_api_key(scoped, "kd1")
        await store.create_api_key(wide, "kd2")
        await fails(CONFLICT, store.create_api_key(attrs.evolve(wide, id="key_3"), "kd2"))
        await fails(CONFLICT, store.create_api_key(attrs.evolve(wide, id="k4", org="o_no"), "d4"))
        assert await store.api_key("kd1") == scoped
        assert await store.api_key("kd2") == wide
        assert await store.api_key("kd3") is None
        assert await store.revoke_api_key(scoped.id)
        assert not await store.revoke_api_key("key_nope")
    async with serving(backend) as store:
        assert await store.api_key("kd1") == attrs.evolve(scoped, revoked=True)
        _, keys = await store.load_access()
        assert sorted(keys, key=lambda k: k.id) == sorted(
            [attrs.evolve(scoped, revoked=True), wide], key=lambda k: k.id
        )
