"""One recorded track, without I/O: RTP packets in, one finished media file out.

A track chains: RTP parse → reorder buffer → depacketizer → muxer. It also keeps what the
manifest needs to place the file on the room's timeline:

- `anchor`: the arrival time (seconds, the recorder's monotonic clock) at which the first
  packet's RTP timestamp would have arrived with no network delay: the minimum over packets of
  `arrival - (timestamp - first timestamp) / clock rate`. Jitter only ever delays packets, so
  the minimum is the best estimate; it needs no RTCP.
- the first written frame's timestamp, and the file's duration from RTP timestamps.

Limits: packets above `max_packet_bytes` and frames above `max_frame_bytes` are dropped; once
the file would pass `max_bytes` the track stops taking frames and says `truncated`. Frames whose
timestamp goes back are dropped (WebRTC streams have no B-frames).
"""

from __future__ import annotations

from typing import Protocol

import attrs

from edge.recording._frame import Frame
from edge.recording._h264 import H264Depacketizer
from edge.recording._mp4 import Mp4Writer
from edge.recording._ogg import OggOpusWriter
from edge.recording._opus import OpusDepacketizer
from edge.recording._reorder import ReorderBuffer
from edge.recording._rtp import RtpPacket, unwrap
from edge.recording._vp8 import Vp8Depacketizer
from edge.recording._webm import WebmWriter

# codec -> (kind, RTP clock rate, container, content type)
CODECS: dict[str, tuple[str, int, str, str]] = {
    "vp8": ("video", 90_000, "webm", "video/webm"),
    "h264": ("video", 90_000, "mp4", "video/mp4"),
    "opus": ("audio", 48_000, "ogg", "audio/ogg"),
}
CONTAINERS = {"webm": "video/webm", "ogg": "audio/ogg", "mp4": "video/mp4"}


class _Depacketizer(Protocol):
    dropped_frames: int

    def push(
        self, payload: bytes, timestamp: int, marker: bool, lost_before: int
    ) -> list[Frame]: ...

    def flush(self) -> list[Frame]: ...


class _Muxer(Protocol):
    frames: int

    @property
    def size(self) -> int: ...

    @property
    def duration_ms(self) -> float: ...

    def add(self, frame: Frame) -> None: ...

    def finish(self) -> bytes: ...


@attrs.frozen
class TrackLimits:
    max_bytes: int
    max_packet_bytes: int
    max_frame_bytes: int
    reorder_packets: int


@attrs.define
class TrackStats:
    packets: int = 0  # accepted into the reorder buffer
    malformed: int = 0  # not RTP, too large, or from another SSRC than the first
    lost: int = 0
    late: int = 0
    dropped_frames: int = 0  # broken, waiting for a keyframe, or going back in time
    frames: int = 0  # written to the file


class Track:
    """Packets in (`push`), file out (`finish`). Not thread-safe; one owner drives it."""

    def __init__(
        self, track_id: str, codec: str, limits: TrackLimits, *, container: str, channels: int
    ) -> None:
        kind, clock, _, _ = CODECS[codec]
        self.id, self.kind, self.codec, self.container = track_id, kind, codec, container
        self.clock_rate = clock
        self.limits = limits
        self.stats = TrackStats()
        self.truncated: str | None = None
        self.anchor: float | None = None
        self._ssrc: int | None = None
        self._ref_ts: int | None = None  # first packet's timestamp, unwrapped
        self._last_ts: int | None = None  # newest timestamp seen, unwrapped
        self._first_frame_ts: int | None = None
        self._last_frame_ts: int | None = None
        self._reorder = ReorderBuffer(limits.reorder_packets)
        self._depack: _Depacketizer
        self._muxer: _Muxer
        if codec == "vp8":
            self._depack = Vp8Depacketizer(limits.max_frame_bytes)
        elif codec == "h264":
            self._depack = H264Depacketizer(limits.max_frame_bytes)
        else:
            self._depack = OpusDepacketizer(limits.max_frame_bytes)
        if container == "webm":
            self._muxer = WebmWriter(codec, clock, channels=channels)
        elif container == "ogg":
            self._muxer = OggOpusWriter(channels=channels)
        else:
            self._muxer = Mp4Writer(clock)

    def push(self, data: bytes, arrival: float) -> None:
        if len(data) > self.limits.max_packet_bytes:
            self.stats.malformed += 1
            return
        try:
            packet = RtpPacket.parse(data)
        except ValueError:
            self.stats.malformed += 1
            return
        if self._ssrc is None:
            self._ssrc = packet.ssrc
        elif packet.ssrc != self._ssrc:
            self.stats.malformed += 1  # one track, one sender: a stranger's packets stay out
            return
        ts = unwrap(packet.timestamp, self._last_ts, 32)
        self._last_ts = ts
        if self._ref_ts is None:
            self._ref_ts = ts
        at = arrival - (ts - self._ref_ts) / self.clock_rate
        self.anchor = at if self.anchor is None else min(self.anchor, at)
        self.stats.packets += 1
        for released in self._reorder.push(packet):
            self._frames(
                self._depack.push(
                    released.packet.payload,
                    unwrap(released.packet.timestamp, self._last_ts, 32),
                    released.packet.marker,
                    released.lost_before,
                )
            )

    def finish(self) -> bytes | None:
        """The file, or None when no frame was written (nothing to store)."""
        for released in self._reorder.flush():
            self._frames(
                self._depack.push(
                    released.packet.payload,
                    unwrap(released.packet.timestamp, self._last_ts, 32),
                    released.packet.marker,
                    released.lost_before,
                )
            )
        self._frames(self._depack.flush())
        self._sync_stats()
        if not self._muxer.frames:
            return None
        return self._muxer.finish()

    def _frames(self, frames: list[Frame]) -> None:
        for frame in frames:
            if self.truncated is not None or (
                self._last_frame_ts is not None and frame.timestamp < self._last_frame_ts
            ):
                self.stats.dropped_frames += 1
                continue
            if self._muxer.size + len(frame.data) > self.limits.max_bytes:
                self.truncated = "max_bytes"
                self.stats.dropped_frames += 1
                continue
            if not self._muxer.frames:
                self._first_frame_ts = frame.timestamp
                self._configure()
            self._muxer.add(frame)
            self._last_frame_ts = frame.timestamp

    def _configure(self) -> None:
        """Codec settings the file header needs, known once the first (key)frame is out."""
        if isinstance(self._depack, Vp8Depacketizer) and isinstance(self._muxer, WebmWriter):
            self._muxer.width, self._muxer.height = self._depack.width, self._depack.height
        if isinstance(self._depack, H264Depacketizer) and isinstance(self._muxer, Mp4Writer):
            self._muxer.sps, self._muxer.pps = self._depack.sps, self._depack.pps

    def _sync_stats(self) -> None:
        self.stats.lost = self._reorder.lost
        self.stats.late = self._reorder.late
        self.stats.frames = self._muxer.frames
        self.stats.dropped_frames += self._depack.dropped_frames
        self._depack.dropped_frames = 0

    @property
    def bytes_estimate(self) -> int:
        return self._muxer.size if self._muxer.frames else 0

    def start_s(self) -> float | None:
        """When the file's first frame happened, on the recorder's monotonic clock."""
        if self.anchor is None or self._first_frame_ts is None or self._ref_ts is None:
            return None
        return self.anchor + (self._first_frame_ts - self._ref_ts) / self.clock_rate

    @property
    def duration_ms(self) -> float:
        return self._muxer.duration_ms
