"""WHIP ingest and WHEP playback (docs/protocol.md "Media over HTTP") against a real `gb6 run`:
a non-browser host (aiortc) publishes over WHIP, viewers receive over the WebSocket and WHEP."""

from __future__ import annotations

import random
from collections.abc import Iterator

import httpx
import pytest
import trio
import trio_asyncio
from aiortc import VideoStreamTrack
from aiortc.mediastreams import AudioStreamTrack

from tests.conftest import Node, module_node
from tests.media_client import HttpMediaClient, MediaClient, loopback_ice, media_event, ws_of

_PORTS = random.randrange(20_000, 60_000, 1_000)
node = module_node(
    "media_http", f"[media]\nudp_port_min = {_PORTS}\nudp_port_max = {_PORTS + 999}\n"
)


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    loopback_ice(monkeypatch)
    yield


async def test_whip_host_to_websocket_and_whep_viewers(node: Node) -> None:
    t = node.create_tenant()
    host, viewer, outsider = t.user("host"), t.user("viewer"), node.create_tenant().user("x")
    with trio.fail_after(45):
        async with trio_asyncio.open_loop(), ws_of(node, host.token) as wh:
            ok = await wh.ok("room.create", name="live", kind="live", members=[viewer.id])
            room = ok["room"]["id"]
            # Nothing published yet: a WHEP session starts anyway, its m-line a waiting slot
            # (tests/test_media_whep.py plays what is published later).
            early = HttpMediaClient(node.http_url, room, viewer.token)
            assert (await early.whep("video")).status_code == 201
            assert (await early.delete()).status_code == 200
            await early.close()
            pub = HttpMediaClient(node.http_url, room, host.token)
            resp = await pub.whip(VideoStreamTrack(), AudioStreamTrack())
            assert resp.status_code == 201, resp.text
            assert resp.headers["content-type"].startswith("application/sdp")
            assert pub.location.startswith(f"/v1/rooms/{room}/whip/")
            # The viewer's WebSocket sees the WHIP host's tracks and decodes them.
            async with ws_of(node, viewer.token) as wv:
                v = MediaClient(wv, room)
                joined = await v.join()
                # WHIP's answer came once the tracks were published: the join lists them.
                known = {tr["kind"]: tr["id"] for tr in joined["tracks"]}
                assert {tr["user"] for tr in joined["tracks"]} == {host.id}
                await v.subscribe([known["video"], known["audio"]])
                assert (await v.frames(known["video"], 3))[-1].width == 640
                # A WHEP viewer plays the same stream.
                play = HttpMediaClient(node.http_url, room, viewer.token)
                resp = await play.whep("video", "audio")
                assert resp.status_code == 201, resp.text
                assert (await play.frames("video", 3))[-1].width == 640
                assert (await play.frames("audio", 3))[-1].sample_rate == 48_000
                # Two viewers now (the WebSocket's and WHEP's): counted, not announced.
                await media_event(wv, "media.viewers", lambda e: e["count"] == 2)
                # Only its owner ends a session; then it is gone.
                other = HttpMediaClient(node.http_url, room, host.token)
                other.location = play.location
                assert (await other.delete()).status_code == 404
                assert (await play.delete()).status_code == 200
                assert (await play.delete()).status_code == 404
                await play.close()
                await other.close()
                # Refusals: a viewer may not WHIP into a live room, a stranger sees no room,
                # an offer must be application/sdp.
                bad = HttpMediaClient(node.http_url, room, viewer.token)
                assert (await bad.whip(VideoStreamTrack())).status_code == 403
                stranger = HttpMediaClient(node.http_url, room, outsider.token)
                assert (await stranger.whip(VideoStreamTrack())).status_code == 404
                async with httpx.AsyncClient() as http:
                    r = await http.post(
                        f"{node.http_url}/v1/rooms/{room}/whip",
                        content="v=0",
                        headers={"Authorization": f"Bearer {host.token}"},
                    )
                    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid"
                    r = await http.post(f"{node.http_url}/v1/rooms/{room}/whep", content="v=0")
                    assert r.status_code == 401
                for c in (bad, stranger, v):
                    await c.close()
            # Ending the WHIP session unpublishes the host's tracks.
            assert (await pub.delete()).status_code == 200
            await pub.close()


async def test_a_suspended_instances_whip_session_ends(node: Node) -> None:
    """A WHIP session has no socket for the gateway to close (4003) when its instance is
    suspended: it ends all the same, and is gone once the instance is resumed."""
    t = node.create_tenant()
    host, member = t.user("host"), t.user("member")
    base = f"/v1/instances/{t.instance}"
    with trio.fail_after(45):
        async with trio_asyncio.open_loop():
            async with ws_of(node, member.token) as wm:
                ok = await wm.ok("room.create", name="m", kind="meeting", members=[host.id])
                room = ok["room"]["id"]
            pub = HttpMediaClient(node.http_url, room, host.token)
            assert (await pub.whip(VideoStreamTrack())).status_code == 201
            assert node.admin("POST", f"{base}/suspend").status_code == 200
            assert node.admin("POST", f"{base}/resume").status_code == 200
            async with ws_of(node, member.token) as wm:
                joined = await wm.ok("media.join", room=room)
                assert joined["participants"] == [] and joined["tracks"] == []
            assert (await pub.delete()).status_code == 404
            await pub.close()
