"""Roles and permissions: who may do what, decided in one place (`authorize`).

Rules:
- A role maps to an explicit set of permissions (`ROLE_PERMISSIONS`). Code never compares role
  names to decide; it asks for a permission.
- Actors: the operator (the admin token) holds every permission everywhere. An org member acts
  on its org and every descendant org and their instances, with its org role's permissions
  (`org_owner`, `org_admin`, `org_member`). An API key acts within its scope (its org's subtree,
  or one instance) with the permissions it was given, never more than its creator held. An
  instance user acts on its own instance only, with its instance role's permissions
  (`instance_admin` for owners and admins, `member`, `guest`, `bot`).
- `authorize` raises `not_found` when the target does not exist or lies outside the actor's
  tenancy (the two look the same: existence is never leaked), and `forbidden` when the target is
  within reach but the permission is missing. Targetless actions (a root organization, the list
  of every root) are the operator's.
- Granting: an actor gives only roles whose permissions it holds (an org admin cannot make an
  owner), and API keys only permissions the creator holds (`grantable`).

Pure: no I/O, no Trio. The org tree comes in as a `Tree` (origin/tenancy.py is one).
"""

from __future__ import annotations

from typing import Final, Protocol

import attrs

from node.errors import forbidden, not_found

# --- permissions ---------------------------------------------------------------------------

ORG_READ: Final = "org.read"
ORG_WRITE: Final = "org.write"  # create child orgs, rename, delete
ORG_MEMBERS: Final = "org.members"  # org members and their tokens
INSTANCE_READ: Final = "instance.read"
INSTANCE_CREATE: Final = "instance.create"
INSTANCE_WRITE: Final = "instance.write"  # name, plan
INSTANCE_LIFECYCLE: Final = "instance.lifecycle"  # suspend, resume, delete
USER_READ: Final = "user.read"
USER_WRITE: Final = "user.write"
TOKEN_ISSUE: Final = "token.issue"  # instance users' tokens
QUOTA_READ: Final = "quota.read"
QUOTA_WRITE: Final = "quota.write"  # per-instance overrides
USAGE_READ: Final = "usage.read"
BILLING_READ: Final = "billing.read"
BILLING_CLOSE: Final = "billing.close"
AUDIT_READ: Final = "audit.read"
APIKEY_READ: Final = "apikey.read"
APIKEY_WRITE: Final = "apikey.write"
# The client socket's (instance users).
ROOM_CREATE: Final = "room.create"
ROOM_MODERATE: Final = "room.moderate"  # manage any room of the instance, delete any message
MESSAGE_SEND: Final = "message.send"

ADMIN_PERMISSIONS: Final = frozenset(
    {
        ORG_READ,
        ORG_WRITE,
        ORG_MEMBERS,
        INSTANCE_READ,
        INSTANCE_CREATE,
        INSTANCE_WRITE,
        INSTANCE_LIFECYCLE,
        USER_READ,
        USER_WRITE,
        TOKEN_ISSUE,
        QUOTA_READ,
        QUOTA_WRITE,
        USAGE_READ,
        BILLING_READ,
        BILLING_CLOSE,
        AUDIT_READ,
        APIKEY_READ,
        APIKEY_WRITE,
    }
)
SOCKET_PERMISSIONS: Final = frozenset({ROOM_CREATE, ROOM_MODERATE, MESSAGE_SEND})
ALL_PERMISSIONS: Final = ADMIN_PERMISSIONS | SOCKET_PERMISSIONS

_READ: Final = frozenset({ORG_READ, INSTANCE_READ, USER_READ, QUOTA_READ, USAGE_READ})

ROLE_PERMISSIONS: Final[dict[str, frozenset[str]]] = {
    "operator": ALL_PERMISSIONS,
    "org_owner": ADMIN_PERMISSIONS,
    # Admins run the org's subtree but neither close billing periods nor set quota overrides
    # (money and limits are the owners').
    "org_admin": ADMIN_PERMISSIONS - {BILLING_CLOSE, QUOTA_WRITE},
    "org_member": _READ | {BILLING_READ},
    "instance_admin": frozenset({ROOM_CREATE, ROOM_MODERATE, MESSAGE_SEND}),
    "member": frozenset({ROOM_CREATE, MESSAGE_SEND}),
    "guest": frozenset({MESSAGE_SEND}),
    "bot": frozenset({ROOM_CREATE, MESSAGE_SEND}),
}

# Org members' roles (records.ORG_ROLES) and instance users' (records.INSTANCE_ROLES) → role.
ORG_ROLE: Final = {"owner": "org_owner", "admin": "org_admin", "member": "org_member"}
INSTANCE_ROLE: Final = {
    "owner": "instance_admin",
    "admin": "instance_admin",
    "member": "member",
    "guest": "guest",
    "bot": "bot",
}

OPERATOR_ID: Final = "operator"


@attrs.frozen
class Actor:
    """Who is asking. `kind` is operator, org_member, api_key or user; `org` is the home org of
    a member or key, `instance` the user's instance or an instance-scoped key's."""

    kind: str
    id: str
    role: str  # a key of ROLE_PERMISSIONS; "api_key" for keys
    org: str | None = None
    instance: str | None = None
    granted: frozenset[str] = frozenset()  # an API key's own permissions

    @property
    def permissions(self) -> frozenset[str]:
        if self.kind == "api_key":
            return self.granted
        return ROLE_PERMISSIONS.get(self.role, frozenset())

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "id": self.id,
            "role": self.role,
            "org": self.org,
            "instance": self.instance,
            "permissions": sorted(self.permissions),
        }


OPERATOR: Final = Actor("operator", OPERATOR_ID, "operator")


def org_member_actor(member_id: str, org: str, org_role: str) -> Actor:
    return Actor("org_member", member_id, ORG_ROLE[org_role], org=org)


def user_actor(user_id: str, instance: str, instance_role: str) -> Actor:
    return Actor("user", user_id, INSTANCE_ROLE.get(instance_role, "guest"), instance=instance)


def api_key_actor(
    key_id: str, org: str, instance: str | None, permissions: frozenset[str]
) -> Actor:
    return Actor(
        "api_key",
        key_id,
        "api_key",
        org=org,
        instance=instance,
        granted=permissions & ADMIN_PERMISSIONS,
    )


def instance_role_allows(instance_role: str, permission: str) -> bool:
    """For the socket's hot paths (no target to look up): does the role hold `permission`?"""
    return permission in ROLE_PERMISSIONS.get(INSTANCE_ROLE.get(instance_role, "guest"), ())


class Tree(Protocol):
    """What `authorize` needs to know of the org tree."""

    def org_chain(self, org: str) -> list[str] | None:
        """`org` then its ancestors up to its root; None if there is no such (live) org."""
        ...

    def instance_org(self, instance: str) -> str | None:
        """The org an instance belongs to; None if there is no such instance."""
        ...


def authorize(
    actor: Actor,
    permission: str,
    *,
    tree: Tree | None = None,
    org: str | None = None,
    instance: str | None = None,
) -> None:
    """Return if `actor` may use `permission` on the target (an org, an instance, or nothing);
    raise `not_found` if the target is absent or out of the actor's reach, else `forbidden`.
    Without `tree`, only an instance target of the actor's own instance can be judged."""
    assert permission in ALL_PERMISSIONS, permission  # a typo must not become a refusal
    if instance is not None:
        what = f"instance {instance} not found"
        home = tree.instance_org(instance) if tree is not None else None
        if tree is not None and home is None:
            raise not_found(what)
        if org is not None and home != org:
            raise not_found(what)
        chain = tree.org_chain(home) if tree is not None and home is not None else None
        if not _reaches_instance(actor, instance, chain):
            raise not_found(what)
    elif org is not None:
        chain = tree.org_chain(org) if tree is not None else None
        if chain is None or not _reaches_org(actor, chain):
            raise not_found(f"organization {org} not found")
    elif actor.kind != "operator":
        raise forbidden("only the operator may do this")
    if permission not in actor.permissions:
        raise forbidden(f"{permission} is not allowed for this {actor.kind.replace('_', ' ')}")


def _reaches_org(actor: Actor, chain: list[str]) -> bool:
    if actor.kind == "operator":
        return True
    if actor.kind in ("org_member", "api_key") and actor.instance is None:
        return actor.org in chain
    return False  # users and instance-scoped keys see no organization


def _reaches_instance(actor: Actor, instance: str, chain: list[str] | None) -> bool:
    if actor.kind == "operator":
        return True
    if actor.instance is not None:  # a user, or an instance-scoped key
        return actor.instance == instance
    return chain is not None and actor.org in chain


def grantable(actor: Actor, permissions: frozenset[str]) -> frozenset[str]:
    """The permissions of `permissions` the actor may not hand on (empty: all may)."""
    return permissions - (actor.permissions & ADMIN_PERMISSIONS)


def may_grant_role(actor: Actor, role: str) -> bool:
    """An actor gives a role (org role key of ROLE_PERMISSIONS) only if it holds all of it."""
    return ROLE_PERMISSIONS[role] <= actor.permissions
