"""The browser client against a real `gb6 run`: the web app and SDK as the node serves them, and
two users in headless Chromium (tests/browser_harness.py) clicking and typing in the app."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import node as node_package
from tests.browser_harness import (
    SCRIPTS,
    BrowserTools,
    browser_tools,
    open_scenario,
    run_scenario,
)
from tests.conftest import Node, User, module_node

node = module_node("web")


@pytest.fixture
def tools() -> BrowserTools:
    return browser_tools()


async def http_get(url: str, **headers: str) -> httpx.Response:
    call = functools.partial(httpx.get, url, headers=headers, timeout=10)
    return await trio.to_thread.run_sync(call)


def who(u: User) -> dict[str, str]:
    return {"id": u.id, "token": u.token}


# --- what the node serves ------------------------------------------------------------------


async def test_app_and_sdk_are_served_with_types_caching_and_csp(node: Node) -> None:
    app = await http_get(node.http_url + "/app/")
    assert app.status_code == 200
    assert app.headers["content-type"].startswith("text/html")
    csp = app.headers["content-security-policy"]
    ws_port = node.ws_url.rsplit(":", 1)[1].split("/")[0]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert f"connect-src 'self' ws://127.0.0.1:{ws_port}/v1/ws" in csp
    assert app.headers["x-content-type-options"] == "nosniff"

    sdk = await http_get(node.http_url + "/sdk/client.js")
    assert sdk.status_code == 200
    assert sdk.headers["content-type"].startswith("text/javascript")
    assert sdk.headers["cache-control"] == "no-cache"
    etag = sdk.headers["etag"]
    again = await http_get(node.http_url + "/sdk/client.js", **{"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""

    redirect = await http_get(node.http_url + "/app")
    assert redirect.status_code == 308 and redirect.headers["location"].endswith("/app/")


async def test_pages_share_one_copy_of_their_common_modules(node: Node) -> None:
    """The web app and the admin console import `h` from node/web/elements.js, served beside
    each page's files; the SDK, a library for other pages, does not carry it."""
    shared = (Path(node_package.__file__).parent / "web" / "elements.js").read_bytes()
    for page in ("/app/", "/admin/"):
        got = await http_get(node.http_url + page + "elements.js")
        assert got.status_code == 200 and got.content == shared
        assert got.headers["content-type"].startswith("text/javascript")
    assert (await http_get(node.http_url + "/sdk/elements.js")).status_code == 404


def test_a_page_module_named_like_a_shared_one_is_refused(tmp_path: Path) -> None:
    """Two files for one URL would be a packaging mistake: the tree is refused at start."""
    from node.errors import GB6Error
    from node.static import load_tree

    (tmp_path / "page").mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "page" / "app.js").write_text("export {};\n")
    (tmp_path / "shared" / "elements.js").write_text("export {};\n")
    assert set(load_tree(tmp_path / "page", shared=tmp_path / "shared")) == {
        "app.js",
        "elements.js",
    }
    (tmp_path / "page" / "elements.js").write_text("export const h = 1;\n")
    with pytest.raises(GB6Error, match=r"elements\.js also in"):
        load_tree(tmp_path / "page", shared=tmp_path / "shared")


async def test_config_names_the_websocket_for_the_host_the_page_came_from(node: Node) -> None:
    cfg = await http_get(node.http_url + "/v1/config")
    assert cfg.status_code == 200 and cfg.headers["cache-control"] == "no-store"
    assert cfg.json() == {"ws": node.ws_url, "files": True}
    port = node.http_url.rsplit(":", 1)[1]
    local = await http_get(node.http_url + "/v1/config", Host=f"localhost:{port}")
    assert local.json()["ws"] == node.ws_url.replace("127.0.0.1", "localhost")
    bad = await http_get(node.http_url + "/v1/config", Host="evil.example/<script>")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid"


@pytest.mark.parametrize(
    "path",
    [
        "/sdk/../web_api.py",
        "/sdk/%2e%2e/web_api.py",
        "/sdk/..%2fweb_api.py",
        "/app/../sdk/client.js/..",
        "/app/%2e%2e%2f%2e%2e%2fgateway.py",
        "/sdk/nope.js",
        "/app/views/",
        "/sdk/",
        "/sdk//etc/passwd",
    ],
)
async def test_unknown_paths_and_traversal_are_404(node: Node, path: str) -> None:
    # httpx would normalise `..` away: send the path as written (a doubled slash is merged by
    # a redirect first).
    url = httpx.URL(node.http_url).copy_with(raw_path=path.encode())
    get = functools.partial(httpx.get, url, timeout=10, follow_redirects=True)
    resp = await trio.to_thread.run_sync(get)
    assert resp.status_code == 404, (path, resp.status_code)
    assert "import" not in resp.text and "def " not in resp.text
    healthy = await http_get(node.http_url + "/healthz")
    assert healthy.status_code == 200


async def test_sdk_core_in_node(tools: BrowserTools) -> None:
    """The SDK's pure core (resume, cid resends, errors, drain) under `node --test`."""
    script = str(SCRIPTS / "sdk_core.test.mjs")
    with trio.fail_after(30):
        done = await trio.run_process(["node", "--test", script], capture_stdout=True, check=False)
    assert done.returncode == 0, done.stdout.decode()[-3000:]


# --- two users in the browser ----------------------------------------------------------------


async def test_two_users_chat_live_with_typing_receipts_history_unread_and_files(
    node: Node, tools: BrowserTools, request: pytest.FixtureRequest
) -> None:
    tenant = node.create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    with trio.fail_after(50):
        out = await run_scenario(
            tools,
            "web_chat.mjs",
            {"http": node.http_url, "alice": who(alice), "bob": who(bob)},
            request.node.name,
        )
    assert out["typingShown"] == f"{alice.id} is typing…"
    assert out["bobLive"] == ["hello bob, welcome", "hi alice", "[deleted]"]
    assert out["bobAfterReload"] == ["hello bob, welcome", "hi alice", "[deleted]"]
    assert out["bobEditedAfterReload"] == 1
    assert "#/rooms/" in out["roomUrl"]
    assert "2 unread" in out["unreadShown"]
    assert out["aliceFinal"] == [
        "hello bob, welcome",
        "hi alice",
        "[deleted]",
        "are you there?",
        "ping",
    ]
    assert out["downloadName"] == "notes.txt"
    assert out["downloaded"] == "file from alice\n"
    assert out["pageErrors"] == []


async def test_reconnect_resumes_without_gaps(
    node: Node, tools: BrowserTools, peer_factory: Any, request: pytest.FixtureRequest
) -> None:
    """Alice's page loses its socket; what Bob sends meanwhile, and what she sends offline,
    appear once each and in order; a send whose answer was lost is resent under its cid."""
    tenant = node.create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    backlog, missed = 60, 5
    async with peer_factory(bob.token) as b:
        created = await b.ok("room.create", name="Backlog", kind="chat", members=[alice.id])
        room = created["room"]["id"]
        for i in range(1, backlog + 1):
            await b.ok("send", room=room, cid=f"m{i}", body={"text": f"m{i}"})
        with trio.fail_after(50):
            async with open_scenario(
                tools,
                "web_resume.mjs",
                {
                    "http": node.http_url,
                    "alice": who(alice),
                    "room": {"id": room, "name": "Backlog"},
                    "backlog": backlog,
                },
                request.node.name,
            ) as sc:
                assert (await sc.next_emit()) == {"step": "open"}
                await sc.send({"do": "cut"})
                assert (await sc.next_emit()) == {"step": "cut"}
                for i in range(1, missed + 1):
                    await b.ok("send", room=room, cid=f"x{i}", body={"text": f"missed {i}"})
                await sc.send({"do": "restore", "missed": missed})
                out = await sc.result()
        history = await b.ok("history", room=room, limit=200)

    backlog_texts = [f"m{i}" for i in range(1, backlog + 1)]
    missed_texts = [f"missed {i}" for i in range(1, missed + 1)]
    assert out["firstPage"] == backlog_texts[-50:]  # the newest page first
    assert out["scrolledBack"] == backlog_texts
    assert out["afterResume"] == [*backlog_texts, *missed_texts, "sent while offline"]
    assert out["final"] == [*backlog_texts, *missed_texts, "sent while offline", "ack lost"]
    # The lost answer: one swallowed ok, the send written twice under one cid, stored once.
    assert out["swallowed"] == 1
    sends = out["ackLostSends"]
    assert len(sends) == 2 and sends[0]["cid"] == sends[1]["cid"]
    assert out["connections"] >= 3
    stored = [m["body"]["text"] for m in history["messages"] if m["type"] == "message"]
    assert stored == out["final"]
    assert out["pageErrors"] == []
