"""The admin HTTP API: organizations, org members, instances, users, tokens, API keys, plans,
quotas and usage, invoices, the audit log.

The routes are data (`admin_routes.Route`, declared in `admin_tenancy` and `admin_billing`),
served by `admin_routes.bind` and described by `origin.openapi` from the same table at
`GET /openapi.json`. The bootstrap calls of PROTOCOL.md keep their exact paths, bodies and
answers.

Rules:
- Credentials (`Authorization: Bearer …`): the operator's admin token, an org member's token
  (`gb6o_…`) or an API key (`gb6k_…`), turned into an actor by
  `tenancy.authenticate_admin`; a user's socket token is not an admin credential (401).
- Authorization is `tenancy.authorize` (origin/rbac.py), called once per request by
  `admin_routes._serve` with the route's permission and target. Ids of another tenant read
  like ids that do not exist (404); a target within reach without the permission is 403.
- Lists are paginated (`limit`, `after`; `{"items", "next"}`) with filters as query
  parameters; `routes(shard)` is the whole table (tests enumerate it via /openapi.json).
- Every route that changes something is recorded in the audit log (`admin.<operation id>`)
  before it is answered; a change refused with 403, a request over its rate (429) and a failed
  authentication (401) are recorded as `denied` in aggregate (`audit.admin_refused`).
- Rate limits per credential and per client address for failed authentication
  (origin/admin_limits.py, `[limits] admin_*`), shared by a cluster's origins through
  `[cluster] redis_url` when set.
"""

from __future__ import annotations

from collections.abc import Mapping

from quart import Blueprint

from node.errors import GB6Error, forbidden
from node.log import log
from origin.admin_billing import billing_routes
from origin.admin_limits import admin_limiter
from origin.admin_routes import Route, Target, bearer, bind
from origin.admin_tenancy import tenancy_routes
from origin.openapi import openapi_route
from origin.rbac import Actor
from origin.shard import OriginShard

__all__ = ["admin_blueprint", "bearer", "routes"]


def routes(shard: OriginShard) -> list[Route]:
    """Every admin route, bound to `shard`."""
    return [*tenancy_routes(shard), *billing_routes(shard)]


class _Guard:
    """`admin_routes.Guard` over the shard's tenancy."""

    def __init__(self, shard: OriginShard, admin_token: str) -> None:
        self.shard = shard
        self.admin_token = admin_token

    async def authenticate(self, secret: str) -> Actor:
        return await self.shard.tenancy.authenticate_admin(secret, self.admin_token)

    def resolve(self, params: Mapping[str, str]) -> Target:
        inst = params.get("inst") or params.get("instance")
        if inst is not None:
            return Target(self.shard.tenancy.instance_org(inst), inst)
        org = params.get("org") or params.get("parent")
        return Target(org) if org is not None else Target()

    def authorize(self, actor: Actor, permission: str, target: Target) -> None:
        if target.instance is not None:
            self.shard.tenancy.authorize(actor, permission, instance=target.instance)
        elif target.org is not None:
            self.shard.tenancy.authorize(actor, permission, org=target.org)
        elif permission not in actor.permissions:
            # Nothing named: the handler shows only what the actor reaches.
            raise forbidden(f"{permission} is not allowed for this {actor.kind}")


class _Recorder:
    """`admin_routes.Recorder` over the shard's audit log."""

    def __init__(self, shard: OriginShard) -> None:
        self.shard = shard

    async def record(
        self, actor: Actor, action: str, target: Target, subject: str | None, outcome: str
    ) -> None:
        await self.shard.audit.record(
            actor=actor.id,
            action=f"admin.{action}",
            org=target.org,
            instance=target.instance,
            target=subject,
            outcome=outcome,
            details={"actor_kind": actor.kind},
        )

    async def refused(self, actor: str, action: str, subject: str | None, code: str) -> None:
        # Aggregated (a flood of refusals costs a bounded number of records); the first of a
        # kind is awaited, so it is on record once answered. The refusal stays the answer even
        # if the log cannot take it now (then it is logged instead).
        try:
            await self.shard.audit.admin_refused(
                actor=actor, action=f"admin.{action}", code=code, target=subject
            )
        except GB6Error as exc:
            log("admin_denied_not_audited", action=action, error=exc.message)


def admin_blueprint(shard: OriginShard, admin_token: str) -> Blueprint:
    """The admin API for `shard`, the operator holding `admin_token`; with /openapi.json."""
    table = routes(shard)
    # Admin bodies are small JSON objects: the message body limit (64 KiB) is ample.
    max_body = shard.limits.body_bytes
    limiter = admin_limiter(shard.config, admin_token)
    bp = bind(table, _Guard(shard, admin_token), _Recorder(shard), "admin", max_body, limiter)
    openapi_route(bp, table)
    return bp
