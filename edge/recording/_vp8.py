"""VP8 RTP depacketizer (RFC 7741): payload descriptors off, frames assembled, keyframes found.

Rules:
- A frame is the packets of one RTP timestamp, in sequence order. It must begin with a packet
  whose descriptor has S=1 and partition id 0; it ends at the marker bit (or, when the marker
  is missing, where the next timestamp begins).
- Any packet lost (reported by the reorder buffer) breaks the frame it falls in; a broken frame
  is dropped, and so is every frame after it until the next keyframe, since later frames may
  refer to what was lost. The stream also starts at its first keyframe.
- Keyframe: the first byte of the VP8 payload header has P (bit 0) clear; a keyframe carries
  the start code 9d 01 2a and the 14-bit width and height (RFC 6386 §9.1).
"""

from __future__ import annotations

import struct

import attrs

from edge.recording._frame import Frame


def strip_descriptor(payload: bytes) -> tuple[bool, int, bytes]:
    """(start of partition, partition id, VP8 data) from one RTP payload; `ValueError` if bad."""
    if not payload:
        raise ValueError("empty VP8 payload")
    b0 = payload[0]
    pos = 1
    if b0 & 0x80:  # X: extension byte follows
        if len(payload) < 2:
            raise ValueError("truncated VP8 descriptor")
        x = payload[1]
        pos = 2
        if x & 0x80:  # I: picture id, 7 or 15 bits (M flags 15)
            if len(payload) < pos + 1:
                raise ValueError("truncated VP8 picture id")
            pos += 2 if payload[pos] & 0x80 else 1
        if x & 0x40:  # L: TL0PICIDX
            pos += 1
        if x & 0x30:  # T or K: TID/Y/KEYIDX
            pos += 1
    if pos > len(payload):
        raise ValueError("truncated VP8 descriptor")
    return bool(b0 & 0x10), b0 & 0x07, payload[pos:]


def keyframe_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) when `frame` is a VP8 keyframe, else None."""
    if len(frame) < 10 or frame[0] & 0x01 or frame[3:6] != b"\x9d\x01\x2a":
        return None
    width, height = struct.unpack_from("<HH", frame, 6)
    return width & 0x3FFF, height & 0x3FFF


@attrs.define
class Vp8Depacketizer:
    max_frame_bytes: int
    width: int = 0
    height: int = 0
    dropped_frames: int = 0
    _ts: int | None = None
    _parts: list[bytes] = attrs.Factory(list)
    _size: int = 0
    _ok: bool = False
    _need_keyframe: bool = True

    def push(self, payload: bytes, timestamp: int, marker: bool, lost_before: int) -> list[Frame]:
        out: list[Frame] = []
        if lost_before:
            if self._ts is not None:
                self._ok = False  # the frame in progress may have lost its tail
            self._need_keyframe = True
        if self._ts is not None and timestamp != self._ts:
            self._finish(out)  # the marker packet never came: end the frame here
        try:
            start, pid, data = strip_descriptor(payload)
        except ValueError:
            start, pid, data = False, 1, b""
            self._ok = False
        if self._ts is None:
            self._ts = timestamp
            self._parts, self._size = [], 0
            self._ok = start and pid == 0
        self._parts.append(data)
        self._size += len(data)
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

    def _finish(self, out: list[Frame]) -> None:
        assert self._ts is not None
        data = b"".join(self._parts) if self._ok else b""
        ts, self._ts, self._parts, self._size = self._ts, None, [], 0
        size = keyframe_size(data) if data else None
        if not data or (self._need_keyframe and size is None):
            self.dropped_frames += 1
            self._need_keyframe = True
            return
        if size is not None:
            self._need_keyframe = False
            self.width, self.height = size
        out.append(Frame(data, ts, size is not None))
