"""The admin API's essential flows on an origin whose store is PostgreSQL, or Kafka + PostgreSQL
(tests/test_admin_api.py runs them on the embedded `gb6 run`), and the admin rate limits shared
by a cluster's origins through Redis.

Each backend gets one `gb6 origin` process (tests/test_cluster.py's config), in a schema and on a
topic of its own, dropped at the end; it is killed (-9) and restarted once, so what the admin
API made must come back from the backend, not from memory.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio_asyncio
from services import require

from node.config import Config, Limits
from origin.admin_limits import admin_limiter
from tests.conftest import Node
from tests.test_cluster import _config, _delete_topics, _pg


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json() if r.content else None


def refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.text


@pytest.fixture(scope="module", params=["postgres", "kafka"])
def origin(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    dsn = require("postgres")
    kafka = require("kafka") if request.param == "kafka" else None
    base = Path(tmp_path_factory.mktemp(f"admin-{request.param}"))
    suffix = uuid.uuid4().hex[:10]
    schema, topic = f"t{suffix}_admin", f"gb6-admin-{suffix}"
    store = f'[store]\nbackend = "{request.param}"\npg_dsn = "{dsn}"\npg_schema = "{schema}"\n'
    if kafka is not None:
        store += f'kafka_bootstrap = "{kafka}"\nkafka_topic = "{topic}"\n'
    conf = _config(base, [], store, name="origin")
    node = Node(base / "s1", extra_args=["--config", str(conf), "--shard", "s1"], command="origin")
    try:
        node.start(timeout=60)
        yield node
    finally:
        node.kill()
        asyncio.run(_pg(dsn, f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        if kafka is not None:
            _delete_topics(kafka, [topic])


def test_essential_admin_flows(origin: Node) -> None:
    a = origin.admin
    org = ok(a("POST", "/v1/orgs", {"name": "acme"}), 201)
    child = ok(a("POST", "/v1/orgs", {"name": "acme-eu", "parent": org["id"]}), 201)
    inst = ok(a("POST", f"/v1/orgs/{child['id']}/instances", {"name": "prod"}), 201)
    base = f"/v1/instances/{inst['id']}"
    user = ok(a("POST", f"{base}/users", {"name": "ann", "role": "admin"}), 201)
    tok = ok(a("POST", f"{base}/users/{user['id']}/tokens", {}), 201)
    assert tok["token"].startswith("gb6u_")
    members = f"/v1/orgs/{org['id']}/members"
    owner = ok(a("POST", members, {"name": "olga", "role": "owner"}), 201)
    otok = ok(a("POST", f"{members}/{owner['id']}/tokens", {}), 201)["token"]
    key = ok(
        a(
            "POST",
            f"/v1/orgs/{org['id']}/api_keys",
            {"name": "ci", "permissions": ["instance.read", "quota.read"], "instance": inst["id"]},
            otok,
        ),
        201,
    )

    # Lifecycle, quotas, usage, invoices: by the operator and by the org's owner.
    assert ok(a("POST", f"{base}/suspend", token=otok))["status"] == "suspended"
    assert ok(a("POST", f"{base}/resume"))["status"] == "active"
    set_ = ok(a("PUT", f"{base}/quotas/rooms", {"limit": 7}, otok))
    assert set_["overrides"] == {"rooms": 7}
    rooms = {u["resource"]: u for u in ok(a("GET", f"{base}/quotas", token=key["secret"]))["usage"]}
    assert rooms["users"]["used"] == 1 and rooms["rooms"]["limit"] == 7
    usage = ok(a("GET", f"{base}/usage"))
    assert usage["instance"] == inst["id"] and isinstance(usage["usage"], dict)
    preview = ok(a("GET", f"{base}/invoices/preview", token=otok))
    assert preview["instance"] == inst["id"] and preview["total"] >= 0
    refused(a("POST", f"{base}/invoices", {"period": preview["period"]}), 409, "conflict")
    refused(a("DELETE", f"{members}/{owner['id']}"), 409, "conflict")  # the last owner
    refused(a("GET", f"{base}/users", token=key["secret"]), 403, "forbidden")

    # The audit trail, as the operator and as the owner (scoped to its subtree) see it.
    mine = ok(a("GET", f"/v1/audit?org={child['id']}&limit=50"))["items"]
    actions = {r["action"] for r in mine}
    assert {"admin.create_instance", "admin.suspend_instance", "admin.resume_instance"} <= actions
    assert {"admin.set_quota_override", "admin.create_user", "admin.issue_user_token"} <= actions
    seen = ok(a("GET", "/v1/audit?limit=200", token=otok))["items"]
    assert {r["seq"] for r in mine} <= {r["seq"] for r in seen}

    # kill -9, restart: everything comes back from the backend.
    origin.restart()
    a = origin.admin
    assert ok(a("GET", f"/v1/orgs/{child['id']}"))["parent"] == org["id"]
    assert ok(a("GET", base))["status"] == "active"
    assert ok(a("GET", f"{base}/users/{user['id']}"))["role"] == "admin"
    assert ok(a("GET", f"{base}/quotas", token=key["secret"]))["overrides"] == {"rooms": 7}
    assert ok(a("GET", f"/v1/orgs/{org['id']}", token=otok))["name"] == "acme"
    again = ok(a("GET", f"/v1/audit?org={child['id']}&limit=50"))["items"]
    assert [r["seq"] for r in again[-len(mine) :]] == [r["seq"] for r in mine]

    # Deleting: the instance, then its org; the deleted instance stays the operator's.
    assert ok(a("DELETE", base))["status"] == "deleted"
    refused(a("PUT", f"{base}/quotas/rooms", {"limit": 9}), 409, "conflict")
    ok(a("DELETE", f"/v1/orgs/{child['id']}", token=otok), 204)
    refused(a("GET", base, token=otok), 404, "not_found")
    assert ok(a("GET", base))["status"] == "deleted"
    origin.restart()
    assert ok(origin.admin("GET", base))["status"] == "deleted"
    refused(origin.admin("GET", f"/v1/orgs/{child['id']}"), 404, "not_found")


def test_origins_share_the_admin_rate_limits_through_redis(tmp_path: Path) -> None:
    redis = require("redis")
    token = "operator-" + uuid.uuid4().hex  # its digest prefixes the keys: this run's own
    limits = "[limits]\nadmin_rate = 0.2\nadmin_burst = 4\n"
    origins = []
    try:
        for shard in ("s1", "s2"):
            conf = _config(tmp_path, [], limits, name=shard, redis=redis)
            node = Node(
                tmp_path / shard,
                extra_args=["--config", str(conf), "--shard", shard],
                command="origin",
                env={"GB6_ADMIN_TOKEN": token},
            )
            node.start()
            origins.append(node)
        one, two = origins
        for node in (one, two, one, two):  # four at once between them: the shared burst
            ok(node.admin("GET", "/v1/plans"))
        for node in (one, two):
            r = node.admin("GET", "/v1/plans")
            refused(r, 429, "rate_limited")
            assert 1 <= int(r.headers["Retry-After"]) <= 5
    finally:
        for node in origins:
            node.kill()


async def test_without_redis_each_origin_keeps_its_own_admin_limit() -> None:
    """Redis gone: the limit still holds, per process (it neither fails open nor locks the
    operator out)."""
    # A slow refill (one request per 100 s): the third admit is over the burst however long the
    # failed Redis attempts take on a loaded machine.
    config = Config(
        redis_url="redis://127.0.0.1:1/0", limits=Limits(admin_rate=0.01, admin_burst=2)
    )
    limiter = admin_limiter(config, "operator-token")
    async with trio_asyncio.open_loop():
        try:
            assert [await limiter.admit("operator:operator") for _ in range(2)] == [0.0, 0.0]
            assert await limiter.admit("operator:operator") > 0
        finally:
            await limiter.aclose()
