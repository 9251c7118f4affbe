"""The admin HTTP API (bootstrap part): organizations, instances, users, tokens.

Every call needs `Authorization: Bearer <admin token>`; the comparison is constant-time.
"""

from __future__ import annotations

import hmac
from typing import Any

from quart import Blueprint, request

from node.errors import UNAUTHORIZED, GB6Error, invalid
from node.http import json_body
from origin.records import iso
from origin.shard import OriginShard


def _name(body: dict[str, Any], key: str = "name", max_chars: int = 200) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
        raise invalid(f"field '{key}' must be a string of 1 to {max_chars} characters")
    return value


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, str) or not 1 <= len(value) <= 200):
        raise invalid(f"field '{key}' must be a string")
    return value


def bearer() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise GB6Error(UNAUTHORIZED, "missing bearer token")
    return token.strip()


def admin_blueprint(shard: OriginShard, admin_token: str) -> Blueprint:
    bp = Blueprint("admin", __name__)

    @bp.before_request
    async def _auth() -> None:
        if not hmac.compare_digest(bearer().encode(), admin_token.encode()):
            raise GB6Error(UNAUTHORIZED, "bad admin token")

    def created(payload: dict[str, Any]) -> tuple[dict[str, Any], int]:
        return payload, 201

    @bp.post("/v1/orgs")
    async def create_org() -> tuple[dict[str, Any], int]:
        body = await json_body()
        org = await shard.create_org(_name(body), _opt_str(body, "parent"))
        return created(org.to_json())

    @bp.post("/v1/orgs/<org>/instances")
    async def create_instance(org: str) -> tuple[dict[str, Any], int]:
        body = await json_body()
        inst = await shard.create_instance(
            org, _name(body), _opt_str(body, "region"), _opt_str(body, "plan")
        )
        return created(inst.to_json())

    @bp.post("/v1/instances/<inst>/users")
    async def create_user(inst: str) -> tuple[dict[str, Any], int]:
        body = await json_body()
        role = body.get("role", "member")
        if not isinstance(role, str):
            raise invalid("field 'role' must be a string")
        user = await shard.create_user(inst, _name(body), role)
        return created(user.to_json())

    @bp.post("/v1/instances/<inst>/users/<user>/tokens")
    async def create_token(inst: str, user: str) -> tuple[dict[str, Any], int]:
        body = await json_body()
        ttl = body.get("ttl_seconds")
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool)):
            raise invalid("field 'ttl_seconds' must be an integer")
        secret, token = await shard.issue_token(inst, user, ttl)
        return created({"token": secret, "id": token.id, "expires_at": iso(token.expires_at)})

    @bp.delete("/v1/instances/<inst>/users/<user>/tokens/<token_id>")
    async def revoke_token(inst: str, user: str, token_id: str) -> tuple[str, int]:
        await shard.revoke_token(inst, user, token_id)
        # A str body: Quart's bodiless Response is read through a worker thread whose
        # StopAsyncIteration escaped into trio-asyncio and took the process down.
        return "", 204

    return bp
