"""Ogg Opus writer (RFC 7845, RFC 3533): OpusHead and OpusTags pages, then audio pages.

Rules:
- One logical stream. Page 0 holds OpusHead alone (beginning of stream), page 1 OpusTags;
  audio pages hold whole packets (an Opus packet is at most 7,660 bytes, 31 lacing values),
  up to 255 lacing values or about one second; the last page is flagged end of stream.
- A page's granule position is the 48 kHz sample count at the end of its last packet, pre-skip
  included. Samples are counted from the packets' TOC durations, and a gap in the RTP
  timestamps (loss, or DTX silence) is filled with "lost frame" packets (a lone TOC byte) so
  the file keeps real time and decoders conceal the gap.
- A packet that starts more than half a frame before the end of the previous one overlaps it
  and is dropped.
- Page checksum: CRC-32, polynomial 0x04C11DB7, not reflected, initial value 0, over the page
  with its CRC field zeroed.
"""

from __future__ import annotations

import struct

import attrs

from edge.recording._frame import Frame
from edge.recording._opus import lost_packet, packet_samples
from edge.recording._webm import APP, opus_head

_PAGE_SAMPLES = 48_000
_MAX_SEGMENTS = 255
_MAX_FILL = 48_000 * 3600  # a gap longer than an hour is cut short (the recording ends first)


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC = _crc_table()


def ogg_crc(data: bytes | bytearray) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC[(crc >> 24) ^ byte]
    return crc


def _lacing(size: int) -> bytes:
    return b"\xff" * (size // 255) + bytes([size % 255])


@attrs.define
class OggOpusWriter:
    channels: int = 2
    serial: int = 0x6762_3600
    pre_skip: int = 0
    frames: int = 0  # packets written, fillers included
    filled: int = 0  # "lost frame" packets written into gaps
    dropped: int = 0  # overlapping packets
    _out: bytearray = attrs.Factory(bytearray)
    _page_seq: int = 0
    _packets: list[bytes] = attrs.Factory(list)
    _segments: int = 0
    _page_start: int = 0  # samples at the start of the pending page
    _samples: int = 0  # samples written so far
    _first_ts: int | None = None
    _last_toc: int = 0

    def __attrs_post_init__(self) -> None:
        self._page([opus_head(self.channels, self.pre_skip)], 0, bos=True)
        vendor = APP.encode()
        tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
        self._page([tags], 0)

    @property
    def size(self) -> int:
        return len(self._out) + sum(len(p) for p in self._packets) + 27 + self._segments

    @property
    def duration_ms(self) -> float:
        return self._samples * 1000 / 48_000

    def add(self, frame: Frame) -> None:
        if self._first_ts is None:
            self._first_ts = frame.timestamp
        start = frame.timestamp - self._first_ts
        if self.frames:
            fill = lost_packet(self._last_toc)
            step = packet_samples(fill)
            gap = min(start - self._samples, _MAX_FILL)
            if gap < -frame.samples // 2:
                self.dropped += 1
                return
            for _ in range((gap + step // 2) // step):
                self._packet(fill, step)
                self.filled += 1
        self._last_toc = frame.data[0]
        self._packet(frame.data, frame.samples)

    def finish(self) -> bytes:
        if self._packets:
            self._flush(eos=True)
        return bytes(self._out)

    def _packet(self, data: bytes, samples: int) -> None:
        lacing = len(data) // 255 + 1
        if self._packets and (
            self._segments + lacing > _MAX_SEGMENTS
            or self._samples - self._page_start >= _PAGE_SAMPLES
        ):
            self._flush(eos=False)
        self._packets.append(data)
        self._segments += lacing
        self._samples += samples
        self.frames += 1

    def _flush(self, *, eos: bool) -> None:
        self._page(self._packets, self.pre_skip + self._samples, eos=eos)
        self._packets, self._segments, self._page_start = [], 0, self._samples

    def _page(
        self, packets: list[bytes], granule: int, *, bos: bool = False, eos: bool = False
    ) -> None:
        lacing = b"".join(_lacing(len(p)) for p in packets)
        flags = (0x02 if bos else 0) | (0x04 if eos else 0)
        header = b"OggS" + struct.pack(
            "<BBqIIIB", 0, flags, granule, self.serial, self._page_seq, 0, len(lacing)
        )
        page = bytearray(header + lacing + b"".join(packets))
        struct.pack_into("<I", page, 22, ogg_crc(page))
        self._out += page
        self._page_seq += 1
