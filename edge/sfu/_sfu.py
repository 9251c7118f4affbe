"""The Trio layer: `Sfu` (rooms, the periodic work), `Peer` (one participant's negotiation).

Rules:
- One `Sfu` component per edge. `run` owns a nursery holding the ticker (keyframe requests,
  REMB, sender reports, active speakers, connection quality) and every peer's transport task;
  cancelling `run` closes every transport.
- A `Peer` is one participant in one room with one BUNDLEd transport. Either side may offer:
  `answer(client_offer)` or `offer()` then `set_answer(client_answer)`; one negotiation at a
  time (a client offer while ours is unanswered is a `conflict`). The first negotiation starts
  the transport (ICE pinned to `[media] host`, then DTLS); media flows once it is connected.
- Publishing: each sending m-line of a client offer becomes a track: the oldest `publish()`
  declaration of its kind (or the one naming its msid track id) gives it its source; an
  undeclared one is a camera (video) or microphone (audio). Subscribing: `subscribe(track_id)`
  adds a sendonly m-line at the next `offer()`, or takes a recvonly m-line of the next client
  offer (WHEP); `needs_negotiation` says when the signaling layer should renegotiate.
- Packet work happens synchronously in the asyncio loop's callbacks (see `_transport`), on the
  pure cores of `_forward`; nothing per packet crosses into Trio.
- Every bad input raises `GB6Error` before anything changes: the room and the peer stay as
  they were.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import attrs
import trio
from aiortc import rtp as artp
from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpHeaderExtensionParameters
from trio_asyncio import aio_as_trio

from edge.sfu import _rtp, _sdp
from edge.sfu._events import (
    KINDS,
    SOURCES,
    ActiveSpeakers,
    ConnectionQuality,
    Kind,
    ParticipantJoined,
    ParticipantLeft,
    PeerState,
    SfuEvent,
    Source,
    TrackInfo,
    TrackMuted,
    TrackPublished,
    TrackStats,
    TrackUnpublished,
)
from edge.sfu._forward import DownTrack, UpTrack
from edge.sfu._speakers import SpeakerDetector
from edge.sfu._transport import PeerTransport
from node.config import MediaConfig
from node.errors import CONFLICT, QUOTA_EXCEEDED, GB6Error, invalid, not_found
from node.ids import new_id

log = logging.getLogger("gb6.sfu")

Listener = Callable[[SfuEvent], None]
_TICK_S = 0.05
_SR_INTERVAL_S = 1.0


def _too_many(what: str, limit: int) -> GB6Error:
    return GB6Error(QUOTA_EXCEEDED, f"too many {what}: at most {limit}")


@attrs.define
class _Section:
    """One m-line of a peer's description, in order; never removed, only rejected."""

    mid: str
    kind: str
    # "inactive": a subscription whose track went; the m-line stays in the BUNDLE group (port
    # 9, a=inactive) rather than rejected: rejecting the group's first m-line makes browsers
    # move the transport (Chromium's connection went back to "new" and failed).
    role: Literal["publish", "subscribe", "slot", "inactive", "rejected"]
    track_id: str | None = None
    codec: RTCRtpCodecParameters | None = None
    extensions: list[RTCRtpHeaderExtensionParameters] = attrs.field(factory=list)
    ssrc: int | None = None
    msid: str | None = None


@attrs.frozen
class _Declared:
    track_id: str
    kind: Kind
    source: Source
    msid_track: str | None


class _Room:
    def __init__(self, name: str, media: MediaConfig) -> None:
        self.name = name
        self.peers: dict[str, Peer] = {}
        self.tracks: dict[str, UpTrack] = {}
        self.codecs: dict[str, RTCRtpCodecParameters] = {}  # each track's, as its publisher sent
        self.speakers = SpeakerDetector(media.speakers_top_n)
        self.last_speakers = 0.0
        self.last_quality = 0.0
        self.last_sr = 0.0

    def emit(self, event: SfuEvent) -> None:
        for peer in list(self.peers.values()):
            peer._deliver(event)


class Sfu:
    """The media relay of one edge. Start it with `nursery.start(sfu.run)`; then `join`."""

    def __init__(self, media: MediaConfig) -> None:
        self.media = media
        self._rooms: dict[str, _Room] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; needs the process's trio_asyncio loop to be open."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._ticker)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for room in list(self._rooms.values()):
                    for peer in list(room.peers.values()):
                        await peer.leave()

    def join(self, room: str, participant: str, listener: Listener) -> Peer:
        """Add `participant` to `room`'s media. `listener` gets the room's events (it must not
        block or raise; it is called from the SFU's loop). Raises `conflict` if already in."""
        if self._nursery is None:
            raise GB6Error("unavailable", "the SFU is not running")
        if not room or not participant:
            raise invalid("room and participant are required")
        r = self._rooms.get(room)
        if r is None:
            r = self._rooms[room] = _Room(room, self.media)
        if participant in r.peers:
            raise GB6Error(CONFLICT, f"{participant} is already in the media of {room}")
        if len(r.peers) >= self.media.participants_per_room:
            raise _too_many("participants in this room", self.media.participants_per_room)
        peer = Peer(self, r, participant, listener)
        r.emit(ParticipantJoined(room, participant))
        r.peers[participant] = peer
        peer._deliver(ParticipantJoined(room, participant))
        return peer

    def tracks(self, room: str) -> tuple[TrackInfo, ...]:
        r = self._rooms.get(room)
        return tuple(t.info for t in r.tracks.values()) if r else ()

    def participants(self, room: str) -> tuple[str, ...]:
        r = self._rooms.get(room)
        return tuple(r.peers) if r else ()

    def tap(
        self, room: str, track_id: str, name: str, sink: Callable[[bytes], None]
    ) -> Callable[[], None]:
        """Hand `track_id`'s forwarded packets to `sink` (the recorder): one more subscription
        of the track without a transport, under the subscriber name `name` (not a participant
        id), so the packets are rewritten like a subscriber's (one SSRC, sequence numbers and
        timestamps continuing across publisher restarts and mutes, video from a keyframe: the
        publisher is asked for one). `sink` is called synchronously in the SFU's loop and must
        not block or raise. Returns the function that ends the tap (idempotent); the tap also
        ends with the track. Raises not_found, quota_exceeded (subscribers_per_track)."""
        r = self._rooms.get(room)
        up = r.tracks.get(track_id) if r is not None else None
        if up is None:
            raise not_found(f"no track {track_id} in room {room}")
        if len(up.downtracks) >= self.media.subscribers_per_track:
            raise _too_many("subscribers of this track", self.media.subscribers_per_track)
        down = DownTrack(up, name, _TapSink(sink), random.getrandbits(32) or 1, 64)
        up.add(down)
        up.activate(down, time.monotonic())

        def end() -> None:
            if up.downtracks.get(name) is down:
                up.remove(name)

        return end

    def _start(self, fn: Callable[[], Any]) -> None:
        if self._nursery is None:
            raise GB6Error("unavailable", "the SFU is not running")
        self._nursery.start_soon(fn)

    def _drop_room(self, room: _Room) -> None:
        if not room.peers and self._rooms.get(room.name) is room:
            del self._rooms[room.name]

    async def _ticker(self) -> None:
        media = self.media
        while True:
            await trio.sleep(_TICK_S)
            now = time.monotonic()
            for room in list(self._rooms.values()):
                for up in room.tracks.values():
                    up.tick(now, media.remb_interval_s)
                if now - room.last_sr >= _SR_INTERVAL_S:
                    room.last_sr = now
                    for peer in room.peers.values():
                        peer._send_reports(now)
                if now - room.last_speakers >= media.speaker_interval_s:
                    room.last_speakers = now
                    self._speakers(room)
                if now - room.last_quality >= media.quality_interval_s:
                    room.last_quality = now
                    for peer in list(room.peers.values()):
                        peer._quality()

    def _speakers(self, room: _Room) -> None:
        levels: dict[tuple[str, str], float | None] = {}
        for up in room.tracks.values():
            if up.kind == "audio":
                level = up.take_level()
                levels[(up.info.participant, up.track_id)] = None if up.muted else level
        changed = room.speakers.update(levels)
        if changed is not None:
            room.emit(ActiveSpeakers(room.name, changed))


class _TapSink:
    """A tap's sink (`Sfu.tap`): packets to a function; RTCP nowhere (it reports nothing)."""

    def __init__(self, fn: Callable[[bytes], None]) -> None:
        self.send_rtp = fn

    def send_rtcp(self, data: bytes) -> None:
        pass


class Peer:
    """One participant's media in one room. Made by `Sfu.join`; see the module rules."""

    def __init__(self, sfu: Sfu, room: _Room, participant: str, listener: Listener) -> None:
        self._sfu = sfu
        self._media = sfu.media
        self._room = room
        self.room = room.name
        self.participant = participant
        self._listener = listener
        self._transport = PeerTransport(sfu.media, self._on_rtp, self._on_rtcp)
        self._local: _sdp.Local | None = None
        self._sections: list[_Section] = []
        self._offered: list[_Section] | None = None  # our offer awaiting its answer
        self._declared: deque[_Declared] = deque()
        self._published: dict[str, UpTrack] = {}
        self._by_ssrc: dict[int, UpTrack] = {}
        self._by_mid: dict[str, UpTrack] = {}
        self._mid_ext = 0
        self._subs: dict[str, DownTrack] = {}  # by published track id
        # Slots (WHEP): sendonly m-lines fed by whichever track `fill` gives them; each keeps
        # its DownTrack (by mid) so its SSRC, sequence numbers and timestamps continue.
        self._slot_codecs: dict[str, str] | None = None
        self._slot_down: dict[str, DownTrack] = {}
        self._down_by_ssrc: dict[int, DownTrack] = {}
        self._started = False
        self._remote_ufrag: str | None = None
        self._dtls_role = "auto"
        self._early_candidates: list[Any] = []
        self._scope: trio.CancelScope | None = None
        self._left = False
        self._version = 0
        self._quality_level = ""
        self._busy = trio.Lock()
        self.state: Literal["new", "connected", "failed", "closed"] = "new"

    # -- what the signaling layer reads ---------------------------------------------------

    @property
    def tracks(self) -> tuple[TrackInfo, ...]:
        """This participant's published tracks."""
        return tuple(t.info for t in self._published.values())

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return tuple(self._subs)

    @property
    def needs_negotiation(self) -> bool:
        """True when a subscription or unsubscription waits for an `offer()`."""
        placed = {
            s.track_id
            for s in self._sections
            if s.role == "subscribe" or (s.role == "slot" and s.track_id in self._subs)
        }
        return placed != set(self._subs)

    def stats(self) -> tuple[TrackStats, ...]:
        up = [t.stats() for t in self._published.values()]
        return (*up, *(d.stats() for d in self._subs.values()))

    def mid_of(self, track_id: str) -> str | None:
        """The m-line (mid) carrying a subscribed or published track, once negotiated."""
        return next((s.mid for s in self._sections if s.track_id == track_id), None)

    # -- tracks ---------------------------------------------------------------------------

    def publish(self, kind: str, source: str, *, msid_track: str | None = None) -> str:
        """Declare a track this participant will send in its next offer; returns its id."""
        self._check_open()
        if kind not in KINDS:
            raise invalid(f"kind must be one of {', '.join(KINDS)}")
        if source not in SOURCES:
            raise invalid(f"source must be one of {', '.join(SOURCES)}")
        if len(self._published) + len(self._declared) >= self._media.tracks_per_participant:
            raise _too_many("tracks for this participant", self._media.tracks_per_participant)
        decl = _Declared(new_id("tr"), kind, source, msid_track)  # type: ignore[arg-type]
        self._declared.append(decl)
        return decl.track_id

    def unpublish(self, track_id: str) -> None:
        self._check_open()
        up = self._published.get(track_id)
        if up is None:
            if any(d.track_id == track_id for d in self._declared):
                self._declared = deque(d for d in self._declared if d.track_id != track_id)
                return
            raise not_found(f"no track {track_id} published by {self.participant}")
        self._remove_track(up)

    def mute(self, track_id: str, muted: bool = True) -> None:
        """Stop (or resume) forwarding one of this participant's tracks; the room is told."""
        self._check_open()
        up = self._published.get(track_id)
        if up is None:
            raise not_found(f"no track {track_id} published by {self.participant}")
        if up.muted != muted:
            up.set_muted(muted, time.monotonic())
            self._room.emit(TrackMuted(self.room, self.participant, track_id, muted))

    def subscribe(self, track_id: str) -> None:
        """Receive a published track; it flows after the next negotiation."""
        self._check_open()
        up = self._room.tracks.get(track_id)
        if up is None:
            raise not_found(f"no track {track_id} in room {self.room}")
        if up.info.participant == self.participant:
            raise invalid("a participant does not subscribe to its own track")
        if track_id in self._subs:
            return
        if len(self._subs) >= self._media.subscriptions_per_participant:
            raise _too_many("subscriptions", self._media.subscriptions_per_participant)
        if len(up.downtracks) >= self._media.subscribers_per_track:
            raise _too_many("subscribers of this track", self._media.subscribers_per_track)
        down = DownTrack(
            up,
            self.participant,
            self._transport,
            self._new_ssrc(),
            self._media.nack_history_packets,
        )
        self._subs[track_id] = down
        self._down_by_ssrc[down.out_ssrc] = down
        up.add(down)

    def unsubscribe(self, track_id: str) -> None:
        self._check_open()
        down = self._subs.pop(track_id, None)
        if down is None:
            raise not_found(f"not subscribed to {track_id}")
        self._down_by_ssrc.pop(down.out_ssrc, None)
        down.track.remove(self.participant)

    def switch(self, track_id: str, to_track_id: str) -> None:
        """Feed the m-line receiving `track_id` from `to_track_id` instead (same kind and
        codec), with no renegotiation: the subscriber's SSRC, sequence numbers and timestamps
        continue. After it, the subscription is known by `to_track_id`."""
        self._check_open()
        down = self._subs.get(track_id)
        if down is None:
            raise not_found(f"not subscribed to {track_id}")
        up = self._room.tracks.get(to_track_id)
        if up is None:
            raise not_found(f"no track {to_track_id} in room {self.room}")
        if up.kind != down.track.kind or up.codec != down.track.codec:
            raise invalid("switch needs a track of the same kind and codec")
        if to_track_id in self._subs or up.info.participant == self.participant:
            raise invalid(f"{to_track_id} is already received or is your own")
        if len(up.downtracks) >= self._media.subscribers_per_track:
            raise _too_many("subscribers of this track", self._media.subscribers_per_track)
        down.track.remove(self.participant)
        del self._subs[track_id]
        down.track = up  # out_pt stays: it is the subscriber's negotiated payload type
        self._subs[to_track_id] = down
        for s in self._sections:
            if s.track_id == track_id and s.role == "subscribe":
                s.track_id = to_track_id
        up.add(down)
        paused = down.paused
        down.paused = True
        if not paused:
            up.activate(down, time.monotonic())

    def accept_slots(self, prefer: dict[str, str]) -> None:
        """The next client offer's recvonly m-lines that no subscription takes become slots
        (WHEP): sendonly m-lines with an SSRC and no track yet, whose codec is `prefer[kind]`
        when the m-line offers it, else its first codec the SFU forwards. `fill` feeds them."""
        self._check_open()
        self._slot_codecs = dict(prefer)

    def fill(self, track_id: str) -> bool:
        """Feed a free slot of the track's kind and codec from `track_id`, with no
        renegotiation (a slot is free when its track is gone or unsubscribed); it flows once
        the transport is up. False when no slot takes it (none free, or the track is already
        received or this participant's own). Raises not_found, quota_exceeded."""
        self._check_open()
        up = self._room.tracks.get(track_id)
        if up is None:
            raise not_found(f"no track {track_id} in room {self.room}")
        if track_id in self._subs or up.info.participant == self.participant:
            return False
        for s in self._sections:
            if s.role != "slot" or s.kind != up.kind or s.track_id in self._subs:
                continue
            if s.codec is None or s.ssrc is None or s.codec.name.lower() != up.codec:
                continue
            if len(up.downtracks) >= self._media.subscribers_per_track:
                raise _too_many("subscribers of this track", self._media.subscribers_per_track)
            down = self._slot_down.get(s.mid)
            if down is None:
                history = self._media.nack_history_packets
                down = DownTrack(up, self.participant, self._transport, s.ssrc, history)
                down.out_pt = s.codec.payloadType or down.out_pt
                self._slot_down[s.mid] = down
            else:
                down.track = up  # out_pt stays: the slot's negotiated payload type
            down.paused = True
            self._down_by_ssrc[s.ssrc] = down
            self._subs[track_id] = down
            s.track_id = track_id
            up.add(down)
            if self.state == "connected":
                up.activate(down, time.monotonic())
            return True
        return False

    # -- negotiation ----------------------------------------------------------------------

    async def answer(self, offer: str) -> str:
        """Apply a client offer; returns our answer. Raises `invalid` (bad SDP, unsupported
        codecs), `conflict` (our offer is unanswered), `quota_exceeded` (too many tracks)."""
        self._check_open()
        async with self._busy:
            if self._offered is not None:
                raise GB6Error(CONFLICT, "an offer from the SFU awaits its answer")
            desc = _sdp.parse(offer, max_bytes=self._media.sdp_bytes, kind="offer")
            remote = _sdp.transport_of(desc, "offer")
            self._check_transport(remote)
            plan = self._plan_answer(desc)
            await self._ensure_local()
            # Nothing is changed before this line.
            self._apply_answer_plan(desc, plan)
            role = "client" if remote.dtls.role == "server" else "server"
            setup = self._dtls_role if self._started else role
            text = self._describe(self._sections, "answer", setup)
            if not self._started:
                self._transport.set_controlling(False)
                self._start_transport(remote, controlling=False, dtls_role=role)
            self._activate()
            return text

    async def offer(self) -> str:
        """Our offer: every section so far plus an m-line per new subscription."""
        self._check_open()
        async with self._busy:
            await self._ensure_local()
            sections = [attrs.evolve(s) for s in self._sections]
            placed: set[str] = set()
            for s in sections:
                if s.role == "subscribe" and s.track_id not in self._subs:
                    s.role, s.track_id = "inactive", None
                elif s.role in ("subscribe", "slot") and s.track_id in self._subs:
                    placed.add(s.track_id)
            used = {s.mid for s in sections}
            for track_id, down in self._subs.items():
                if track_id in placed:
                    continue
                mid = _free_mid(used)
                up = down.track
                codec = _sdp.attrs_evolve_codec(
                    self._room.codecs[up.track_id], _sdp.default_feedback(up.kind)
                )
                sections.append(
                    _Section(
                        mid=mid,
                        kind=up.kind,
                        role="subscribe",
                        track_id=track_id,
                        codec=codec,
                        ssrc=down.out_ssrc,
                        msid=f"{up.info.participant} {track_id}",
                    )
                )
            self._offered = sections
            if not self._started:
                self._transport.set_controlling(True)
            setup = self._dtls_role if self._started else "auto"
            return self._describe(sections, "offer", setup)

    async def set_answer(self, answer: str) -> None:
        """Apply the client's answer to our last `offer()`."""
        self._check_open()
        async with self._busy:
            offered = self._offered
            if offered is None:
                raise GB6Error(CONFLICT, "no offer from the SFU awaits an answer")
            desc = _sdp.parse(answer, max_bytes=self._media.sdp_bytes, kind="answer")
            if [m.rtp.muxId for m in desc.media] != [s.mid for s in offered]:
                raise invalid("sdp answer: its m-lines are not those of the offer")
            remote = _sdp.transport_of(desc, "answer") if not self._started else None
            if remote is not None and remote.dtls.role not in ("client", "server"):
                raise invalid("sdp answer: a=setup must be active or passive")
            for s, m in zip(offered, desc.media, strict=True):
                if s.role != "subscribe":
                    continue
                if m.port == 0 or m.direction not in ("recvonly", "sendrecv"):
                    s.role, s.track_id = "rejected", None
                    continue
                down = self._subs.get(s.track_id or "")
                chosen = _sdp.choose_codec(m, down.track.codec) if down else None
                if down is None or chosen is None:
                    s.role, s.track_id = "rejected", None
                    continue
                down.out_pt = chosen.payloadType or down.out_pt
            self._sections = offered
            self._offered = None
            if remote is not None:
                role = "client" if remote.dtls.role == "server" else "server"
                self._start_transport(remote, controlling=True, dtls_role=role)
            self._activate()

    async def add_ice_candidate(self, candidate: str | None) -> None:
        """A trickled remote candidate; None (or "") means end of candidates."""
        self._check_open()
        cand = _sdp.candidate(candidate, self._media.ice_candidate_chars) if candidate else None
        if cand is not None and cand.ip and not _ip_allowed(cand.ip):
            raise invalid("ice candidate: only IP addresses are accepted (no mDNS names)")
        if not self._transport.trickle_open:  # the transport's task takes them, in order
            if len(self._early_candidates) >= self._media.remote_candidates:
                raise _too_many("ICE candidates", self._media.remote_candidates)
            self._early_candidates.append(cand)
            return
        await aio_as_trio(self._transport.add_candidate)(cand)

    async def leave(self) -> None:
        """Unpublish everything, stop receiving, close the transport. Idempotent."""
        if self._left:
            return
        self._left = True
        for up in list(self._published.values()):
            self._remove_track(up)
        for track_id in list(self._subs):
            down = self._subs.pop(track_id)
            down.track.remove(self.participant)
        self._down_by_ssrc.clear()
        if self._scope is not None:
            self._scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(3):
            await aio_as_trio(self._transport.close)()
        room = self._room
        room.peers.pop(self.participant, None)
        self._set_state("closed")
        room.emit(ParticipantLeft(self.room, self.participant))
        self._sfu._drop_room(room)

    # -- internals: negotiation -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._left:
            raise GB6Error("invalid", f"{self.participant} has left the media of {self.room}")

    def _check_transport(self, remote: _sdp.Transport) -> None:
        if self._remote_ufrag is not None and remote.ice.usernameFragment != self._remote_ufrag:
            raise invalid("sdp: ICE restart is not supported (ice-ufrag changed)")

    def _plan_answer(self, desc: Any) -> list[tuple[str, Any]]:
        """Check every m-line before anything changes; what each one becomes."""
        plan: list[tuple[str, Any]] = []
        new_tracks = 0
        slots = sum(1 for s in self._sections if s.role == "slot")
        declared = list(self._declared)
        wanted = [t for t in self._subs if t not in {s.track_id for s in self._sections}]
        if len(desc.media) < len(self._sections):
            raise invalid("sdp offer: m-lines may not be removed")
        for i, m in enumerate(desc.media):
            mid = m.rtp.muxId
            if i < len(self._sections):
                s = self._sections[i]
                if mid != s.mid and m.port != 0:
                    raise invalid(f"sdp offer: m-line {i} has mid {mid!r}, was {s.mid!r}")
                sending = m.port != 0 and m.direction in ("sendonly", "sendrecv")
                plan.append(("keep", sending))
                continue
            if any(s.mid == mid for s in self._sections) or any(
                p[0] != "keep" and desc.media[j].rtp.muxId == mid for j, p in enumerate(plan)
            ):
                raise invalid(f"sdp offer: duplicate mid {mid!r}")
            if m.port == 0 or m.kind not in KINDS or m.direction == "inactive":
                plan.append(("reject", None))
            elif m.direction in ("sendonly", "sendrecv"):
                codec = _sdp.choose_codec(m)
                if codec is None:
                    names = ", ".join(_sdp.CODECS[m.kind])
                    raise invalid(
                        f"sdp offer: m-line {mid}: no {m.kind} codec the SFU forwards ({names})"
                    )
                new_tracks += 1
                limit = self._media.tracks_per_participant
                if len(self._published) + new_tracks > limit:
                    raise _too_many("tracks for this participant", limit)
                msid_track = m.msid.split()[-1] if m.msid else None
                decl = next(
                    (d for d in declared if d.msid_track and d.msid_track == msid_track), None
                )
                decl = decl or next(
                    (d for d in declared if d.kind == m.kind and not d.msid_track), None
                )
                if decl is not None:
                    declared.remove(decl)
                plan.append(("publish", (codec, decl)))
            else:  # recvonly: a subscription the client makes room for (WHEP)
                track_id = next((t for t in wanted if self._subs[t].track.kind == m.kind), None)
                codec = _sdp.choose_codec(m, self._subs[track_id].track.codec) if track_id else None
                if track_id is None and self._slot_codecs is not None:
                    slots += 1
                    limit = self._media.subscriptions_per_participant
                    if len(self._subs) + slots > limit:
                        raise _too_many("subscriptions", limit)
                    preferred = self._slot_codecs.get(m.kind)
                    codec = (_sdp.choose_codec(m, preferred) if preferred else None) or (
                        _sdp.choose_codec(m)
                    )
                    plan.append(("slot", codec) if codec is not None else ("reject", None))
                elif track_id is None or codec is None:
                    plan.append(("reject", None))
                else:
                    wanted.remove(track_id)
                    plan.append(("subscribe", (track_id, codec)))
        return plan

    def _apply_answer_plan(self, desc: Any, plan: list[tuple[str, Any]]) -> None:
        remote = _sdp.transport_of(desc, "offer")
        self._remote_ufrag = remote.ice.usernameFragment
        for i, (m, (what, arg)) in enumerate(zip(desc.media, plan, strict=True)):
            mid = m.rtp.muxId or str(i)
            if what == "keep":
                s = self._sections[i]
                if s.role == "publish" and not arg and s.track_id in self._published:
                    self._remove_track(self._published[s.track_id])
                    s.role = "rejected"
                continue
            if what == "reject":
                self._sections.append(_Section(mid=mid, kind=m.kind, role="rejected"))
                continue
            if what == "slot":
                ssrc = self._new_ssrc()
                self._sections.append(
                    _Section(
                        mid=mid,
                        kind=m.kind,
                        role="slot",
                        codec=arg,
                        ssrc=ssrc,
                        msid=f"{self.participant} slot-{mid}",
                    )
                )
                continue
            if what == "subscribe":
                track_id, codec = arg
                down = self._subs[track_id]
                down.out_pt = codec.payloadType
                up = down.track
                self._sections.append(
                    _Section(
                        mid=mid,
                        kind=m.kind,
                        role="subscribe",
                        track_id=track_id,
                        codec=codec,
                        ssrc=down.out_ssrc,
                        msid=f"{up.info.participant} {track_id}",
                    )
                )
                continue
            codec, decl = arg
            extensions = _sdp.accepted_extensions(m)
            if decl is not None:
                self._declared.remove(decl)
                track_id, source = decl.track_id, decl.source
            else:
                track_id = new_id("tr")
                source = "camera" if m.kind == "video" else "microphone"
            info = TrackInfo(
                track_id=track_id,
                participant=self.participant,
                kind=m.kind,
                source=source,
                codec=codec.name.lower(),
                clock_rate=codec.clockRate,
                channels=(codec.channels or 1) if m.kind == "audio" else 0,
            )
            cap = (
                self._media.video_bitrate_cap_bps
                if m.kind == "video"
                else self._media.audio_bitrate_cap_bps
            )
            up = UpTrack(
                info,
                codec_pt=codec.payloadType,
                clock_rate=codec.clockRate,
                feedback=self._transport,
                keyframe_interval=self._media.keyframe_request_interval_s,
                remb_cap=cap,
                audio_level_id=_sdp.extension_id(extensions, _sdp.AUDIO_LEVEL_URI),
            )
            for ssrc_info in m.ssrc[:1]:
                up.ssrcs.add(ssrc_info.ssrc)
                self._by_ssrc[ssrc_info.ssrc] = up
            self._by_mid[mid] = up
            self._mid_ext = self._mid_ext or _sdp.extension_id(extensions, _sdp.MID_URI)
            self._published[track_id] = up
            self._room.tracks[track_id] = up
            self._sections.append(
                _Section(
                    mid=mid,
                    kind=m.kind,
                    role="publish",
                    track_id=track_id,
                    codec=codec,
                    extensions=extensions,
                )
            )
            self._room.codecs[track_id] = codec
            self._room.emit(TrackPublished(self.room, info))

    def _describe(self, sections: list[_Section], kind: str, setup: str) -> str:
        assert self._local is not None
        media = []
        for s in sections:
            direction = {
                "publish": "recvonly",
                "subscribe": "sendonly",
                "slot": "sendonly",
                "inactive": "inactive",
            }.get(s.role, "rejected")
            media.append(
                _sdp.media_section(
                    self._local,
                    kind=s.kind,
                    mid=s.mid,
                    direction=direction,
                    setup=setup,
                    codec=s.codec,
                    extensions=s.extensions if s.role == "publish" else [],
                    ssrc=s.ssrc,
                    msid=s.msid,
                )
            )
        self._version += 1
        return _sdp.session(media, kind, self._version)

    async def _ensure_local(self) -> None:
        if self._local is None:
            ice, candidates, fingerprints = await aio_as_trio(self._transport.gather)()
            self._local = _sdp.Local(
                ice=ice, fingerprints=tuple(fingerprints), candidates=tuple(candidates), host=""
            )

    def _start_transport(
        self, remote: _sdp.Transport, *, controlling: bool, dtls_role: str
    ) -> None:
        self._started = True
        self._dtls_role = dtls_role
        self._remote_ufrag = remote.ice.usernameFragment
        # The description's candidates first, then those trickled before it (end-of-candidates
        # last); the list stays the buffer `serve` reads until it opens trickling.
        early = self._early_candidates
        candidates: list[Any] = [c for c in remote.candidates if _ip_allowed(c.ip)]
        candidates += [c for c in early if c is not None]
        if remote.end_of_candidates or None in early:
            candidates.append(None)
        self._early_candidates = candidates
        scope = trio.CancelScope(deadline=trio.current_time() + self._media.connect_timeout_s)
        self._scope = scope

        def connected() -> None:
            scope.deadline = math.inf
            self._set_state("connected")
            self._activate()

        async def serve() -> None:
            ok = False
            with scope:
                serving = aio_as_trio(self._transport.serve)
                ok = await serving(
                    remote.ice,
                    remote.dtls,
                    candidates,
                    controlling=controlling,
                    dtls_role=dtls_role,
                    on_connected=connected,
                )
            if not self._left and (not ok or scope.cancelled_caught):
                self._set_state("failed")

        self._sfu._start(serve)

    def _activate(self) -> None:
        """Start every negotiated subscription once the transport is up."""
        if self.state != "connected":
            return
        now = time.monotonic()
        placed = {s.track_id for s in self._sections if s.role in ("subscribe", "slot")}
        for track_id, down in self._subs.items():
            if track_id in placed and down.paused:
                down.track.activate(down, now)

    def _new_ssrc(self) -> int:
        while True:
            ssrc = random.getrandbits(32)
            slots = (s.ssrc for s in self._sections if s.role == "slot")
            if ssrc and ssrc not in self._down_by_ssrc and ssrc not in slots:
                return ssrc

    def _remove_track(self, up: UpTrack) -> None:
        self._published.pop(up.track_id, None)
        self._room.tracks.pop(up.track_id, None)
        self._room.codecs.pop(up.track_id, None)
        for ssrc in up.ssrcs:
            self._by_ssrc.pop(ssrc, None)
        for mid, t in list(self._by_mid.items()):
            if t is up:
                del self._by_mid[mid]
        for subscriber in list(up.downtracks):
            peer = self._room.peers.get(subscriber)
            if peer is not None:
                down = peer._subs.pop(up.track_id, None)
                if down is not None:
                    peer._down_by_ssrc.pop(down.out_ssrc, None)
            up.remove(subscriber)
        self._room.emit(TrackUnpublished(self.room, self.participant, up.track_id))

    def _set_state(self, state: Literal["connected", "failed", "closed"]) -> None:
        if self.state != state:
            self.state = state
            self._room.emit(PeerState(self.room, self.participant, state))

    def _deliver(self, event: SfuEvent) -> None:
        try:
            self._listener(event)
        except Exception:
            log.exception("sfu listener of %s failed", self.participant)

    # -- internals: packets (called in the asyncio loop, synchronously) ---------------------

    def _on_rtp(self, data: bytes) -> None:
        try:
            pkt = _rtp.RtpIn(data)
        except ValueError:
            return
        up = self._by_ssrc.get(pkt.ssrc)
        if up is None:
            mid = _rtp.mid_extension(data, self._mid_ext) if self._mid_ext else None
            up = self._by_mid.get(mid) if mid else None
            if up is None:
                return
            # A new SSRC on a known m-line: the publisher restarted its sender.
            up.ssrcs.add(pkt.ssrc)
            self._by_ssrc[pkt.ssrc] = up
        up.on_rtp(pkt, time.monotonic())

    def _on_rtcp(self, data: bytes) -> None:
        try:
            packets = _rtp.parse_rtcp(data)
        except ValueError:
            return
        now = time.monotonic()
        subs = self._down_by_ssrc
        for p in packets:
            if isinstance(p, (artp.RtcpRrPacket, artp.RtcpSrPacket)):
                for r in p.reports:
                    down = subs.get(r.ssrc)
                    if down is not None:
                        down.on_receiver_report(r.fraction_lost, r.jitter, r.lsr, r.dlsr, now)
            elif isinstance(p, artp.RtcpRtpfbPacket):
                down = subs.get(p.media_ssrc)
                if down is not None and p.fmt == artp.RTCP_RTPFB_NACK:
                    down.on_nack(p.lost)
            elif isinstance(p, artp.RtcpPsfbPacket):
                if p.fmt == artp.RTCP_PSFB_PLI:
                    down = subs.get(p.media_ssrc)
                    if down is not None:
                        down.track.request_keyframe(now)
                elif p.fmt == artp.RTCP_PSFB_FIR and len(p.fci) >= 4:
                    down = subs.get(int.from_bytes(p.fci[:4], "big"))
                    if down is not None:
                        down.track.request_keyframe(now)
                elif p.fmt == artp.RTCP_PSFB_APP:
                    try:
                        bitrate, ssrcs = artp.unpack_remb_fci(p.fci)
                    except ValueError:
                        continue
                    for ssrc in ssrcs[:64]:
                        down = subs.get(ssrc)
                        if down is not None:
                            down.remb_bps = bitrate

    def _send_reports(self, now: float) -> None:
        if self.state != "connected":
            return
        for down in self._subs.values():
            report = down.sender_report(now)
            if report is not None:
                self._transport.send_rtcp(report)

    def _quality(self) -> None:
        ups = list(self._published.values())
        for up in ups:
            before = up._received_prior
            up.interval_stats()
            if not up.muted and up.packets == before and self.state == "connected":
                self._report_quality("lost", 1.0, 0.0, 0.0)
                return
        downs = list(self._subs.values())
        if not ups and not downs:
            return
        loss = max([u.loss for u in ups] + [d.loss for d in downs] + [0.0])
        jitter = max([u.stats().jitter_ms for u in ups] + [d.jitter_ms for d in downs] + [0.0])
        rtt = max([d.rtt_ms for d in downs] + [0.0])
        level = "excellent" if loss < 0.02 else "good" if loss < 0.10 else "poor"
        self._report_quality(level, loss, jitter, rtt)

    def _report_quality(self, level: Any, loss: float, jitter: float, rtt: float) -> None:
        if level != self._quality_level:
            self._quality_level = level
            self._room.emit(
                ConnectionQuality(
                    self.room,
                    self.participant,
                    level,
                    round(loss, 4),
                    round(jitter, 2),
                    round(rtt, 2),
                )
            )


def _free_mid(used: set[str]) -> str:
    i = 0
    while str(i) in used:
        i += 1
    used.add(str(i))
    return str(i)


def _ip_allowed(ip: str) -> bool:
    """Candidates must be IP literals: an mDNS name would need a resolver we do not run."""
    import ipaddress

    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True
