"""The SFU (edge/sfu) with real aiortc peers on 127.0.0.1.

The test side encodes (aiortc's VP8/Opus encoders behind its MediaStreamTracks) and decodes
(reading a received track decodes it); the SFU in between only forwards packets. Media stays on
loopback: the SFU pins its candidates to [media] host, and the test peers' host gathering is
pinned to 127.0.0.1 (aioice leaves loopback out by default). No ICE servers anywhere.
"""

from __future__ import annotations

import fractions
import itertools
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
    ConnectionQuality,
    ParticipantLeft,
    Peer,
    PeerState,
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
        self._arrived = trio.Event()

    async def until(self, condition: Any, within: float = 10) -> None:
        """Wait until `condition()` holds, checking as packets arrive."""
        with trio.fail_after(within):
            while not condition():
                await self._arrived.wait()
                self._arrived = trio.Event()

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
                self._arrived.set()  # trio_asyncio: the same thread as Trio
                await _o(packet, arrival_time_ms)

            receiver._handle_rtp_packet = tap  # type: ignore[method-assign]
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
        assert isinstance(frame, AudioFrame)
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
    audio_info = next(t for t in sfu.tracks("r1") if t.kind == "audio")
    assert (audio_info.codec, audio_info.clock_rate, audio_info.channels) == ("opus", 48_000, 2)
    tapped: list[bytes] = []
    untap = sfu.tap("r1", ids["video"], "recorder", tapped.append)
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
    # The tap (what a recorder is fed): the track as a subscriber gets it, one SSRC, in order.
    untap()
    assert tapped and len({p[8:12] for p in tapped}) == 1
    seqs = [int.from_bytes(p[2:4], "big") for p in tapped]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs))
    # Quality is judged every 0.5 s here: on a saturated machine the test's own encoder can
    # starve for an interval, which the SFU rightly reports as "lost"; once media flows on
    # loopback without loss, the publisher's quality is excellent.
    quality = await pub.events.wait(
        ConnectionQuality, lambda e: e.participant == "alice" and e.quality != "lost"
    )
    assert quality.quality == "excellent" and quality.loss < 0.02
    await pub.events.wait(PeerState, lambda e: e.participant == "bob" and e.state == "connected")
    for c in [pub, *subs]:
        await c.close()


def receiver_of(client: Client, track_id: str) -> Any:
    mid = client.peer.mid_of(track_id)
    return next(t.receiver for t in client.pc.getTransceivers() if t.mid == mid)


def ssrc_of(client: Client, track_id: str) -> int:
    """The SSRC the SFU announced for `track_id` in the subscriber's description."""
    mid, current = client.peer.mid_of(track_id), ""
    for line in client.pc.remoteDescription.sdp.splitlines():
        if line.startswith("a=mid:"):
            current = line[6:]
        elif line.startswith("a=ssrc:") and current == mid:
            return int(line[7:].split()[0])
    raise AssertionError(f"no ssrc for {track_id}")


async def wait_packets(client: Client, ssrc: int, n: int, within: float = 10) -> None:
    await client.until(lambda: sum(1 for p in client.rtp if p[0] == ssrc) >= n, within)


async def publisher_and_subscriber(
    sfu: Sfu, room: str, *tracks: MediaStreamTrack
) -> tuple[Client, Client, dict[str, str]]:
    pub = Client(sfu, room, "alice")
    await pub.publish(*tracks)
    ids: dict[str, str] = {t.kind: t.track_id for t in pub.peer.tracks}
    sub = Client(sfu, room, "bob")
    for tid in ids.values():
        sub.peer.subscribe(tid)
    await sub.renegotiate()
    return pub, sub, ids


async def test_switching_publishers_keeps_ssrc_and_sequence_continuous(sfu: Sfu) -> None:
    pub1, sub, ids = await publisher_and_subscriber(sfu, "r2", VideoStreamTrack())
    pub2 = Client(sfu, "r2", "dave")
    await pub2.publish(VideoStreamTrack())
    (second,) = pub2.peer.tracks
    ssrc = ssrc_of(sub, ids["video"])
    await wait_packets(sub, ssrc, 30)
    before = len(sub.rtp)
    sub.peer.switch(ids["video"], second.track_id)
    assert sub.peer.subscriptions == (second.track_id,)
    await wait_packets(sub, ssrc, before + 30)
    # One SSRC throughout; sequence numbers without a gap or a jump at the switch;
    # timestamps moving forward (the new source's are offset onto the old ones).
    assert {p[0] for p in sub.rtp} == {ssrc}
    seqs = [p[1] for p in sub.rtp]
    unique = list(dict.fromkeys(seqs))
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(unique))
    ts_step = (sub.rtp[before][2] - sub.rtp[before - 1][2]) & 0xFFFFFFFF
    assert 0 < ts_step < 90_000  # under one second of the 90 kHz clock
    frames = await sub.frames(ids["video"], 3)  # the same m-line and track keep decoding
    assert frames[-1].width == 640
    for c in (pub1, pub2, sub):
        await c.close()


async def test_nack_is_answered_from_the_subscribers_history(sfu: Sfu) -> None:
    pub, sub, ids = await publisher_and_subscriber(sfu, "r3", VideoStreamTrack())
    ssrc = ssrc_of(sub, ids["video"])
    await wait_packets(sub, ssrc, 20)
    # Lose three packets on the subscriber's wire (SRTP leaves the RTP header in the clear):
    # its NACKs (aiortc's receiver sends them) must bring them back from the SFU's history.
    ice = receiver_of(sub, ids["video"]).transport.transport
    receive = ice._recv
    dropped: list[int] = []

    async def lossy() -> bytes:
        while True:
            data: bytes = await receive()
            is_media = len(data) > 12 and 128 <= data[0] < 192 and not 192 <= data[1] <= 223
            if is_media and int.from_bytes(data[8:12], "big") == ssrc and len(dropped) < 3:
                dropped.append(int.from_bytes(data[2:4], "big"))
                continue
            return data

    ice._recv = lossy
    await sub.until(lambda: len(dropped) == 3 and set(dropped) <= {p[1] for p in sub.rtp})
    (down,) = [s for s in sub.peer.stats() if s.direction == "down"]
    assert down.retransmitted >= 3
    for c in (pub, sub):
        await c.close()


async def test_subscriber_plis_reach_the_publisher_at_most_once_a_second(sfu: Sfu) -> None:
    pub, sub, ids = await publisher_and_subscriber(sfu, "r4", VideoStreamTrack())
    ssrc = ssrc_of(sub, ids["video"])
    await wait_packets(sub, ssrc, 10)
    sender = pub.pc.getSenders()[0]
    seen: list[float] = []
    original = sender._handle_rtcp_packet

    async def count(packet: Any) -> None:
        if getattr(packet, "fmt", None) == 1 and type(packet).__name__ == "RtcpPsfbPacket":
            seen.append(trio.current_time())
        await original(packet)

    sender._handle_rtcp_packet = count  # type: ignore[method-assign]
    receiver = receiver_of(sub, ids["video"])
    start = trio.current_time()
    while trio.current_time() - start < 2.5:
        await aio_as_trio(receiver._send_rtcp_pli)(ssrc)
        await trio.sleep(0.05)
    await trio.sleep(1.2)  # a request held back by the limit goes out when its turn comes
    assert 2 <= len(seen) <= 4, seen  # ~50 asked for in 2.5 s
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(seen)), seen
    for c in (pub, sub):
        await c.close()


async def test_active_speaker_from_the_audio_level_extension(sfu: Sfu) -> None:
    loud = Client(sfu, "r5", "alice")
    quiet = Client(sfu, "r5", "bob")
    await loud.publish(Tone())
    await quiet.publish(AudioStreamTrack())
    event = await quiet.events.wait(ActiveSpeakers, lambda e: len(e.speakers) > 0)
    assert [s.participant for s in event.speakers] == ["alice"]
    assert event.speakers[0].track_id == loud.peer.tracks[0].track_id
    loud.peer.mute(loud.peer.tracks[0].track_id)
    await quiet.events.wait(ActiveSpeakers, lambda e: e.speakers == ())
    for c in (loud, quiet):
        await c.close()


async def test_mute_stops_forwarding_and_tells_subscribers(sfu: Sfu) -> None:
    pub, sub, ids = await publisher_and_subscriber(sfu, "r6", VideoStreamTrack())
    ssrc = ssrc_of(sub, ids["video"])
    await wait_packets(sub, ssrc, 10)
    pub.peer.mute(ids["video"])
    event = await sub.events.wait(TrackMuted)
    assert (event.participant, event.track_id, event.muted) == ("alice", ids["video"], True)
    assert sfu.tracks("r6")[0].muted
    await trio.sleep(0.2)  # packets already in flight
    frozen = len(sub.rtp)
    await trio.sleep(0.7)
    assert len(sub.rtp) == frozen
    up = next(s for s in pub.peer.stats() if s.direction == "up")
    await trio.sleep(0.3)
    assert next(s for s in pub.peer.stats() if s.direction == "up").packets > up.packets
    pub.peer.mute(ids["video"], False)
    await sub.events.wait(TrackMuted, lambda e: not e.muted)
    await wait_packets(sub, ssrc, frozen + 10)
    for c in (pub, sub):
        await c.close()


async def test_unpublish_and_leave_remove_tracks(sfu: Sfu) -> None:
    pub, sub, ids = await publisher_and_subscriber(
        sfu, "r7", VideoStreamTrack(), AudioStreamTrack()
    )
    pub.peer.unpublish(ids["audio"])
    gone = await sub.events.wait(TrackUnpublished)
    assert gone.track_id == ids["audio"]
    assert sub.peer.subscriptions == (ids["video"],)
    assert sub.peer.needs_negotiation
    await sub.renegotiate()  # the audio m-line goes inactive, the video one stays
    assert not sub.peer.needs_negotiation
    sdp = sub.pc.remoteDescription.sdp
    audio = sdp[sdp.index("m=audio") :]
    # Kept in the BUNDLE group (port 9, inactive), never rejected: see edge/sfu/_sfu.py.
    assert audio.startswith("m=audio 9 ") and "a=inactive" in audio
    assert "a=group:BUNDLE 0 1" in sdp
    await sub.frames(ids["video"], 2)
    with pytest.raises(GB6Error) as err:
        sub.peer.subscribe(ids["audio"])
    assert err.value.code == "not_found"
    await pub.close()
    left = await sub.events.wait(ParticipantLeft)
    assert left.participant == "alice"
    assert sfu.tracks("r7") == () and sfu.participants("r7") == ("bob",)
    assert sub.peer.subscriptions == ()
    await sub.close()
    assert sfu.participants("r7") == ()


async def offer_of(*tracks: MediaStreamTrack) -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    for t in tracks:
        pc.addTrack(t)

    async def make() -> str:
        await pc.setLocalDescription(await pc.createOffer())
        return str(pc.localDescription.sdp)

    return pc, await aio_as_trio(make)()


async def refused(code: str, call: Any, *args: Any) -> str:
    with pytest.raises(GB6Error) as err:
        result = call(*args)
        if hasattr(result, "__await__"):
            await result
    assert err.value.code == code, err.value
    return err.value.message


async def test_bad_input_is_refused_and_the_room_keeps_working() -> None:
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        sfu = Sfu(media_config(tracks_per_participant=2, participants_per_room=2))
        await nursery.start(sfu.run)
        peer = sfu.join("bad", "mallory", Events())
        pc, offer = await offer_of(VideoStreamTrack(), VideoStreamTrack(), AudioStreamTrack())
        assert "v=0" in await refused("invalid", peer.answer, "hello")
        assert "no media" in await refused("invalid", peer.answer, "v=0\r\ns=-\r\nt=0 0\r\n")
        no_bundle = "".join(x for x in offer.splitlines(True) if "a=group:BUNDLE" not in x)
        assert "BUNDLE" in await refused("invalid", peer.answer, no_bundle)
        assert "larger" in await refused("invalid", peer.answer, offer + "a=x:" + "y" * 70_000)
        assert "too many tracks" in await refused("quota_exceeded", peer.answer, offer)
        assert peer.tracks == () and sfu.tracks("bad") == ()
        await refused("not_found", peer.subscribe, "tr_nope")
        await refused("not_found", peer.unpublish, "tr_nope")
        await refused("not_found", peer.mute, "tr_nope")
        await refused("invalid", peer.publish, "smell", "camera")
        await refused("invalid", peer.publish, "video", "hologram")
        await refused("invalid", peer.add_ice_candidate, "candidate:garbage")
        mdns = "candidate:1 1 udp 2130706431 3f2a.local 5000 typ host"
        await refused("invalid", peer.add_ice_candidate, mdns)
        await refused("conflict", sfu.join, "bad", "mallory", Events())
        await aio_as_trio(pc.close)()

        # The same room, right after: a publisher and a subscriber work.
        pub = Client(sfu, "bad", "alice")
        await refused("quota_exceeded", sfu.join, "bad", "eve", Events())
        assert pub.peer.publish("video", "screen")
        await pub.publish(VideoStreamTrack())
        (track,) = pub.peer.tracks
        assert track.source == "screen"
        await peer.leave()
        sub = Client(sfu, "bad", "bob")
        sub.peer.subscribe(track.track_id)
        await sub.renegotiate()
        assert (await sub.frames(track.track_id, 2))[-1].width == 640
        for c in (pub, sub):
            await c.close()
        nursery.cancel_scope.cancel()


class Wire:
    """A sink that keeps what the forwarding core sends."""

    def __init__(self) -> None:
        self.rtp: list[bytes] = []
        self.rtcp: list[bytes] = []

    def send_rtp(self, data: bytes) -> None:
        self.rtp.append(data)

    def send_rtcp(self, data: bytes) -> None:
        self.rtcp.append(data)


def vp8_packet(seq: int, ts: int, ssrc: int, key: bool) -> bytes:
    header = bytes([0x80, 96]) + seq.to_bytes(2, "big") + ts.to_bytes(4, "big")
    return header + ssrc.to_bytes(4, "big") + bytes([0x10, 0x00 if key else 0x01]) + b"x" * 20


def vp8_uptrack(publisher: Wire) -> Any:
    """A published VP8 camera (SSRC 1234) whose feedback goes to `publisher`: one keyframe
    request a second at most, REMB capped at 2 Mbit/s."""
    from edge.sfu._events import TrackInfo
    from edge.sfu._forward import UpTrack

    up = UpTrack(
        TrackInfo("tr_1", "alice", "video", "camera", "vp8"),
        codec_pt=96,
        clock_rate=90_000,
        feedback=publisher,
        keyframe_interval=1.0,
        remb_cap=2_000_000,
    )
    up.ssrcs.add(1234)
    return up


def test_core_remb_is_the_minimum_over_subscribers_capped_and_video_starts_on_a_keyframe() -> None:
    from aiortc import rtp as artp

    from edge.sfu._forward import DownTrack
    from edge.sfu._rtp import RtpIn

    publisher = Wire()
    up = vp8_uptrack(publisher)
    wires = [Wire(), Wire()]
    downs = [DownTrack(up, f"s{i}", w, 100 + i, 64) for i, w in enumerate(wires)]
    for d in downs:
        up.add(d)
        up.activate(d, now=0.0)
    assert len(publisher.rtcp) == 1  # one PLI for both subscribers (the limit)
    up.on_rtp(RtpIn(vp8_packet(10, 1000, 1234, key=False)), 0.1)
    assert wires[0].rtp == []  # no keyframe yet
    up.on_rtp(RtpIn(vp8_packet(11, 4000, 1234, key=True)), 0.2)
    up.on_rtp(RtpIn(vp8_packet(12, 4000, 1234, key=False)), 0.2)
    out = [RtpIn(p) for p in wires[1].rtp]
    assert [p.ssrc for p in out] == [101, 101] and out[1].seq == (out[0].seq + 1) & 0xFFFF
    downs[0].remb_bps, downs[1].remb_bps = 5_000_000, 3_000_000
    up.tick(2.0, remb_interval=1.0)
    (remb,) = artp.RtcpPacket.parse(publisher.rtcp[-1])
    assert isinstance(remb, artp.RtcpPsfbPacket)
    assert artp.unpack_remb_fci(remb.fci) == (2_000_000, [1234])  # min 3 Mbit/s, capped at 2
    downs[1].remb_bps = 1_000_000
    up.tick(3.1, remb_interval=1.0)
    (remb,) = artp.RtcpPacket.parse(publisher.rtcp[-1])
    assert isinstance(remb, artp.RtcpPsfbPacket)
    assert artp.unpack_remb_fci(remb.fci)[0] == 1_000_000


def test_core_a_video_subscription_asks_again_until_its_keyframe_comes() -> None:
    """The PLI sent when a subscription starts may be lost, or its keyframe may be: while the
    subscription drops packets waiting for one it keeps asking, once per interval."""
    from edge.sfu._forward import DownTrack
    from edge.sfu._rtp import RtpIn

    publisher, wire = Wire(), Wire()
    up = vp8_uptrack(publisher)
    down = DownTrack(up, "s0", wire, 100, 64)
    up.add(down)
    up.activate(down, now=0.0)
    assert len(publisher.rtcp) == 1  # the first request: its answer never comes
    for i in range(20):  # 2 s of delta frames
        up.on_rtp(RtpIn(vp8_packet(10 + i, 1000 + 9000 * i, 1234, key=False)), 0.1 * (i + 1))
        up.tick(0.1 * (i + 1), remb_interval=60.0)
    assert wire.rtp == []
    assert len(publisher.rtcp) == 3  # at 1.0 and 2.0 s: once per interval, not per packet
    up.on_rtp(RtpIn(vp8_packet(30, 190_000, 1234, key=True)), 2.1)
    up.on_rtp(RtpIn(vp8_packet(31, 199_000, 1234, key=False)), 2.2)
    up.tick(3.5, remb_interval=60.0)
    assert len(wire.rtp) == 2 and len(publisher.rtcp) == 3  # started: no more requests


def test_media_config_is_read_and_checked(tmp_path: Any) -> None:
    from node.config import load

    path = tmp_path / "node.toml"
    path.write_text(
        "[media]\nhost = '127.0.0.1'\nudp_port_min = 41000\nudp_port_max = 41999\n"
        "ice_servers = [{urls = 'turn:127.0.0.1:3478', username = 'u', credential = 'p'}]\n"
    )
    media = load(path, {}).media
    assert (media.udp_port_min, media.udp_port_max) == (41000, 41999)
    assert media.ice_servers[0].urls == ("turn:127.0.0.1:3478",)
    assert load(None, {}).media.ice_servers == ()  # none unless configured: no public STUN
    path.write_text("[media]\nudp_port_min = 5000\nudp_port_max = 4000\n")
    with pytest.raises(GB6Error):
        load(path, {})


async def test_renegotiation_adds_a_screen_share_to_a_running_session(sfu: Sfu) -> None:
    pub, sub, ids = await publisher_and_subscriber(sfu, "r8", VideoStreamTrack())
    await sub.frames(ids["video"], 2)
    screen = pub.peer.publish("video", "screen")
    await pub.publish(VideoStreamTrack())  # a second offer on the same transport
    shared = await sub.events.wait(TrackPublished, lambda e: e.track.source == "screen")
    assert shared.track.track_id == screen
    sub.peer.subscribe(screen)
    await sub.renegotiate()
    assert (await sub.frames(screen, 2))[-1].width == 640
    assert (await sub.frames(ids["video"], 2))[-1].width == 640  # the camera kept flowing
    for c in (pub, sub):
        await c.close()


async def test_a_receive_only_client_offer_takes_its_subscriptions_whep_style(sfu: Sfu) -> None:
    pub = Client(sfu, "r9", "host")
    await pub.publish(VideoStreamTrack(), AudioStreamTrack())
    viewer = Client(sfu, "r9", "viewer")
    for track in pub.peer.tracks:
        viewer.peer.subscribe(track.track_id)
    viewer.pc.addTransceiver("video", direction="recvonly")
    viewer.pc.addTransceiver("audio", direction="recvonly")
    await aio_as_trio(viewer._local_offer)()
    answer = await viewer.peer.answer(viewer.pc.localDescription.sdp)
    assert answer.count("a=sendonly") == 2 and "a=msid:host " in answer
    await aio_as_trio(viewer.pc.setRemoteDescription)(RTCSessionDescription(answer, "answer"))
    assert not viewer.peer.needs_negotiation
    receivers = {t.kind: t.receiver.track for t in viewer.pc.getTransceivers()}
    with trio.fail_after(15):
        frame = await aio_as_trio(receivers["video"].recv)()
        assert frame.width == 640
        await aio_as_trio(receivers["audio"].recv)()
    for c in (pub, viewer):
        await c.close()


async def test_trickled_candidates_connect_a_publisher(sfu: Sfu) -> None:
    pub = Client(sfu, "r10", "alice")
    pub.pc.addTrack(VideoStreamTrack())
    await aio_as_trio(pub._local_offer)()
    lines = pub.pc.localDescription.sdp.splitlines(True)
    trickled = [x.strip()[2:] for x in lines if x.startswith("a=candidate:")]
    assert trickled
    await pub.peer.add_ice_candidate(trickled[0])  # before the offer: kept for later
    bare = "".join(x for x in lines if not x.startswith(("a=candidate:", "a=end-of-candidates")))
    answer = await pub.peer.answer(bare)
    await aio_as_trio(pub.pc.setRemoteDescription)(RTCSessionDescription(answer, "answer"))
    for cand in trickled[1:]:
        await pub.peer.add_ice_candidate(cand)
    await pub.peer.add_ice_candidate(None)
    await pub.events.wait(PeerState, lambda e: e.participant == "alice" and e.state == "connected")
    sub = Client(sfu, "r10", "bob")
    (track,) = pub.peer.tracks
    sub.peer.subscribe(track.track_id)
    await sub.renegotiate()
    assert (await sub.frames(track.track_id, 2))[-1].width == 640
    for c in (pub, sub):
        await c.close()


async def test_a_flood_of_datagrams_before_ice_is_bounded() -> None:
    """Anyone can send to a candidate's port: aioice queues every datagram that is not STUN for
    its `recv`, unbounded; the SFU's connection keeps at most `_ICE_QUEUE` and drops the rest."""
    import socket

    from edge.sfu._transport import _ICE_QUEUE, _PinnedConnection

    async with trio_asyncio.open_loop():
        conn = _PinnedConnection(media_config())
        await aio_as_trio(conn.gather_candidates)()
        port = conn.local_candidates[0].port
        sent = 3 * _ICE_QUEUE
        with trio.socket.socket(type=socket.SOCK_DGRAM) as sock:
            for i in range(sent):
                # A DTLS application-data record header, then junk: not STUN, not SRTP.
                await sock.sendto(b"\x17\xfe\xfd" + i.to_bytes(4, "big"), (HOST, port))
                if i % 64 == 63:
                    await trio.sleep(0.001)  # let the loop read: the kernel must not drop them
        with trio.fail_after(5):
            # aioice offers no signal for a queued datagram: poll.
            while conn.dropped_datagrams + conn._queue.qsize() < sent:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert conn._queue.qsize() == _ICE_QUEUE
        assert conn.dropped_datagrams == sent - _ICE_QUEUE
        await aio_as_trio(conn.close)()
