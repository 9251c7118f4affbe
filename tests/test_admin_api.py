"""The admin HTTP API against a real `gb6 run`: create/read/update/delete, pagination, filters,
and errors in the protocol's shape (PROTOCOL.md: `{"error": {"code", "message"}}`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from node.config import Config, Limits
from node.errors import GB6Error
from origin import rbac
from origin.admin_limits import admin_limiter
from tests.conftest import Node, module_node, running_node

node = module_node("admin_api")


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json() if r.content else None


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return str(body["error"]["message"])


def walk(
    node: Node, path: str, limit: int, after: str | None = None, **filters: str
) -> list[dict[str, Any]]:
    """Every item of a list route (after the cursor `after`), page by page; checks each page's
    size and cursor."""
    items: list[dict[str, Any]] = []
    for _ in range(1000):
        params = {**filters, "limit": str(limit)}
        if after is not None:
            params["after"] = after
        r = httpx.get(
            node.http_url + path,
            params=params,
            headers={"Authorization": f"Bearer {node.admin_token}"},
            timeout=10,
        )
        page = ok(r)
        assert set(page) == {"items", "next"}, page
        assert len(page["items"]) <= limit
        items += page["items"]
        if page["next"] is None:
            return items
        assert len(page["items"]) == limit, page  # only the last page may be short
        after = page["next"]
    raise AssertionError("pagination did not end")


def new_org(node: Node, name: str = "o", parent: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name}
    if parent is not None:
        body["parent"] = parent
    return dict(ok(node.admin("POST", "/v1/orgs", body), 201))


def test_bootstrap_calls_answer_as_the_protocol_says(node: Node) -> None:
    org = new_org(node, "acme")
    assert isinstance(org["id"], str) and org["name"] == "acme" and org["parent"] is None
    child = new_org(node, "acme-eu", org["id"])
    assert child["parent"] == org["id"]
    inst = ok(node.admin("POST", f"/v1/orgs/{org['id']}/instances", {"name": "prod"}), 201)
    assert inst["org"] == org["id"] and inst["plan"] == "free" and inst["status"] == "active"
    assert inst["region"] == "local"
    user = ok(
        node.admin("POST", f"/v1/instances/{inst['id']}/users", {"name": "ann", "role": "admin"}),
        201,
    )
    assert user["instance"] == inst["id"] and user["role"] == "admin"
    tok = ok(node.admin("POST", f"/v1/instances/{inst['id']}/users/{user['id']}/tokens", {}), 201)
    assert isinstance(tok["token"], str) and tok["expires_at"].endswith("Z")

    # What was created reads back the same.
    assert ok(node.admin("GET", f"/v1/orgs/{org['id']}")) == org
    assert ok(node.admin("GET", f"/v1/instances/{inst['id']}")) == inst
    assert ok(node.admin("GET", f"/v1/instances/{inst['id']}/users/{user['id']}")) == user
    children = ok(node.admin("GET", f"/v1/orgs/{org['id']}/children"))
    assert children == {"items": [child], "next": None}

    # Revoking the token: 204, then the token is gone (a second revoke is still fine).
    path = f"/v1/instances/{inst['id']}/users/{user['id']}/tokens/{tok['id']}"
    r = node.admin("DELETE", path)
    assert r.status_code == 204 and r.content == b""


def test_pagination_walks_every_item_once(node: Node) -> None:
    parent = new_org(node, "parent")
    made = {new_org(node, f"child-{i}", parent["id"])["id"] for i in range(7)}
    for limit in (1, 2, 3, 7, 8, 200):
        seen = [o["id"] for o in walk(node, "/v1/orgs", limit, parent=parent["id"])]
        assert len(seen) == len(set(seen)) == 7 and set(seen) == made, limit
        seen = [o["id"] for o in walk(node, f"/v1/orgs/{parent['id']}/children", limit)]
        assert set(seen) == made and len(seen) == 7

    org = new_org(node)
    inst = ok(node.admin("POST", f"/v1/orgs/{org['id']}/instances", {"name": "i"}), 201)
    users = {
        ok(node.admin("POST", f"/v1/instances/{inst['id']}/users", {"name": f"u{i}"}), 201)["id"]
        for i in range(5)
    }
    seen = [u["id"] for u in walk(node, f"/v1/instances/{inst['id']}/users", 2)]
    assert sorted(seen) == sorted(users)

    # Items created during a walk after its cursor are seen; none before it is seen twice.
    first = ok(node.admin("GET", f"/v1/orgs?parent={parent['id']}&limit=3"))
    late = new_org(node, "late", parent["id"])
    rest = walk(node, "/v1/orgs", 3, first["next"], parent=parent["id"])
    ids = [o["id"] for o in first["items"] + rest]
    assert len(ids) == len(set(ids)) and set(ids) >= made
    # The new one comes in this walk if its id sorts after the cursor, else in the next.
    assert (late["id"] in ids) == (late["id"] > first["next"])


def test_filters(node: Node) -> None:
    org = new_org(node, "filters")
    oid = org["id"]
    free = ok(node.admin("POST", f"/v1/orgs/{oid}/instances", {"name": "a"}), 201)
    unl = ok(
        node.admin("POST", f"/v1/orgs/{oid}/instances", {"name": "b", "plan": "unlimited"}), 201
    )
    assert walk(node, f"/v1/orgs/{oid}/instances", 10) in ([free, unl], [unl, free])
    assert walk(node, f"/v1/orgs/{oid}/instances", 10, plan="unlimited") == [unl]
    assert walk(node, f"/v1/orgs/{oid}/instances", 10, name="a") == [free]
    assert walk(node, "/v1/instances", 10, org=oid, plan="free") == [free]
    assert walk(node, f"/v1/orgs/{oid}/instances", 10, status="suspended") == []

    base = f"/v1/instances/{free['id']}/users"
    owner = ok(node.admin("POST", base, {"name": "boss", "role": "owner"}), 201)
    guest = ok(node.admin("POST", base, {"name": "visitor", "role": "guest"}), 201)
    assert walk(node, base, 10, role="owner") == [owner]
    assert walk(node, base, 10, name="visitor") == [guest]
    assert walk(node, base, 10, role="member") == []
    assert walk(node, "/v1/orgs", 50, name="filters") == [org]

    plans = {p["name"]: p for p in walk(node, "/v1/plans", 1)}
    assert {"free", "unlimited"} <= set(plans)
    assert ok(node.admin("GET", "/v1/plans/free"))["name"] == "free"


def test_errors_have_the_protocol_shape_and_change_nothing(node: Node) -> None:
    org = new_org(node, "errors")
    oid = org["id"]
    before = walk(node, "/v1/orgs", 200)

    # Credentials: 401 for none, a wrong one, or a user's token.
    r = httpx.get(node.http_url + "/v1/orgs", timeout=10)
    error(r, 401, "unauthorized")
    error(node.admin("GET", "/v1/orgs", token="nope"), 401, "unauthorized")
    error(node.admin("POST", "/v1/orgs", {"name": "x"}, token="nope"), 401, "unauthorized")

    # Bodies: every refusal names the field.
    assert "name" in error(node.admin("POST", "/v1/orgs", {}), 400, "invalid")
    assert "name" in error(node.admin("POST", "/v1/orgs", {"name": ""}), 400, "invalid")
    assert "color" in error(
        node.admin("POST", "/v1/orgs", {"name": "x", "color": "red"}), 400, "invalid"
    )
    assert "parent" in error(
        node.admin("POST", "/v1/orgs", {"name": "x", "parent": 5}), 400, "invalid"
    )
    r = httpx.post(
        node.http_url + "/v1/orgs",
        content=b"{nope",
        headers={"Authorization": f"Bearer {node.admin_token}"},
        timeout=10,
    )
    error(r, 400, "invalid")
    path = f"/v1/orgs/{oid}/instances"
    assert "plan" in error(node.admin("POST", path, {"name": "i", "plan": "gold"}), 400, "invalid")
    assert "region" in error(
        node.admin("POST", path, {"name": "i", "region": "mars"}), 400, "invalid"
    )

    big = {"name": "x", "pad": "y" * (64 << 10)}
    error(node.admin("POST", "/v1/orgs", big), 413, "too_large")

    # Query parameters: declared ones only, in range.
    assert "limit" in error(node.admin("GET", "/v1/orgs?limit=0"), 400, "invalid")
    assert "limit" in error(node.admin("GET", "/v1/orgs?limit=201"), 400, "invalid")
    assert "limit" in error(node.admin("GET", "/v1/orgs?limit=ten"), 400, "invalid")
    assert "sort" in error(node.admin("GET", "/v1/orgs?sort=name"), 400, "invalid")
    error(node.admin("GET", "/v1/instances?status=sleeping"), 400, "invalid")

    # Ids: malformed 400, unknown 404.
    error(node.admin("GET", "/v1/orgs/NOT-AN-ID"), 400, "invalid")
    error(node.admin("GET", "/v1/orgs/org_doesnotexist"), 404, "not_found")
    error(node.admin("GET", "/v1/instances/ins_doesnotexist"), 404, "not_found")
    error(node.admin("GET", "/v1/instances/ins_doesnotexist/users"), 404, "not_found")
    error(node.admin("GET", "/v1/plans/gold"), 404, "not_found")
    error(node.admin("POST", "/v1/orgs", {"name": "x", "parent": "org_nope"}), 404, "not_found")

    # Methods and paths the API does not have.
    r = node.admin("PUT", "/v1/orgs")
    error(r, 405, "invalid")
    assert set(r.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    error(node.admin("GET", "/v1/nothing"), 404, "not_found")

    assert walk(node, "/v1/orgs", 200) == before  # nothing was created by any of these


def test_me_tells_a_credential_who_it_is_and_what_it_may_do(node: Node) -> None:
    me = ok(node.admin("GET", "/v1/me"))
    assert me["kind"] == "operator" and me["org"] is None and me["instance"] is None
    assert me["permissions"] == sorted(rbac.ALL_PERMISSIONS)

    org = new_org(node, "me-org")
    inst = ok(node.admin("POST", f"/v1/orgs/{org['id']}/instances", {"name": "i"}), 201)
    base = f"/v1/orgs/{org['id']}/members"
    for role, as_role in (("owner", "org_owner"), ("admin", "org_admin"), ("member", "org_member")):
        member = ok(node.admin("POST", base, {"name": role, "role": role}), 201)
        tok = ok(node.admin("POST", f"{base}/{member['id']}/tokens", {}), 201)["token"]
        me = ok(node.admin("GET", "/v1/me", token=tok))
        assert (me["kind"], me["id"], me["role"]) == ("org_member", member["id"], as_role)
        assert (me["org"], me["instance"]) == (org["id"], None)
        assert me["permissions"] == sorted(rbac.ROLE_PERMISSIONS[as_role])
    assert "billing.close" not in ok(node.admin("GET", "/v1/me", token=tok))["permissions"]

    key = ok(
        node.admin(
            "POST",
            f"/v1/orgs/{org['id']}/api_keys",
            {"name": "k", "permissions": ["user.write", "user.read"], "instance": inst["id"]},
        ),
        201,
    )
    me = ok(node.admin("GET", "/v1/me", token=key["secret"]))
    assert (me["kind"], me["id"], me["instance"]) == ("api_key", key["id"], inst["id"])
    assert me["permissions"] == ["user.read", "user.write"]

    # Nobody, a revoked key and an instance user's token are not admin credentials.
    assert httpx.get(node.http_url + "/v1/me", timeout=10).status_code == 401
    ok(node.admin("DELETE", f"/v1/orgs/{org['id']}/api_keys/{key['id']}"), 204)
    error(node.admin("GET", "/v1/me", token=key["secret"]), 401, "unauthorized")
    user = ok(node.admin("POST", f"/v1/instances/{inst['id']}/users", {"name": "u"}), 201)
    path = f"/v1/instances/{inst['id']}/users/{user['id']}/tokens"
    utok = ok(node.admin("POST", path, {}), 201)["token"]
    error(node.admin("GET", "/v1/me", token=utok), 401, "unauthorized")


def test_openapi_document_describes_every_route(node: Node) -> None:
    doc = httpx.get(node.http_url + "/openapi.json", timeout=10).json()  # no credentials needed
    assert doc["openapi"].startswith("3.1")
    ops = [(m.upper(), p, op) for p, item in doc["paths"].items() for m, op in item.items()]
    ids = [op["operationId"] for _, _, op in ops]
    assert len(ids) == len(set(ids))
    for method, path, op in ops:
        assert "401" in op["responses"] and "400" in op["responses"], (method, path)
        names = {p["name"] for p in op["parameters"] if p["in"] == "path"}
        assert names == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
        if method == "GET" and "limit" in {p["name"] for p in op["parameters"]}:
            answer = op["responses"]["200"]["content"]["application/json"]["schema"]
            assert answer["required"] == ["items", "next"], path
    # The bootstrap calls of PROTOCOL.md are there, as they are.
    have = {(m, p) for m, p, _ in ops}
    assert {
        ("POST", "/v1/orgs"),
        ("POST", "/v1/orgs/{org}/instances"),
        ("POST", "/v1/instances/{inst}/users"),
        ("POST", "/v1/instances/{inst}/users/{user}/tokens"),
    } <= have


def test_org_update_delete_and_conflicts(node: Node) -> None:
    org = new_org(node, "before")
    renamed = ok(node.admin("PATCH", f"/v1/orgs/{org['id']}", {"name": "after"}))
    assert renamed["name"] == "after" and renamed["id"] == org["id"]
    assert ok(node.admin("GET", f"/v1/orgs/{org['id']}"))["name"] == "after"
    child = new_org(node, "kid", org["id"])
    # Not while it has children or live instances.
    error(node.admin("DELETE", f"/v1/orgs/{org['id']}"), 409, "conflict")
    ok(node.admin("DELETE", f"/v1/orgs/{child['id']}"), 204)
    inst = ok(node.admin("POST", f"/v1/orgs/{org['id']}/instances", {"name": "i"}), 201)
    error(node.admin("DELETE", f"/v1/orgs/{org['id']}"), 409, "conflict")
    ok(node.admin("DELETE", f"/v1/instances/{inst['id']}"))
    ok(node.admin("DELETE", f"/v1/orgs/{org['id']}"), 204)
    error(node.admin("GET", f"/v1/orgs/{org['id']}"), 404, "not_found")


def test_instance_lifecycle(node: Node) -> None:
    org = new_org(node)
    inst = ok(node.admin("POST", f"/v1/orgs/{org['id']}/instances", {"name": "i"}), 201)
    base = f"/v1/instances/{inst['id']}"
    changed = ok(node.admin("PATCH", base, {"name": "renamed", "plan": "unlimited"}))
    assert changed["name"] == "renamed" and changed["plan"] == "unlimited"
    assert ok(node.admin("POST", f"{base}/suspend"))["status"] == "suspended"
    error(node.admin("POST", f"{base}/suspend"), 409, "conflict")
    assert (
        walk(node, f"/v1/orgs/{org['id']}/instances", 5, status="suspended")[0]["id"] == inst["id"]
    )
    assert ok(node.admin("POST", f"{base}/resume"))["status"] == "active"
    assert ok(node.admin("DELETE", base))["status"] == "deleted"
    error(node.admin("POST", f"{base}/resume"), 409, "conflict")
    error(node.admin("PATCH", base, {"name": "zombie"}), 409, "conflict")
    error(node.admin("PATCH", base, {"plan": "gold"}), 409, "conflict")


def test_users_update_delete_and_tokens(node: Node) -> None:
    org = new_org(node)
    inst = ok(node.admin("POST", f"/v1/orgs/{org['id']}/instances", {"name": "i"}), 201)
    base = f"/v1/instances/{inst['id']}/users"
    user = ok(node.admin("POST", base, {"name": "ann"}), 201)
    assert user["role"] == "member"
    upd = ok(node.admin("PATCH", f"{base}/{user['id']}", {"name": "anne", "role": "admin"}))
    assert (upd["name"], upd["role"]) == ("anne", "admin")
    error(node.admin("PATCH", f"{base}/{user['id']}", {"role": "king"}), 400, "invalid")
    tok = ok(node.admin("POST", f"{base}/{user['id']}/tokens", {"ttl_seconds": 60}), 201)
    r = node.admin("DELETE", f"{base}/{user['id']}/tokens/{tok['id']}")
    assert r.status_code == 204
    error(node.admin("DELETE", f"{base}/{user['id']}/tokens/tok_nope"), 404, "not_found")
    ok(node.admin("DELETE", f"{base}/{user['id']}"), 204)
    error(node.admin("GET", f"{base}/{user['id']}"), 404, "not_found")
    assert walk(node, base, 10) == []


def test_org_members_tokens_and_their_reach(node: Node) -> None:
    org = new_org(node, "members-org")
    other = new_org(node, "elsewhere")
    base = f"/v1/orgs/{org['id']}/members"
    owner = ok(node.admin("POST", base, {"name": "olga", "role": "owner"}), 201)
    reader = ok(node.admin("POST", base, {"name": "rita"}), 201)
    assert reader["role"] == "member"
    assert {m["id"] for m in walk(node, base, 1)} == {owner["id"], reader["id"]}
    assert walk(node, base, 10, role="owner") == [owner]
    upd = ok(node.admin("PATCH", f"{base}/{reader['id']}", {"name": "rita b"}))
    assert upd["name"] == "rita b" and upd["role"] == "member"
    otok = ok(node.admin("POST", f"{base}/{owner['id']}/tokens", {}), 201)["token"]
    rtok = ok(node.admin("POST", f"{base}/{reader['id']}/tokens", {}), 201)["token"]

    # The owner runs the org's subtree, and only it.
    child = ok(node.admin("POST", "/v1/orgs", {"name": "sub", "parent": org["id"]}, otok), 201)
    assert ok(node.admin("GET", "/v1/orgs", token=otok))["items"] == [
        ok(node.admin("GET", f"/v1/orgs/{org['id']}"))
    ]
    error(node.admin("POST", "/v1/orgs", {"name": "root"}, otok), 403, "forbidden")
    error(node.admin("GET", f"/v1/orgs/{other['id']}", token=otok), 404, "not_found")
    inst = ok(node.admin("POST", f"/v1/orgs/{child['id']}/instances", {"name": "i"}, otok), 201)
    assert [i["id"] for i in walk(node, "/v1/instances", 10, org=child["id"])] == [inst["id"]]
    # A member reads, and changes nothing.
    assert ok(node.admin("GET", f"/v1/instances/{inst['id']}", token=rtok))["id"] == inst["id"]
    error(node.admin("POST", f"/v1/instances/{inst['id']}/suspend", token=rtok), 403, "forbidden")
    error(node.admin("POST", base, {"name": "x"}, rtok), 403, "forbidden")
    # Removing a member ends its tokens.
    ok(node.admin("DELETE", f"{base}/{reader['id']}"), 204)
    error(node.admin("GET", f"/v1/orgs/{org['id']}", token=rtok), 401, "unauthorized")
    # A member of another org is not found under this one.
    stranger = ok(node.admin("POST", f"/v1/orgs/{other['id']}/members", {"name": "s"}), 201)
    error(node.admin("GET", f"{base}/{stranger['id']}"), 404, "not_found")


def test_api_keys(node: Node) -> None:
    org = new_org(node, "keys-org")
    inst = ok(node.admin("POST", f"/v1/orgs/{org['id']}/instances", {"name": "i"}), 201)
    base = f"/v1/orgs/{org['id']}/api_keys"
    key = ok(
        node.admin("POST", base, {"name": "ci", "permissions": ["instance.read", "user.read"]}),
        201,
    )
    assert key["secret"].startswith("gb6k_") and key["revoked"] is False
    scoped = ok(
        node.admin(
            "POST", base, {"name": "one", "permissions": ["user.write"], "instance": inst["id"]}
        ),
        201,
    )
    listed = walk(node, base, 1)
    assert {k["id"] for k in listed} == {key["id"], scoped["id"]}
    assert all("secret" not in k for k in listed)
    assert walk(node, base, 10, instance=inst["id"])[0]["id"] == scoped["id"]
    error(node.admin("POST", base, {"name": "x", "permissions": ["root"]}), 400, "invalid")
    error(node.admin("POST", base, {"name": "x", "permissions": []}), 400, "invalid")

    # A key does what it was given, no more.
    secret = key["secret"]
    assert ok(node.admin("GET", f"/v1/instances/{inst['id']}", token=secret))["id"] == inst["id"]
    path = f"/v1/instances/{inst['id']}/users"
    error(node.admin("POST", path, {"name": "u"}, secret), 403, "forbidden")
    assert ok(node.admin("POST", path, {"name": "u"}, scoped["secret"]), 201)["name"] == "u"
    error(node.admin("GET", f"/v1/orgs/{org['id']}", token=scoped["secret"]), 404, "not_found")

    ok(node.admin("DELETE", f"{base}/{key['id']}"), 204)
    assert ok(node.admin("GET", f"{base}/{key['id']}"))["revoked"] is True
    error(node.admin("GET", f"/v1/instances/{inst['id']}", token=secret), 401, "unauthorized")


@pytest.mark.usefixtures("within_one_utc_day")  # the running month, read twice
def test_quotas_usage_and_invoices(node: Node) -> None:
    org = new_org(node)
    inst = ok(node.admin("POST", f"/v1/orgs/{org['id']}/instances", {"name": "i"}), 201)
    base = f"/v1/instances/{inst['id']}"
    quotas = ok(node.admin("GET", f"{base}/quotas"))
    assert quotas["plan"] == "free"
    rooms = {u["resource"]: u for u in quotas["usage"]}["rooms"]
    assert rooms["used"] == 0 and rooms["limit"] == 1000
    set_ = ok(node.admin("PUT", f"{base}/quotas/rooms", {"limit": 3}))
    assert {u["resource"]: u for u in set_["usage"]}["rooms"]["limit"] == 3
    assert set_["overrides"] == {"rooms": 3}
    error(node.admin("PUT", f"{base}/quotas/rooms", {"limit": -1}), 400, "invalid")
    error(node.admin("PUT", f"{base}/quotas/unicorns", {"limit": 1}), 400, "invalid")
    cleared = ok(node.admin("DELETE", f"{base}/quotas/rooms"))
    assert cleared["overrides"] == {}

    usage = ok(node.admin("GET", f"{base}/usage"))
    assert usage["instance"] == inst["id"] and isinstance(usage["usage"], dict)
    assert ok(node.admin("GET", f"{base}/usage?period=2026-01-02"))["period"] == "2026-01-02"
    error(node.admin("GET", f"{base}/usage?period=2026-13"), 400, "invalid")
    preview = ok(node.admin("GET", f"{base}/invoices/preview"))
    assert preview["instance"] == inst["id"] and preview["total"] >= 0
    assert ok(node.admin("GET", f"{base}/invoices")) == {"items": [], "next": None}
    error(node.admin("GET", f"{base}/invoices/2020-01"), 404, "not_found")
    # The running month cannot be closed yet; a month before the instance existed has no bill.
    month = preview["period"]
    error(node.admin("POST", f"{base}/invoices", {"period": month}), 409, "conflict")
    error(node.admin("POST", f"{base}/invoices", {"period": "2020-1"}), 400, "invalid")


def test_audit_records_every_admin_change(node: Node) -> None:
    org = new_org(node, "audited")
    inst = ok(node.admin("POST", f"/v1/orgs/{org['id']}/instances", {"name": "i"}), 201)
    ok(node.admin("POST", f"/v1/instances/{inst['id']}/suspend"))
    records = walk(node, "/v1/audit", 2, org=org["id"])
    actions = [r["action"] for r in records]
    # Newest first; each change once, by the operator.
    assert actions.index("admin.suspend_instance") < actions.index("admin.create_instance")
    assert "admin.create_org" in actions
    mine = [r for r in records if r["action"].startswith("admin.")]
    assert all(r["actor"] == "operator" and r["outcome"] == "ok" for r in mine)
    assert len(mine) == 3
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) == len(set(seqs))
    only = walk(node, "/v1/audit", 50, action="admin.suspend_instance", instance=inst["id"])
    assert [r["target"] for r in only] == [inst["id"]]
    assert walk(node, "/v1/audit", 50, org=org["id"], since="2999-01-01T00:00:00Z") == []
    error(node.admin("GET", "/v1/audit?since=yesterday"), 400, "invalid")
    # A change refused by authorization is recorded as denied (node-wide: operator only).
    reader = ok(node.admin("POST", f"/v1/orgs/{org['id']}/members", {"name": "r"}), 201)
    path = f"/v1/orgs/{org['id']}/members/{reader['id']}/tokens"
    rtok = ok(node.admin("POST", path, {}), 201)["token"]
    error(node.admin("POST", f"/v1/instances/{inst['id']}/resume", token=rtok), 403, "forbidden")
    denied = walk(node, "/v1/audit", 5, action="admin.resume_instance", actor=reader["id"])
    assert [(r["outcome"], r["target"]) for r in denied] == [("denied", inst["id"])]
    assert walk(node, "/v1/audit", 5, action="admin.resume_instance", org=org["id"]) == []
    records = walk(node, "/v1/audit", 50, org=org["id"])
    # Reads are not recorded.
    ok(node.admin("GET", f"/v1/instances/{inst['id']}"))
    assert len(walk(node, "/v1/audit", 50, org=org["id"])) == len(records)


def test_a_deleted_instance_and_an_orgs_last_owner_refuse_changes(node: Node) -> None:
    org = new_org(node, "lifecycle")
    inst = ok(node.admin("POST", f"/v1/orgs/{org['id']}/instances", {"name": "i"}), 201)
    base = f"/v1/instances/{inst['id']}"
    ok(node.admin("PUT", f"{base}/quotas/rooms", {"limit": 3}))
    ok(node.admin("DELETE", base))
    error(node.admin("PUT", f"{base}/quotas/rooms", {"limit": 5}), 409, "conflict")
    error(node.admin("DELETE", f"{base}/quotas/rooms"), 409, "conflict")
    assert ok(node.admin("GET", f"{base}/quotas"))["overrides"] == {"rooms": 3}
    # The org may go; the operator still reads the deleted instance and its bills.
    ok(node.admin("DELETE", f"/v1/orgs/{org['id']}"), 204)
    assert ok(node.admin("GET", base))["status"] == "deleted"
    assert ok(node.admin("GET", f"{base}/invoices/preview"))["instance"] == inst["id"]

    org = new_org(node, "owned")
    members = f"/v1/orgs/{org['id']}/members"
    owner = ok(node.admin("POST", members, {"name": "only", "role": "owner"}), 201)
    error(node.admin("DELETE", f"{members}/{owner['id']}"), 409, "conflict")
    error(node.admin("PATCH", f"{members}/{owner['id']}", {"role": "admin"}), 409, "conflict")
    ok(node.admin("POST", members, {"name": "next", "role": "owner"}), 201)
    ok(node.admin("DELETE", f"{members}/{owner['id']}"), 204)


RATE_LIMITED_CONFIG = """
[limits]
admin_rate = 0.2
admin_burst = 20
admin_auth_failures_rate = 0.2
admin_auth_failures_burst = 3
admin_auth_loopback = true

[audit]
refusal_window_s = 1.0
"""


def limited(r: httpx.Response) -> int:
    """A 429 in the protocol's shape; its Retry-After (whole seconds)."""
    error(r, 429, "rate_limited")
    retry = int(r.headers["Retry-After"])
    assert 1 <= retry <= 5, retry  # 1 / 0.2 per second at most
    return retry


def test_rate_limits_per_credential_and_per_address_and_refusals_audited_in_aggregate(
    tmp_path: Path,
) -> None:
    with running_node(tmp_path, RATE_LIMITED_CONFIG) as node:
        org = new_org(node, "limited")
        inst = ok(node.admin("POST", f"/v1/orgs/{org['id']}/instances", {"name": "i"}), 201)
        members = f"/v1/orgs/{org['id']}/members"
        reader = ok(node.admin("POST", members, {"name": "r"}), 201)
        rtok = ok(node.admin("POST", f"{members}/{reader['id']}/tokens", {}), 201)["token"]

        # The member's budget: 20 at once. Eight refused changes, then reads up to the limit.
        resume = f"/v1/instances/{inst['id']}/resume"
        for _ in range(8):
            error(node.admin("POST", resume, token=rtok), 403, "forbidden")
        for _ in range(12):
            ok(node.admin("GET", f"/v1/instances/{inst['id']}", token=rtok))
        limited(node.admin("GET", f"/v1/instances/{inst['id']}", token=rtok))
        limited(node.admin("POST", resume, token=rtok))  # refused before anything else
        # Another credential has its own budget.
        assert ok(node.admin("GET", f"/v1/instances/{inst['id']}"))["status"] == "active"

        # Refusals are on record, aggregated: one record for the first of a kind in a window,
        # one count for the rest once the window is over; never one per request.
        def denied() -> list[dict[str, Any]]:
            got = ok(node.admin("GET", f"/v1/audit?actor={reader['id']}&limit=50"))["items"]
            return [r for r in got if r["outcome"] == "denied"]

        deadline = time.monotonic() + 10
        while True:
            records = denied()
            forbidden = [r for r in records if r["action"] == "admin.resume_instance"]
            if sum(r["details"]["count"] for r in forbidden) == 8 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert sum(r["details"]["count"] for r in forbidden) == 8, records
        assert 2 <= len(forbidden) <= 4, forbidden  # one window, or at worst two
        assert forbidden[-1]["target"] == inst["id"] and forbidden[-1]["details"]["count"] == 1
        assert any(r["details"].get("aggregated") for r in forbidden)
        rate = [r for r in records if r["action"] == "admin.rate_limited"]
        assert rate and rate[-1]["details"]["code"] == "rate_limited"

        # Failed authentication from one address: three may fail; then the address waits,
        # even with the right credential (the credential is not even looked at).
        for _ in range(3):
            error(node.admin("GET", "/v1/orgs", token="gb6o_guess"), 401, "unauthorized")
        limited(node.admin("GET", "/v1/orgs", token="gb6o_guess"))
        limited(node.admin("GET", f"/v1/orgs/{org['id']}"))
        assert node.proc is not None and node.proc.poll() is None  # still serving


def test_bad_admin_rate_limits_are_refused_at_start() -> None:
    for bad in ({"admin_rate": 0}, {"admin_burst": 1.5}, {"admin_auth_failures_rate": -1}):
        with pytest.raises(GB6Error) as info:
            admin_limiter(Config(limits=Limits(**bad)), "token")
        assert info.value.code == "invalid" and next(iter(bad)) in info.value.message
