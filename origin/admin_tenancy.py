"""Admin routes of the tenancy: organizations (and children), org members (and their tokens),
instances (and their lifecycle), users (and their tokens), API keys.

Handlers call `shard.tenancy` (origin/tenancy.py) with the caller's actor; the route's
permission was already checked on the target by `admin_routes._serve`. A sub-resource named in
the path (a member, a key, a user) must belong to the org or instance the path names: another
one reads like one that does not exist (404).

Listings that are not under an org or instance in the path (`GET /v1/orgs`, `GET /v1/instances`)
show what the caller may see: everything for the operator, its org's subtree for an org member
or an org-wide API key, nothing (orgs) or its one instance for an instance-scoped key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from node.errors import not_found
from origin import rbac
from origin.admin_routes import (
    Call,
    Param,
    Reply,
    Route,
    Target,
    page_query,
    page_reply,
    page_schema,
    paginate,
)
from origin.admin_schema import (
    NAME_CHARS,
    Schema,
    array,
    boolean,
    id_string,
    integer,
    obj,
    string,
    timestamp,
)
from origin.rbac import Actor
from origin.records import INSTANCE_ROLES, INSTANCE_STATUSES, ORG_ROLES, ApiKey, OrgMember, iso
from origin.shard import OriginShard

# --- what the API answers -------------------------------------------------------------------

# Who the credential is and what it may do (`GET /v1/me`): a console shows only what it allows.
ME: Final = obj(
    {
        "kind": string(enum=["operator", "org_member", "api_key"]),
        "id": string(1, 80),
        "role": string(1, 40),
        "org": id_string(nullable=True),
        "instance": id_string(nullable=True),
        "permissions": array(string(enum=sorted(rbac.ALL_PERMISSIONS))),
    },
    ["kind", "id", "role", "org", "instance", "permissions"],
)

ORG: Final = obj(
    {
        "id": id_string(),
        "name": string(),
        "parent": id_string(nullable=True),
        "created_at": timestamp(),
    },
    ["id", "name", "parent", "created_at"],
    additional=True,
)
MEMBER: Final = obj(
    {
        "id": id_string(),
        "org": id_string(),
        "name": string(),
        "role": string(enum=ORG_ROLES),
        "created_at": timestamp(),
    },
    ["id", "org", "name", "role", "created_at"],
    additional=True,
)
INSTANCE: Final = obj(
    {
        "id": id_string(),
        "org": id_string(),
        "name": string(),
        "region": string(1, 64),
        "plan": string(1, 64),
        "status": string(enum=INSTANCE_STATUSES),
        "created_at": timestamp(),
    },
    ["id", "org", "name", "region", "plan", "status", "created_at"],
    additional=True,
)
USER: Final = obj(
    {
        "id": id_string(),
        "instance": id_string(),
        "name": string(),
        "role": string(enum=INSTANCE_ROLES),
        "created_at": timestamp(),
    },
    ["id", "instance", "name", "role", "created_at"],
    additional=True,
)
ISSUED_TOKEN: Final = obj(
    {"token": string(1, 4096), "id": id_string(), "expires_at": timestamp()},
    ["token", "id", "expires_at"],
    additional=True,
)
PERMISSION: Final = string(enum=sorted(rbac.ADMIN_PERMISSIONS))
API_KEY_FIELDS: Final[Mapping[str, Schema]] = {
    "id": id_string(),
    "org": id_string(),
    "instance": id_string(nullable=True),
    "name": string(),
    "permissions": array(PERMISSION),
    "created_by": string(1, 100),
    "expires_at": timestamp(nullable=True),
    "revoked": boolean(),
    "created_at": timestamp(),
}
API_KEY: Final = obj(API_KEY_FIELDS, list(API_KEY_FIELDS), additional=True)
ISSUED_KEY: Final = obj(
    {**API_KEY_FIELDS, "secret": string(1, 4096)},
    [*API_KEY_FIELDS, "secret"],
    additional=True,
)

ORG_PATH: Final[Mapping[str, Schema]] = {"org": id_string()}
MEMBER_PATH: Final[Mapping[str, Schema]] = {"org": id_string(), "member": id_string()}
KEY_PATH: Final[Mapping[str, Schema]] = {"org": id_string(), "key": id_string()}
INST_PATH: Final[Mapping[str, Schema]] = {"inst": id_string()}
USER_PATH: Final[Mapping[str, Schema]] = {"inst": id_string(), "user": id_string()}
NAME_FILTER: Final = Param("name", string(1, NAME_CHARS), "only items with exactly this name")


def _instance_filters() -> tuple[Param, ...]:
    return (
        Param("status", string(enum=INSTANCE_STATUSES)),
        Param("region", string(1, 64)),
        Param("plan", string(1, 64)),
        NAME_FILTER,
    )


# --- what an actor sees -------------------------------------------------------------------


def visible_orgs(shard: OriginShard, actor: Actor) -> set[str] | None:
    """The orgs the actor reaches (its org and every descendant); None: all (the operator)."""
    if actor.kind == "operator":
        return None
    if actor.org is None or actor.instance is not None:
        return set()
    return {o for o in shard.orgs if actor.org in (shard.tenancy.org_chain(o) or ())}


def visible_instances(shard: OriginShard, actor: Actor) -> set[str] | None:
    """The instances the actor reaches; None: all (the operator)."""
    if actor.kind == "operator":
        return None
    if actor.instance is not None:
        return {actor.instance}
    orgs = visible_orgs(shard, actor) or set()
    return {i.id for i in shard.instances.values() if i.org in orgs}


def tenancy_routes(shard: OriginShard) -> list[Route]:
    tenancy = shard.tenancy

    async def get_me(call: Call) -> Reply:
        actor: Actor = call.actor
        return Reply(
            {
                "kind": actor.kind,
                "id": actor.id,
                "role": actor.role,
                "org": actor.org,
                "instance": actor.instance,
                "permissions": sorted(actor.permissions),
            }
        )

    # organizations

    async def create_org(call: Call) -> Reply:
        org = await tenancy.create_org(call.actor, call.body["name"], call.body.get("parent"))
        return Reply(org.to_json(), org.id, Target(org.id))

    async def list_orgs(call: Call) -> Reply:
        parent, name = call.query.get("parent"), call.query.get("name")
        if parent is not None:
            found = tenancy.children(parent)
        elif call.actor.kind == "operator":
            found = tenancy.children(None)
        else:  # the roots of what the actor sees: its own org
            seen = visible_orgs(shard, call.actor) or set()
            found = [o for o in shard.orgs.values() if o.id in seen and o.parent not in seen]
        found = [o for o in found if name is None or o.name == name]
        page, nxt = paginate(found, lambda o: o.id, call.query)
        return page_reply([o.to_json() for o in page], nxt)

    async def get_org(call: Call) -> Reply:
        return Reply(tenancy.get_org(call.actor, call.params["org"]).to_json())

    async def update_org(call: Call) -> Reply:
        org = await tenancy.rename_org(call.actor, call.params["org"], call.body["name"])
        return Reply(org.to_json())

    async def delete_org(call: Call) -> Reply:
        await tenancy.delete_org(call.actor, call.params["org"])
        return Reply(None)

    async def list_children(call: Call) -> Reply:
        page, nxt = paginate(tenancy.children(call.params["org"]), lambda o: o.id, call.query)
        return page_reply([o.to_json() for o in page], nxt)

    # org members

    def _member(call: Call) -> OrgMember:
        member = tenancy.get_member(call.actor, call.params["member"])
        if member.org != call.params["org"]:
            raise not_found(f"member {call.params['member']} not found")
        return member

    async def add_member(call: Call) -> Reply:
        b = call.body
        member = await tenancy.add_member(
            call.actor, call.params["org"], b["name"], b.get("role", "member")
        )
        return Reply(member.to_json(), member.id)

    async def list_members(call: Call) -> Reply:
        org, q = call.params["org"], call.query
        found = [
            m
            for m in tenancy.members.values()
            if m.org == org and q.get("role") in (None, m.role) and q.get("name") in (None, m.name)
        ]
        page, nxt = paginate(found, lambda m: m.id, q)
        return page_reply([m.to_json() for m in page], nxt)

    async def get_member(call: Call) -> Reply:
        return Reply(_member(call).to_json())

    async def update_member(call: Call) -> Reply:
        _member(call)
        b = call.body
        member = await tenancy.update_member(
            call.actor, call.params["member"], name=b.get("name"), role=b.get("role")
        )
        return Reply(member.to_json())

    async def remove_member(call: Call) -> Reply:
        _member(call)
        await tenancy.remove_member(call.actor, call.params["member"])
        return Reply(None)

    async def issue_member_token(call: Call) -> Reply:
        _member(call)
        secret, token = await tenancy.issue_member_token(
            call.actor, call.params["member"], call.body.get("ttl_seconds")
        )
        payload = {"token": secret, "id": token.id, "expires_at": iso(token.expires_at)}
        return Reply(payload, token.id)

    async def revoke_member_token(call: Call) -> Reply:
        _member(call)
        p = call.params
        await tenancy.revoke_member_token(call.actor, p["member"], p["token_id"])
        return Reply(None)

    # instances

    async def create_instance(call: Call) -> Reply:
        b = call.body
        inst = await tenancy.create_instance(
            call.actor, call.params["org"], b["name"], b.get("region"), b.get("plan")
        )
        return Reply(inst.to_json(), inst.id)

    def _instances(call: Call, org: str | None) -> Reply:
        q = call.query
        want = {k: q[k] for k in ("status", "region", "plan", "name") if k in q}
        org = org or q.get("org")
        seen = visible_instances(shard, call.actor)
        found = [
            i
            for i in shard.instances.values()
            if (org is None or i.org == org)
            and (seen is None or i.id in seen)
            and all(getattr(i, k) == v for k, v in want.items())
        ]
        page, nxt = paginate(found, lambda i: i.id, q)
        return page_reply([i.to_json() for i in page], nxt)

    async def list_org_instances(call: Call) -> Reply:
        return _instances(call, call.params["org"])

    async def list_instances(call: Call) -> Reply:
        return _instances(call, None)

    async def get_instance(call: Call) -> Reply:
        return Reply(tenancy.get_instance(call.actor, call.params["inst"]).to_json())

    async def update_instance(call: Call) -> Reply:
        b = call.body
        inst = await tenancy.update_instance(
            call.actor, call.params["inst"], name=b.get("name"), plan=b.get("plan")
        )
        return Reply(inst.to_json())

    async def suspend_instance(call: Call) -> Reply:
        return Reply((await tenancy.suspend_instance(call.actor, call.params["inst"])).to_json())

    async def resume_instance(call: Call) -> Reply:
        return Reply((await tenancy.resume_instance(call.actor, call.params["inst"])).to_json())

    async def delete_instance(call: Call) -> Reply:
        return Reply((await tenancy.delete_instance(call.actor, call.params["inst"])).to_json())

    # users and their tokens

    async def create_user(call: Call) -> Reply:
        b = call.body
        user = await tenancy.create_user(
            call.actor, call.params["inst"], b["name"], b.get("role", "member")
        )
        return Reply(user.to_json(), user.id)

    async def list_users(call: Call) -> Reply:
        inst, q = call.params["inst"], call.query
        found = [
            u
            for u in shard.users.values()
            if u.instance == inst
            and q.get("role") in (None, u.role)
            and q.get("name") in (None, u.name)
        ]
        page, nxt = paginate(found, lambda u: u.id, q)
        return page_reply([u.to_json() for u in page], nxt)

    async def get_user(call: Call) -> Reply:
        p = call.params
        return Reply(tenancy.get_user(call.actor, p["inst"], p["user"]).to_json())

    async def update_user(call: Call) -> Reply:
        p, b = call.params, call.body
        user = await tenancy.update_user(
            call.actor, p["inst"], p["user"], name=b.get("name"), role=b.get("role")
        )
        return Reply(user.to_json())

    async def delete_user(call: Call) -> Reply:
        await tenancy.delete_user(call.actor, call.params["inst"], call.params["user"])
        return Reply(None)

    async def issue_token(call: Call) -> Reply:
        p = call.params
        secret, token = await tenancy.issue_token(
            call.actor, p["inst"], p["user"], call.body.get("ttl_seconds")
        )
        payload = {"token": secret, "id": token.id, "expires_at": iso(token.expires_at)}
        return Reply(payload, token.id)

    async def revoke_token(call: Call) -> Reply:
        p = call.params
        await tenancy.revoke_token(call.actor, p["inst"], p["user"], p["token_id"])
        return Reply(None)

    # API keys

    def _key(call: Call) -> ApiKey:
        key = tenancy.get_api_key(call.actor, call.params["key"])
        if key.org != call.params["org"]:
            raise not_found(f"API key {call.params['key']} not found")
        return key

    async def create_key(call: Call) -> Reply:
        b = call.body
        secret, key = await tenancy.create_api_key(
            call.actor,
            call.params["org"],
            b["name"],
            b["permissions"],
            instance=b.get("instance"),
            ttl_s=b.get("ttl_seconds"),
        )
        return Reply({**key.to_json(), "secret": secret}, key.id)

    async def list_keys(call: Call) -> Reply:
        org, q = call.params["org"], call.query
        found = [
            k
            for k in tenancy.keys.values()
            if k.org == org
            and q.get("instance") in (None, k.instance)
            and q.get("revoked") in (None, k.revoked)
        ]
        page, nxt = paginate(found, lambda k: k.id, q)
        return page_reply([k.to_json() for k in page], nxt)

    async def get_key(call: Call) -> Reply:
        return Reply(_key(call).to_json())

    async def revoke_key(call: Call) -> Reply:
        _key(call)
        await tenancy.revoke_api_key(call.actor, call.params["key"])
        return Reply(None)

    ttl = integer(1, shard.limits.token_ttl_max_s)
    token_body = obj({"ttl_seconds": ttl})
    return [
        Route(
            "GET",
            "/v1/me",
            "get_me",
            "The calling credential: its kind, id, role, home org or instance, and permissions",
            "me",
            None,
            get_me,
            response=ME,
        ),
        # organizations
        Route(
            "POST",
            "/v1/orgs",
            "create_org",
            "Create an organization: a root (operator only) or a child of `parent`",
            "orgs",
            rbac.ORG_WRITE,
            create_org,
            status=201,
            body=obj({"name": string(), "parent": id_string(nullable=True)}, ["name"]),
            response=ORG,
            scope=("body", "parent"),
        ),
        Route(
            "GET",
            "/v1/orgs",
            "list_orgs",
            "Organizations: the children of `parent`, else the roots the caller sees",
            "orgs",
            rbac.ORG_READ,
            list_orgs,
            response=page_schema(ORG),
            query=page_query(
                Param("parent", id_string(), "only children of this organization"), NAME_FILTER
            ),
            scope=("query", "parent"),
        ),
        Route(
            "GET",
            "/v1/orgs/{org}",
            "get_org",
            "An organization",
            "orgs",
            rbac.ORG_READ,
            get_org,
            response=ORG,
            path_params=ORG_PATH,
        ),
        Route(
            "PATCH",
            "/v1/orgs/{org}",
            "update_org",
            "Rename an organization",
            "orgs",
            rbac.ORG_WRITE,
            update_org,
            body=obj({"name": string()}, ["name"]),
            response=ORG,
            path_params=ORG_PATH,
        ),
        Route(
            "DELETE",
            "/v1/orgs/{org}",
            "delete_org",
            "Delete an organization without children or live instances (else 409)",
            "orgs",
            rbac.ORG_WRITE,
            delete_org,
            status=204,
            path_params=ORG_PATH,
        ),
        Route(
            "GET",
            "/v1/orgs/{org}/children",
            "list_org_children",
            "The organization's direct children",
            "orgs",
            rbac.ORG_READ,
            list_children,
            response=page_schema(ORG),
            query=page_query(),
            path_params=ORG_PATH,
        ),
        # org members
        Route(
            "POST",
            "/v1/orgs/{org}/members",
            "add_org_member",
            "Add a member (owner, admin or member) to the organization",
            "members",
            rbac.ORG_MEMBERS,
            add_member,
            status=201,
            body=obj({"name": string(), "role": string(enum=ORG_ROLES)}, ["name"]),
            response=MEMBER,
            path_params=ORG_PATH,
        ),
        Route(
            "GET",
            "/v1/orgs/{org}/members",
            "list_org_members",
            "The organization's members",
            "members",
            rbac.ORG_READ,
            list_members,
            response=page_schema(MEMBER),
            query=page_query(Param("role", string(enum=ORG_ROLES)), NAME_FILTER),
            path_params=ORG_PATH,
        ),
        Route(
            "GET",
            "/v1/orgs/{org}/members/{member}",
            "get_org_member",
            "A member",
            "members",
            rbac.ORG_READ,
            get_member,
            response=MEMBER,
            path_params=MEMBER_PATH,
        ),
        Route(
            "PATCH",
            "/v1/orgs/{org}/members/{member}",
            "update_org_member",
            "Rename a member or change its role",
            "members",
            rbac.ORG_MEMBERS,
            update_member,
            body=obj({"name": string(), "role": string(enum=ORG_ROLES)}),
            response=MEMBER,
            path_params=MEMBER_PATH,
        ),
        Route(
            "DELETE",
            "/v1/orgs/{org}/members/{member}",
            "remove_org_member",
            "Remove a member (its tokens stop working)",
            "members",
            rbac.ORG_MEMBERS,
            remove_member,
            status=204,
            path_params=MEMBER_PATH,
        ),
        Route(
            "POST",
            "/v1/orgs/{org}/members/{member}/tokens",
            "issue_member_token",
            "Issue an admin API token (`gb6o_…`) for the member",
            "members",
            rbac.ORG_MEMBERS,
            issue_member_token,
            status=201,
            body=token_body,
            response=ISSUED_TOKEN,
            path_params=MEMBER_PATH,
        ),
        Route(
            "DELETE",
            "/v1/orgs/{org}/members/{member}/tokens/{token_id}",
            "revoke_member_token",
            "Revoke one of the member's tokens",
            "members",
            rbac.ORG_MEMBERS,
            revoke_member_token,
            status=204,
            path_params={**MEMBER_PATH, "token_id": id_string()},
        ),
        # instances
        Route(
            "POST",
            "/v1/orgs/{org}/instances",
            "create_instance",
            "Create an instance (region: the node's; plan: free)",
            "instances",
            rbac.INSTANCE_CREATE,
            create_instance,
            status=201,
            body=obj(
                {
                    "name": string(),
                    "region": string(1, 64, nullable=True),
                    "plan": string(1, 64, nullable=True),
                },
                ["name"],
            ),
            response=INSTANCE,
            path_params=ORG_PATH,
        ),
        Route(
            "GET",
            "/v1/orgs/{org}/instances",
            "list_org_instances",
            "The organization's instances",
            "instances",
            rbac.INSTANCE_READ,
            list_org_instances,
            response=page_schema(INSTANCE),
            query=page_query(*_instance_filters()),
            path_params=ORG_PATH,
        ),
        Route(
            "GET",
            "/v1/instances",
            "list_instances",
            "The instances the caller sees (of one organization with `org`)",
            "instances",
            rbac.INSTANCE_READ,
            list_instances,
            response=page_schema(INSTANCE),
            query=page_query(
                Param("org", id_string(), "only this organization's"), *_instance_filters()
            ),
            scope=("query", "org"),
        ),
        Route(
            "GET",
            "/v1/instances/{inst}",
            "get_instance",
            "An instance",
            "instances",
            rbac.INSTANCE_READ,
            get_instance,
            response=INSTANCE,
            path_params=INST_PATH,
        ),
        Route(
            "PATCH",
            "/v1/instances/{inst}",
            "update_instance",
            "Rename an instance or change its plan",
            "instances",
            rbac.INSTANCE_WRITE,
            update_instance,
            body=obj({"name": string(), "plan": string(1, 64)}),
            response=INSTANCE,
            path_params=INST_PATH,
        ),
        Route(
            "DELETE",
            "/v1/instances/{inst}",
            "delete_instance",
            "Delete an instance: nothing is served any more, its data is kept",
            "instances",
            rbac.INSTANCE_LIFECYCLE,
            delete_instance,
            response=INSTANCE,
            path_params=INST_PATH,
        ),
        Route(
            "POST",
            "/v1/instances/{inst}/suspend",
            "suspend_instance",
            "Suspend an active instance: its users' sockets close, their tokens are refused",
            "instances",
            rbac.INSTANCE_LIFECYCLE,
            suspend_instance,
            response=INSTANCE,
            path_params=INST_PATH,
        ),
        Route(
            "POST",
            "/v1/instances/{inst}/resume",
            "resume_instance",
            "Resume a suspended instance",
            "instances",
            rbac.INSTANCE_LIFECYCLE,
            resume_instance,
            response=INSTANCE,
            path_params=INST_PATH,
        ),
        # users
        Route(
            "POST",
            "/v1/instances/{inst}/users",
            "create_user",
            "Create a user of the instance",
            "users",
            rbac.USER_WRITE,
            create_user,
            status=201,
            body=obj({"name": string(), "role": string(enum=INSTANCE_ROLES)}, ["name"]),
            response=USER,
            path_params=INST_PATH,
        ),
        Route(
            "GET",
            "/v1/instances/{inst}/users",
            "list_users",
            "The instance's users",
            "users",
            rbac.USER_READ,
            list_users,
            response=page_schema(USER),
            query=page_query(Param("role", string(enum=INSTANCE_ROLES)), NAME_FILTER),
            path_params=INST_PATH,
        ),
        Route(
            "GET",
            "/v1/instances/{inst}/users/{user}",
            "get_user",
            "A user",
            "users",
            rbac.USER_READ,
            get_user,
            response=USER,
            path_params=USER_PATH,
        ),
        Route(
            "PATCH",
            "/v1/instances/{inst}/users/{user}",
            "update_user",
            "Rename a user or change their role",
            "users",
            rbac.USER_WRITE,
            update_user,
            body=obj({"name": string(), "role": string(enum=INSTANCE_ROLES)}),
            response=USER,
            path_params=USER_PATH,
        ),
        Route(
            "DELETE",
            "/v1/instances/{inst}/users/{user}",
            "delete_user",
            "Delete a user: tokens revoked, removed from every room, sockets closed",
            "users",
            rbac.USER_WRITE,
            delete_user,
            status=204,
            path_params=USER_PATH,
        ),
        Route(
            "POST",
            "/v1/instances/{inst}/users/{user}/tokens",
            "issue_user_token",
            "Issue an access token for the user (for the WebSocket's hello)",
            "users",
            rbac.TOKEN_ISSUE,
            issue_token,
            status=201,
            body=token_body,
            response=ISSUED_TOKEN,
            path_params=USER_PATH,
        ),
        Route(
            "DELETE",
            "/v1/instances/{inst}/users/{user}/tokens/{token_id}",
            "revoke_user_token",
            "Revoke one of the user's tokens",
            "users",
            rbac.TOKEN_ISSUE,
            revoke_token,
            status=204,
            path_params={**USER_PATH, "token_id": id_string()},
        ),
        # API keys
        Route(
            "POST",
            "/v1/orgs/{org}/api_keys",
            "create_api_key",
            "Create an API key (`gb6k_…`, shown once) for the org's subtree or one instance",
            "api_keys",
            rbac.APIKEY_WRITE,
            create_key,
            status=201,
            body=obj(
                {
                    "name": string(),
                    "permissions": array(PERMISSION, len(rbac.ADMIN_PERMISSIONS)),
                    "instance": id_string(nullable=True),
                    "ttl_seconds": ttl,
                },
                ["name", "permissions"],
            ),
            response=ISSUED_KEY,
            path_params=ORG_PATH,
        ),
        Route(
            "GET",
            "/v1/orgs/{org}/api_keys",
            "list_api_keys",
            "The organization's API keys (never their secrets)",
            "api_keys",
            rbac.APIKEY_READ,
            list_keys,
            response=page_schema(API_KEY),
            query=page_query(Param("instance", id_string()), Param("revoked", boolean())),
            path_params=ORG_PATH,
        ),
        Route(
            "GET",
            "/v1/orgs/{org}/api_keys/{key}",
            "get_api_key",
            "An API key",
            "api_keys",
            rbac.APIKEY_READ,
            get_key,
            response=API_KEY,
            path_params=KEY_PATH,
        ),
        Route(
            "DELETE",
            "/v1/orgs/{org}/api_keys/{key}",
            "revoke_api_key",
            "Revoke an API key",
            "api_keys",
            rbac.APIKEY_WRITE,
            revoke_key,
            status=204,
            path_params=KEY_PATH,
        ),
    ]
