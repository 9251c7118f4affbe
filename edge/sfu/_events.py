"""What the SFU tells the signaling layer: frozen attrs records, one module.

Every event names its room. The listener given to `Sfu.join` receives the events of the room it
joined (its own included, e.g. `TrackPublished` for its own track), in the order they happened.
"""

from __future__ import annotations

from typing import Literal

import attrs

Kind = Literal["audio", "video"]
Source = Literal["camera", "microphone", "screen", "screen_audio"]
KINDS: tuple[str, ...] = ("audio", "video")
SOURCES: tuple[str, ...] = ("camera", "microphone", "screen", "screen_audio")


@attrs.frozen
class TrackInfo:
    """A published track. `track_id` is what subscribe/unsubscribe/mute take; subscribers see
    it as the msid track id (`a=msid:<participant> <track_id>`) of the m-line carrying it."""

    track_id: str
    participant: str
    kind: Kind
    source: Source
    codec: str  # "opus", "vp8", "h264"
    muted: bool = False
    clock_rate: int = 90_000
    channels: int = 0  # audio: as negotiated (Opus: 2); video: 0


@attrs.frozen
class TrackStats:
    """One direction of one track on one peer. `loss` is a fraction (0..1) over the last RTCP
    interval; jitter and RTT in milliseconds (0 until reports arrive)."""

    track_id: str
    direction: Literal["up", "down"]
    packets: int
    bytes: int
    loss: float
    jitter_ms: float
    rtt_ms: float
    retransmitted: int = 0
    keyframe_requests: int = 0


@attrs.frozen
class ParticipantJoined:
    room: str
    participant: str


@attrs.frozen
class ParticipantLeft:
    room: str
    participant: str


@attrs.frozen
class TrackPublished:
    room: str
    track: TrackInfo


@attrs.frozen
class TrackUnpublished:
    room: str
    participant: str
    track_id: str


@attrs.frozen
class TrackMuted:
    room: str
    participant: str
    track_id: str
    muted: bool


@attrs.frozen
class Speaker:
    participant: str
    track_id: str
    level: float  # 0..1, smoothed


@attrs.frozen
class ActiveSpeakers:
    """The loudest `speakers_top_n` participants, loudest first; sent when the list changes
    (an empty tuple when everyone went quiet)."""

    room: str
    speakers: tuple[Speaker, ...]


@attrs.frozen
class ConnectionQuality:
    """Sent when a participant's quality level changes. `quality`: excellent (loss < 2 %),
    good (< 10 %), poor, or lost (no media in the last interval while it should flow)."""

    room: str
    participant: str
    quality: Literal["excellent", "good", "poor", "lost"]
    loss: float
    jitter_ms: float
    rtt_ms: float


@attrs.frozen
class PeerState:
    """The participant's transport: connected (ICE+DTLS up), failed, or closed."""

    room: str
    participant: str
    state: Literal["connected", "failed", "closed"]


SfuEvent = (
    ParticipantJoined
    | ParticipantLeft
    | TrackPublished
    | TrackUnpublished
    | TrackMuted
    | ActiveSpeakers
    | ConnectionQuality
    | PeerState
)
