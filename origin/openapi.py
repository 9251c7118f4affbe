"""The OpenAPI 3.1 document of the admin API, built from the route table that serves it.

`document(routes)` is pure: each `Route` gives its path, method, parameters (path and query,
with the schemas `_serve` validates them against), request body, answer schema and status. Every
operation also lists the error answers the protocol defines, all with the one error shape, and
the bearer security scheme. `openapi_route` serves it at `GET /openapi.json` without credentials
(it describes the API, it holds no data).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from quart import Blueprint

from origin.admin_routes import Route
from origin.admin_schema import Schema, obj, string

VERSION: Final = "1"
ERROR: Final = obj(
    {
        "error": obj(
            {"code": string(1, 64), "message": string(0, 4096)},
            ["code", "message"],
            additional=True,
        )
    },
    ["error"],
)
# The protocol's error statuses (PROTOCOL.md): any admin call may meet these. 405 is for a
# method the path does not have.
ERROR_STATUSES: Final = {
    "400": "invalid: a malformed body, parameter or value",
    "401": "unauthorized: no or bad credentials",
    "403": "forbidden, or quota_exceeded",
    "404": "not_found (also for another tenant's ids)",
    "405": "invalid: the path has no such method",
    "409": "conflict",
    "413": "too_large: the body is over the node's limit",
    "429": "rate_limited (with Retry-After)",
    "503": "unavailable: the store cannot answer now",
}


def _json(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def operation(route: Route) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": route.path_params[name]}
        for name in route.path_names()
    ]
    params += [
        {
            "name": p.name,
            "in": "query",
            "required": p.required,
            "schema": p.schema,
            **({"description": p.description} if p.description else {}),
        }
        for p in route.query
    ]
    responses: dict[str, Any] = {}
    if route.response is None:
        responses[str(route.status)] = {"description": "done"}
    else:
        responses[str(route.status)] = {"description": "done", "content": _json(route.response)}
    for status, description in ERROR_STATUSES.items():
        responses[status] = {
            "description": description,
            "content": _json({"$ref": "#/components/schemas/Error"}),
        }
    responses["429"]["headers"] = {
        "Retry-After": {
            "description": "whole seconds to wait before retrying (origin/admin_limits.py)",
            "required": True,
            "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
        }
    }
    op: dict[str, Any] = {
        "operationId": route.op_id,
        "summary": route.summary,
        "tags": [route.tag],
        "description": f"Permission: `{route.permission}`.",
        "parameters": params,
        "responses": responses,
    }
    if route.body is not None:
        # An empty body counts as {}: a body is required only where it has required fields.
        required = bool(route.body.get("required"))
        op["requestBody"] = {"required": required, "content": _json(route.body)}
    return op


def links(route: Route, routes: Sequence[Route]) -> dict[str, Any]:
    """OpenAPI links from a create (`POST …` answering 201 with an `id`) to the operations on
    what it made: those whose path continues the create's path with one more parameter
    (`POST /v1/orgs` → `/v1/orgs/{org}…`), given the new id and the create's own parameters.
    Clients (and schemathesis' stateful phase) follow them."""
    if route.method != "POST" or route.status != 201 or route.response is None:
        return {}
    if "id" not in route.response.get("properties", {}):
        return {}
    found: dict[str, Any] = {}
    prefix = route.path + "/{"
    for other in routes:
        if not other.path.startswith(prefix):
            continue
        new = other.path[len(prefix) :].split("}", 1)[0]
        params = {name: f"$request.path.{name}" for name in route.path_names()}
        params[new] = "$response.body#/id"
        if set(params) == set(other.path_names()) and new not in route.path_names():
            found[other.op_id] = {"operationId": other.op_id, "parameters": params}
    return found


def document(routes: Sequence[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op = operation(route)
        made = links(route, routes)
        if made:
            op["responses"][str(route.status)]["links"] = made
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "GB6 admin API",
            "version": VERSION,
            "description": (
                "Organizations, instances, users, tokens, API keys, plans, quotas and usage, "
                "invoices and the audit log. Lists take `limit` and `after` and answer "
                '`{"items": [...], "next": cursor or null}`.'
            ),
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def openapi_route(bp: Blueprint, routes: Sequence[Route]) -> None:
    """Serve `document(routes)` at GET /openapi.json on `bp` (built once)."""
    doc = document(routes)

    async def openapi_json() -> dict[str, Any]:
        return doc

    bp.add_url_rule("/openapi.json", endpoint="openapi_json", view_func=openapi_json)
