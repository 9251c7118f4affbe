"""H.264 RTP depacketizer (RFC 6184, packetization modes 0 and 1) and SPS reading.

Rules:
- Single NAL unit packets (types 1-23), STAP-A (24) and FU-A (28) are understood; other
  aggregation types (STAP-B, MTAP, FU-B: interleaved mode only) break the frame they are in.
- An access unit is the NAL units of one RTP timestamp; it ends at the marker bit (or where
  the next timestamp begins). Its sample is the NAL units, each behind a 4-byte big-endian
  length: the form MP4 (ISO/IEC 14496-15 `avc1`) stores. RTP carries bare NAL units, so there
  are no Annex-B start codes to strip.
- SPS (7) and PPS (8) are remembered: the first pair goes into the MP4 `avcC`. They stay
  in-band as well, so a stream that changes them mid-way still decodes.
- Loss breaks the access unit it falls in (or an FU-A without its start); a broken unit is
  dropped, and so is everything until the next IDR (type 5), since later frames refer back.
  The stream starts at its first IDR preceded by an SPS and a PPS.
"""

from __future__ import annotations

import struct

import attrs

from edge.recording._frame import Frame

NAL_IDR, NAL_SPS, NAL_PPS = 5, 7, 8
_STAP_A, _FU_A = 24, 28


@attrs.define
class H264Depacketizer:
    max_frame_bytes: int
    sps: bytes = b""
    pps: bytes = b""
    dropped_frames: int = 0
    _ts: int | None = None
    _nals: list[bytes] = attrs.Factory(list)
    _size: int = 0
    _fu: bytearray | None = None
    _ok: bool = False
    _need_keyframe: bool = True

    def push(self, payload: bytes, timestamp: int, marker: bool, lost_before: int) -> list[Frame]:
        out: list[Frame] = []
        if lost_before:
            if self._ts is not None:
                self._ok = False
            self._fu = None
            self._need_keyframe = True
        if self._ts is not None and timestamp != self._ts:
            self._finish(out)
        if self._ts is None:
            self._ts, self._nals, self._size, self._fu, self._ok = timestamp, [], 0, None, True
        try:
            self._take(payload)
        except ValueError:
            self._ok = False
        if self._size > self.max_frame_bytes:
            self._ok = False
        if marker:
            self._finish(out)
        return out

    def flush(self) -> list[Frame]:
        out: list[Frame] = []
        if self._ts is not None:
            self._finish(out)
        return out

    def _take(self, payload: bytes) -> None:
        if not payload:
            raise ValueError("empty H.264 payload")
        kind = payload[0] & 0x1F
        if 1 <= kind <= 23:
            self._nal(payload)
        elif kind == _STAP_A:
            pos = 1
            while pos < len(payload):
                if pos + 2 > len(payload):
                    raise ValueError("truncated STAP-A")
                (size,) = struct.unpack_from("!H", payload, pos)
                pos += 2
                if size == 0 or pos + size > len(payload):
                    raise ValueError("bad STAP-A unit size")
                self._nal(payload[pos : pos + size])
                pos += size
        elif kind == _FU_A:
            if len(payload) < 3:
                raise ValueError("truncated FU-A")
            header = payload[1]
            if header & 0x80:  # S: a new fragmented unit, its NAL header rebuilt
                self._fu = bytearray([(payload[0] & 0xE0) | (header & 0x1F)])
            elif self._fu is None:
                raise ValueError("FU-A continuation without its start")
            self._fu += payload[2:]
            self._size += len(payload) - 2
            if header & 0x40:  # E
                nal, self._fu = bytes(self._fu), None
                self._size -= len(nal) - 1  # counted as fragments already; _nal counts it whole
                self._nal(nal)
        else:
            raise ValueError(f"unsupported H.264 packet type {kind}")

    def _nal(self, nal: bytes) -> None:
        kind = nal[0] & 0x1F
        if kind == NAL_SPS and not self.sps:
            self.sps = nal
        elif kind == NAL_PPS and not self.pps:
            self.pps = nal
        self._nals.append(nal)
        self._size += 4 + len(nal)

    def _finish(self, out: list[Frame]) -> None:
        assert self._ts is not None
        nals, ts, ok = self._nals, self._ts, self._ok and self._fu is None
        self._ts, self._nals, self._size, self._fu = None, [], 0, None
        keyframe = any(n[0] & 0x1F == NAL_IDR for n in nals)
        if not ok or not nals or (self._need_keyframe and not (keyframe and self.sps and self.pps)):
            self.dropped_frames += 1
            self._need_keyframe = True
            return
        if keyframe:
            self._need_keyframe = False
        out.append(Frame(b"".join(struct.pack("!I", len(n)) + n for n in nals), ts, keyframe))


class _Bits:
    """An exp-Golomb bit reader over an RBSP (emulation prevention bytes removed)."""

    def __init__(self, nal: bytes) -> None:
        self.data = nal.replace(b"\x00\x00\x03", b"\x00\x00")
        self.pos = 0

    def bit(self) -> int:
        byte = self.pos >> 3
        if byte >= len(self.data):
            raise ValueError("SPS ends early")
        self.pos += 1
        return (self.data[byte] >> (7 - ((self.pos - 1) & 7))) & 1

    def bits(self, n: int) -> int:
        value = 0
        for _ in range(n):
            value = (value << 1) | self.bit()
        return value

    def ue(self) -> int:
        zeros = 0
        while self.bit() == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad exp-Golomb code")
        return (1 << zeros) - 1 + self.bits(zeros)

    def se(self) -> int:
        v = self.ue()
        return (v + 1) // 2 if v & 1 else -(v // 2)


def sps_size(sps: bytes) -> tuple[int, int]:
    """(width, height) in pixels from an SPS NAL unit (ITU-T H.264 §7.3.2.1.1); `ValueError`."""
    r = _Bits(sps[1:])
    profile = r.bits(8)
    r.bits(16)  # constraint flags, level
    r.ue()  # seq_parameter_set_id
    chroma_format = 1
    if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        chroma_format = r.ue()
        if chroma_format == 3:
            r.bit()  # separate_colour_plane_flag
        r.ue()  # bit_depth_luma_minus8
        r.ue()  # bit_depth_chroma_minus8
        r.bit()  # qpprime_y_zero_transform_bypass_flag
        if r.bit():  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma_format != 3 else 12):
                if r.bit():
                    last, nxt = 8, 8
                    for _ in range(16 if i < 6 else 64):
                        if nxt:
                            nxt = (last + r.se()) % 256
                        last = nxt or last
    r.ue()  # log2_max_frame_num_minus4
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()
    elif poc_type == 1:
        r.bit()
        r.se()
        r.se()
        for _ in range(r.ue()):
            r.se()
    r.ue()  # max_num_ref_frames
    r.bit()  # gaps_in_frame_num_value_allowed_flag
    mbs_w = r.ue() + 1
    map_units_h = r.ue() + 1
    frame_mbs_only = r.bit()
    if not frame_mbs_only:
        r.bit()  # mb_adaptive_frame_field_flag
    r.bit()  # direct_8x8_inference_flag
    width, height = mbs_w * 16, (2 - frame_mbs_only) * map_units_h * 16
    if r.bit():  # frame_cropping_flag
        left, right, top, bottom = r.ue(), r.ue(), r.ue(), r.ue()
        crop_x = 1 if chroma_format == 0 else (2 if chroma_format in (1, 2) else 1)
        crop_y = (1 if chroma_format in (0, 2, 3) else 2) * (2 - frame_mbs_only)
        width -= crop_x * (left + right)
        height -= crop_y * (top + bottom)
    if width <= 0 or height <= 0:
        raise ValueError("SPS gives an empty picture")
    return width, height
