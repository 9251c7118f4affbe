"""origin/rbac.py: the permission table and the one check, on a small org tree held as data,
then the socket-side checks (room.create, moderation) that go through the same table."""

from __future__ import annotations

import attrs
import pytest

from node.errors import GB6Error
from origin import api_keys, rbac
from origin.membership import Principal
from origin.rbac import OPERATOR, Actor, authorize
from origin.records import Instance, User


@attrs.frozen
class Tree:
    """root ─ child ─ grandchild (instance ins_g); other (instance ins_o)."""

    parents: dict[str, str | None] = attrs.Factory(
        lambda: {"root": None, "child": "root", "grand": "child", "other": None}
    )
    instances: dict[str, str] = attrs.Factory(lambda: {"ins_g": "grand", "ins_o": "other"})

    def org_chain(self, org: str) -> list[str] | None:
        if org not in self.parents:
            return None
        chain = [org]
        while (parent := self.parents[chain[-1]]) is not None:
            chain.append(parent)
        return chain

    def instance_org(self, instance: str) -> str | None:
        return self.instances.get(instance)


TREE = Tree()


def code(actor: Actor, permission: str, **target: str) -> str:
    """`ok`, or the code `authorize` refuses with."""
    try:
        authorize(actor, permission, tree=TREE, **target)
    except GB6Error as exc:
        return exc.code
    return "ok"


def test_the_operator_may_do_everything_but_not_on_what_does_not_exist() -> None:
    for perm in sorted(rbac.ALL_PERMISSIONS):
        assert code(OPERATOR, perm, org="grand") == "ok"
        assert code(OPERATOR, perm, instance="ins_o") == "ok"
        assert code(OPERATOR, perm) == "ok"
    assert code(OPERATOR, rbac.ORG_READ, org="nope") == "not_found"
    assert code(OPERATOR, rbac.INSTANCE_READ, instance="ins_nope") == "not_found"
    assert code(OPERATOR, rbac.INSTANCE_READ, org="other", instance="ins_g") == "not_found"


def test_org_roles_reach_their_subtree_with_their_role_s_permissions() -> None:
    owner = rbac.org_member_actor("mem_1", "child", "owner")
    admin = rbac.org_member_actor("mem_2", "child", "admin")
    member = rbac.org_member_actor("mem_3", "child", "member")
    for actor in (owner, admin, member):
        assert code(actor, rbac.ORG_READ, org="child") == "ok"
        assert code(actor, rbac.ORG_READ, org="grand") == "ok"  # a descendant
        assert code(actor, rbac.INSTANCE_READ, instance="ins_g") == "ok"
        # Above or beside its org: as if it did not exist.
        assert code(actor, rbac.ORG_READ, org="root") == "not_found"
        assert code(actor, rbac.ORG_READ, org="other") == "not_found"
        assert code(actor, rbac.INSTANCE_READ, instance="ins_o") == "not_found"
        assert code(actor, rbac.ORG_WRITE) == "forbidden"  # a root org is the operator's
    assert code(owner, rbac.BILLING_CLOSE, org="grand") == "ok"
    assert code(admin, rbac.BILLING_CLOSE, org="grand") == "forbidden"
    assert code(admin, rbac.INSTANCE_LIFECYCLE, instance="ins_g") == "ok"
    assert code(member, rbac.INSTANCE_CREATE, org="grand") == "forbidden"
    assert code(member, rbac.USER_WRITE, instance="ins_g") == "forbidden"
    # Nobody out of reach learns whether a target exists.
    assert code(member, rbac.ORG_WRITE, org="other") == code(member, rbac.ORG_WRITE, org="zzz")


def test_roles_are_granted_only_by_who_holds_them() -> None:
    owner = rbac.org_member_actor("m", "root", "owner")
    admin = rbac.org_member_actor("m", "root", "admin")
    assert rbac.may_grant_role(owner, "org_owner")
    assert not rbac.may_grant_role(admin, "org_owner")
    assert rbac.may_grant_role(admin, "org_admin") and rbac.may_grant_role(admin, "org_member")
    assert rbac.grantable(admin, frozenset({rbac.ORG_READ, rbac.BILLING_CLOSE})) == {
        rbac.BILLING_CLOSE
    }
    assert rbac.grantable(OPERATOR, frozenset({rbac.ROOM_CREATE})) == {rbac.ROOM_CREATE}


def test_api_keys_act_in_their_scope_with_their_own_permissions() -> None:
    admin = rbac.org_member_actor("mem_a", "root", "admin")
    with pytest.raises(GB6Error) as info:
        api_keys.mint(admin, "root", None, "k", [rbac.BILLING_CLOSE], None, 0, 60)
    assert info.value.code == "forbidden" and "billing.close" in info.value.message
    for bad in ([], ["nope"], [rbac.ROOM_CREATE]):
        with pytest.raises(GB6Error) as info:
            api_keys.mint(admin, "root", None, "k", bad, None, 0, 60)
        assert info.value.code == "invalid"
    secret, key = api_keys.mint(
        admin, "root", "ins_g", "deploy", [rbac.INSTANCE_READ], 30, 1_000, 60
    )
    assert secret.startswith(api_keys.PREFIX) and key.expires_at == 31_000
    actor = api_keys.actor_of(key, 30_999)
    assert code(actor, rbac.INSTANCE_READ, instance="ins_g") == "ok"
    assert code(actor, rbac.INSTANCE_WRITE, instance="ins_g") == "forbidden"
    assert code(actor, rbac.INSTANCE_READ, instance="ins_o") == "not_found"
    assert code(actor, rbac.ORG_READ, org="grand") == "not_found"  # instance scope: no org
    for usable_at, revoked in ((31_000, False), (0, True)):
        with pytest.raises(GB6Error) as info:
            api_keys.actor_of(attrs.evolve(key, revoked=revoked), usable_at)
        assert info.value.code == "unauthorized"
    org_key = rbac.api_key_actor("k2", "child", None, frozenset({rbac.ORG_READ, "room.create"}))
    assert org_key.permissions == {rbac.ORG_READ}  # never a socket permission
    assert code(org_key, rbac.ORG_READ, org="grand") == "ok"
    assert code(org_key, rbac.ORG_READ, org="root") == "not_found"


def _principal(role: str) -> Principal:
    inst = Instance("ins_g", "grand", "i", "local", "free", "active", 0)
    return Principal(User("usr_1", "ins_g", "u", role, 0), inst)


def test_instance_users_socket_permissions_come_from_the_same_table() -> None:
    expected = {
        "owner": (True, True),
        "admin": (True, True),
        "member": (True, False),
        "bot": (True, False),
        "guest": (False, False),
    }
    for role, (creates, moderates) in expected.items():
        who = _principal(role)
        assert who.moderator is moderates, role
        assert (code(who.actor, rbac.ROOM_CREATE, instance="ins_g") == "ok") is creates, role
        assert code(who.actor, rbac.MESSAGE_SEND, instance="ins_g") == "ok"
        # A user reaches its own instance only, and no organization.
        assert code(who.actor, rbac.MESSAGE_SEND, instance="ins_o") == "not_found"
        assert code(who.actor, rbac.ORG_READ, org="grand") == "not_found"
        # Without a tree (the socket's hot path), the own instance is still judged.
        authorize(who.actor, rbac.MESSAGE_SEND, instance="ins_g")
