"""WHEP with tracks that come and go, on a real `gb6 run`: WHEP has no renegotiation, so a
session's recvonly m-lines are slots the SFU feeds from the hosts' current tracks. A viewer
that starts before the stream is up plays it once published; when the host replaces its
camera, the same m-line plays the new track."""

from __future__ import annotations

import random
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest
import trio
import trio_asyncio
from aiortc import VideoStreamTrack
from aiortc.mediastreams import AudioStreamTrack
from av import VideoFrame

from tests.conftest import Node, module_node
from tests.media_client import HttpMediaClient, MediaClient, loopback_ice, media_event, ws_of

_PORTS = random.randrange(20_000, 60_000, 1_000)
node = module_node(
    "media_whep", f"[media]\nudp_port_min = {_PORTS}\nudp_port_max = {_PORTS + 999}\n"
)


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    loopback_ice(monkeypatch)
    yield


class SmallVideo(VideoStreamTrack):
    """A 320x240 camera: its frames are told apart from aiortc's default 640x480 ones."""

    async def recv(self) -> Any:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame(width=320, height=240)
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.pts, frame.time_base = pts, time_base or Fraction(1, 90_000)
        return frame


async def frame_of_width(play: HttpMediaClient, width: int, within: float = 15) -> Any:
    """Decoded video frames until one is `width` wide."""
    with trio.fail_after(within):
        while True:
            (frame,) = await play.frames("video", 1, within)
            if frame.width == width:
                return frame


async def test_whep_before_the_stream_and_across_a_replaced_track(node: Node) -> None:
    t = node.create_tenant()
    host, viewer = t.user("host"), t.user("viewer")
    with trio.fail_after(50):
        async with trio_asyncio.open_loop(), ws_of(node, host.token) as wh:
            ok = await wh.ok("room.create", name="live", kind="live", members=[viewer.id])
            room = ok["room"]["id"]
            # Nothing is published yet: the WHEP session starts anyway, its slots waiting.
            play = HttpMediaClient(node.http_url, room, viewer.token)
            resp = await play.whep("video", "audio")
            assert resp.status_code == 201, resp.text
            assert resp.text.count("a=sendonly") == 2 and "a=ssrc:" in resp.text
            h = MediaClient(wh, room)
            await h.join()
            video, _audio = await h.publish(VideoStreamTrack(), AudioStreamTrack())
            # Published after the WHEP session started: it plays both.
            assert (await frame_of_width(play, 640)).width == 640
            assert (await play.frames("audio", 3))[-1].sample_rate == 48_000
            # The host replaces its camera (another track, another size): no new offer, the
            # WHEP m-line now carries the new one.
            await wh.ok("media.unpublish", room=room, track=video)
            await media_event(wh, "media.track_unpublished")
            h.pc.addTrack(SmallVideo())
            await wh.ok("media.publish", room=room, kind="video", source="camera")
            await h.offer()
            assert (await frame_of_width(play, 320)).height == 240
            assert (await play.frames("audio", 3))[-1].sample_rate == 48_000
            assert (await play.delete()).status_code == 200
            await play.close()
            await wh.ok("media.leave", room=room)
            await h.close()
