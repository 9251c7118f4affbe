"""The recording manifest: what was recorded, where each track's file is, when it plays.

Times: `started_at` and `stopped_at` are wall-clock milliseconds since the epoch. A track's
`start_ms` is its first frame's offset from `started_at` on the room's timeline, and
`duration_ms` its file's length from RTP timestamps; a player lines the files up by them.
The JSON form is documented in docs/protocol.md ("Recording manifest").
"""

from __future__ import annotations

from typing import Any

import attrs

MANIFEST_VERSION = 1


@attrs.frozen
class TrackFile:
    id: str  # the track id the SFU gave
    kind: str  # "audio" | "video"
    codec: str  # "vp8" | "opus" | "h264"
    container: str  # "webm" | "ogg" | "mp4"
    content_type: str
    file: str | None  # blob id of the file; None when no frame was recorded or storing failed
    bytes: int
    start_ms: int | None  # None when no frame was recorded
    duration_ms: int
    frames: int
    packets: int
    lost: int
    late: int
    malformed: int
    dropped_frames: int
    dropped_packets: int  # the recorder's queue was full
    truncated: str | None  # "max_bytes" when the file hit the byte limit
    error: str | None = None  # "store_failed" when the blob store refused the file

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Manifest:
    id: str  # the recording id; also the manifest's blob id
    room: str
    started_at: int
    stopped_at: int
    stop_reason: str  # "stopped" | "max_duration" | "shutdown"
    tracks: tuple[TrackFile, ...]
    unknown_packets: int  # fed for track ids that were not (or no longer) recorded

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "id": self.id,
            "room": self.room,
            "started_at": self.started_at,
            "stopped_at": self.stopped_at,
            "stop_reason": self.stop_reason,
            "tracks": [t.to_json() for t in self.tracks],
            "unknown_packets": self.unknown_packets,
        }
