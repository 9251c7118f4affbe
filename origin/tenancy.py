"""Tenancy: the organization tree, org members, instance lifecycles, users, regions.

The origin shard holds one `Tenancy` (`shard.tenancy`) over its own in-memory tenancy (orgs,
instances, users: loaded at start, changed only after the store committed). Every public method
takes the `Actor` asking (origin/rbac.py; `authenticate_admin` turns a bearer credential into
one) and authorizes first, through `rbac.authorize`: nothing here is reachable without a check.

Rules:
- Orgs nest (`parent`) at most `limits.org_depth` levels, with at most `limits.org_children`
  children and `limits.org_members` members each (`quota_exceeded` past them). An org member
  (owner, admin, member) of an org acts on it and every descendant, and their instances.
- An org is deleted only without children and without instances other than deleted ones
  (`conflict`); its members, their tokens and its API keys go with it. Its deleted instances
  stay: still deleted, reachable by the operator alone (their usage, invoices and audit remain
  readable and a past month can still be closed), before and after a restart.
- An org is never left without an owner: removing or demoting an owner is `conflict` when no
  other owner of the org or of an ancestor (who administers it too) remains.
- Instance lifecycle (data, `_TRANSITIONS`): active ⇄ suspended, either → deleted (terminal:
  data kept, nothing served, no change accepted: renames, plans, quota overrides, users, their
  tokens, new keys scoped to it are all `conflict`; billing still closes its past months and
  its keys may still be revoked).
  Whenever an instance is not active, its tokens are refused at `hello` (`unauthorized`) and
  the edges close its sockets (4003): they follow `shard.tenancy_listeners`.
- Regions: an instance is created only in a region whose shards include this one
  (`replication.shard_map.check_region`, done by the shard).
- Users: deleting one revokes their tokens and removes them from every room (one store
  transaction); their events keep their id. Roles change freely within `INSTANCE_ROLES`.
- API keys are bounded at USE time by their creator (`_key_permissions`): a key holds the
  permissions it was given that its creator (an org member, the operator, or the key that made
  it) still holds now; a demoted creator's keys lose what the creator lost, and keys of a removed
  member (or of a revoked, expired or removed key) are `unauthorized`.
- Org member tokens are `gb6o_…`, API keys `gb6k_…`, user tokens `gb6u_…`: the prefix says what
  a credential is; only digests are stored.
- Listings are pages: items in id order (ids are time-ordered), `limit` (1 to
  `limits.page_limit`, 50 unless asked) and `cursor` (the last id of the previous page).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Generic, TypeVar

import attrs
import trio

from node.errors import (
    CONFLICT,
    QUOTA_EXCEEDED,
    UNAUTHORIZED,
    GB6Error,
    forbidden,
    invalid,
    not_found,
)
from node.ids import new_id, new_secret, secret_digest
from origin import api_keys, rbac
from origin.membership import MembershipChange
from origin.rbac import OPERATOR, Actor
from origin.records import (
    INSTANCE_ROLES,
    INSTANCE_STATUSES,
    ORG_ROLES,
    ApiKey,
    Instance,
    Org,
    OrgMember,
    Token,
    User,
)
from origin.sqlite_store import now_ms

if TYPE_CHECKING:
    from origin.shard import OriginShard

T = TypeVar("T")

MEMBER_TOKEN_PREFIX: Final = "gb6o_"
DEFAULT_PAGE: Final = 50
_CURSOR_CHARS: Final = 100

# status → the lifecycle actions allowed from it, and where each leads.
_TRANSITIONS: Final[dict[str, dict[str, str]]] = {
    "active": {"suspend": "suspended", "delete": "deleted"},
    "suspended": {"resume": "active", "delete": "deleted"},
    "deleted": {},
}
assert set(_TRANSITIONS) == set(INSTANCE_STATUSES)


@attrs.frozen
class Page(Generic[T]):
    """One page of a listing; `next_cursor` is None on the last page."""

    items: tuple[T, ...]
    next_cursor: str | None


class Tenancy:
    """The shard's tenancy operations (see the module doc). Implements `rbac.Tree`."""

    def __init__(self, shard: OriginShard) -> None:
        self.shard = shard
        self.limits = shard.limits
        self.members: dict[str, OrgMember] = {}
        self.keys: dict[str, ApiKey] = {}
        # One tenancy change at a time: a check (a limit, "no children", a status) and the
        # write it allows must not interleave with another's across the store's await.
        self._writing = trio.Lock()

    def load(self, members: Iterable[OrgMember], keys: Iterable[ApiKey]) -> None:
        """At start, what the store holds (the shard's orgs are loaded already)."""
        self.members = {m.id: m for m in members if m.org in self.shard.orgs}
        self.keys = {k.id: k for k in keys if k.org in self.shard.orgs}

    # --- rbac.Tree -----------------------------------------------------------------------

    def org_chain(self, org: str) -> list[str] | None:
        chain: list[str] = []
        current: str | None = org
        while current is not None:
            rec = self.shard.orgs.get(current)
            if rec is None or len(chain) > self.limits.org_depth:
                return None
            chain.append(current)
            current = rec.parent
        return chain

    def instance_org(self, instance: str) -> str | None:
        inst = self.shard.instances.get(instance)
        return inst.org if inst is not None else None

    def authorize(
        self, actor: Actor, permission: str, *, org: str | None = None, instance: str | None = None
    ) -> None:
        """`rbac.authorize` over this shard's tree: the one check (see origin/rbac.py)."""
        rbac.authorize(actor, permission, tree=self, org=org, instance=instance)

    # --- credentials ---------------------------------------------------------------------

    async def authenticate_admin(self, bearer: str, admin_token: str) -> Actor:
        """The actor a bearer credential of the admin API stands for: the operator (the admin
        token, compared in constant time), an org member's token, or an API key. Anything
        else, or a revoked, expired or orphaned credential, is `unauthorized`."""
        if admin_token and hmac.compare_digest(bearer.encode(), admin_token.encode()):
            return OPERATOR
        if bearer.startswith(MEMBER_TOKEN_PREFIX):
            token = await self.shard.store.member_token(secret_digest(bearer))
            member = self.members.get(token.user) if token is not None else None
            if token is None or member is None:
                raise GB6Error(UNAUTHORIZED, "unknown token")
            if token.revoked:
                raise GB6Error(UNAUTHORIZED, "token revoked")
            if token.expires_at <= now_ms():
                raise GB6Error(UNAUTHORIZED, "token expired")
            return rbac.org_member_actor(member.id, member.org, member.role)
        if bearer.startswith(api_keys.PREFIX):
            key = await self.shard.store.api_key(secret_digest(bearer))
            if key is None or key.id not in self.keys:
                raise GB6Error(UNAUTHORIZED, "unknown API key")
            now = now_ms()
            actor = api_keys.actor_of(key, now)
            held = self._key_permissions(self.keys[key.id], now, self.limits.org_api_keys)
            if held is None:
                raise GB6Error(UNAUTHORIZED, "the API key's creator is gone")
            return attrs.evolve(actor, granted=actor.granted & held)
        raise GB6Error(UNAUTHORIZED, "unknown credential")

    def _key_permissions(self, key: ApiKey, now: int, depth: int) -> frozenset[str] | None:
        """What `key` may do now: its permissions within what its creator holds now; None
        if the key, or its creator, is unusable (revoked, expired, removed). Keys made by keys
        are followed at most `depth` links (no chain is longer than an org's keys)."""
        if key.revoked or (key.expires_at is not None and key.expires_at <= now) or depth < 0:
            return None
        mine = frozenset(key.permissions)
        creator = key.created_by
        if creator == rbac.OPERATOR_ID:
            return mine
        member = self.members.get(creator)
        if member is not None:
            return mine & rbac.ROLE_PERMISSIONS[rbac.ORG_ROLE[member.role]]
        parent = self.keys.get(creator)
        if parent is None:
            return None
        above = self._key_permissions(parent, now, depth - 1)
        return None if above is None else mine & above

    # --- organizations -------------------------------------------------------------------

    def _org(self, org: str) -> Org:
        rec = self.shard.orgs.get(org)
        if rec is None:
            raise not_found(f"organization {org} not found")
        return rec

    async def create_org(self, actor: Actor, name: str, parent: str | None) -> Org:
        """A root org (operator only) or a child of `parent` (`org.write` there)."""
        async with self._writing:
            if parent is None:
                self.authorize(actor, rbac.ORG_WRITE)
            else:
                self.authorize(actor, rbac.ORG_WRITE, org=parent)
                chain = self.org_chain(parent) or []
                if len(chain) + 1 > self.limits.org_depth:
                    raise GB6Error(
                        QUOTA_EXCEEDED, f"organizations nest at most {self.limits.org_depth} levels"
                    )
                if len(self.children(parent)) >= self.limits.org_children:
                    raise GB6Error(
                        QUOTA_EXCEEDED,
                        f"an organization has at most {self.limits.org_children} children",
                    )
            org = Org(new_id("org"), name, parent, now_ms())
            with trio.CancelScope(shield=True):  # once queued it commits: memory must follow
                await self.shard.store.create_org(org)
            self.shard.orgs[org.id] = org
            return org

    def get_org(self, actor: Actor, org: str) -> Org:
        self.authorize(actor, rbac.ORG_READ, org=org)
        return self._org(org)

    def children(self, org: str | None) -> list[Org]:
        return sorted((o for o in self.shard.orgs.values() if o.parent == org), key=lambda o: o.id)

    def list_orgs(
        self, actor: Actor, parent: str | None, limit: int | None = None, cursor: str | None = None
    ) -> Page[Org]:
        """The children of `parent`; without one, the roots of what the actor sees (every root
        org for the operator, its own org for an org member or an org-scoped key)."""
        if parent is not None:
            self.authorize(actor, rbac.ORG_READ, org=parent)
            items = self.children(parent)
        elif actor.kind == "operator":
            items = self.children(None)
        elif actor.org is not None and actor.instance is None:
            self.authorize(actor, rbac.ORG_READ, org=actor.org)
            items = [self._org(actor.org)]
        else:
            items = []
        return paginate(items, lambda o: o.id, limit, cursor, self.limits.page_limit)

    async def rename_org(self, actor: Actor, org: str, name: str) -> Org:
        async with self._writing:
            self.authorize(actor, rbac.ORG_WRITE, org=org)
            rec = attrs.evolve(self._org(org), name=name)
            with trio.CancelScope(shield=True):
                await self.shard.store.update_org(rec)
            self.shard.orgs[org] = rec
            return rec

    async def delete_org(self, actor: Actor, org: str) -> None:
        async with self._writing:
            self.authorize(actor, rbac.ORG_WRITE, org=org)
            if self.children(org):
                raise GB6Error(CONFLICT, f"organization {org} has child organizations")
            live = [i.id for i in self.shard.instances.values() if i.org == org]
            live = [i for i in live if self.shard.instances[i].status != "deleted"]
            if live:
                raise GB6Error(
                    CONFLICT, f"organization {org} has {len(live)} instance(s) not deleted"
                )
            with trio.CancelScope(shield=True):
                await self.shard.store.delete_org(org)
            del self.shard.orgs[org]
            self.members = {k: m for k, m in self.members.items() if m.org != org}
            self.keys = {k: v for k, v in self.keys.items() if v.org != org}

    # --- org members ---------------------------------------------------------------------

    def _member(self, actor: Actor, member_id: str, permission: str) -> OrgMember:
        member = self.members.get(member_id)
        if member is None:
            raise not_found(f"member {member_id} not found")
        try:
            self.authorize(actor, permission, org=member.org)
        except GB6Error as exc:
            if exc.code == "not_found":
                raise not_found(f"member {member_id} not found") from None
            raise
        return member

    def _keeps_an_owner(self, member: OrgMember) -> None:
        """`conflict` if `member` is the last owner of its org and of every ancestor."""
        if member.role != "owner":
            return
        chain = set(self.org_chain(member.org) or ())
        others = (m for m in self.members.values() if m.role == "owner" and m.id != member.id)
        if not any(m.org in chain for m in others):
            raise GB6Error(
                CONFLICT,
                f"member {member.id} is the last owner of organization {member.org}"
                " (add another owner first)",
            )

    def _check_grant(self, actor: Actor, org_role: str) -> None:
        if org_role not in ORG_ROLES:
            raise invalid(f"role must be one of {', '.join(ORG_ROLES)}")
        if not rbac.may_grant_role(actor, rbac.ORG_ROLE[org_role]):
            raise forbidden(f"only an owner may give or take the role {org_role!r}")

    async def add_member(self, actor: Actor, org: str, name: str, role: str) -> OrgMember:
        async with self._writing:
            self.authorize(actor, rbac.ORG_MEMBERS, org=org)
            self._check_grant(actor, role)
            if sum(1 for m in self.members.values() if m.org == org) >= self.limits.org_members:
                raise GB6Error(
                    QUOTA_EXCEEDED, f"an organization has at most {self.limits.org_members} members"
                )
            member = OrgMember(new_id("mem"), org, name, role, now_ms())
            with trio.CancelScope(shield=True):
                await self.shard.store.create_org_member(member)
            self.members[member.id] = member
            return member

    def get_member(self, actor: Actor, member_id: str) -> OrgMember:
        return self._member(actor, member_id, rbac.ORG_READ)

    def list_members(
        self,
        actor: Actor,
        org: str,
        limit: int | None = None,
        cursor: str | None = None,
        role: str | None = None,
    ) -> Page[OrgMember]:
        self.authorize(actor, rbac.ORG_READ, org=org)
        items = sorted(
            (m for m in self.members.values() if m.org == org and role in (None, m.role)),
            key=lambda m: m.id,
        )
        return paginate(items, lambda m: m.id, limit, cursor, self.limits.page_limit)

    async def update_member(
        self, actor: Actor, member_id: str, *, name: str | None = None, role: str | None = None
    ) -> OrgMember:
        async with self._writing:
            member = self._member(actor, member_id, rbac.ORG_MEMBERS)
            if role is not None:
                self._check_grant(actor, role)  # the new role...
                self._check_grant(actor, member.role)  # ...and the one taken away
                if role != "owner":
                    self._keeps_an_owner(member)
            rec = attrs.evolve(member, name=name or member.name, role=role or member.role)
            with trio.CancelScope(shield=True):
                await self.shard.store.update_org_member(rec)
            self.members[rec.id] = rec
            return rec

    async def remove_member(self, actor: Actor, member_id: str) -> None:
        async with self._writing:
            member = self._member(actor, member_id, rbac.ORG_MEMBERS)
            self._check_grant(actor, member.role)
            self._keeps_an_owner(member)
            with trio.CancelScope(shield=True):
                await self.shard.store.delete_org_member(member_id)
            self.members.pop(member_id, None)

    async def issue_member_token(
        self, actor: Actor, member_id: str, ttl_s: int | None = None
    ) -> tuple[str, Token]:
        """A new admin-API token for an org member: the secret (shown once) and its record."""
        member = self._member(actor, member_id, rbac.ORG_MEMBERS)
        self._check_grant(actor, member.role)  # no admin mints an owner's token
        ttl = self._ttl(ttl_s)
        secret = MEMBER_TOKEN_PREFIX + new_secret()
        token = Token(new_id("tok"), member.id, now_ms() + ttl * 1000, False)
        await self.shard.store.create_member_token(token, secret_digest(secret))
        return secret, token

    async def revoke_member_token(self, actor: Actor, member_id: str, token_id: str) -> None:
        member = self._member(actor, member_id, rbac.ORG_MEMBERS)
        if actor.kind != "org_member" or actor.id != member.id:  # anyone may drop their own
            self._check_grant(actor, member.role)
        if not await self.shard.store.revoke_member_token(member_id, token_id):
            raise not_found(f"token {token_id} not found")

    def _ttl(self, ttl_s: int | None) -> int:
        ttl = self.limits.token_ttl_s if ttl_s is None else ttl_s
        if not 1 <= ttl <= self.limits.token_ttl_max_s:
            raise invalid(f"ttl_seconds must be between 1 and {self.limits.token_ttl_max_s}")
        return ttl

    # --- instances -----------------------------------------------------------------------

    def _instance(self, instance: str) -> Instance:
        inst = self.shard.instances.get(instance)
        if inst is None:
            raise not_found(f"instance {instance} not found")
        return inst

    def _live(self, instance: str) -> Instance:
        inst = self._instance(instance)
        if inst.status == "deleted":
            raise GB6Error(CONFLICT, f"instance {instance} is deleted")
        return inst

    async def create_instance(
        self, actor: Actor, org: str, name: str, region: str | None, plan: str | None
    ) -> Instance:
        """In `region` (default: the node's) on `plan` (default `free`); refused (`forbidden`,
        naming the region) unless this shard serves the region."""
        async with self._writing:
            self.authorize(actor, rbac.INSTANCE_CREATE, org=org)
            return await self.shard.create_instance(org, name, region, plan)

    def get_instance(self, actor: Actor, instance: str) -> Instance:
        self.authorize(actor, rbac.INSTANCE_READ, instance=instance)
        return self._instance(instance)

    def list_instances(
        self,
        actor: Actor,
        org: str,
        limit: int | None = None,
        cursor: str | None = None,
        status: str | None = None,
    ) -> Page[Instance]:
        self.authorize(actor, rbac.INSTANCE_READ, org=org)
        if status is not None and status not in INSTANCE_STATUSES:
            raise invalid(f"status must be one of {', '.join(INSTANCE_STATUSES)}")
        items = sorted(
            (
                i
                for i in self.shard.instances.values()
                if i.org == org and status in (None, i.status)
            ),
            key=lambda i: i.id,
        )
        return paginate(items, lambda i: i.id, limit, cursor, self.limits.page_limit)

    async def update_instance(
        self, actor: Actor, instance: str, *, name: str | None = None, plan: str | None = None
    ) -> Instance:
        async with self._writing:
            self.authorize(actor, rbac.INSTANCE_WRITE, instance=instance)
            inst = self._live(instance)
            if plan is not None and plan not in self.shard.config.plans:
                raise invalid(f"unknown plan {plan!r}; plans: {', '.join(self.shard.config.plans)}")
            return await self._put_instance(
                attrs.evolve(inst, name=name or inst.name, plan=plan or inst.plan)
            )

    async def suspend_instance(self, actor: Actor, instance: str) -> Instance:
        return await self._lifecycle(actor, instance, "suspend")

    async def resume_instance(self, actor: Actor, instance: str) -> Instance:
        return await self._lifecycle(actor, instance, "resume")

    async def delete_instance(self, actor: Actor, instance: str) -> Instance:
        return await self._lifecycle(actor, instance, "delete")

    async def set_quota_override(
        self, actor: Actor, instance: str, resource: str, limit: object
    ) -> None:
        """The instance's own limit for `resource` (shard.set_quota_override), not on a
        deleted instance: under the tenancy lock, so it cannot be deleted meanwhile (the shard
        serializes the stored overrides itself)."""
        async with self._writing:
            self.authorize(actor, rbac.QUOTA_WRITE, instance=instance)
            self._live(instance)
            await self.shard.set_quota_override(instance, resource, limit)

    async def clear_quota_override(self, actor: Actor, instance: str, resource: str) -> None:
        async with self._writing:
            self.authorize(actor, rbac.QUOTA_WRITE, instance=instance)
            self._live(instance)
            await self.shard.clear_quota_override(instance, resource)

    async def _lifecycle(self, actor: Actor, instance: str, action: str) -> Instance:
        async with self._writing:
            self.authorize(actor, rbac.INSTANCE_LIFECYCLE, instance=instance)
            inst = self._instance(instance)
            status = _TRANSITIONS[inst.status].get(action)
            if status is None:
                raise GB6Error(CONFLICT, f"cannot {action} an instance that is {inst.status}")
            return await self._put_instance(attrs.evolve(inst, status=status))

    async def _put_instance(self, inst: Instance) -> Instance:
        with trio.CancelScope(shield=True):
            await self.shard.store.update_instance(inst)
        self.shard.instances[inst.id] = inst
        self.shard._tenancy_changed(inst)  # edges close a suspended instance's sockets
        return inst

    # --- users ---------------------------------------------------------------------------

    def _user(self, instance: str, user_id: str) -> User:
        try:
            return self.shard.user_of_instance(instance, user_id)
        except GB6Error:
            raise not_found(f"user {user_id} not found in instance {instance}") from None

    async def create_user(self, actor: Actor, instance: str, name: str, role: str) -> User:
        async with self._writing:
            self.authorize(actor, rbac.USER_WRITE, instance=instance)
            self._live(instance)
            return await self.shard.create_user(instance, name, role)

    def get_user(self, actor: Actor, instance: str, user_id: str) -> User:
        self.authorize(actor, rbac.USER_READ, instance=instance)
        return self._user(instance, user_id)

    def list_users(
        self,
        actor: Actor,
        instance: str,
        limit: int | None = None,
        cursor: str | None = None,
        *,
        role: str | None = None,
        name_prefix: str | None = None,
    ) -> Page[User]:
        self.authorize(actor, rbac.USER_READ, instance=instance)
        if role is not None and role not in INSTANCE_ROLES:
            raise invalid(f"role must be one of {', '.join(INSTANCE_ROLES)}")
        prefix = (name_prefix or "").casefold()
        items = sorted(
            (
                u
                for u in self.shard.users.values()
                if u.instance == instance
                and role in (None, u.role)
                and u.name.casefold().startswith(prefix)
            ),
            key=lambda u: u.id,
        )
        return paginate(items, lambda u: u.id, limit, cursor, self.limits.page_limit)

    async def update_user(
        self,
        actor: Actor,
        instance: str,
        user_id: str,
        *,
        name: str | None = None,
        role: str | None = None,
    ) -> User:
        async with self._writing:
            self.authorize(actor, rbac.USER_WRITE, instance=instance)
            self._live(instance)
            user = self._user(instance, user_id)
            if role is not None and role not in INSTANCE_ROLES:
                raise invalid(f"role must be one of {', '.join(INSTANCE_ROLES)}")
            rec = attrs.evolve(user, name=name or user.name, role=role or user.role)
            quotas = self.shard.quotas
            moved = _quota_kind(user.role) != _quota_kind(rec.role)
            with trio.CancelScope(shield=True):
                if moved:  # a member becoming a bot counts against bots, and back
                    with quotas.reserve(instance, _quota_kind(rec.role)):
                        await self.shard.store.update_user(rec)
                    quotas.remove(instance, _quota_kind(user.role))
                else:
                    await self.shard.store.update_user(rec)
            self.shard.users[rec.id] = rec
            self.shard._tenancy_changed(rec)  # edges refresh the principal of live sockets
            return rec

    async def delete_user(self, actor: Actor, instance: str, user_id: str) -> None:
        """Tokens revoked, removed from every room (members see a `members` event), sockets
        closed (4003); the user's events stay."""
        async with self._writing:
            self.authorize(actor, rbac.USER_WRITE, instance=instance)
            self._live(instance)
            user = self._user(instance, user_id)
            with trio.CancelScope(shield=True):  # once queued it commits: memory must follow
                await self.shard.store.delete_user(user_id)
            # Rooms joined while it was written included: the store removed those too.
            rooms = sorted(self.shard.user_rooms.get(user_id, ()))
            del self.shard.users[user_id]
            self.shard.quotas.remove(instance, _quota_kind(user.role))
            for room in rooms:
                self.shard.state.remove_members(room, [user_id])
                self.shard._members_changed(MembershipChange(room, (), (user_id,)))
            self.shard._tenancy_changed(attrs.evolve(user, status="deleted"))

    async def issue_token(
        self, actor: Actor, instance: str, user_id: str, ttl_s: int | None = None
    ) -> tuple[str, Token]:
        """A user's socket token (`gb6u_…`): the secret (shown once) and its record."""
        self.authorize(actor, rbac.TOKEN_ISSUE, instance=instance)
        self._live(instance)
        return await self.shard.issue_token(instance, user_id, ttl_s)

    async def revoke_token(self, actor: Actor, instance: str, user_id: str, token_id: str) -> None:
        self.authorize(actor, rbac.TOKEN_ISSUE, instance=instance)
        self._live(instance)
        await self.shard.revoke_token(instance, user_id, token_id)

    # --- API keys ------------------------------------------------------------------------

    async def create_api_key(
        self,
        actor: Actor,
        org: str,
        name: str,
        permissions: Iterable[str],
        *,
        instance: str | None = None,
        ttl_s: int | None = None,
    ) -> tuple[str, ApiKey]:
        """A key for machines, scoped to `org`'s subtree or to one `instance` of it, holding
        `permissions` (a subset of the creator's). The secret is returned once."""
        async with self._writing:
            self.authorize(actor, rbac.APIKEY_WRITE, org=org)
            if instance is not None:
                self.authorize(actor, rbac.APIKEY_WRITE, instance=instance)
                chain = self.org_chain(self._instance(instance).org) or []
                if org not in chain:
                    raise not_found(f"instance {instance} not found")
                self._live(instance)
            if sum(1 for k in self.keys.values() if k.org == org) >= self.limits.org_api_keys:
                raise GB6Error(
                    QUOTA_EXCEEDED,
                    f"an organization has at most {self.limits.org_api_keys} API keys",
                )
            secret, key = api_keys.mint(
                actor,
                org,
                instance,
                name,
                permissions,
                ttl_s,
                now_ms(),
                self.limits.token_ttl_max_s,
            )
            with trio.CancelScope(shield=True):
                await self.shard.store.create_api_key(key, secret_digest(secret))
            self.keys[key.id] = key
            return secret, key

    def _key(self, actor: Actor, key_id: str, permission: str) -> ApiKey:
        key = self.keys.get(key_id)
        if key is None:
            raise not_found(f"API key {key_id} not found")
        try:
            self.authorize(actor, permission, org=key.org)
        except GB6Error as exc:
            if exc.code == "not_found":
                raise not_found(f"API key {key_id} not found") from None
            raise
        return key

    def get_api_key(self, actor: Actor, key_id: str) -> ApiKey:
        return self._key(actor, key_id, rbac.APIKEY_READ)

    def list_api_keys(
        self, actor: Actor, org: str, limit: int | None = None, cursor: str | None = None
    ) -> Page[ApiKey]:
        self.authorize(actor, rbac.APIKEY_READ, org=org)
        items = sorted((k for k in self.keys.values() if k.org == org), key=lambda k: k.id)
        return paginate(items, lambda k: k.id, limit, cursor, self.limits.page_limit)

    async def revoke_api_key(self, actor: Actor, key_id: str) -> ApiKey:
        async with self._writing:
            key = self._key(actor, key_id, rbac.APIKEY_WRITE)
            with trio.CancelScope(shield=True):
                await self.shard.store.revoke_api_key(key_id)
            rec = attrs.evolve(key, revoked=True)
            self.keys[key_id] = rec
            return rec


def _quota_kind(role: str) -> str:
    return "bots" if role == "bot" else "users"


def paginate(
    items: list[T], key: Callable[[T], str], limit: int | None, cursor: str | None, most: int
) -> Page[T]:
    """`items` (sorted by `key`) after `cursor`, at most `limit` of them."""
    n = DEFAULT_PAGE if limit is None else limit
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        raise invalid(f"limit must be an integer from 1 to {most}")
    if cursor is not None and (not isinstance(cursor, str) or len(cursor) > _CURSOR_CHARS):
        raise invalid("cursor must be the last id of the previous page")
    start = [i for i in items if cursor is None or key(i) > cursor]
    page = tuple(start[:n])
    return Page(page, key(page[-1]) if len(start) > n else None)
