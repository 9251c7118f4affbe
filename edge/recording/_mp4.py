"""MP4 writer (ISO/IEC 14496-12 and -15) for one H.264 track: ftyp, moov, then mdat.

Rules:
- Samples are access units as the depacketizer gives them (4-byte length-prefixed NAL units).
  The sample entry is `avc1` with an `avcC` built from the stream's first SPS and PPS.
- Times: the media timescale is the RTP clock (90 kHz); a sample lasts until the next one's
  RTP timestamp, the last one as long as the one before it. The movie timescale is 1,000.
- No B-frames (WebRTC's H.264 profiles have none), so no `ctts`: decode order is display order.
- The whole file is laid out at `finish()`, `moov` first ("fast start"): all samples sit in one
  chunk, so `stsc` has one entry and `stco` one offset. The file stays under 4 GiB (the
  recording's byte limit is far below), so 32-bit sizes and offsets suffice.
"""

from __future__ import annotations

import struct

import attrs

from edge.recording._frame import Frame
from edge.recording._h264 import sps_size

_MATRIX = struct.pack("!9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def box(kind: bytes, *body: bytes) -> bytes:
    data = b"".join(body)
    return struct.pack("!I", 8 + len(data)) + kind + data


def full_box(kind: bytes, version: int, flags: int, *body: bytes) -> bytes:
    return box(kind, struct.pack("!I", (version << 24) | flags), *body)


def avcc(sps: bytes, pps: bytes) -> bytes:
    """AVCDecoderConfigurationRecord: one SPS, one PPS, 4-byte NAL lengths."""
    return box(
        b"avcC",
        bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]),
        struct.pack("!H", len(sps)),
        sps,
        b"\x01",
        struct.pack("!H", len(pps)),
        pps,
    )


@attrs.define
class Mp4Writer:
    clock_rate: int = 90_000
    sps: bytes = b""
    pps: bytes = b""
    frames: int = 0
    _data: list[bytes] = attrs.Factory(list)
    _sizes: list[int] = attrs.Factory(list)
    _times: list[int] = attrs.Factory(list)
    _sync: list[int] = attrs.Factory(list)  # 1-based sample numbers of keyframes
    _bytes: int = 0

    @property
    def size(self) -> int:
        return self._bytes + 16 * self.frames + 1024

    def _durations(self) -> list[int]:
        steps = [max(1, b - a) for a, b in zip(self._times, self._times[1:], strict=False)]
        return [*steps, steps[-1] if steps else self.clock_rate // 30]

    @property
    def duration_ms(self) -> float:
        return sum(self._durations()) * 1000 / self.clock_rate if self.frames else 0.0

    def add(self, frame: Frame) -> None:
        self._data.append(frame.data)
        self._sizes.append(len(frame.data))
        self._times.append(frame.timestamp)
        self._bytes += len(frame.data)
        self.frames += 1
        if frame.keyframe:
            self._sync.append(self.frames)

    def finish(self) -> bytes:
        ftyp = box(b"ftyp", b"isom", struct.pack("!I", 0x200), b"isomiso2avc1mp41")
        moov = self._moov(0)
        moov = self._moov(len(ftyp) + len(moov) + 8)  # same length: stco is fixed-width
        mdat = box(b"mdat", *self._data)
        return ftyp + moov + mdat

    def _moov(self, data_offset: int) -> bytes:
        width, height = sps_size(self.sps)
        durations = self._durations()
        media_duration = sum(durations)
        movie_duration = media_duration * 1000 // self.clock_rate
        mvhd = full_box(
            b"mvhd",
            0,
            0,
            struct.pack("!IIII", 0, 0, 1000, movie_duration),
            struct.pack("!IH10x", 0x10000, 0x100),
            _MATRIX,
            bytes(24),
            struct.pack("!I", 2),
        )
        tkhd = full_box(
            b"tkhd",
            0,
            3,  # enabled, in movie
            struct.pack("!IIII", 0, 0, 1, 0),
            struct.pack("!I8xhhh2x", movie_duration, 0, 0, 0),
            _MATRIX,
            struct.pack("!II", width << 16, height << 16),
        )
        mdhd = full_box(
            b"mdhd", 0, 0, struct.pack("!IIIIHH", 0, 0, self.clock_rate, media_duration, 0x55C4, 0)
        )
        hdlr = full_box(b"hdlr", 0, 0, struct.pack("!I4s12x", 0, b"vide"), b"VideoHandler\0")
        vmhd = full_box(b"vmhd", 0, 1, bytes(8))
        dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack("!I", 1), full_box(b"url ", 0, 1)))
        avc1 = box(
            b"avc1",
            bytes(6),
            struct.pack("!H", 1),  # data_reference_index
            bytes(16),
            struct.pack("!HH", width, height),
            struct.pack("!II4xH", 0x00480000, 0x00480000, 1),
            bytes(32),  # compressorname
            struct.pack("!Hh", 0x0018, -1),
            avcc(self.sps, self.pps),
        )
        runs: list[list[int]] = []
        for d in durations:
            if runs and runs[-1][1] == d:
                runs[-1][0] += 1
            else:
                runs.append([1, d])
        stbl = box(
            b"stbl",
            full_box(b"stsd", 0, 0, struct.pack("!I", 1), avc1),
            full_box(
                b"stts", 0, 0, struct.pack("!I", len(runs)), *(struct.pack("!II", *r) for r in runs)
            ),
            full_box(
                b"stss", 0, 0, struct.pack(f"!I{len(self._sync)}I", len(self._sync), *self._sync)
            ),
            full_box(
                b"stsz", 0, 0, struct.pack(f"!II{self.frames}I", 0, self.frames, *self._sizes)
            ),
            full_box(b"stsc", 0, 0, struct.pack("!IIII", 1, 1, self.frames, 1)),
            full_box(b"stco", 0, 0, struct.pack("!II", 1, data_offset)),
        )
        minf = box(b"minf", vmhd, dinf, stbl)
        mdia = box(b"mdia", mdhd, hdlr, minf)
        return box(b"moov", mvhd, box(b"trak", tkhd, mdia))
