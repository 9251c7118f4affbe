"""H.264 end to end on a real `gb6 run`: an aiortc publisher that offers H.264 only (its
encoder is libx264 on the test side), the SFU forwarding it untouched to a subscriber that
decodes it, and a recording that is MP4 which ffprobe reads as h264 with the right duration."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
import trio_asyncio
from aiortc import RTCRtpSender, VideoStreamTrack

from tests.conftest import Node, module_node
from tests.media_client import MediaClient, loopback_ice, media_event, ws_of
from tests.services import require_tool
from tests.test_media_recording import probe

RECORD_S = 4.0
_PORTS = random.randrange(20_000, 60_000, 1_000)
node = module_node(
    "media_h264", f"[media]\nudp_port_min = {_PORTS}\nudp_port_max = {_PORTS + 999}\n"
)


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    loopback_ice(monkeypatch)
    yield


async def publish_h264(client: MediaClient) -> str:
    """Declare a camera, offer it with H.264 (packetization-mode 1) as its only codec."""
    ok = await client.ws.ok("media.publish", room=client.room, kind="video", source="camera")
    transceiver = client.pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    h264 = [
        c
        for c in RTCRtpSender.getCapabilities("video").codecs
        if c.mimeType == "video/H264" and c.parameters.get("packetization-mode") == "1"
    ]
    assert h264, "aiortc offers H.264"
    transceiver.setCodecPreferences(h264)
    await client.offer()
    return str(ok["track"])


async def test_h264_is_forwarded_decoded_and_recorded_as_mp4(node: Node, tmp_path: Any) -> None:
    ffprobe = require_tool("ffprobe")
    t = node.create_tenant()
    alice, bob = t.user("alice"), t.user("bob")
    with trio.fail_after(50):
        async with trio_asyncio.open_loop(), ws_of(node, alice.token) as wa:
            ok = await wa.ok("room.create", name="m", kind="meeting", members=[bob.id])
            room = ok["room"]["id"]
            a = MediaClient(wa, room)
            await a.join()
            video = await publish_h264(a)
            published = await media_event(wa, "media.track_published")
            assert published["track"] == {**published["track"], "id": video, "codec": "h264"}
            async with ws_of(node, bob.token) as wb:
                b = MediaClient(wb, room)
                joined = await b.join()
                assert [tr["codec"] for tr in joined["tracks"]] == ["h264"]
                await b.subscribe([video])
                assert "H264/90000" in b.pc.remoteDescription.sdp
                # Bob's aiortc decodes what the SFU forwarded: real H.264 frames.
                frames = await b.frames(video, 5)
                assert (frames[-1].width, frames[-1].height) == (640, 480)
                rec = (await wa.ok("media.record", room=room, on=True))["recording"]
                await trio.sleep(RECORD_S)  # the recording's length is the point: real time
                manifest = (await wa.ok("media.record", room=room, on=False))["manifest"]
                await wb.ok("media.leave", room=room)
                await b.close()
            await wa.ok("media.leave", room=room)
            await a.close()
    assert manifest["id"] == rec
    (track,) = manifest["tracks"]
    assert (track["codec"], track["container"], track["content_type"]) == (
        "h264",
        "mp4",
        "video/mp4",
    )
    async with httpx.AsyncClient(base_url=node.http_url, timeout=20) as http:
        url = f"/v1/rooms/{room}/recordings/{rec}/files/{track['file']}"
        r = await http.get(url, headers={"Authorization": f"Bearer {bob.token}"})
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    info = await probe(ffprobe, r.content, tmp_path)
    assert [s["codec_name"] for s in info["streams"]] == ["h264"]
    assert "mp4" in info["format"]["format_name"]
    assert abs(float(info["format"]["duration"]) - RECORD_S) < 1.0, info["format"]
    assert abs(track["duration_ms"] / 1000 - RECORD_S) < 1.0, track
