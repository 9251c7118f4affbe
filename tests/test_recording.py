"""Recording without transcoding (edge/recording): real RTP in, files ffprobe reads out.

The test side makes real media: aiortc's own encoders and packetizers (Vp8Encoder, H264Encoder,
OpusEncoder) encode 10 s of generated frames as fast as they can, and each payload goes into an
aiortc RtpPacket with its sequence number, timestamp and SSRC. Sequence numbers and timestamps
start just before they wrap. `arrival` is the media time plus a little jitter, so the manifest's
timeline is checked without waiting 10 s. The edge side (the Recorder) neither decodes nor
encodes; ffprobe decodes every file (`-count_frames`) and must report no error.
"""

from __future__ import annotations

import fractions
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import av
import numpy
import orjson
import pytest
import trio
import trio.testing
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder, VpxPayloadDescriptor, vp8_depayload
from aiortc.rtp import RtpPacket as AiortcRtp

from edge.recording import Manifest, Recorder, TrackFile
from edge.recording._h264 import sps_size
from edge.recording._reorder import ReorderBuffer
from edge.recording._rtp import RtpPacket
from edge.recording._vp8 import strip_descriptor
from node.config import Limits
from node.errors import GB6Error
from origin.blobs import LocalBlobStore
from tests.services import require_tool

SECONDS = 10
FPS = 30
FRAMES = SECONDS * FPS  # 300 video frames
PACKETS_OPUS = SECONDS * 50  # 500 Opus packets of 20 ms
WIDTH, HEIGHT = 320, 180  # 180 is not a multiple of 16: the H.264 SPS crops
KEY_EVERY = 30  # frames between forced keyframes (loss tests recover at the next one)


@attrs.frozen
class Sent:
    """One RTP packet as the SFU would hand it over."""

    data: bytes
    arrival: float  # seconds after the stream's first packet
    frame: int  # index of the frame (video) or Opus packet it belongs to
    key: bool = False  # part of a video keyframe (VP8 key frame, H.264 IDR)


def _is_key(codec: str, payload: bytes) -> bool:
    """Told apart on the test side with aiortc's depayloader (VP8) or the NAL unit types."""
    if codec == "vp8":
        data = vp8_depayload(payload)
        return bool(data) and not data[0] & 1 and data[3:6] == b"\x9d\x01\x2a"
    kind = payload[0] & 0x1F
    if kind == 24:  # STAP-A: 16-bit size, NAL unit, ...
        types, pos = [], 1
        while pos < len(payload):
            types.append(payload[pos + 2] & 0x1F)
            pos += 2 + int.from_bytes(payload[pos : pos + 2], "big")
        return 5 in types
    return (payload[1] & 0x1F if kind == 28 else kind) == 5


def _rtp(payload: bytes, *, seq: int, ts: int, ssrc: int, marker: bool, pt: int) -> bytes:
    p = AiortcRtp(
        payload_type=pt,
        marker=int(marker),
        sequence_number=seq & 0xFFFF,
        timestamp=ts & 0xFFFFFFFF,
        ssrc=ssrc,
    )
    p.payload = payload
    return bytes(p.serialize())


def _video(codec: str, ssrc: int) -> list[Sent]:
    encoder = Vp8Encoder() if codec == "vp8" else H264Encoder()
    seq, ts0 = 65_400, (1 << 32) - 90_000 * 3  # both wrap a few seconds in
    out: list[Sent] = []
    noise = numpy.random.default_rng(7).integers(0, 256, (48, 96), numpy.uint8)
    for i in range(FRAMES):
        luma = numpy.full((HEIGHT, WIDTH), (i * 3) % 256, numpy.uint8)
        luma[(i * 2) % (HEIGHT - 20) :][:20] = 255  # a moving bar
        luma[:48, :96] = noise  # detail: keyframes span packets (VP8 continuations, FU-A)
        chroma = numpy.full((HEIGHT // 2, WIDTH), 128, numpy.uint8)
        frame = av.VideoFrame.from_ndarray(numpy.vstack([luma, chroma]), format="yuv420p")
        frame.pts, frame.time_base = i * 3000, fractions.Fraction(1, 90_000)
        payloads, ts = encoder.encode(frame, force_keyframe=i % KEY_EVERY == 0)
        for k, payload in enumerate(payloads):
            last = k == len(payloads) - 1
            data = _rtp(payload, seq=seq, ts=ts0 + ts, ssrc=ssrc, marker=last, pt=97)
            out.append(Sent(data, i / FPS + 0.001 * k, i, _is_key(codec, payload)))
            seq += 1
    return out


def _opus(ssrc: int) -> list[Sent]:
    encoder = OpusEncoder()
    seq, ts0 = 65_500, (1 << 32) - 48_000
    out: list[Sent] = []
    t = numpy.arange(960) / 48_000
    for i in range(PACKETS_OPUS):
        tone = (numpy.sin(2 * numpy.pi * 440 * (t + i * 0.02)) * 8000).astype(numpy.int16)
        frame = av.AudioFrame.from_ndarray(
            numpy.stack([tone, tone]).T.reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate, frame.pts = 48_000, i * 960
        frame.time_base = fractions.Fraction(1, 48_000)
        payloads, ts = encoder.encode(frame)
        for payload in payloads:
            data = _rtp(payload, seq=seq, ts=ts0 + ts, ssrc=ssrc, marker=False, pt=96)
            out.append(Sent(data, ts / 48_000, i))
            seq += 1
    return out


@pytest.fixture(scope="module")
def media() -> dict[str, list[Sent]]:
    """10 s of each codec, encoded once for the whole module (about a second of CPU)."""
    made = {"vp8": _video("vp8", 0x1111), "h264": _video("h264", 0x2222), "opus": _opus(0x3333)}
    # Every packetization the depacketizers handle is in there: VP8 frames over several
    # packets, H.264 STAP-A (SPS, PPS, IDR), FU-A and single NAL unit packets.
    assert any(a.frame == b.frame for a, b in zip(made["vp8"], made["vp8"][1:], strict=False))
    kinds = {RtpPacket.parse(s.data).payload[0] & 0x1F for s in made["h264"]}
    assert {24, 28} <= kinds and kinds & set(range(1, 24)), kinds
    return made


@pytest.fixture
def ffprobe() -> str:
    return require_tool("ffprobe")


async def probe(ffprobe: str, path: Path) -> dict[str, Any]:
    """ffprobe decodes every frame; any complaint on stderr fails the test."""
    result = await trio.run_process(
        [
            ffprobe,
            *("-v", "error", "-count_frames", "-of", "json"),
            *("-show_entries", "stream=codec_name,nb_read_frames,width,height,channels"),
            *("-show_entries", "format=duration,format_name"),
            str(path),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b"", result.stderr.decode()
    info: dict[str, Any] = json.loads(result.stdout)
    return info


async def probe_all(ffprobe: str, paths: list[Path]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{} for _ in paths]

    async def one(i: int) -> None:
        results[i] = await probe(ffprobe, paths[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(paths)):
            nursery.start_soon(one, i)
    return results


def interleave(streams: dict[str, list[Sent]], offsets: dict[str, float]) -> list[tuple[str, Sent]]:
    """Every stream's packets merged by arrival, each stream shifted by its offset (seconds)."""
    merged = [
        (s.arrival + offsets.get(track, 0.0), track, s)
        for track, sent in streams.items()
        for s in sent
    ]
    merged.sort(key=lambda m: m[0])
    return [(track, s) for _, track, s in merged]


async def record(
    blobs: LocalBlobStore,
    limits: Limits,
    tracks: dict[str, tuple[str, list[Sent]]],
    *,
    offsets: dict[str, float] | None = None,
) -> Manifest:
    """Start a Recorder, add `tracks` (id -> (codec, packets)), feed them as they would arrive
    (yielding now and then, as a forwarder does), stop, and return the manifest."""
    recorder = Recorder("room_test", blobs, limits)
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        for track_id, (codec, _) in tracks.items():
            recorder.add_track(track_id, codec)
        base = time.monotonic()
        order = interleave({t: sent for t, (_, sent) in tracks.items()}, offsets or {})
        for n, (track_id, s) in enumerate(order):
            recorder.feed(track_id, s.data, base + s.arrival + (offsets or {}).get(track_id, 0))
            if n % 64 == 63:
                await trio.lowlevel.checkpoint()  # the forwarder yields; the recorder keeps up
        recorder.stop()
    manifest = await recorder.wait()
    assert recorder.statistics().dropped == 0
    return manifest


def path_of(blobs: LocalBlobStore, track: TrackFile) -> Path:
    assert track.file is not None
    return blobs.path(track.file)


# --- ten seconds of each codec ------------------------------------------------------------


async def test_ten_seconds_of_vp8_opus_h264_play_with_the_right_codecs_and_frames(
    tmp_path: Path, media: dict[str, list[Sent]], ffprobe: str
) -> None:
    blobs = LocalBlobStore(tmp_path)
    manifest = await record(
        blobs,
        Limits(),
        {
            "cam": ("vp8", media["vp8"]),
            "mic": ("opus", media["opus"]),
            "h": ("h264", media["h264"]),
        },
        offsets={"cam": 0.5, "h": 1.25},  # video joined the room's timeline later than audio
    )
    tracks = {t.id: t for t in manifest.tracks}
    assert set(tracks) == {"cam", "mic", "h"}
    infos = await probe_all(ffprobe, [path_of(blobs, tracks[t]) for t in ("cam", "mic", "h")])
    expected = {"cam": ("vp8", FRAMES), "mic": ("opus", PACKETS_OPUS), "h": ("h264", FRAMES)}
    for track_id, info in zip(("cam", "mic", "h"), infos, strict=True):
        codec, frames = expected[track_id]
        stream = info["streams"][0]
        assert stream["codec_name"] == codec
        assert int(stream["nb_read_frames"]) == frames
        assert abs(float(info["format"]["duration"]) - SECONDS) < 1.0
        t = tracks[track_id]
        assert t.frames == frames and t.lost == 0 and t.dropped_frames == 0
        assert abs(t.duration_ms - SECONDS * 1000) < 100
        assert t.bytes == path_of(blobs, t).stat().st_size
        if codec != "opus":
            assert (stream["width"], stream["height"]) == (WIDTH, HEIGHT)
    assert tracks["cam"].container == "webm" and tracks["h"].content_type == "video/mp4"
    assert tracks["mic"].container == "ogg" and infos[1]["streams"][0]["channels"] == 2
    # The timeline: each track's start on the room's clock, from arrivals and RTP timestamps.
    mic = tracks["mic"].start_ms
    assert mic is not None and mic < 200
    assert abs((tracks["cam"].start_ms or 0) - mic - 500) <= 25
    assert abs((tracks["h"].start_ms or 0) - mic - 1250) <= 25
    # The manifest is in the blob store too, as documented in docs/protocol.md.
    stored = orjson.loads(blobs.path(manifest.id).read_bytes())
    assert stored == manifest.to_json()
    assert stored["version"] == 1 and stored["room"] == "room_test"
    assert stored["started_at"] <= stored["stopped_at"] and stored["stop_reason"] == "stopped"


async def test_opus_in_webm_plays(
    tmp_path: Path, media: dict[str, list[Sent]], ffprobe: str
) -> None:
    blobs = LocalBlobStore(tmp_path)
    recorder = Recorder("room_test", blobs, Limits())
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        recorder.add_track("mic", "audio/opus", container="webm")
        for s in media["opus"]:
            recorder.feed("mic", s.data, s.arrival)
        recorder.stop()
    (track,) = (await recorder.wait()).tracks
    (info,) = await probe_all(ffprobe, [path_of(blobs, track)])
    assert info["streams"][0]["codec_name"] == "opus"
    assert int(info["streams"][0]["nb_read_frames"]) == PACKETS_OPUS
    assert abs(float(info["format"]["duration"]) - SECONDS) < 1.0
    assert "webm" in info["format"]["format_name"]


# --- loss, reordering, duplicates, garbage ------------------------------------------------


def damage(
    sent: list[Sent], *, lose_in_frames: set[int], rng: random.Random
) -> tuple[list[Sent], int]:
    """Lose one packet in each frame of `lose_in_frames`; swap neighbours and duplicate packets
    here and there (all within the reorder window). Returns the packets and how many were lost."""
    out: list[Sent] = []
    lost = 0
    for s in sent:
        if s.frame in lose_in_frames and not any(o.frame == s.frame for o in out[-3:]):
            lose_in_frames = lose_in_frames - {s.frame}
            lost += 1
            continue
        out.append(s)
    for i in range(0, len(out) - 1, 7):
        out[i], out[i + 1] = out[i + 1], out[i]
    for i in rng.sample(range(len(out)), len(out) // 20):
        out.insert(i, out[i])  # duplicates
    return out, lost


def surviving_frames(sent: list[Sent], broken: set[int]) -> int:
    """Frames left when each broken frame and those after it up to the next keyframe go."""
    keys = sorted({s.frame for s in sent if s.key})
    gone = set()
    for f in broken:
        gone |= set(range(f, next((k for k in keys if k > f), FRAMES)))
    return FRAMES - len(gone)


async def test_loss_and_reordering_leave_files_that_play(
    tmp_path: Path, media: dict[str, list[Sent]], ffprobe: str
) -> None:
    """A lost packet drops its frame and everything up to the next keyframe (the decoder
    never sees a broken reference); reordered and duplicated packets are put back in order;
    an Opus gap is filled with "lost frame" packets so the Ogg file keeps its length."""
    rng = random.Random(5)
    broken = {45, 200}
    assert not any(s.key for s in media["vp8"] + media["h264"] if s.frame in broken)
    vp8, vp8_lost = damage(media["vp8"], lose_in_frames=broken, rng=rng)
    h264, h264_lost = damage(media["h264"], lose_in_frames=broken, rng=rng)
    opus = [s for s in media["opus"] if not 100 <= s.frame < 110]  # 200 ms of silence
    for i in range(0, len(opus) - 1, 5):
        opus[i], opus[i + 1] = opus[i + 1], opus[i]
    garbage = [Sent(b"\x00" * 5, 0.0, 0), Sent(b"\x80\x60", 0.0, 0), Sent(b"\xbf" * 40, 0.0, 0)]
    blobs = LocalBlobStore(tmp_path)
    manifest = await record(
        blobs,
        Limits(),
        {"v": ("vp8", garbage + vp8), "h": ("h264", h264), "a": ("opus", opus + garbage)},
    )
    tracks = {t.id: t for t in manifest.tracks}
    expected = {
        "v": surviving_frames(media["vp8"], broken),
        "h": surviving_frames(media["h264"], broken),
    }
    assert all(n < FRAMES - 10 for n in expected.values())
    infos = await probe_all(ffprobe, [path_of(blobs, tracks[t]) for t in ("v", "h", "a")])
    for track_id, info in zip(("v", "h"), infos[:2], strict=True):
        assert int(info["streams"][0]["nb_read_frames"]) == expected[track_id]
        assert abs(float(info["format"]["duration"]) - SECONDS) < 1.0
        assert tracks[track_id].frames == expected[track_id]
    assert tracks["v"].lost == vp8_lost == 2 and tracks["h"].lost == h264_lost == 2
    assert tracks["v"].late > 0  # the duplicates
    assert tracks["v"].malformed == 3 and tracks["a"].malformed == 3
    audio = infos[2]
    assert int(audio["streams"][0]["nb_read_frames"]) == PACKETS_OPUS  # 490 + 10 filled
    assert abs(float(audio["format"]["duration"]) - SECONDS) < 0.05
    assert tracks["a"].lost == 10


# --- tracks coming and going, limits, bad input -------------------------------------------


class WatchedBlobs(LocalBlobStore):
    """The real blob store, telling the test which blob was just written."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.written: list[str] = []
        self.changed = trio.Event()

    async def put(self, blob_id: str, data: bytes) -> None:
        await super().put(blob_id, data)
        self.written.append(blob_id)
        self.changed.set()
        self.changed = trio.Event()


async def test_a_removed_track_is_written_at_once_and_can_come_back(
    tmp_path: Path, media: dict[str, list[Sent]], ffprobe: str
) -> None:
    blobs = WatchedBlobs(tmp_path)
    recorder = Recorder("room_test", blobs, Limits())
    half = len(media["opus"]) // 2
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        recorder.add_track("mic", "opus")
        for s in media["opus"][:half]:
            recorder.feed("mic", s.data, s.arrival)
        recorder.remove_track("mic")
        recorder.feed("mic", media["opus"][half].data)  # after removal: counted, not recorded
        while not blobs.written:
            await blobs.changed.wait()
        recorder.add_track("mic", "opus")  # republished: a second file
        for s in media["opus"][half:]:
            recorder.feed("mic", s.data, s.arrival)
        recorder.stop()
    manifest = await recorder.wait()
    first, second = manifest.tracks
    assert first.file == blobs.written[0] and first.frames == half
    assert second.frames == len(media["opus"]) - half
    assert manifest.unknown_packets == 1
    assert blobs.written[-1] == manifest.id  # the manifest comes last
    infos = await probe_all(ffprobe, [path_of(blobs, first), path_of(blobs, second)])
    assert [int(i["streams"][0]["nb_read_frames"]) for i in infos] == [half, half]


class HeldBlobs(WatchedBlobs):
    """Holds the write of the Ogg file (the opus track's) until `release` is set (an origin
    briefly unreachable)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = trio.Event()
        self.held: str | None = None

    async def put(self, blob_id: str, data: bytes) -> None:
        if data.startswith(b"OggS"):
            self.held = blob_id
            await self.release.wait()
        await super().put(blob_id, data)


async def test_a_file_slow_to_store_holds_up_no_other_track(
    tmp_path: Path, media: dict[str, list[Sent]]
) -> None:
    """A removed track's file is written while the other tracks go on being recorded: none of
    their packets is dropped while the write waits."""
    blobs = HeldBlobs(tmp_path)
    recorder = Recorder("room_test", blobs, Limits(recording_queue_packets=64))
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        recorder.add_track("mic", "opus")
        recorder.add_track("cam", "vp8")
        for s in media["opus"][:32]:
            recorder.feed("mic", s.data, s.arrival)
        recorder.remove_track("mic")
        await trio.testing.wait_all_tasks_blocked()
        assert blobs.held is not None and not blobs.written  # the mic's file, waiting
        for i, s in enumerate(media["vp8"]):
            recorder.feed("cam", s.data, s.arrival)
            if i % 32 == 31:  # never more than the queue holds between two turns of the loop
                await trio.testing.wait_all_tasks_blocked()
        assert recorder.statistics().dropped == 0
        blobs.release.set()
        recorder.stop()
    manifest = await recorder.wait()
    mic, cam = manifest.tracks
    assert mic.file == blobs.held and mic.frames == 32
    assert cam.file is not None and cam.frames == FRAMES and cam.dropped_packets == 0


async def test_a_file_not_stored_in_time_leaves_the_manifest_its_share(
    tmp_path: Path, media: dict[str, list[Sent]]
) -> None:
    """At the stop, a file whose write does not end (an origin unreachable) is given up in
    time for the manifest to be written, naming the file `store_failed`."""
    blobs = HeldBlobs(tmp_path)  # the mic's file is never written
    recorder = Recorder("room_test", blobs, Limits(recording_finish_s=1.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        recorder.add_track("mic", "opus")
        recorder.add_track("cam", "vp8")
        for s in media["opus"][:50]:
            recorder.feed("mic", s.data, s.arrival)
        for s in media["vp8"][:60]:
            recorder.feed("cam", s.data, s.arrival)
        recorder.stop()
    manifest = await recorder.wait()
    mic, cam = manifest.tracks
    assert (mic.file, mic.error) == (None, "store_failed") and mic.frames == 50
    assert cam.file is not None and cam.error is None
    assert blobs.written == [cam.file, manifest.id]


async def test_bad_calls_get_clear_errors_and_change_nothing(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    recorder = Recorder("room_test", blobs, Limits(recording_tracks=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        recorder.add_track("a", "opus")
        cases: list[tuple[Callable[[], None], str]] = [
            (lambda: recorder.add_track("x", "video/AV1"), "invalid"),
            (lambda: recorder.add_track("x", "vp8", container="mp4"), "invalid"),
            (lambda: recorder.add_track("", "vp8"), "invalid"),
            (lambda: recorder.add_track("x" * 129, "vp8"), "invalid"),
            (lambda: recorder.add_track("x", "opus", channels=3), "invalid"),
            (lambda: recorder.add_track("a", "opus"), "conflict"),
            (lambda: recorder.remove_track("nope"), "not_found"),
        ]
        for call, code in cases:
            with pytest.raises(GB6Error) as err:
                call()
            assert err.value.code == code
        recorder.add_track("b", "vp8")
        with pytest.raises(GB6Error) as err:
            recorder.add_track("c", "h264")
        assert err.value.code == "quota_exceeded"
        recorder.feed("zzz", b"\x80" * 20)  # unknown track: counted, nothing raised
        assert recorder.statistics().unknown == 1 and recorder.statistics().tracks == 2
        recorder.stop()
    manifest = await recorder.wait()
    assert [t.id for t in manifest.tracks] == ["a", "b"]
    assert all(t.file is None and t.start_ms is None for t in manifest.tracks)  # no media
    with pytest.raises(GB6Error) as err:
        recorder.add_track("d", "opus")
    assert err.value.code == "conflict"


async def test_a_full_queue_drops_and_counts_instead_of_blocking_the_forwarder(
    tmp_path: Path, media: dict[str, list[Sent]], ffprobe: str
) -> None:
    blobs = LocalBlobStore(tmp_path)
    recorder = Recorder("room_test", blobs, Limits(recording_queue_packets=64))
    recorder.add_track("mic", "opus")
    for s in media["opus"]:  # before the recorder runs: nothing drains the queue
        recorder.feed("mic", s.data, s.arrival)
    assert recorder.statistics().dropped == PACKETS_OPUS - 64
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        recorder.stop()
    (track,) = (await recorder.wait()).tracks
    assert track.dropped_packets == PACKETS_OPUS - 64 and track.frames == 64
    (info,) = await probe_all(ffprobe, [path_of(blobs, track)])
    assert int(info["streams"][0]["nb_read_frames"]) == 64


async def test_byte_and_duration_limits(
    tmp_path: Path, media: dict[str, list[Sent]], ffprobe: str
) -> None:
    blobs = LocalBlobStore(tmp_path)
    limits = Limits(recording_track_bytes=60_000, recording_max_duration_s=0.3)
    recorder = Recorder("room_test", blobs, limits)
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        recorder.add_track("cam", "vp8")
        recorder.add_track("h", "h264")
        for s in media["vp8"]:
            recorder.feed("cam", s.data, s.arrival)
        for s in media["h264"]:
            recorder.feed("h", s.data, s.arrival)
    manifest = await recorder.wait()  # stopped itself at the duration limit
    assert manifest.stop_reason == "max_duration"
    tracks = {t.id: t for t in manifest.tracks}
    infos = await probe_all(ffprobe, [path_of(blobs, tracks["cam"]), path_of(blobs, tracks["h"])])
    for t, info in zip(tracks.values(), infos, strict=True):
        assert t.truncated == "max_bytes" and 0 < t.bytes <= 60_000
        assert 0 < t.frames < FRAMES
        assert int(info["streams"][0]["nb_read_frames"]) == t.frames


async def test_cancelling_the_recorder_still_writes_the_files(
    tmp_path: Path, media: dict[str, list[Sent]], ffprobe: str
) -> None:
    """An edge shutting down cancels its recorders: what was recorded is finished, not lost."""
    blobs = LocalBlobStore(tmp_path)
    recorder = Recorder("room_test", blobs, Limits())
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(recorder.run)
            recorder.add_track("cam", "vp8")
            for s in media["vp8"][:200]:
                recorder.feed("cam", s.data, s.arrival)
            await trio.lowlevel.checkpoint()
            scope.cancel()
    manifest = await recorder.wait()
    assert manifest.stop_reason == "shutdown"
    (info,) = await probe_all(ffprobe, [path_of(blobs, manifest.tracks[0])])
    assert int(info["streams"][0]["nb_read_frames"]) == manifest.tracks[0].frames > 0


async def test_a_failing_blob_store_is_reported_not_hidden(
    tmp_path: Path, media: dict[str, list[Sent]]
) -> None:
    """The blob store's root is a file, so every write fails: run() raises the store's error
    and wait() answers `unavailable` instead of a manifest that was never stored."""
    root = tmp_path / "not_a_directory"
    root.write_bytes(b"")
    recorder = Recorder("room_test", LocalBlobStore(root), Limits())
    with pytest.RaisesGroup(OSError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(recorder.run)
            recorder.add_track("mic", "opus")
            for s in media["opus"][:50]:
                recorder.feed("mic", s.data, s.arrival)
            recorder.stop()
    with pytest.raises(GB6Error) as err:
        await recorder.wait()
    assert err.value.code == "unavailable"


# --- pure pieces --------------------------------------------------------------------------


def _packets(seqs: list[int]) -> Iterator[RtpPacket]:
    for seq in seqs:
        yield RtpPacket(False, 96, seq & 0xFFFF, seq * 10, 1, b"x")


def test_reorder_buffer_orders_unwraps_and_declares_loss() -> None:
    buf = ReorderBuffer(capacity=4)
    out = []
    for p in _packets([65534, 0, 65535, 1, 1, 65533, 3, 4, 5, 6, 7]):
        out += buf.push(p)
    out += buf.flush()
    assert [r.seq for r in out] == [65534, 65535, 65536, 65537, 65539, 65540, 65541, 65542, 65543]
    assert [r.lost_before for r in out if r.lost_before] == [1]  # 65538 (seq 2) never came
    assert buf.late == 2 and buf.lost == 1  # the duplicate 1 and the old 65533


def test_vp8_descriptor_with_every_optional_field() -> None:
    """Descriptors as browsers send them (picture id, TL0PICIDX, TID/KEYIDX), serialized by
    aiortc, come off cleanly."""
    for fields in (
        {},
        {"picture_id": 17},
        {"picture_id": 4_000, "tl0picidx": 3},
        {"picture_id": 4_000, "tl0picidx": 3, "tid": (1, 1), "keyidx": 5},
        {"tid": (2, 0)},
    ):
        descriptor = VpxPayloadDescriptor(partition_start=1, partition_id=0, **fields)
        start, pid, data = strip_descriptor(bytes(descriptor) + b"VP8DATA")
        assert (start, pid, data) == (True, 0, b"VP8DATA"), fields
    with pytest.raises(ValueError):
        strip_descriptor(b"\x80\x80")  # says a picture id follows; none does


def test_rtp_parse_rejects_what_is_not_rtp() -> None:
    for bad in (b"", b"\x80" * 11, b"\x00" * 12, b"\x90" + b"\x00" * 11, b"\xa0" + b"\x00" * 11):
        with pytest.raises(ValueError):
            RtpPacket.parse(bad)


def test_sps_size_reads_cropped_dimensions(media: dict[str, list[Sent]]) -> None:
    for s in media["h264"]:
        payload = RtpPacket.parse(s.data).payload
        if payload[0] & 0x1F == 24:  # STAP-A with SPS and PPS first
            size = int.from_bytes(payload[1:3], "big")
            assert sps_size(payload[3 : 3 + size]) == (WIDTH, HEIGHT)
            return
    raise AssertionError("no STAP-A with an SPS")


async def test_the_recorder_loads_no_codec_library() -> None:
    """No encoder or decoder runs in the edge's recorder: importing it loads neither PyAV
    (FFmpeg) nor aiortc (whose codecs sit on PyAV)."""
    code = "import sys, edge.recording; print(sorted({'av', 'aiortc'} & set(sys.modules)))"
    result = await trio.run_process(
        [sys.executable, "-c", code], capture_stdout=True, cwd=Path(__file__).parent.parent
    )
    assert result.stdout.strip() == b"[]"
