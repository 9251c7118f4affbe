"""A live stream on a real `gb6 run`: the host publishes from a non-browser client over WHIP
(aiortc), and at least 20 viewers watch at once: headless aiortc viewers on the WebSocket, one
over WHEP, and browser viewers in the web app's live viewer (with comments and reactions).
Every viewer decodes the host's video and audio; media stays on loopback."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio_asyncio
from aiortc import VideoStreamTrack
from aiortc.mediastreams import AudioStreamTrack
from av import VideoFrame

from tests.browser_harness import BrowserTools, browser_tools, run_scenario
from tests.conftest import Node, User, module_node
from tests.media_client import HttpMediaClient, MediaClient, loopback_ice, ws_of

WS_VIEWERS = 16
BROWSER_VIEWERS = 3
VIEWERS = WS_VIEWERS + 1 + BROWSER_VIEWERS  # + one over WHEP
_PORTS = random.randrange(20_000, 60_000, 1_000)
node = module_node("live", f"[media]\nudp_port_min = {_PORTS}\nudp_port_max = {_PORTS + 999}\n")


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    loopback_ice(monkeypatch)
    yield


@pytest.fixture
def tools() -> BrowserTools:
    return browser_tools()


class SmallVideo(VideoStreamTrack):
    """160x120 frames: twenty Python decoders on two cores stay cheap."""

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame(width=160, height=120)
        for plane in frame.planes:
            plane.update(bytes([(pts // 3000) % 200 + 20]) * plane.buffer_size)
        frame.pts = pts
        frame.time_base = time_base
        return frame


def who(u: User) -> dict[str, str]:
    return {"id": u.id, "token": u.token, "name": u.name}


async def test_whip_host_and_twenty_viewers(
    node: Node, tools: BrowserTools, request: pytest.FixtureRequest
) -> None:
    t = node.create_tenant()
    host = t.user("host")
    viewers = [t.user(f"viewer{i}") for i in range(VIEWERS)]
    ws_viewers, whep_viewer, browser_viewers = (
        viewers[:WS_VIEWERS],
        viewers[WS_VIEWERS],
        viewers[WS_VIEWERS + 1 :],
    )
    decoded: dict[str, Any] = {}
    with trio.fail_after(100):
        async with trio_asyncio.open_loop(), ws_of(node, host.token) as wh:
            ok = await wh.ok(
                "room.create", name="launch", kind="live", members=[v.id for v in viewers]
            )
            room = ok["room"]["id"]
            # The host goes live from a non-browser client over WHIP.
            pub = HttpMediaClient(node.http_url, room, host.token)
            resp = await pub.whip(SmallVideo(), AudioStreamTrack())
            assert resp.status_code == 201, resp.text

            async def ws_viewer(user: User, ready: trio.Event, done: trio.Event) -> None:
                async with ws_of(node, user.token) as ws:
                    m = MediaClient(ws, room)
                    joined = await m.join()
                    assert joined["role"] == "viewer"
                    tracks = {tr["kind"]: tr["id"] for tr in joined["tracks"]}
                    await m.subscribe([tracks["video"], tracks["audio"]])
                    video = await m.frames(tracks["video"], 3, within=40)
                    audio = await m.frames(tracks["audio"], 3, within=40)
                    decoded[user.id] = (video[-1].width, audio[-1].sample_rate)
                    ready.set()
                    await done.wait()  # stay in the audience until the browsers are done
                    await ws.ok("media.leave", room=room)
                    await m.close()

            async def whep(ready: trio.Event, done: trio.Event) -> None:
                play = HttpMediaClient(node.http_url, room, whep_viewer.token)
                resp = await play.whep("video", "audio")
                assert resp.status_code == 201, resp.text
                video = await play.frames("video", 3, within=40)
                audio = await play.frames("audio", 3, within=40)
                decoded["whep"] = (video[-1].width, audio[-1].sample_rate)
                ready.set()
                await done.wait()
                assert (await play.delete()).status_code == 200
                await play.close()

            done = trio.Event()
            async with trio.open_nursery() as nursery:
                readies = []
                for user in ws_viewers:
                    ready = trio.Event()
                    readies.append(ready)
                    nursery.start_soon(ws_viewer, user, ready, done)
                ready = trio.Event()
                readies.append(ready)
                nursery.start_soon(whep, ready, done)
                for r in readies:
                    await r.wait()
                out: dict[str, Any] = await run_scenario(
                    tools,
                    "media_live.mjs",
                    {
                        "http": node.http_url,
                        "room": room,
                        "host": host.id,
                        "viewers": [who(v) for v in browser_viewers],
                        "expectViewers": VIEWERS,
                    },
                    request.node.name,
                )
                done.set()
            assert (await pub.delete()).status_code == 200
            await pub.close()
    # Every headless viewer (WebSocket and WHEP) decoded the host's video and audio.
    assert len(decoded) == WS_VIEWERS + 1
    assert set(decoded.values()) == {(160, 48_000)}
    # Every browser viewer decoded both tracks and saw the whole audience counted.
    assert len(out["decoding"]) == BROWSER_VIEWERS
    for progress in out["decoding"]:
        assert sorted(p["kind"] for p in progress.values() if p["delta"] > 0) == [
            "audio",
            "video",
        ]
    assert out["counts"] == [f"{VIEWERS} watching"] * BROWSER_VIEWERS
    assert out["goLiveHidden"] is True
    assert out["reactions"] == "❤️ 1"
    assert out["pageErrors"] == []
