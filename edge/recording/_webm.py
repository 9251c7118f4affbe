"""WebM writer (Matroska subset, EBML): one VP8 or Opus track, SimpleBlocks in Clusters, Cues.

Rules:
- Timestamps are milliseconds (TimestampScale 1,000,000 ns), relative to the first frame.
- A Cluster holds at most 5 s (SimpleBlock times are signed 16-bit offsets from the cluster's
  time); a video keyframe starts a new cluster once the current one is 1 s old, so every
  cluster but the first few starts at a keyframe and the Cues point at those.
- Frames come in timestamp order (the track drops any that go back) and the first is a keyframe.
- The file is laid out at `finish()`: EBML header, Segment {SeekHead, Info (with the Duration),
  Tracks, Clusters, Cues}. Every size is known then, so nothing is patched and no element has
  an unknown size. Sizes are always written on 8 bytes: simpler, and a few bytes per element.
"""

from __future__ import annotations

import struct

import attrs

from edge.recording._frame import Frame

_EBML = 0x1A45DFA3
_SEGMENT = 0x18538067
_SEEKHEAD, _SEEK, _SEEKID, _SEEKPOS = 0x114D9B74, 0x4DBB, 0x53AB, 0x53AC
_INFO, _TIMESCALE, _DURATION, _MUXINGAPP, _WRITINGAPP = 0x1549A966, 0x2AD7B1, 0x4489, 0x4D80, 0x5741
_TRACKS, _TRACKENTRY, _TRACKNUMBER, _TRACKUID, _TRACKTYPE = 0x1654AE6B, 0xAE, 0xD7, 0x73C5, 0x83
_FLAGLACING, _CODECID, _CODECPRIVATE, _CODECDELAY, _SEEKPREROLL = 0x9C, 0x86, 0x63A2, 0x56AA, 0x56BB
_VIDEO, _PIXELWIDTH, _PIXELHEIGHT = 0xE0, 0xB0, 0xBA
_AUDIO, _SAMPLINGFREQ, _CHANNELS = 0xE1, 0xB5, 0x9F
_CLUSTER, _TIMESTAMP, _SIMPLEBLOCK = 0x1F43B675, 0xE7, 0xA3
_CUES, _CUEPOINT, _CUETIME, _CUETRACKPOS, _CUETRACK, _CUECLUSTERPOS = (
    0x1C53BB6B,
    0xBB,
    0xB3,
    0xB7,
    0xF7,
    0xF1,
)
_CLUSTER_MAX_MS = 5_000
_KEYFRAME_CLUSTER_MS = 1_000
APP = "gb6"


def _id(element: int) -> bytes:
    return element.to_bytes((element.bit_length() + 7) // 8, "big")


def _size(n: int) -> bytes:
    return struct.pack("!Q", n | (0x01 << 56))  # an 8-byte EBML vint


def element(element_id: int, *body: bytes) -> bytes:
    data = b"".join(body)
    return _id(element_id) + _size(len(data)) + data


def uint(element_id: int, value: int) -> bytes:
    return element(element_id, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def uint8(element_id: int, value: int) -> bytes:
    """A uint always 8 bytes wide: its size does not depend on its value."""
    return element(element_id, struct.pack("!Q", value))


def text(element_id: int, value: str) -> bytes:
    return element(element_id, value.encode("utf-8"))


def double(element_id: int, value: float) -> bytes:
    return element(element_id, struct.pack("!d", value))


def opus_head(channels: int, pre_skip: int = 0) -> bytes:
    """The OpusHead identification header (RFC 7845 §5.1), mapping family 0."""
    return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, pre_skip, 48_000, 0, 0)


@attrs.define
class WebmWriter:
    codec: str  # "vp8" or "opus"
    clock_rate: int  # RTP clock: 90,000 (VP8) or 48,000 (Opus)
    channels: int = 2
    width: int = 0
    height: int = 0
    frames: int = 0
    _clusters: list[bytes] = attrs.Factory(list)
    _cluster_times: list[tuple[int, bool]] = attrs.Factory(list)  # (ms, starts at a keyframe)
    _blocks: list[bytes] = attrs.Factory(list)
    _cluster_ms: int | None = None
    _cluster_key: bool = False
    _size: int = 0
    _first_ts: int | None = None
    _last_ms: int = 0
    _last_duration_ms: float = 0.0

    @property
    def size(self) -> int:
        """Bytes the file would have now, give or take the headers and cues."""
        # A cluster's header and cue take under 64 bytes; the headers before them under 640.
        return self._size + 64 * (len(self._cluster_times) + 1) + 640

    @property
    def duration_ms(self) -> float:
        return self._last_ms + self._last_duration_ms if self.frames else 0.0

    def add(self, frame: Frame) -> None:
        if self._first_ts is None:
            self._first_ts = frame.timestamp
        ms = (frame.timestamp - self._first_ts) * 1000 // self.clock_rate
        video = self.codec == "vp8"
        if self.frames:
            step = ms - self._last_ms
            if video and step > 0:
                self._last_duration_ms = float(step)
        if audio_ms := frame.samples * 1000 / self.clock_rate:
            self._last_duration_ms = audio_ms
        if (
            self._cluster_ms is None
            or ms - self._cluster_ms >= _CLUSTER_MAX_MS
            or (video and frame.keyframe and ms - self._cluster_ms >= _KEYFRAME_CLUSTER_MS)
        ):
            self._close_cluster()
            self._cluster_ms, self._cluster_key = ms, frame.keyframe
        assert self._cluster_ms is not None
        flags = 0x80 if frame.keyframe else 0x00
        block = element(
            _SIMPLEBLOCK,
            b"\x81" + struct.pack("!hB", ms - self._cluster_ms, flags),
            frame.data,
        )
        self._blocks.append(block)
        self._size += len(block)
        self._last_ms = max(self._last_ms, ms)
        self.frames += 1

    def _close_cluster(self) -> None:
        if self._cluster_ms is None or not self._blocks:
            return
        cluster = element(_CLUSTER, uint(_TIMESTAMP, self._cluster_ms), *self._blocks)
        self._size += len(cluster) - sum(len(b) for b in self._blocks)
        self._clusters.append(cluster)
        self._cluster_times.append((self._cluster_ms, self._cluster_key))
        self._blocks = []

    def finish(self) -> bytes:
        self._close_cluster()
        header = element(
            _EBML,
            uint(0x4286, 1),  # EBMLVersion
            uint(0x42F7, 1),  # EBMLReadVersion
            uint(0x42F2, 4),  # EBMLMaxIDLength
            uint(0x42F3, 8),  # EBMLMaxSizeLength
            text(0x4282, "webm"),  # DocType
            uint(0x4287, 4),  # DocTypeVersion
            uint(0x4285, 2),  # DocTypeReadVersion
        )
        info = element(
            _INFO,
            uint(_TIMESCALE, 1_000_000),
            double(_DURATION, self.duration_ms),
            text(_MUXINGAPP, APP),
            text(_WRITINGAPP, APP),
        )
        tracks = element(_TRACKS, element(_TRACKENTRY, *self._track_entry()))

        def seekhead(cues_at: int) -> bytes:
            def seek(target: int, pos: int) -> bytes:
                return element(_SEEK, element(_SEEKID, _id(target)), uint8(_SEEKPOS, pos))

            return element(
                _SEEKHEAD,
                seek(_INFO, len(seekhead_shape)),
                seek(_TRACKS, len(seekhead_shape) + len(info)),
                seek(_CUES, cues_at),
            )

        seekhead_shape = b""
        seekhead_shape = seekhead(0)  # fixed-width positions: the length is final already
        pos = len(seekhead_shape) + len(info) + len(tracks)
        points = []
        for cluster, (ms, key) in zip(self._clusters, self._cluster_times, strict=True):
            if key:
                points.append(
                    element(
                        _CUEPOINT,
                        uint(_CUETIME, ms),
                        element(_CUETRACKPOS, uint(_CUETRACK, 1), uint(_CUECLUSTERPOS, pos)),
                    )
                )
            pos += len(cluster)
        cues = element(_CUES, *points)  # the first cluster starts at a keyframe: never empty
        body = [seekhead(pos), info, tracks, *self._clusters, cues]
        return header + element(_SEGMENT, *body)

    def _track_entry(self) -> list[bytes]:
        common = [
            uint(_TRACKNUMBER, 1),
            uint(_TRACKUID, 1),
            uint(_FLAGLACING, 0),
        ]
        if self.codec == "vp8":
            return [
                *common,
                uint(_TRACKTYPE, 1),
                text(_CODECID, "V_VP8"),
                element(_VIDEO, uint(_PIXELWIDTH, self.width), uint(_PIXELHEIGHT, self.height)),
            ]
        return [
            *common,
            uint(_TRACKTYPE, 2),
            text(_CODECID, "A_OPUS"),
            element(_CODECPRIVATE, opus_head(self.channels)),
            uint(_CODECDELAY, 0),
            uint(_SEEKPREROLL, 80_000_000),  # 80 ms, as RFC 7845 / the Matroska Opus mapping
            element(_AUDIO, double(_SAMPLINGFREQ, 48_000.0), uint(_CHANNELS, self.channels)),
        ]
