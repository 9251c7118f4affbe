"""The SFU: forwards RTP between participants without decoding, on aiortc's ICE/DTLS/SRTP.

Public API (everything else in this package is private):

    sfu = Sfu(config.media)                  # node.config.MediaConfig, the `[media]` section
    await nursery.start(sfu.run)             # inside the process's trio_asyncio.open_loop()
    peer = sfu.join(room, participant, listener)   # listener(event) for the room's SfuEvents
    sfu.tracks(room) -> tuple[TrackInfo, ...];  sfu.participants(room) -> tuple[str, ...]
    end = sfu.tap(room, track_id, name, sink)   # a transport-less subscription: sink(rtp)
        # gets the track's rewritten packets (the recorder's feed); end() stops it

  Negotiation (one BUNDLEd transport per peer; either side may offer, one at a time):
    answer_sdp = await peer.answer(offer_sdp)      # client offers (publish, or WHIP/WHEP)
    offer_sdp = await peer.offer(); await peer.set_answer(answer_sdp)   # SFU offers
    await peer.add_ice_candidate("candidate:..." | None)   # trickle; None: end of candidates
    peer.needs_negotiation -> bool                  # a (un)subscription awaits `offer()`
    peer.state: "new" | "connected" | "failed" | "closed"

  Tracks:
    track_id = peer.publish(kind, source, msid_track=None)  # declare before the client offer
        kind "audio"|"video", source "camera"|"microphone"|"screen"|"screen_audio"; each
        sending m-line of the next offer takes the oldest declaration of its kind (or the one
        whose msid_track matches its a=msid track id); undeclared ones are camera/microphone.
        peer.tracks -> tuple[TrackInfo, ...] once published (TrackPublished to the room).
    peer.unpublish(track_id); peer.mute(track_id, muted=True)   # TrackUnpublished/TrackMuted
    peer.subscribe(track_id); peer.unsubscribe(track_id)        # then renegotiate
    peer.switch(track_id, to_track_id)   # same m-line, another publisher: seamless seq/ts
    peer.accept_slots({kind: codec})     # WHEP: the next offer's free recvonly m-lines
        # become slots (sendonly, own SSRC, no track yet); peer.fill(track_id) -> bool feeds a
        # free one (its track gone or unsubscribed) of that kind and codec, no renegotiation
    peer.mid_of(track_id) -> mid | None; peer.subscriptions; peer.stats() -> TrackStats...
    await peer.leave()                   # unpublish all, close; ParticipantLeft to the room

  Events (attrs, `edge.sfu.SfuEvent`): ParticipantJoined, ParticipantLeft, TrackPublished,
  TrackUnpublished, TrackMuted, ActiveSpeakers, ConnectionQuality, PeerState.

  Errors: `GB6Error` `invalid` (malformed SDP or candidate, unsupported codec, unknown kind or
  source, ICE restart), `not_found` (unknown track id), `conflict` (glare, joined twice),
  `quota_exceeded` (too many tracks, participants, subscribers, subscriptions, candidates),
  `unavailable` (SFU not running, no free UDP port). The room is unchanged after any of them.

What a subscriber receives: per subscribed track one sendonly m-line with
`a=msid:<publisher participant> <track_id>` and its own SSRC; sequence numbers and timestamps
are rewritten per subscriber and continue across switches, publisher restarts and mutes; video
starts on a keyframe (the SFU asks the publisher for one). NACKs are answered from a per
subscriber history; PLI/FIR reach the publisher at most once per `keyframe_request_interval_s`
per track; the publisher gets REMB = min over subscribers, capped by `[media]` bitrate caps.
Header extensions are not forwarded. Loopback: host candidates are `[media] host` only.
"""

from edge.sfu._events import (
    ActiveSpeakers,
    ConnectionQuality,
    ParticipantJoined,
    ParticipantLeft,
    PeerState,
    SfuEvent,
    Speaker,
    TrackInfo,
    TrackMuted,
    TrackPublished,
    TrackStats,
    TrackUnpublished,
)
from edge.sfu._sfu import Listener, Peer, Sfu

__all__ = [
    "ActiveSpeakers",
    "ConnectionQuality",
    "Listener",
    "ParticipantJoined",
    "ParticipantLeft",
    "Peer",
    "PeerState",
    "Sfu",
    "SfuEvent",
    "Speaker",
    "TrackInfo",
    "TrackMuted",
    "TrackPublished",
    "TrackStats",
    "TrackUnpublished",
]
