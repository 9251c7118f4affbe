"""The SFU (edge/sfu) with real aiortc peers on 127.0.0.1.

The test side encodes (aiortc's VP8/Opus encoders behind its MediaStreamTracks) and decodes
(reading a received track decodes it); the SFU in between only forwards packets. Media stays on
loopback: the SFU pins its candidates to [media] host, and the test peers' host gathering is
pinned to 127.0.0.1 (aioice leaves loopback out by default). No ICE servers anywhere.
"""

from __future__ import annotations

import fractions
import math
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
import trio
import trio_asyncio
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import AudioStreamTrack
from av import AudioFrame
from trio_asyncio import aio_as_trio

from edge.sfu import (
    ActiveSpeakers,
    Peer,
    Sfu,
    SfuEvent,
    TrackMuted,
    TrackPublished,
    TrackUnpublished,
)
from node.config import MediaConfig
from node.errors import GB6Error

HOST = "127.0.0.1"


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The test peers' host candidates: loopback only (DESIGN.md §2b)."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: [HOST])
    yield


def media_config(**over: Any) -> MediaConfig:
    base = random.randrange(20_000, 60_000, 1_000)
    fields: dict[str, Any] = {"host": HOST, "udp_port_min": base, "udp_port_max": base + 999}
    fields.update(over)
    return MediaConfig(**fields)


@pytest.fixture
async def sfu() -> AsyncIterator[Sfu]:
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        s = Sfu(media_config(speaker_interval_s=0.1, quality_interval_s=0.5))
        await nursery.start(s.run)
        yield s
        nursery.cancel_scope.cancel()


class Events:
    """A listener that keeps what it got and lets a test wait for a kind of event."""

    def __init__(self) -> None:
        self.items: list[SfuEvent] = []
        self._changed = trio.Event()

    def __call__(self, event: SfuEvent) -> None:
        self.items.append(event)
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, cls: type, pred: Any = lambda e: True, within: float = 10) -> Any:
        with trio.fail_after(within):
            while True:
                for e in self.items:
                    if isinstance(e, cls) and pred(e):
                        return e
                await self._changed.wait()


class Client:
    """A headless aiortc participant on 127.0.0.1 with its SFU peer."""

    def __init__(self, sfu: Sfu, room: str, name: str) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.events = Events()
        self.peer: Peer = sfu.join(room, name, self.events)
        self.tracks: dict[str, MediaStreamTrack] = {}  # by the SFU's track id (msid)
        self.rtp: list[tuple[int, int, int]] = []  # (ssrc, seq, ts) as received

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            pass

    async def publish(self, *tracks: MediaStreamTrack) -> None:
        for t in tracks:
            self.pc.addTrack(t)
        await aio_as_trio(self._local_offer)()
        answer = await self.peer.answer(self.pc.localDescription.sdp)
        await aio_as_trio(self.pc.setRemoteDescription)(RTCSessionDescription(answer, "answer"))

    async def _local_offer(self) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())

    async def _local_answer(self, offer: str) -> str:
        await self.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return str(self.pc.localDescription.sdp)

    async def renegotiate(self) -> None:
        offer = await self.peer.offer()
        answer = await aio_as_trio(self._local_answer)(offer)
        await self.peer.set_answer(answer)
        for t in self.pc.getTransceivers():
            receiver = t.receiver
            if getattr(receiver, "_gb6_tapped", False):
                continue
            receiver._gb6_tapped = True  # type: ignore[attr-defined]
            original = receiver._handle_rtp_packet

            async def tap(packet: Any, arrival_time_ms: int, _o: Any = original) -> None:
                self.rtp.append((packet.ssrc, packet.sequence_number, packet.timestamp))
                await _o(packet, arrival_time_ms)

            receiver._handle_rtp_packet = tap  # type: ignore[method-assign]
        for t in self.pc.getTransceivers():
            if t.receiver.track is not None:
                for s in self.pc.remoteDescription.sdp.splitlines():
                    pass
        self.tracks = self._tracks_by_msid()

    def _tracks_by_msid(self) -> dict[str, MediaStreamTrack]:
        out: dict[str, MediaStreamTrack] = {}
        mids: dict[str, str] = {}
        mid = ""
        for line in self.pc.remoteDescription.sdp.splitlines():
            if line.startswith("a=mid:"):
                mid = line[6:]
            elif line.startswith("a=msid:"):
                mids[mid] = line.split()[-1]
        for t in self.pc.getTransceivers():
            if t.mid in mids and t.receiver.track is not None:
                out[mids[t.mid]] = t.receiver.track
        return out

    async def frames(self, track_id: str, n: int, within: float = 15) -> list[Any]:
        track = self.tracks[track_id]
        got = []
        with trio.fail_after(within):
            for _ in range(n):
                got.append(await aio_as_trio(track.recv)())
        return got

    async def close(self) -> None:
        await self.peer.leave()
        await aio_as_trio(self.pc.close)()


class Tone(AudioStreamTrack):
    """A loud 440 Hz tone (AudioStreamTrack is silence): the audio-level extension says -dBov."""

    def __init__(self) -> None:
        super().__init__()
        self._phase = 0

    async def recv(self) -> AudioFrame:
        frame = await super().recv()
        samples = frame.samples
        t = (np.arange(samples) + self._phase) / 48_000
        self._phase += samples
        wave = (np.sin(2 * math.pi * 440 * t) * 20_000).astype(np.int16)
        out = AudioFrame.from_ndarray(wave.reshape(1, -1), format="s16", layout="mono")
        out.sample_rate = 48_000
        out.pts = frame.pts
        out.time_base = fractions.Fraction(1, 48_000)
        return out


async def test_publisher_to_two_subscribers_decodes_video_and_audio(sfu: Sfu) -> None:
    pub = Client(sfu, "r1", "alice")
    await pub.publish(VideoStreamTrack(), AudioStreamTrack())
    published = await pub.events.wait(TrackPublished, lambda e: e.track.kind == "video")
    assert published.track.source == "camera" and published.track.codec == "vp8"
    ids = {t.kind: t.track_id for t in pub.peer.tracks}
    subs = [Client(sfu, "r1", name) for name in ("bob", "carol")]
    for s in subs:
        for tid in ids.values():
            s.peer.subscribe(tid)
        assert s.peer.needs_negotiation
        await s.renegotiate()
        assert not s.peer.needs_negotiation
    for s in subs:
        video = await s.frames(ids["video"], 5)
        assert video[-1].width == 640 and video[-1].height == 480
        audio = await s.frames(ids["audio"], 5)
        assert audio[-1].sample_rate == 48_000
    for c in [pub, *subs]:
        await c.close()
