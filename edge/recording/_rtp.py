"""RTP fixed header parsing (RFC 3550 §5.1), and the unwrapping of 16/32-bit counters.

Only what a recorder needs: marker, payload type, sequence number, timestamp, SSRC and the
payload (after CSRCs, the header extension and padding). Header extensions are skipped, not
interpreted. A packet that does not parse raises `ValueError`; the caller counts and drops it.
"""

from __future__ import annotations

import struct

import attrs

_HEADER = struct.Struct("!BBHII")


@attrs.frozen(slots=True)
class RtpPacket:
    marker: bool
    payload_type: int
    seq: int  # 16 bits, as sent
    timestamp: int  # 32 bits, as sent
    ssrc: int
    payload: bytes

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        if len(data) < _HEADER.size:
            raise ValueError("shorter than an RTP header")
        b0, b1, seq, ts, ssrc = _HEADER.unpack_from(data)
        if b0 >> 6 != 2:
            raise ValueError("not RTP version 2")
        pos = _HEADER.size + 4 * (b0 & 0x0F)
        if b0 & 0x10:  # header extension: 16-bit profile, 16-bit length in words
            if len(data) < pos + 4:
                raise ValueError("truncated header extension")
            pos += 4 + 4 * struct.unpack_from("!H", data, pos + 2)[0]
        end = len(data)
        if b0 & 0x20:  # padding: the last byte counts the padding bytes, itself included
            if end == 0 or data[-1] == 0:
                raise ValueError("bad padding")
            end -= data[-1]
        if pos > end:
            raise ValueError("truncated RTP packet")
        return cls(bool(b1 & 0x80), b1 & 0x7F, seq, ts, ssrc, bytes(data[pos:end]))


def unwrap(value: int, last: int | None, bits: int) -> int:
    """Extend a wrapping `bits`-wide counter to an unbounded int, nearest to `last` (extended)."""
    if last is None:
        return value
    size = 1 << bits
    half = size >> 1
    return last + ((value - last + half) % size) - half
