"""The admin API's route table: each route declared once, as data, and served from that data.

A `Route` names its method and path, the permission it needs, the schemas of its path
parameters, query parameters, body and answer, and the handler. `bind` turns the table into a
Quart blueprint; `origin.openapi` turns the same table into the OpenAPI document. So the document
and the checks cannot drift apart.

Every request goes through `_serve`, the one place that:
0. refuses (429) a client address blocked after too many failed authentications, before its
   credential is looked at (origin/admin_limits.py),
1. authenticates the bearer (the guard: operator token, org member token or API key); a 401
   counts against the address; then counts the request against its credential's rate limit
   (429 `rate_limited` with `Retry-After` past it),
2. validates path parameters, query parameters and the body against the route's schemas
   (`invalid`, 400, before anything is looked up or changed),
3. resolves the target (the org or instance the path, or the route's `scope` parameter,
   names) and authorizes the route's permission on it: unknown or another tenant's: 404;
   within reach without the permission: 403 (such a refused change is audited as denied,
   like 401s and 429s: in aggregate, see `Recorder.refused`),
4. calls the handler, and for a route that changes something records the action in the audit
   log (the recorder) once the change is made, before answering.

List routes take `limit` (1-`MAX_PAGE`, default `DEFAULT_PAGE`) and `after` (the `next` of the
previous page) and answer `{"items": [...], "next": cursor | null}`; `paginate` is the one
implementation. Cursors are the last item's id: items are listed in id order, so a walk sees
every item that existed throughout the walk exactly once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import trio
from quart import Blueprint, request

from node.auth_failures import rate_limited
from node.errors import FORBIDDEN, RATE_LIMITED, TOO_LARGE, UNAUTHORIZED, GB6Error
from node.http import json_body
from origin.admin_limits import AdminLimiter
from origin.admin_schema import Schema, array, integer, obj, string, validate

T = TypeVar("T")
DEFAULT_PAGE = 50
MAX_PAGE = 200


@attrs.frozen
class Target:
    """What a request's path names, resolved: the org (always, when the path names anything)
    and the instance when the path is under one."""

    org: str | None = None
    instance: str | None = None


class Guard(Protocol):
    """Authentication and authorization, decided elsewhere (origin/rbac.py); called only here."""

    async def authenticate(self, bearer: str) -> Any:
        """The actor behind a bearer token; raises `unauthorized`."""
        ...

    def resolve(self, params: Mapping[str, str]) -> Target:
        """The org/instance named by `params` (path parameters, and the route's scope
        parameter from the body or query). Nothing is looked up here but the instance's org."""
        ...

    def authorize(self, actor: Any, permission: str, target: Target) -> None:
        """Raise `not_found` if the target is absent or outside the actor's tenancy, else
        `forbidden` unless the actor holds `permission` on it. A target naming nothing means
        "whatever the actor may see": only the permission itself is checked (the handler
        lists what is visible)."""
        ...


class Recorder(Protocol):
    """The audit log, as the admin API sees it."""

    async def record(
        self, actor: Any, action: str, target: Target, subject: str | None, outcome: str
    ) -> None:
        """Record an admin action once done (outcome `ok`), durable on return."""
        ...

    async def refused(self, actor: str, action: str, subject: str | None, code: str) -> None:
        """Record a refused request (outcome `denied`): a change refused by authorization
        (403), a credential over its rate (429), a failed authentication (401, `actor` is the
        client's address). Aggregated: the first of each (actor, action, code) in a window is
        durable on return, later ones are counted into one record. Kept out of the target's
        tenant (it may be someone else's)."""
        ...


@attrs.frozen
class Call:
    """One validated request, as a handler sees it."""

    actor: Any
    target: Target
    params: Mapping[str, str]
    query: Mapping[str, Any]
    body: Mapping[str, Any]


@attrs.frozen
class Reply:
    """A handler's answer: the JSON payload (None for 204) and what the audit record says
    about it (the id it made or changed, by default the path's last id)."""

    payload: Any
    subject: str | None = None
    target: Target | None = None  # for the audit record, when the call made the target


Handler = Callable[[Call], Awaitable[Reply]]


@attrs.frozen
class Param:
    name: str
    schema: Schema
    description: str = ""
    required: bool = False


@attrs.frozen
class Route:
    method: str  # GET, POST, PATCH, DELETE
    path: str  # OpenAPI style: /v1/orgs/{org}
    op_id: str  # unique; also the audit action of a route that changes something
    summary: str
    tag: str
    permission: str | None  # None: any authenticated actor (plans)
    handler: Handler
    status: int = 200
    response: Schema | None = None  # None: no body (204)
    body: Schema | None = None
    query: tuple[Param, ...] = ()
    # Path parameter → its schema; every {name} of `path` must be here.
    path_params: Mapping[str, Schema] = attrs.field(factory=dict)
    # Where the target org/instance is named when the path does not: ("body", "parent"),
    # ("query", "org"), ... (the value goes to the guard under that name).
    scope: tuple[str, str] | None = None

    @property
    def changes(self) -> bool:
        return self.method != "GET"

    def path_names(self) -> list[str]:
        return [part[1:-1] for part in self.path.split("/") if part.startswith("{")]

    def quart_path(self) -> str:
        return "/".join(f"<{p[1:-1]}>" if p.startswith("{") else p for p in self.path.split("/"))


# --- pagination --------------------------------------------------------------------------


def page_query(*filters: Param) -> tuple[Param, ...]:
    """The query parameters of a list route: its filters, then `limit` and `after`."""
    return (
        *filters,
        Param("limit", integer(1, MAX_PAGE), f"items per page (default {DEFAULT_PAGE})"),
        Param("after", string(1, 200), "the `next` of the previous page"),
    )


def page_schema(item: Schema) -> Schema:
    return obj(
        {"items": array(item), "next": string(1, 200, nullable=True)},
        ["items", "next"],
    )


def paginate(
    items: Iterable[T], key: Callable[[T], str], query: Mapping[str, Any]
) -> tuple[list[T], str | None]:
    """One page of `items` in `key` order after the cursor `query["after"]`, and the next
    cursor (None on the last page)."""
    limit: int = query.get("limit") or DEFAULT_PAGE
    after: str | None = query.get("after")
    ordered = sorted(items, key=key)
    if after is not None:
        ordered = [i for i in ordered if key(i) > after]
    page = ordered[: limit + 1]
    if len(page) > limit:
        return page[:limit], key(page[limit - 1])
    return page, None


def page_reply(items: Sequence[Any], next_cursor: str | None) -> Reply:
    return Reply({"items": list(items), "next": next_cursor})


# --- serving -------------------------------------------------------------------------------


def bearer() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise GB6Error(UNAUTHORIZED, "missing bearer token")
    return token.strip()


def _query(route: Route) -> dict[str, Any]:
    """The route's declared query parameters, converted and validated; others are refused."""
    declared = {p.name: p for p in route.query}
    out: dict[str, Any] = {}
    for name in request.args:
        if name not in declared:
            allowed = ", ".join(declared) or "none"
            raise GB6Error("invalid", f"query parameter '{name}' is not allowed ({allowed})")
    for p in route.query:
        values = request.args.getlist(p.name)
        if not values:
            if p.required:
                raise GB6Error("invalid", f"query parameter '{p.name}' is required")
            continue
        if len(values) > 1:
            raise GB6Error("invalid", f"query parameter '{p.name}' is given more than once")
        value: Any = values[0]
        if p.schema.get("type") in ("integer", ["integer", "null"]):
            try:
                value = int(value, 10)
            except ValueError:
                raise GB6Error(
                    "invalid", f"query parameter '{p.name}' must be an integer"
                ) from None
        elif p.schema.get("type") == "boolean":
            if value not in ("true", "false"):
                raise GB6Error("invalid", f"query parameter '{p.name}' must be true or false")
            value = value == "true"
        out[p.name] = validate(p.schema, value, f"query parameter '{p.name}'")
    return out


async def _authenticate(guard: Guard, recorder: Recorder, limiter: AdminLimiter) -> Any:
    """The actor behind the request's bearer, within the address's and the credential's
    rate limits (origin/admin_limits.py); refusals go to the recorder."""
    address = request.remote_addr or "unknown"
    who = f"address:{address}"
    wait = limiter.failures.blocked(address)
    if wait > 0:
        await recorder.refused(who, "authenticate", None, RATE_LIMITED)
        raise rate_limited(wait, "failed authentications from this address")
    try:
        actor = await guard.authenticate(bearer())
    except GB6Error as exc:
        if exc.code != UNAUTHORIZED:
            raise
        await recorder.refused(who, "authenticate", None, exc.code)
        wait = await limiter.failures.failed(address)
        if wait > 0:
            raise rate_limited(wait, "failed authentications from this address") from None
        raise
    wait = await limiter.admit(f"{actor.kind}:{actor.id}")
    if wait > 0:
        await recorder.refused(actor.id, "rate_limited", None, RATE_LIMITED)
        raise rate_limited(wait, "admin requests with this credential")
    return actor


async def _serve(
    route: Route,
    guard: Guard,
    recorder: Recorder,
    limiter: AdminLimiter,
    max_body: int,
    params: dict[str, str],
) -> Any:
    actor = await _authenticate(guard, recorder, limiter)
    for name, schema in route.path_params.items():
        validate(schema, params[name], f"path parameter '{name}'")
    query = _query(route)
    body: dict[str, Any] = {}
    if route.body is not None:
        if len(await request.get_data(cache=True)) > max_body:
            raise GB6Error(TOO_LARGE, f"admin request bodies are limited to {max_body} bytes")
        body = validate(route.body, await json_body())
    named = dict(params)
    if route.scope is not None:
        source, name = route.scope
        value = (body if source == "body" else query).get(name)
        if value is not None:
            named[name] = value
    subject = params[route.path_names()[-1]] if params else None
    if route.permission is not None:
        try:
            target = guard.resolve(named)
            guard.authorize(actor, route.permission, target)
        except GB6Error as exc:
            # A 403 is a credential reaching for more than it holds: on record. A 404 (an
            # unknown id, or another tenant's) is not: anyone could fill the log with them.
            if route.changes and exc.code == FORBIDDEN:
                await recorder.refused(actor.id, route.op_id, subject, exc.code)
            raise
    else:
        target = Target()
    reply = await route.handler(Call(actor, target, params, query, body))
    if route.changes:
        made = reply.target or target
        # The change is made: a client that goes away now must not leave it unaudited.
        with trio.CancelScope(shield=True):
            await recorder.record(actor, route.op_id, made, reply.subject or subject, "ok")
    if reply.payload is None:
        # A str body: Quart's bodiless Response is read through a worker thread whose
        # StopAsyncIteration escaped into trio-asyncio and took the process down.
        return "", route.status
    return reply.payload, route.status


def bind(
    routes: Sequence[Route],
    guard: Guard,
    recorder: Recorder,
    name: str,
    max_body: int,
    limiter: AdminLimiter,
) -> Blueprint:
    """A blueprint serving `routes` (checked for duplicate ids and undeclared parameters);
    request bodies above `max_body` bytes are `too_large` (413); `limiter` rates requests
    (its Redis client, if any, is closed when the app stops serving)."""
    check_table(routes)
    bp = Blueprint(name, __name__)
    bp.after_app_serving(limiter.aclose)
    for route in routes:
        bp.add_url_rule(
            route.quart_path(),
            endpoint=route.op_id,
            view_func=_view(route, guard, recorder, limiter, max_body),
            methods=[route.method],
        )
    return bp


def _view(
    route: Route, guard: Guard, recorder: Recorder, limiter: AdminLimiter, max_body: int
) -> Callable[..., Awaitable[Any]]:
    async def view(**params: str) -> Any:
        return await _serve(route, guard, recorder, limiter, max_body, params)

    view.__name__ = route.op_id
    return view


def check_table(routes: Sequence[Route]) -> None:
    seen: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    for r in routes:
        if r.op_id in seen or (r.method, r.path) in pairs:
            raise ValueError(f"route {r.op_id} ({r.method} {r.path}) is declared twice")
        seen.add(r.op_id)
        pairs.add((r.method, r.path))
        if sorted(r.path_names()) != sorted(r.path_params):
            raise ValueError(f"route {r.op_id}: path parameters and their schemas differ")
        if r.method == "GET" and r.body is not None:
            raise ValueError(f"route {r.op_id}: a GET has no body")
