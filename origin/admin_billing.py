"""Admin routes of plans, quotas and usage, invoices and the audit log.

- Plans (`config.plans`, origin/plans.py) are readable by any authenticated caller.
- Quotas: an instance's usage against its limits (`shard.quota_usage`) and the operator's (or
  an org owner's) per-instance overrides (`shard.set_quota_override`).
- Usage and invoices come from `shard.billing` (origin/invoicing.py): usage per UTC day or
  month, the running month's preview, closing a past month (numbered, immutable), the list of
  issued invoices (oldest first, the cursor is the last month shown) and one of them.
- The audit log (`shard.audit`, origin/audit_log.py): newest first, filtered, scoped to what
  the caller sees (the operator: everything; an org member or org-wide key: its org's subtree
  and their instances; an instance-scoped key: its instance).
"""

from __future__ import annotations

import datetime
from typing import Any, Final

from node.errors import invalid, not_found
from origin import rbac
from origin.admin_routes import (
    DEFAULT_PAGE,
    MAX_PAGE,
    Call,
    Param,
    Reply,
    Route,
    page_query,
    page_reply,
    page_schema,
    paginate,
)
from origin.admin_schema import (
    Schema,
    any_object,
    array,
    id_string,
    integer,
    obj,
    string,
    timestamp,
)
from origin.admin_tenancy import visible_instances, visible_orgs
from origin.audit_log import cursor_before
from origin.audit_store import AuditQuery
from origin.billing import month_of
from origin.plans import RESOURCES
from origin.shard import OriginShard
from origin.sqlite_store import now_ms

MONTH: Final = r"^[0-9]{4}-[0-9]{2}$"
PERIOD: Final = r"^[0-9]{4}-[0-9]{2}(-[0-9]{2})?$"
INST_PATH: Final = {"inst": id_string()}
QUOTA_LIMIT: Final = integer(0, 1 << 62, nullable=True)

PLAN: Final = obj(
    {
        "name": string(1, 64),
        "quotas": obj({r: QUOTA_LIMIT for r in RESOURCES}, list(RESOURCES)),
        "rate": {"type": ["object", "null"]},
    },
    ["name", "quotas", "rate"],
    additional=True,
)
QUOTAS: Final = obj(
    {
        "instance": id_string(),
        "plan": string(1, 64),
        "usage": array(
            obj(
                {
                    "resource": string(enum=RESOURCES),
                    "used": integer(),
                    "limit": integer(nullable=True),
                    "period": string(1, 20, nullable=True),
                },
                ["resource", "used", "limit", "period"],
                additional=True,
            )
        ),
        "overrides": obj({}, additional=QUOTA_LIMIT),
    },
    ["instance", "plan", "usage", "overrides"],
    additional=True,
)
USAGE: Final = obj(
    {
        "instance": id_string(),
        "period": string(7, 10, pattern=PERIOD),
        "usage": obj({}, additional=integer()),
    },
    ["instance", "period", "usage"],
)
INVOICE_FIELDS: Final[dict[str, Schema]] = {
    "instance": id_string(),
    "period": string(7, 7, pattern=MONTH),
    "currency": string(3, 3),
    "lines": array(any_object()),
    "total": integer(),
}
PREVIEW: Final = obj(INVOICE_FIELDS, list(INVOICE_FIELDS), additional=True)
INVOICE: Final = obj(
    {**INVOICE_FIELDS, "number": integer(1), "closed_at": timestamp()},
    [*INVOICE_FIELDS, "number", "closed_at"],
    additional=True,
)
AUDIT_RECORD: Final = obj(
    {
        "seq": integer(1),
        "ts": integer(0),
        "actor": string(1, 200),
        "action": string(1, 200),
        "org": string(1, 200, nullable=True),
        "instance": string(1, 200, nullable=True),
        "target": string(1, 200, nullable=True),
        "outcome": string(1, 20),
        "details": any_object(),
        "hash": string(64, 64),
    },
    ["seq", "ts", "actor", "action", "org", "instance", "target", "outcome", "details"],
    additional=True,
)


def _ms(value: str, name: str) -> int:
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise invalid(f"query parameter '{name}' must be an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    ms = int(when.timestamp() * 1000)
    if not 0 <= ms < 1 << 62:
        raise invalid(f"query parameter '{name}' is out of range")
    return ms


def billing_routes(shard: OriginShard) -> list[Route]:
    # plans

    def _plans() -> dict[str, dict[str, Any]]:
        return {name: plan.to_json() for name, plan in shard.config.plans.items()}

    async def list_plans(call: Call) -> Reply:
        page, nxt = paginate(list(_plans().values()), lambda p: str(p["name"]), call.query)
        return page_reply(page, nxt)

    async def get_plan(call: Call) -> Reply:
        plan = _plans().get(call.params["plan"])
        if plan is None:
            raise not_found(f"plan {call.params['plan']} not found")
        return Reply(plan)

    # quotas and usage

    async def get_quotas(call: Call) -> Reply:
        return Reply(shard.quota_usage(call.params["inst"]))

    async def set_quota(call: Call) -> Reply:
        p = call.params
        await shard.tenancy.set_quota_override(
            call.actor, p["inst"], p["resource"], call.body["limit"]
        )
        return Reply(shard.quota_usage(p["inst"]))

    async def clear_quota(call: Call) -> Reply:
        p = call.params
        await shard.tenancy.clear_quota_override(call.actor, p["inst"], p["resource"])
        return Reply(shard.quota_usage(p["inst"]))

    async def get_usage(call: Call) -> Reply:
        inst = call.params["inst"]
        period = call.query.get("period") or month_of(now_ms())
        usage = await shard.billing.usage(inst, period)
        return Reply({"instance": inst, "period": period, "usage": usage})

    # invoices

    async def preview(call: Call) -> Reply:
        return Reply((await shard.billing.preview(call.params["inst"])).to_json())

    async def close(call: Call) -> Reply:
        inv = await shard.billing.close(call.params["inst"], call.body["period"])
        return Reply(inv.to_json(), inv.period)

    async def list_invoices(call: Call) -> Reply:
        limit: int = call.query.get("limit") or DEFAULT_PAGE
        found = await shard.billing.invoices(
            call.params["inst"], after=call.query.get("after"), limit=limit + 1
        )
        nxt = found[limit - 1].period if len(found) > limit else None
        return page_reply([i.to_json() for i in found[:limit]], nxt)

    async def get_invoice(call: Call) -> Reply:
        p = call.params
        return Reply((await shard.billing.invoice(p["inst"], p["period"])).to_json())

    # audit

    async def list_audit(call: Call) -> Reply:
        q, actor = call.query, call.actor
        orgs = visible_orgs(shard, actor)
        insts = visible_instances(shard, actor)
        query = AuditQuery(
            limit=q.get("limit") or DEFAULT_PAGE,
            actor=q.get("actor"),
            action=q.get("action"),
            org=q.get("org"),
            instance=q.get("instance"),
            since=_ms(q["since"], "since") if "since" in q else None,
            until=_ms(q["until"], "until") if "until" in q else None,
            before=cursor_before(q["after"]) if "after" in q else None,
            orgs=None if orgs is None else frozenset(orgs),
            instances=None if insts is None else frozenset(insts),
        )
        if query.orgs is not None and not query.orgs and not query.instances:
            return page_reply([], None)
        records, nxt = await shard.audit.page(query)
        return page_reply([r.to_json() for r in records], nxt)

    return [
        Route(
            "GET",
            "/v1/plans",
            "list_plans",
            "Plans: quotas per resource and the rate limit",
            "plans",
            None,
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
            None,
            get_plan,
            response=PLAN,
            path_params={"plan": string(1, 64)},
        ),
        Route(
            "GET",
            "/v1/instances/{inst}/quotas",
            "get_quotas",
            "The instance's usage of each resource against its limit, and its overrides",
            "quotas",
            rbac.QUOTA_READ,
            get_quotas,
            response=QUOTAS,
            path_params=INST_PATH,
        ),
        Route(
            "PUT",
            "/v1/instances/{inst}/quotas/{resource}",
            "set_quota_override",
            "Give the instance its own limit for a resource (null: unlimited)",
            "quotas",
            rbac.QUOTA_WRITE,
            set_quota,
            body=obj({"limit": QUOTA_LIMIT}, ["limit"]),
            response=QUOTAS,
            path_params={**INST_PATH, "resource": string(enum=RESOURCES)},
        ),
        Route(
            "DELETE",
            "/v1/instances/{inst}/quotas/{resource}",
            "clear_quota_override",
            "Back to the plan's limit for a resource",
            "quotas",
            rbac.QUOTA_WRITE,
            clear_quota,
            response=QUOTAS,
            path_params={**INST_PATH, "resource": string(enum=RESOURCES)},
        ),
        Route(
            "GET",
            "/v1/instances/{inst}/usage",
            "get_usage",
            "Metered usage of a UTC month (YYYY-MM, default: this one) or day (YYYY-MM-DD)",
            "usage",
            rbac.USAGE_READ,
            get_usage,
            response=USAGE,
            query=(Param("period", string(7, 10, pattern=PERIOD)),),
            path_params=INST_PATH,
        ),
        Route(
            "GET",
            "/v1/instances/{inst}/invoices",
            "list_invoices",
            "Issued invoices, oldest month first",
            "invoices",
            rbac.BILLING_READ,
            list_invoices,
            response=page_schema(INVOICE),
            query=(
                Param("limit", integer(1, MAX_PAGE), f"items per page (default {DEFAULT_PAGE})"),
                Param("after", string(7, 7, pattern=MONTH), "the `next` of the previous page"),
            ),
            path_params=INST_PATH,
        ),
        Route(
            "GET",
            "/v1/instances/{inst}/invoices/preview",
            "preview_invoice",
            "The running month's invoice as it would be if the month ended now",
            "invoices",
            rbac.BILLING_READ,
            preview,
            response=PREVIEW,
            path_params=INST_PATH,
        ),
        Route(
            "POST",
            "/v1/instances/{inst}/invoices",
            "close_invoice",
            "Close a past month: issue its invoice (again: the same invoice)",
            "invoices",
            rbac.BILLING_CLOSE,
            close,
            status=201,
            body=obj({"period": string(7, 7, pattern=MONTH)}, ["period"]),
            response=INVOICE,
            path_params=INST_PATH,
        ),
        Route(
            "GET",
            "/v1/instances/{inst}/invoices/{period}",
            "get_invoice",
            "The issued invoice of a month",
            "invoices",
            rbac.BILLING_READ,
            get_invoice,
            response=INVOICE,
            path_params={**INST_PATH, "period": string(7, 7, pattern=MONTH)},
        ),
        Route(
            "GET",
            "/v1/audit",
            "list_audit",
            "Audit records the caller may see, newest first",
            "audit",
            rbac.AUDIT_READ,
            list_audit,
            response=page_schema(AUDIT_RECORD),
            query=(
                Param("actor", string(1, 200)),
                Param("action", string(1, 200)),
                Param("org", id_string()),
                Param("instance", id_string()),
                Param("since", string(1, 40), "ISO 8601; records at or after"),
                Param("until", string(1, 40), "ISO 8601; records before"),
                Param("limit", integer(1, MAX_PAGE), f"items per page (default {DEFAULT_PAGE})"),
                Param("after", string(1, 18, pattern=r"^[0-9]+$"), "the `next` of the last page"),
            ),
            scope=("query", "instance"),
        ),
    ]
