"""The admin console (/admin/) against a real `gb6 run`: what the node serves (types, CSP, no
traversal), the page's pure helpers under `node --test`, and an operator in headless Chromium
(tests/browser_harness.py) who creates an organization, an instance and a user with real clicks,
reads quotas, usage and the invoice preview after the user has sent messages, suspends the
instance and finds it all in the audit log; a member of the organization signs in with their own
token and sees only their organization. Screenshots are kept in tests/artifacts/<test>/."""

from __future__ import annotations

import functools
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.browser_harness import (
    SCRIPTS,
    BrowserTools,
    artifacts_root,
    browser_tools,
    open_scenario,
)
from tests.conftest import Node, connect, make_room, module_node

# The plan the console puts the instance on: one user, five messages a day, a flat fee and
# messages past the second at half a cent.
CONFIG = """
[plans.team.quotas]
users = 1
messages = 5

[plans.team.pricing]
currency = "EUR"
[[plans.team.pricing.components]]
model = "flat"
name = "base"
amount = 4900
[[plans.team.pricing.components]]
model = "graduated"
name = "messages"
metric = "messages"
tiers = [{up_to = 2, unit_price = 0}, {unit_price = "0.5"}]
"""

node = module_node("admin_console", CONFIG)


@pytest.fixture
def tools() -> BrowserTools:
    return browser_tools()


async def http_get(url: str, **headers: str) -> httpx.Response:
    call = functools.partial(httpx.get, url, headers=headers, timeout=10)
    return await trio.to_thread.run_sync(call)


def assert_console_headers(resp: httpx.Response) -> None:
    csp = resp.headers["content-security-policy"]
    for rule in (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ):
        assert rule in csp, csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["x-frame-options"] == "DENY"
    assert resp.headers["referrer-policy"] == "no-referrer"


# --- what the node serves ------------------------------------------------------------------


async def test_console_is_served_with_types_caching_and_csp(node: Node) -> None:
    page = await http_get(node.http_url + "/admin/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="app.js">' in page.text
    assert_console_headers(page)

    module = await http_get(node.http_url + "/admin/views/audit.js")
    assert module.status_code == 200
    assert module.headers["content-type"].startswith("text/javascript")
    assert_console_headers(module)
    again = await http_get(
        node.http_url + "/admin/views/audit.js", **{"If-None-Match": module.headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""

    redirect = await http_get(node.http_url + "/admin")
    assert redirect.status_code == 308 and redirect.headers["location"].endswith("/admin/")
    # The page is public; the API behind it is not.
    refused = await http_get(node.http_url + "/v1/orgs")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    "path",
    [
        "/admin/../admin_console.py",
        "/admin/%2e%2e/admin_console.py",
        "/admin/..%2fadmin_api.py",
        "/admin/views/%2e%2e%2f%2e%2e%2fshard.py",
        "/admin/views/",
        "/admin/nope.js",
        "/admin/.hidden",
    ],
)
async def test_unknown_paths_and_traversal_are_404(node: Node, path: str) -> None:
    url = httpx.URL(node.http_url).copy_with(raw_path=path.encode())
    get = functools.partial(httpx.get, url, timeout=10, follow_redirects=True)
    resp = await trio.to_thread.run_sync(get)
    assert resp.status_code == 404, (path, resp.status_code)
    assert "import" not in resp.text and "def " not in resp.text
    assert (await http_get(node.http_url + "/healthz")).status_code == 200


async def test_gb6_origin_serves_the_console_beside_its_admin_api(tmp_path: Path) -> None:
    config = tmp_path / "origin.toml"
    config.write_text('[cluster]\nlink_secret = "console-test-secret-0123456789"\n')
    origin = Node(tmp_path / "o", ["--config", str(config)], command="origin")
    await trio.to_thread.run_sync(origin.start)
    try:
        page = await http_get(origin.http_url + "/admin/")
        assert page.status_code == 200 and "GB6 admin" in page.text
        assert_console_headers(page)
    finally:
        origin.kill()


async def test_console_helpers_in_node(tools: BrowserTools) -> None:
    """Quota levels at 80/100 %, money in exact minor units, months, the org tree."""
    script = str(SCRIPTS / "admin_model.test.mjs")
    with trio.fail_after(30):
        done = await trio.run_process(["node", "--test", script], capture_stdout=True, check=False)
    assert done.returncode == 0, done.stdout.decode()[-3000:]


# --- an operator in the browser --------------------------------------------------------------


async def send_as(node: Node, token: str, user: str, count: int) -> None:
    """`count` messages from the user behind `token`, over the client WebSocket."""
    async with asynccontextmanager(connect)(node, token) as peer:
        room = await make_room(peer, [user])
        for i in range(count):
            await peer.ok("send", room=room, cid=f"c{i}", body={"text": f"m{i}"})


def admin_get(node: Node, path: str) -> Any:
    resp = node.admin("GET", path)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.usefixtures("within_one_utc_day")  # a daily quota, sent to and read
async def test_operator_creates_suspends_and_audits_in_the_browser(
    node: Node, tools: BrowserTools, request: pytest.FixtureRequest
) -> None:
    other = node.admin("POST", "/v1/orgs", {"name": "Other"})
    assert other.status_code == 201, other.text
    other_org = other.json()["id"]
    for i in range(6):  # records enough for the audit view to page (ten a page)
        child = node.admin("POST", "/v1/orgs", {"name": f"Other {i}", "parent": other_org})
        assert child.status_code == 201, child.text
    name = request.node.name
    with trio.fail_after(60):
        async with open_scenario(
            tools,
            "admin_console.mjs",
            {"http": node.http_url, "admin_token": node.admin_token, "other_org": other_org},
            name,
        ) as sc:
            step = await sc.next_emit()
            assert step["step"] == "user" and step["token"].startswith("gb6u_")
            # The token the page showed is a real one: alice sends four messages with it.
            await send_as(node, step["token"], step["user"], 4)
            await sc.send({"go": True})
            out = await sc.result()

    assert out["pageErrors"] == []
    assert out["refused"].startswith("unauthorized")
    assert out["who"] == "Signed in (operator)"
    assert "Acme" in out["tree"] and "Other" in out["tree"]

    # What the page created is what the server holds.
    inst = admin_get(node, f"/v1/instances/{out['instance']}")
    assert (inst["name"], inst["plan"], inst["status"]) == ("acme-prod", "team", "suspended")
    org = admin_get(node, f"/v1/orgs/{inst['org']}")
    assert org["name"] == "Acme" and org["parent"] is None
    assert [(u[0], u[2]) for u in out["users"]] == [("alice", step["user"])]
    members = admin_get(node, f"/v1/orgs/{org['id']}/members")["items"]
    assert sorted(m["name"] for m in members) == ["bob", "mia"]  # mia: added by bob, below

    # Quotas: 1 of 1 user (full), 4 of 5 messages (past 80 %), rooms unlimited on this plan.
    assert out["quotas"]["users"] == {"level": "full", "text": "1 of 1 (100 %)"}
    assert out["quotas"]["messages"] == {"level": "warn", "text": "4 of 5 (80 %)"}
    assert out["quotas"]["rooms"] == {"level": "unlimited", "text": "1 (unlimited)"}
    # Metered usage and the preview: 49.00 flat + (4 - 2) x 0.5 cents = 4901 minor units.
    assert out["usage"]["messages"] == "4"
    assert out["total"] == "EUR 49.01"
    assert out["preview"][0][:2] == ["base", "flat"] and out["preview"][0][-1] == "EUR 49.00"
    assert out["preview"][1][:4] == ["messages", "graduated", "messages", "4"]
    assert out["preview"][1][-1] == "EUR 0.01"
    assert out["closeError"].startswith("conflict")
    assert out["status"] == "suspended" and out["resumeShown"] is True

    # The audit view shows the clicks (newest first) and filters to the suspension.
    actions = [r[3] for r in out["audit"]]
    for done in (
        "admin.create_org",
        "admin.add_org_member",
        "admin.issue_member_token",
        "admin.create_instance",
        "admin.create_user",
        "admin.issue_user_token",
        "admin.suspend_instance",
    ):
        assert done in actions, (done, actions)
    assert actions.index("admin.suspend_instance") < actions.index("admin.create_instance")
    assert actions.index("admin.create_instance") < actions.index("admin.create_org")
    assert len(out["filtered"]) == 1
    suspended = out["filtered"][0]
    assert suspended[3] == "admin.suspend_instance" and suspended[5] == out["instance"]
    assert suspended[7] == "ok"
    # Paging ten at a time walks every record once, newest first.
    assert out["firstPage"] == 10 and out["pages"] == -(-len(out["allSeqs"]) // 10) >= 2
    assert out["allSeqs"] == sorted(set(out["allSeqs"]), reverse=True)
    assert len(out["allSeqs"]) == len(out["audit"])

    # Bob (admin of Acme, his own gb6o_ token from the page) sees Acme only; Other is not found.
    assert out["bobWho"] == "Signed in (organization member)"
    assert out["bobSections"] == ["Organizations", "Instances", "Audit log"]
    assert out["bobTree"] == ["Acme"]
    assert out["bobOther"].startswith("not_found")
    # Mia, a plain member Bob added: Organizations and Instances (no audit.read); Acme's members
    # listed with their roles as text; none of the changes she may not make is offered.
    assert out["miaSections"] == ["Organizations", "Instances"]
    assert sorted(out["miaMembers"]) == [["bob", "admin"], ["mia", "member"]]
    assert out["miaButtons"] == dict.fromkeys(out["miaButtons"], 0) and len(out["miaButtons"]) == 7

    # An API key made in the console for acme-prod (instance.read, quota.read, audit.read):
    # it sees that instance only, reads its quotas, not its users, and is offered no action it
    # may not take (resume, quota overrides).
    assert out["keys"] == [
        [
            "reader",
            "acme-prod",
            "audit.read, instance.read, quota.read",
            "never",
            "active",
            "Revoke",
        ]
    ]
    assert out["keyWho"] == "Signed in (API key)"
    # GET /v1/me: the key may read instances and the audit log, not organizations.
    assert out["keySections"] == ["Instances", "Audit log"]
    assert out["keyFirst"] == "Instances"
    assert out["keyReloaded"] == out["keySections"]
    assert "forbidden" in out["keyOrgs"]
    assert [r[0] for r in out["keyInstances"]] == ["acme-prod"]
    assert out["keyUsers"].startswith("forbidden")
    assert out["keyQuota"]["text"] == "1 of 1 (100 %)"
    # The quotas and the suspended instance's header are shown, without their actions.
    assert (out["keyResume"], out["keyOverride"]) == (0, 0)
    assert admin_get(node, f"/v1/instances/{out['instance']}")["status"] == "suspended"

    shots = artifacts_root() / name
    assert (shots / "organization.png").stat().st_size > 0
    assert (shots / "instance.png").stat().st_size > 0
    assert (shots / "audit.png").stat().st_size > 0
    assert (shots / "api-key.png").stat().st_size > 0
