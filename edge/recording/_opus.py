"""Opus RTP depacketizer (RFC 7587): one RTP payload is one Opus packet, kept as it is.

The packet's duration comes from its TOC byte (RFC 6716 §3.1): the configuration gives the
frame size, the code gives the frame count. Loss needs no special care here: every packet
decodes on its own, and the muxers see the gap in the timestamps.
"""

from __future__ import annotations

import attrs

from edge.recording._frame import Frame

# Frame size in 48 kHz samples per TOC configuration (0..31): SILK, hybrid, CELT.
_FRAME_SAMPLES = (
    [480, 960, 1920, 2880] * 3  # SILK NB/MB/WB: 10, 20, 40, 60 ms
    + [480, 960] * 2  # hybrid SWB/FB: 10, 20 ms
    + [120, 240, 480, 960] * 4  # CELT: 2.5, 5, 10, 20 ms
)
MAX_PACKET_SAMPLES = 5760  # 120 ms (RFC 6716 §3.2.5)


def packet_samples(packet: bytes) -> int:
    """Duration of an Opus packet in 48 kHz samples; `ValueError` if the TOC is malformed."""
    if not packet:
        raise ValueError("empty Opus packet")
    toc = packet[0]
    code = toc & 0x03
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            raise ValueError("Opus code 3 packet without a frame count")
        frames = packet[1] & 0x3F
    samples = frames * _FRAME_SAMPLES[toc >> 3]
    if not 0 < samples <= MAX_PACKET_SAMPLES:
        raise ValueError("Opus packet duration out of range")
    return samples


def lost_packet(previous_toc: int) -> bytes:
    """A packet that says "lost here": code 0, one frame of length 0 (RFC 6716 §3.2.1).

    Decoders conceal it (PLC), so a gap in an Ogg stream keeps its place on the timeline.
    Its duration is one frame of `previous_toc`'s configuration.
    """
    return bytes([previous_toc & 0xFC])


@attrs.define
class OpusDepacketizer:
    max_frame_bytes: int
    dropped_frames: int = 0

    def push(self, payload: bytes, timestamp: int, marker: bool, lost_before: int) -> list[Frame]:
        try:
            samples = packet_samples(payload)
        except ValueError:
            self.dropped_frames += 1
            return []
        if len(payload) > self.max_frame_bytes:
            self.dropped_frames += 1
            return []
        return [Frame(payload, timestamp, True, samples)]

    def flush(self) -> list[Frame]:
        return []
