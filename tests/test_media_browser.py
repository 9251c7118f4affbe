"""Meetings in the browser: three headless Chromium participants (fake camera, microphone and
screen capture) in the web app's meeting grid against a real `gb6 run`, media on loopback."""

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
    "media_browser", f"[media]\nudp_port_min = {_PORTS}\nudp_port_max = {_PORTS + 999}\n"
)


@pytest.fixture
def tools() -> BrowserTools:
    return browser_tools()


async def test_three_participants_meet_mute_share_and_leave(
    node: Node, tools: BrowserTools, request: pytest.FixtureRequest
) -> None:
    t = node.create_tenant()
    users = [t.user(name) for name in ("alice", "bob", "carol")]
    async with ws_of(node, users[0].token) as ws:
        ok = await ws.ok(
            "room.create", name="standup", kind="meeting", members=[u.id for u in users[1:]]
        )
    room = ok["room"]["id"]
    with trio.fail_after(110):
        out: dict[str, Any] = await run_scenario(
            tools,
            "media_meeting.mjs",
            {
                "http": node.http_url,
                "room": room,
                "users": [{"id": u.id, "token": u.token, "name": u.name} for u in users],
            },
            request.node.name,
        )
    # Each receives the other two's video and audio, decoding (frames / samples rising).
    for name, got in out["received"].items():
        kinds = sorted(p["kind"] for p in got["progress"].values() if p["delta"] > 0)
        assert len(got["ids"]) == 4, (name, got)
        assert kinds.count("video") >= 2 and kinds.count("audio") >= 2, (name, got)
        for p in got["progress"].values():
            if p["kind"] == "audio":
                assert p["concealed"] < p["total"], (name, p)  # real audio, not concealment
    # Mute stops the muted camera's frames; the others keep decoding; unmute resumes.
    for name, got in out["muted"].items():
        assert got["camera"]["delta"] <= 1, (name, got)
        assert any(p["delta"] > 0 for p in got["others"].values() if p["kind"] == "video")
        assert out["unmuted"][name]["delta"] > 0
    # The screen share appears and decodes at both others.
    assert set(out["screen"]) == {"bob", "carol"}
    for got in out["screen"].values():
        assert got["progress"]["delta"] > 0
    # Leaving removes the leaver's tracks.
    for got in out["afterLeave"].values():
        assert len(got["carolTracks"]) == 2 and got["stillReceived"] == []
    assert out["pageErrors"] == []
