"""The admin HTTP API: organizations, instances, users and their tokens, plans.

The routes are data (`admin_routes.Route`), served by `admin_routes.bind` and described by
`origin.openapi` from the same table (`GET /openapi.json`). The bootstrap calls of PROTOCOL.md
keep their exact paths, bodies and answers.

Rules:
- Every call needs `Authorization: Bearer <credential>`: the operator's admin token (compared in
  constant time) may do everything.
- Ids of another tenant read like ids that do not exist (404); a known target without the
  permission is 403.
- Lists are paginated (`limit`, `after`; `{"items", "next"}`) in id order, with filters as
  query parameters; `routes()` is the whole table (tests enumerate it).
- Every route that changes something is recorded with its `op_id` as the action.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any, Final

import attrs
from quart import Blueprint

from node.errors import UNAUTHORIZED, GB6Error, not_found
from origin.admin_routes import (
    Call,
    Param,
    Reply,
    Route,
    Target,
    bearer,
    bind,
    page_query,
    page_reply,
    page_schema,
    paginate,
)
from origin.admin_schema import (
    NAME_CHARS,
    Schema,
    id_string,
    integer,
    obj,
    string,
    timestamp,
)
from origin.records import INSTANCE_ROLES, iso
from origin.shard import OriginShard

__all__ = ["admin_blueprint", "bearer", "routes"]

INSTANCE_STATUSES: Final = ("active", "suspended", "deleted")

# --- schemas of what the API answers ----------------------------------------------------------

ORG = obj(
    {
        "id": id_string(),
        "name": string(),
        "parent": id_string(nullable=True),
        "created_at": timestamp(),
    },
    ["id", "name", "parent", "created_at"],
    additional=True,
)
INSTANCE = obj(
    {
        "id": id_string(),
        "org": id_string(),
        "name": string(),
        "region": string(),
        "plan": string(1, 64),
        "status": string(enum=INSTANCE_STATUSES),
        "created_at": timestamp(),
    },
    ["id", "org", "name", "region", "plan", "status", "created_at"],
    additional=True,
)
USER = obj(
    {
        "id": id_string(),
        "instance": id_string(),
        "name": string(),
        "role": string(1, 32),
        "created_at": timestamp(),
    },
    ["id", "instance", "name", "role", "created_at"],
    additional=True,
)
ISSUED_TOKEN = obj(
    {"token": string(1, 4096), "id": id_string(), "expires_at": timestamp()},
    ["token", "id", "expires_at"],
    additional=True,
)
PLAN = obj(
    {"name": string(1, 64), "quotas": {"type": "object"}, "rate": {"type": ["object", "null"]}},
    ["name"],
    additional=True,
)

ORG_PATH: Final[Mapping[str, Schema]] = {"org": id_string()}
INST_PATH: Final[Mapping[str, Schema]] = {"inst": id_string()}
USER_PATH: Final[Mapping[str, Schema]] = {"inst": id_string(), "user": id_string()}
NAME_FILTER = Param("name", string(1, NAME_CHARS), "only items with exactly this name")


# --- the guard: who is calling, what they may reach --------------------------------------------


@attrs.frozen
class Operator:
    """The operator: the holder of the node's admin token. May do everything."""

    id: str = "operator"


class _Guard:
    def __init__(self, shard: OriginShard, admin_token: str) -> None:
        self.shard = shard
        self.admin_token = admin_token

    async def authenticate(self, secret: str) -> Any:
        if hmac.compare_digest(secret.encode(), self.admin_token.encode()):
            return Operator()
        raise GB6Error(UNAUTHORIZED, "bad admin token")

    async def resolve(self, actor: Any, params: Mapping[str, str]) -> Target:
        shard = self.shard
        if "inst" in params:
            inst = shard.instances.get(params["inst"])
            if inst is None:
                raise not_found(f"instance {params['inst']} not found")
            return Target(inst.org, inst.id)
        if "org" in params:
            if params["org"] not in shard.orgs:
                raise not_found(f"organization {params['org']} not found")
            return Target(params["org"])
        return Target()

    def authorize(self, actor: Any, permission: str, target: Target) -> None:
        if isinstance(actor, Operator):
            return
        raise GB6Error("forbidden", f"not allowed: {permission}")


class _Recorder:
    async def record(
        self, actor: Any, action: str, target: Target, details: Mapping[str, Any]
    ) -> None:
        return None


# --- routes -------------------------------------------------------------------------------


def routes(shard: OriginShard) -> list[Route]:
    """Every admin route, bound to `shard`."""

    def _user(call: Call) -> Any:
        return shard.user_of_instance(call.params["inst"], call.params["user"])

    # organizations

    async def create_org(call: Call) -> Reply:
        org = await shard.create_org(call.body["name"], call.body.get("parent"))
        return Reply(org.to_json(), org.id)

    async def list_orgs(call: Call) -> Reply:
        parent, name = call.query.get("parent"), call.query.get("name")
        found = [
            o
            for o in shard.orgs.values()
            if (parent is None or o.parent == parent) and (name is None or o.name == name)
        ]
        page, nxt = paginate(found, lambda o: o.id, call.query)
        return page_reply([o.to_json() for o in page], nxt)

    async def get_org(call: Call) -> Reply:
        return Reply(shard.orgs[call.params["org"]].to_json())

    async def list_children(call: Call) -> Reply:
        org = call.params["org"]
        found = [o for o in shard.orgs.values() if o.parent == org]
        page, nxt = paginate(found, lambda o: o.id, call.query)
        return page_reply([o.to_json() for o in page], nxt)

    # instances

    async def create_instance(call: Call) -> Reply:
        b = call.body
        inst = await shard.create_instance(
            call.params["org"], b["name"], b.get("region"), b.get("plan")
        )
        return Reply(inst.to_json(), inst.id)

    def _instances(call: Call, org: str | None) -> Reply:
        q = call.query
        want = {k: q[k] for k in ("status", "region", "plan", "name") if k in q}
        if org is None:
            org = q.get("org")
        found = [
            i
            for i in shard.instances.values()
            if (org is None or i.org == org) and all(getattr(i, k) == v for k, v in want.items())
        ]
        page, nxt = paginate(found, lambda i: i.id, q)
        return page_reply([i.to_json() for i in page], nxt)

    async def list_org_instances(call: Call) -> Reply:
        return _instances(call, call.params["org"])

    async def list_instances(call: Call) -> Reply:
        return _instances(call, None)

    async def get_instance(call: Call) -> Reply:
        return Reply(shard.instances[call.params["inst"]].to_json())

    # users and their tokens

    async def create_user(call: Call) -> Reply:
        b = call.body
        user = await shard.create_user(call.params["inst"], b["name"], b.get("role", "member"))
        return Reply(user.to_json(), user.id)

    async def list_users(call: Call) -> Reply:
        inst, q = call.params["inst"], call.query
        found = [
            u
            for u in shard.users.values()
            if u.instance == inst
            and ("role" not in q or u.role == q["role"])
            and ("name" not in q or u.name == q["name"])
        ]
        page, nxt = paginate(found, lambda u: u.id, q)
        return page_reply([u.to_json() for u in page], nxt)

    async def get_user(call: Call) -> Reply:
        return Reply(_user(call).to_json())

    async def issue_token(call: Call) -> Reply:
        secret, token = await shard.issue_token(
            call.params["inst"], call.params["user"], call.body.get("ttl_seconds")
        )
        return Reply(
            {"token": secret, "id": token.id, "expires_at": iso(token.expires_at)}, token.id
        )

    async def revoke_token(call: Call) -> Reply:
        p = call.params
        await shard.revoke_token(p["inst"], p["user"], p["token_id"])
        return Reply(None)

    # plans

    def _plans() -> dict[str, Any]:
        plans = getattr(shard.config, "plans", None)
        if plans is None:
            return {name: {"name": name} for name in ("free", "unlimited")}
        return {name: plan.to_json() for name, plan in plans.items()}

    async def list_plans(call: Call) -> Reply:
        page, nxt = paginate(list(_plans().values()), lambda p: str(p["name"]), call.query)
        return page_reply(page, nxt)

    async def get_plan(call: Call) -> Reply:
        plan = _plans().get(call.params["plan"])
        if plan is None:
            raise not_found(f"plan {call.params['plan']} not found")
        return Reply(plan)

    ttl = integer(1, shard.limits.token_ttl_max_s)
    return [
        Route(
            "POST",
            "/v1/orgs",
            "create_org",
            "Create an organization (under `parent`)",
            "orgs",
            "org.create",
            create_org,
            status=201,
            body=obj({"name": string(), "parent": id_string(nullable=True)}, ["name"]),
            response=ORG,
        ),
        Route(
            "GET",
            "/v1/orgs",
            "list_orgs",
            "List organizations",
            "orgs",
            "org.read",
            list_orgs,
            response=page_schema(ORG),
            query=page_query(
                Param("parent", id_string(), "only children of this organization"), NAME_FILTER
            ),
        ),
        Route(
            "GET",
            "/v1/orgs/{org}",
            "get_org",
            "An organization",
            "orgs",
            "org.read",
            get_org,
            response=ORG,
            path_params=ORG_PATH,
        ),
        Route(
            "GET",
            "/v1/orgs/{org}/children",
            "list_org_children",
            "The organization's direct children",
            "orgs",
            "org.read",
            list_children,
            response=page_schema(ORG),
            query=page_query(),
            path_params=ORG_PATH,
        ),
        Route(
            "POST",
            "/v1/orgs/{org}/instances",
            "create_instance",
            "Create an instance (region: the node's; plan: free)",
            "instances",
            "instance.create",
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
            "instance.read",
            list_org_instances,
            response=page_schema(INSTANCE),
            path_params=ORG_PATH,
            query=page_query(*_instance_filters()),
        ),
        Route(
            "GET",
            "/v1/instances",
            "list_instances",
            "Instances the caller may see",
            "instances",
            "instance.read",
            list_instances,
            response=page_schema(INSTANCE),
            query=page_query(
                Param("org", id_string(), "only this organization's"), *_instance_filters()
            ),
        ),
        Route(
            "GET",
            "/v1/instances/{inst}",
            "get_instance",
            "An instance",
            "instances",
            "instance.read",
            get_instance,
            response=INSTANCE,
            path_params=INST_PATH,
        ),
        Route(
            "POST",
            "/v1/instances/{inst}/users",
            "create_user",
            "Create a user of the instance",
            "users",
            "user.create",
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
            "user.read",
            list_users,
            response=page_schema(USER),
            path_params=INST_PATH,
            query=page_query(Param("role", string(enum=INSTANCE_ROLES)), NAME_FILTER),
        ),
        Route(
            "GET",
            "/v1/instances/{inst}/users/{user}",
            "get_user",
            "A user",
            "users",
            "user.read",
            get_user,
            response=USER,
            path_params=USER_PATH,
        ),
        Route(
            "POST",
            "/v1/instances/{inst}/users/{user}/tokens",
            "issue_user_token",
            "Issue an access token for the user (for the WebSocket's hello)",
            "users",
            "user.token",
            issue_token,
            status=201,
            body=obj({"ttl_seconds": ttl}),
            response=ISSUED_TOKEN,
            path_params=USER_PATH,
        ),
        Route(
            "DELETE",
            "/v1/instances/{inst}/users/{user}/tokens/{token_id}",
            "revoke_user_token",
            "Revoke one of the user's tokens",
            "users",
            "user.token",
            revoke_token,
            status=204,
            path_params={**USER_PATH, "token_id": id_string()},
        ),
        Route(
            "GET",
            "/v1/plans",
            "list_plans",
            "Plans",
            "plans",
            "plan.read",
            list_plans,
            response=page_schema(PLAN),
            query=page_query(),
        ),
        Route(
            "GET",
            "/v1/plans/{plan}",
            "get_plan",
            "A plan",
            "plans",
            "plan.read",
            get_plan,
            response=PLAN,
            path_params={"plan": string(1, 64)},
        ),
    ]


def _instance_filters() -> tuple[Param, ...]:
    return (
        Param("status", string(enum=INSTANCE_STATUSES)),
        Param("region", string(1, 64)),
        Param("plan", string(1, 64)),
        NAME_FILTER,
    )


def admin_blueprint(shard: OriginShard, admin_token: str) -> Blueprint:
    """The admin API for `shard`, the operator holding `admin_token`."""
    from origin.openapi import openapi_route  # the document is served beside the API

    bp = bind(routes(shard), _Guard(shard, admin_token), _Recorder(), "admin")
    openapi_route(bp, routes(shard))
    return bp
