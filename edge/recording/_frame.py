"""What depacketizers hand to muxers: one coded frame, untouched, with its RTP timing."""

from __future__ import annotations

import attrs


@attrs.frozen(slots=True)
class Frame:
    data: bytes  # VP8: the frame; Opus: the packet; H.264: 4-byte length-prefixed NAL units
    timestamp: int  # RTP timestamp, unwrapped (clock units of the codec)
    keyframe: bool  # audio frames are all keyframes
    samples: int = 0  # audio: duration in clock units (from the Opus TOC); video: 0 (unknown)


class FrameTooLarge(ValueError):
    """An assembled frame exceeds the recording's frame limit; it is dropped like a broken one."""
