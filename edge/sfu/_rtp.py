"""RTP and RTCP pieces the forwarder needs, as pure functions on bytes (no I/O).

Rules:
- A forwarded packet is never decoded: the header is read once per incoming packet
  (`parse_rtp`), the header extensions are dropped (their ids are the publisher's, not the
  subscriber's), and each subscriber gets a new 12-byte header with its own SSRC, sequence
  number, timestamp and payload type in front of the same tail (`RtpIn.tail`).
- Keyframe detection looks only at the payload descriptor (VP8) or NAL unit header (H.264),
  which is enough to start a subscriber on a decodable frame.
- RTCP is parsed and built with aiortc's `rtp` module (low rate: no need for speed there).
"""

from __future__ import annotations

import struct
import time
from typing import Final

from aiortc import rtp as artp

_HEADER: Final = struct.Struct("!BBHII")
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")

# Seconds between 1900 (NTP) and 1970 (Unix).
_NTP_EPOCH: Final = 2_208_988_800


class RtpIn:
    """One received RTP packet's header fields, and the bytes every copy of it shares."""

    __slots__ = (
        "b0",
        "data",
        "marker",
        "out_b0",
        "payload_offset",
        "pt",
        "seq",
        "ssrc",
        "tail",
        "ts",
    )

    def __init__(self, data: bytes) -> None:
        if len(data) < 12 or data[0] >> 6 != 2:
            raise ValueError("not an RTP packet")
        b0, b1, seq, ts, ssrc = _HEADER.unpack_from(data)
        cc = b0 & 0x0F
        offset = 12 + 4 * cc
        if b0 & 0x10:
            if len(data) < offset + 4:
                raise ValueError("truncated RTP header extension")
            offset += 4 + 4 * _U16.unpack_from(data, offset + 2)[0]
        if offset > len(data):
            raise ValueError("truncated RTP packet")
        self.data = data
        self.b0 = b0
        self.out_b0 = 0x80 | (b0 & 0x2F)  # forwarded: V=2, P and CC kept, X cleared
        self.marker = b1 & 0x80
        self.pt = b1 & 0x7F
        self.seq = seq
        self.ts = ts
        self.ssrc = ssrc
        self.payload_offset = offset
        # CSRCs and payload (padding included): the part every subscriber's copy shares.
        self.tail = data[12 : 12 + 4 * cc] + data[offset:] if cc else data[offset:]


def parse_rtp(data: bytes) -> RtpIn:
    """Raise ValueError on anything that is not a well-formed RTP packet."""
    return RtpIn(data)


def build_rtp(pkt: RtpIn, pt: int, seq: int, ts: int, ssrc: int) -> bytes:
    """The packet as one subscriber receives it: V=2, P and CC kept, X cleared."""
    return _HEADER.pack(pkt.out_b0, pkt.marker | pt, seq, ts, ssrc) + pkt.tail


pack_header = _HEADER.pack  # (b0, marker|pt, seq, ts, ssrc): the forwarder's hot path


def rtp_seq(data: bytes) -> int:
    return int(_U16.unpack_from(data, 2)[0])


def header_extension(data: bytes, ext_id: int) -> bytes | None:
    """The value of header extension `ext_id` (one-byte or two-byte form), or None."""
    if not data[0] & 0x10 or not ext_id:
        return None
    pos = 12 + 4 * (data[0] & 0x0F)
    profile, words = struct.unpack_from("!HH", data, pos)
    pos += 4
    end = min(pos + 4 * words, len(data))
    if profile == 0xBEDE:
        while pos < end:
            b = data[pos]
            if b == 0:  # padding
                pos += 1
                continue
            x_id, length = b >> 4, (b & 0x0F) + 1
            if x_id == 15:
                return None
            if x_id == ext_id:
                return data[pos + 1 : pos + 1 + length]
            pos += 1 + length
    elif profile & 0xFFF0 == 0x1000:
        while pos + 1 < end:
            x_id = data[pos]
            if x_id == 0:
                pos += 1
                continue
            length = data[pos + 1]
            if x_id == ext_id:
                return data[pos + 2 : pos + 2 + length]
            pos += 2 + length
    return None


def audio_level(data: bytes, ext_id: int) -> int | None:
    """RFC 6464 level in -dBov (0 loudest, 127 silence), or None when absent."""
    value = header_extension(data, ext_id)
    if not value:
        return None
    return value[0] & 0x7F


def mid_extension(data: bytes, ext_id: int) -> str | None:
    value = header_extension(data, ext_id)
    return value.decode("ascii", "replace") if value else None


def is_keyframe_start(codec: str, payload: bytes) -> bool:
    """True when `payload` begins a keyframe (VP8) or carries an IDR/SPS NAL (H.264)."""
    if not payload:
        return False
    if codec == "vp8":
        b = payload[0]
        if not b & 0x10 or b & 0x07:  # S=1 and partition 0: the start of a frame
            return False
        pos = 1
        if b & 0x80:  # X: extended control bits
            if len(payload) < 2:
                return False
            x = payload[1]
            pos = 2
            if x & 0x80:  # I: picture id, 7 or 15 bits
                pos += 2 if len(payload) > pos and payload[pos] & 0x80 else 1
            if x & 0x40:  # L: TL0PICIDX
                pos += 1
            if x & 0x30:  # T or K
                pos += 1
        return len(payload) > pos and not payload[pos] & 0x01  # P=0: key frame
    if codec == "h264":
        nal = payload[0] & 0x1F
        if nal in (5, 7):
            return True
        if nal == 24:  # STAP-A: 16-bit sizes then NAL units
            pos = 1
            while pos + 2 < len(payload):
                size = _U16.unpack_from(payload, pos)[0]
                if payload[pos + 2] & 0x1F in (5, 7):
                    return True
                pos += 2 + size
            return False
        if nal == 28 and len(payload) > 1:  # FU-A start of an IDR
            return bool(payload[1] & 0x80) and payload[1] & 0x1F in (5, 7)
        return False
    return True  # audio and unknown codecs need no keyframe


def ntp_now(now: float | None = None) -> int:
    t = time.time() if now is None else now
    return (int(t + _NTP_EPOCH) << 32) | int((t % 1) * (1 << 32))


def pli(sender_ssrc: int, media_ssrc: int) -> bytes:
    return bytes(
        artp.RtcpPsfbPacket(fmt=artp.RTCP_PSFB_PLI, ssrc=sender_ssrc, media_ssrc=media_ssrc)
    )


def remb(sender_ssrc: int, bitrate: int, ssrcs: list[int]) -> bytes:
    fci = artp.pack_remb_fci(bitrate, ssrcs)
    return bytes(
        artp.RtcpPsfbPacket(fmt=artp.RTCP_PSFB_APP, ssrc=sender_ssrc, media_ssrc=0, fci=fci)
    )


def sender_report(ssrc: int, ntp: int, rtp_ts: int, packets: int, octets: int) -> bytes:
    info = artp.RtcpSenderInfo(
        ntp_timestamp=ntp,
        rtp_timestamp=rtp_ts & 0xFFFFFFFF,
        packet_count=packets & 0xFFFFFFFF,
        octet_count=octets & 0xFFFFFFFF,
    )
    return bytes(artp.RtcpSrPacket(ssrc=ssrc, sender_info=info))


def parse_rtcp(data: bytes) -> list[artp.AnyRtcpPacket]:
    """Raise ValueError on malformed RTCP."""
    return artp.RtcpPacket.parse(data)


def is_rtcp(data: bytes) -> bool:
    return len(data) >= 2 and 192 <= data[1] <= 223
