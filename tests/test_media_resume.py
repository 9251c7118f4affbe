"""The browser SDK's media survives a reconnect: a headless Chromium participant whose socket
is cut (Playwright's routeWebSocket) joins the room's media again by itself, republishes its
camera and microphone and resubscribes; both sides decode video again (`media_resume.mjs`)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

from tests.browser_harness import BrowserTools, browser_tools, run_scenario
from tests.conftest import Node, module_node
from tests.media_client import ws_of

_PORTS = random.randrange(20_000, 60_000, 1_000)
node = module_node(
    "media_resume", f"[media]\nudp_port_min = {_PORTS}\nudp_port_max = {_PORTS + 999}\n"
)


@pytest.fixture
def tools() -> BrowserTools:
    return browser_tools()


async def test_media_rejoins_after_the_socket_reconnects(
    node: Node, tools: BrowserTools, request: pytest.FixtureRequest
) -> None:
    t = node.create_tenant()
    alice, bob = t.user("alice"), t.user("bob")
    async with ws_of(node, alice.token) as ws:
        ok = await ws.ok("room.create", name="standup", kind="meeting", members=[bob.id])
        room = ok["room"]["id"]
        # Recorded from before anyone joins: no `media.recording` event tells the pages.
        rec = (await ws.ok("media.record", room=room, on=True))["recording"]
        who = {u.name: {"id": u.id, "token": u.token, "name": u.name} for u in (alice, bob)}
        with trio.fail_after(100):
            out: dict[str, Any] = await run_scenario(
                tools,
                "media_resume.mjs",
                {"http": node.http_url, "room": room, **who},
                request.node.name,
            )
        await ws.ok("media.record", room=room, on=False)
    before, after = out["before"], out["after"]
    assert before["aliceSees"]["progress"]["delta"] > 0
    assert before["bobSees"]["progress"]["delta"] > 0
    # A second connection; the session went through 'reconnecting' back to 'connected'.
    assert out["connections"] >= 2
    assert "reconnecting" in after["states"] and after["states"][-1] == "connected"
    # A new participant with a new camera track (the old one went with the old socket) ...
    assert after["alice"]["participant"] != before["alice"]["participant"]
    assert after["bobSees"]["id"] != before["bobSees"]["id"]
    assert len(after["alice"]["local"]) == 2 and after["bobSees"]["id"] in after["alice"]["local"]
    # ... and video decoding again both ways: Bob's camera (same track) at Alice, hers at Bob.
    assert after["aliceSees"]["id"] == before["aliceSees"]["id"]
    assert after["aliceSees"]["progress"]["delta"] > 0
    assert after["bobSees"]["progress"]["delta"] > 0
    # Each join's answer said the room was being recorded.
    assert before["alice"]["recording"] == rec and after["alice"]["recording"] == rec
    assert out["pageErrors"] == []
