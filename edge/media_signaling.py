"""Media signaling: the `media.*` ops of the client WebSocket, and each room's media on this edge.

Who holds what:
- `MediaRooms` (one per edge, a component started next to the gateway, inside the process's
  trio-asyncio loop): the SFU's participants of this edge, from WebSockets and from WHIP/WHEP
  (edge/media_http.py), per room: who is a host, the live co-hosts, the viewer count. Its
  nursery runs the leaves of closed sockets and ended HTTP sessions, and the viewer ticker.
- `MediaSession`: one participant (an SFU `Peer`) of one room: its principal, its role, and
  the `media_participants` slot it holds: taken at join from the instance's origin
  (`origin.acquire_slot`: the shard itself in one process, over the link on a cluster edge,
  so the plan's limit holds across every edge), released exactly once at leave.
- `ConnectionMedia`: one WebSocket's sessions by room (at most
  `limits.media_rooms_per_connection`); the socket closing leaves them all.

Rules:
- Only members of a `meeting` or `live` room join its media (`room_for_member`: `not_found` or
  `forbidden` exactly as for its messages); a `chat` room is `invalid`. A member removed from
  the room is taken out of its media, and so is a deleted user or one of a suspended instance
  (WHIP/WHEP sessions included: they have no socket the gateway would close).
- In a `live` room the room's creator, the instance's owners and admins, and the co-hosts the
  creator names (`media.cohost`) are hosts; everybody else joins as a viewer: `media.publish`
  and offers with a sending m-line are `forbidden`, and viewers are not announced to the room,
  only counted (`media.viewers`, at most once per `limits.media_viewer_interval_s`).
- Naming a co-host takes effect at once for the user's joined WebSocket sessions: a viewer
  becomes a host (`media.role` to it, `media.participant_joined` to the others; it may then
  publish). Un-naming one who is a host only as a co-host unpublishes its tracks and makes it
  a viewer again (`media.role`; the others see its tracks go and `media.participant_left`);
  its WHIP sessions end. WHEP sessions stay viewers. Co-hosts are this edge's (a cluster
  does not share them between edges).
- Negotiation never collides because only the client starts it: the client offers for its own
  tracks (`media.offer` → the SFU's answer), and asks for the SFU's offer
  (`media.subscribe`, `media.unsubscribe`, `media.renegotiate` → an `ok` with `sdp`, answered
  with `media.answer`). A client runs one negotiation at a time (the SFU refuses a second with
  `conflict`).
- The SFU calls each session's listener synchronously, in order: it only turns events into
  frames for the session's connection (and tells the recorder about its own tracks).
- Every refusal is a `GB6Error` raised before anything changed (the SFU guarantees it for its
  calls; the checks here come before them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, Protocol

import attrs
import trio

from edge.protocol import MediaRequest
from edge.sfu import (
    ActiveSpeakers,
    ConnectionQuality,
    ParticipantJoined,
    ParticipantLeft,
    Peer,
    PeerState,
    Sfu,
    SfuEvent,
    TrackInfo,
    TrackMuted,
    TrackPublished,
    TrackUnpublished,
)
from node.config import Config
from node.errors import CONFLICT, QUOTA_EXCEEDED, UNAVAILABLE, GB6Error, forbidden, invalid
from node.ids import new_id
from node.log import log
from node.retry import while_unavailable
from origin.membership import MembershipChange, Principal, RoomState
from origin.records import Instance, User
from replication.edge_link import LinkLost, RemoteOrigin

MEDIA_KINDS = frozenset({"meeting", "live"})
# A session's slot, taken again once its shard's link is back, is asked this long while the
# origin answers `unavailable` (busy, or the instance's shard not known for a moment).
_SLOT_AGAIN_RETRY_S = 10.0
Role = Literal["host", "viewer"]
# What a session asks for: "auto" (the WebSocket: host or viewer by the room's rules), "host"
# (WHIP: must be allowed to publish), "viewer" (WHEP: never publishes).
Want = Literal["auto", "host", "viewer"]
Sink = Callable[[str, dict[str, Any]], object]  # (event type, fields) → written to the client


class Origin(Protocol):
    """What media needs from the edge's origin interface (OriginShard or RemoteOrigin)."""

    def room_for_member(self, who: Principal, room_id: str) -> RoomState: ...

    async def acquire_slot(self, instance: str, resource: str) -> Callable[[], None]: ...


class Recordings(Protocol):
    """The recorder's side (edge/media_recording.py): told about published tracks (from the
    SFU's loop, synchronously), started or stopped by `media.record`, all stopped at a drain;
    asked which runs as a participant joins."""

    def track_published(self, room: str, track: TrackInfo) -> None: ...

    def track_unpublished(self, room: str, track_id: str) -> None: ...

    async def control(self, who: Principal, room: str, on: bool) -> dict[str, Any]: ...

    def running(self, room: str) -> str | None: ...

    async def finish_all(self) -> None: ...

    def abandon(self) -> None: ...


# --- the pure part: SFU events → wire events ------------------------------------------------


def track_json(track: TrackInfo, user: str) -> dict[str, Any]:
    return {
        "id": track.track_id,
        "participant": track.participant,
        "user": user,
        "kind": track.kind,
        "source": track.source,
        "codec": track.codec,
        "muted": track.muted,
    }


def wire_event(
    event: SfuEvent, users: dict[str, str], hidden: Callable[[str], bool]
) -> tuple[str, dict[str, Any]] | None:
    """The client's view of an SFU event (None: not shown). `users`: participant → user id;
    `hidden(participant)`: a live room's viewer, whose joins and leaves are only counted."""
    match event:
        case ParticipantJoined() | ParticipantLeft():
            if hidden(event.participant):
                return None
            kind = "joined" if isinstance(event, ParticipantJoined) else "left"
            return f"media.participant_{kind}", {
                "room": event.room,
                "participant": event.participant,
                "user": users.get(event.participant, ""),
            }
        case TrackPublished():
            user = users.get(event.track.participant, "")
            return "media.track_published", {
                "room": event.room,
                "track": track_json(event.track, user),
            }
        case TrackUnpublished():
            return "media.track_unpublished", {
                "room": event.room,
                "participant": event.participant,
                "track": event.track_id,
            }
        case TrackMuted():
            return "media.track_muted", {
                "room": event.room,
                "participant": event.participant,
                "track": event.track_id,
                "muted": event.muted,
            }
        case ActiveSpeakers():
            speakers = [
                {
                    "participant": s.participant,
                    "user": users.get(s.participant, ""),
                    "track": s.track_id,
                    "level": round(s.level, 3),
                }
                for s in event.speakers
            ]
            return "media.speakers", {"room": event.room, "speakers": speakers}
        case ConnectionQuality():
            if hidden(event.participant):
                return None
            return "media.quality", {
                "room": event.room,
                "participant": event.participant,
                "quality": event.quality,
                "loss": event.loss,
                "jitter_ms": event.jitter_ms,
                "rtt_ms": event.rtt_ms,
            }
        case PeerState():
            return None  # only the participant's own: MediaSession sends it
    return None


def sending_sections(sdp: str) -> int:
    """How many audio/video m-lines of an offer send media (sendrecv or sendonly, port ≠ 0)."""
    count = 0
    current: tuple[bool, str] | None = None  # (counts, direction) of the m-line being read
    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            if current is not None and current[0] and current[1] in ("sendrecv", "sendonly"):
                count += 1
            parts = line[2:].split()
            live = len(parts) > 1 and parts[1] != "0" and parts[0] in ("audio", "video")
            current = (live, "sendrecv")
        elif current is not None and line in (
            "a=sendrecv",
            "a=sendonly",
            "a=recvonly",
            "a=inactive",
        ):
            current = (current[0], line[2:])
    if current is not None and current[0] and current[1] in ("sendrecv", "sendonly"):
        count += 1
    return count


def may_host(room: RoomState, who: Principal, cohosts: Iterable[str]) -> bool:
    """Who publishes: everyone in a meeting; in a live room its creator, the instance's owners
    and admins, and its co-hosts."""
    record = room.record
    if record.kind != "live":
        return True
    return record.creator == who.id or who.moderator or who.id in cohosts


# --- sessions and rooms --------------------------------------------------------------------


@attrs.define(eq=False)
class _MediaRoom:
    kind: str
    users: dict[str, str] = attrs.Factory(dict)  # participant → user
    sessions: dict[str, MediaSession] = attrs.Factory(dict)
    cohosts: set[str] = attrs.Factory(set)
    viewers: int = 0
    viewers_sent: int = 0


class MediaSession:
    """One participant of one room's media. Made by `MediaRooms.join`; end it with `leave()`
    (or `MediaRooms.end`, which leaves from the component's nursery)."""

    def __init__(
        self,
        rooms: MediaRooms,
        who: Principal,
        room: str,
        kind: str,
        role: Role,
        sink: Sink | None,
        want: Want = "auto",
    ) -> None:
        self.rooms = rooms
        self.want: Want = want
        self.who = who
        self.room = room
        self.kind = kind
        self.role: Role = role
        self.id = new_id("pa")
        self.sink = sink
        self.peer: Peer | None = None
        self.left = False
        self.ending = False  # its leave is under way or scheduled (`MediaRooms.end`)
        self.on_state: Callable[[str], None] | None = None  # HTTP sessions end on failed/closed
        self.release_slot: Callable[[], None] = _nothing  # the media_participants slot

    @property
    def over(self) -> bool:
        """Left, or its leave under way: it takes no slot and answers no op."""
        return self.left or self.ending

    @property
    def hidden(self) -> bool:
        return self.kind == "live" and self.role == "viewer"

    def require_peer(self) -> Peer:
        if self.peer is None or self.over:
            raise invalid(f"not in the media of room {self.room}")
        return self.peer

    def require_host(self) -> Peer:
        peer = self.require_peer()
        if self.role != "host":
            raise forbidden("viewers of a live room do not publish")
        return peer

    async def answer(self, offer: str) -> str:
        """The client's offer → the SFU's answer (viewers may not offer to send)."""
        peer = self.require_peer()
        if self.role != "host" and sending_sections(offer):
            raise forbidden("viewers of a live room do not publish: offer receive-only m-lines")
        return await peer.answer(offer)

    def fill_slots(self) -> None:
        """WHEP: feed free slots from the hosts' tracks, newest first (edge/media_http.py)."""
        peer = self.peer
        if peer is None or self.over:
            return
        for track in reversed(self.rooms.tracks_of_hosts(self.room)):
            try:
                peer.fill(track.track_id)
            except GB6Error as exc:  # too many subscribers of that track: the slot waits
                log("media_slot_refused", participant=self.id, error=exc.message)

    async def leave(self) -> None:
        """Leave the SFU, release the quota, forget the session. Idempotent."""
        if self.left:
            return
        self.left = True
        try:
            if self.peer is not None:
                await self.peer.leave()
        finally:
            self.rooms._forget(self)

    def _listener(self, event: SfuEvent) -> None:
        r = self.rooms._rooms.get(self.room)
        if r is None:
            return
        tap = self.rooms.recordings
        if tap is not None:  # each track event once: at its own publisher's session
            if isinstance(event, TrackPublished) and event.track.participant == self.id:
                tap.track_published(self.room, event.track)
            elif isinstance(event, TrackUnpublished) and event.participant == self.id:
                tap.track_unpublished(self.room, event.track_id)
        if self.want == "viewer" and isinstance(event, TrackPublished | TrackUnpublished):
            self.fill_slots()  # WHEP: a new track, or a slot freed
        if isinstance(event, PeerState):
            if event.participant != self.id:
                return
            if self.sink is not None:
                self.sink("media.state", {"room": self.room, "state": event.state})
            if self.on_state is not None:
                self.on_state(event.state)
            return
        if self.sink is None:
            return
        if isinstance(event, ParticipantJoined) and event.participant == self.id:
            return  # the join's ok says it
        wire = wire_event(event, r.users, lambda p: _hidden(r, p))
        if wire is not None:
            self.sink(*wire)


def _nothing() -> None:
    pass


def _participant(s: MediaSession) -> dict[str, Any]:
    return {"room": s.room, "participant": s.id, "user": s.who.id}


def _hidden(room: _MediaRoom, participant: str) -> bool:
    s = room.sessions.get(participant)
    return s is not None and s.hidden


class MediaRooms:
    """The edge's media: `await nursery.start(media.run)` after the SFU started."""

    def __init__(self, config: Config, sfu: Sfu, origin: Origin) -> None:
        self.config = config
        self.limits = config.limits
        self.sfu = sfu
        self.origin = origin
        self.recordings: Recordings | None = None  # set when this edge records
        self._rooms: dict[str, _MediaRoom] = {}
        self.http: dict[str, MediaSession] = {}  # WHIP/WHEP sessions by id
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then every session leaves (shielded, bounded)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._viewer_ticker)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for room in list(self._rooms.values()):
                    for session in list(room.sessions.values()):
                        await session.leave()

    async def drain(self) -> None:
        """The edge is draining: its recordings finish (stopped `shutdown`) while the origin
        that takes their files still answers (beside the gateway's drain: `drain_edge`)."""
        if self.recordings is not None:
            await self.recordings.finish_all()

    def abandon(self) -> None:
        """Stop now: recordings still finishing end where they are (`Recordings.abandon`)."""
        if self.recordings is not None:
            self.recordings.abandon()

    # --- joining and leaving -------------------------------------------------------------

    async def join(
        self, who: Principal, room_id: str, sink: Sink | None, want: Want
    ) -> MediaSession:
        """A new participant of `room_id`'s media. Raises not_found/forbidden (membership),
        invalid (a chat room), forbidden (WHIP by a viewer), quota_exceeded
        (media_participants, counted by the instance's origin across edges, or the SFU's room
        size), unavailable (no SFU, or the origin unreachable)."""
        self._check_joinable(who, room_id, want)
        # The slot first (the one await): the checks are made again after it, on the state
        # as it is then, and the slot goes back if they or the SFU refuse.
        release = await self.origin.acquire_slot(who.instance.id, "media_participants")
        try:
            room, role = self._check_joinable(who, room_id, want)
            r = self._rooms.get(room_id)
            if r is None:
                r = self._rooms[room_id] = _MediaRoom(room.record.kind)
            session = MediaSession(self, who, room_id, room.record.kind, role, sink, want)
            session.release_slot = release
            # Known before the SFU announces it, so the others' listeners can name its user.
            r.users[session.id] = who.id
            r.sessions[session.id] = session
            try:
                session.peer = self.sfu.join(room_id, session.id, session._listener)
            except BaseException:
                r.users.pop(session.id, None)
                r.sessions.pop(session.id, None)
                self._drop_if_empty(room_id)
                raise
        except BaseException:
            release()
            raise
        if session.hidden:
            r.viewers += 1
        log("media_join", room=room_id, participant=session.id, user=who.id, role=role)
        return session

    def _check_joinable(self, who: Principal, room_id: str, want: Want) -> tuple[RoomState, Role]:
        if self._nursery is None:
            raise GB6Error(UNAVAILABLE, "media is not running on this edge")
        room = self.origin.room_for_member(who, room_id)
        if room.record.kind not in MEDIA_KINDS:
            raise invalid("only meeting and live rooms take media")
        r = self._rooms.get(room_id)
        host = may_host(room, who, r.cohosts if r is not None else ())
        if want == "host" and not host:
            raise forbidden("only the room's hosts publish into a live room")
        return room, "host" if host and want != "viewer" else "viewer"

    def end(self, session: MediaSession) -> None:
        """Leave from the component's nursery (for callers that cannot wait: a closed socket,
        a failed transport)."""
        if session.over:
            return
        session.ending = True
        if self._nursery is None:
            return  # the component is stopping: `run`'s finally leaves every session
        self._nursery.start_soon(session.leave)

    def _forget(self, session: MediaSession) -> None:
        r = self._rooms.get(session.room)
        if r is not None and r.sessions.pop(session.id, None) is session:
            r.users.pop(session.id, None)
            if session.hidden:
                r.viewers -= 1
            session.release_slot()
            self._drop_if_empty(session.room)
        self.http.pop(session.id, None)
        log("media_leave", room=session.room, participant=session.id)

    def _drop_if_empty(self, room_id: str) -> None:
        r = self._rooms.get(room_id)
        if r is not None and not r.sessions and not r.cohosts:
            del self._rooms[room_id]

    # --- what the join's ok carries ------------------------------------------------------

    def snapshot(self, session: MediaSession) -> dict[str, Any]:
        r = self._rooms[session.room]
        participants = [
            {"participant": pid, "user": s.who.id}
            for pid, s in r.sessions.items()
            if pid != session.id and not s.hidden
        ]
        tracks = [
            track_json(t, r.users.get(t.participant, "")) for t in self.sfu.tracks(session.room)
        ]
        out: dict[str, Any] = {
            "room": session.room,
            "participant": session.id,
            "role": session.role,
            "participants": participants,
            "tracks": tracks,
            # A participant is told that it is being recorded as it joins, not only by the
            # `media.recording` events sent since.
            "recording": self.recordings.running(session.room) if self.recordings else None,
        }
        if session.kind == "live":
            out["viewers"] = r.viewers
        return out

    def tracks_of_hosts(self, room_id: str) -> list[TrackInfo]:
        r = self._rooms.get(room_id)
        if r is None:
            return []
        return [t for t in self.sfu.tracks(room_id) if not _hidden(r, t.participant)]

    # --- live rooms: co-hosts and the viewer count ---------------------------------------

    def cohost(self, who: Principal, room_id: str, user: str, on: bool) -> None:
        """Name (or un-name) a co-host of a live room: its creator or an owner/admin only."""
        room = self.origin.room_for_member(who, room_id)
        if room.record.kind != "live":
            raise invalid("co-hosts are for live rooms")
        if room.record.creator != who.id and not who.moderator:
            raise forbidden("only the room's creator or an instance owner or admin names co-hosts")
        if user not in room.members:
            raise invalid(f"user {user} is not a member of room {room_id}")
        r = self._rooms.get(room_id)
        if r is None:
            r = self._rooms[room_id] = _MediaRoom(room.record.kind)
        if on and user not in r.cohosts and len(r.cohosts) >= self.limits.media_cohosts:
            raise GB6Error(QUOTA_EXCEEDED, f"at most {self.limits.media_cohosts} co-hosts")
        if on:
            r.cohosts.add(user)
        else:
            r.cohosts.discard(user)
        for s in list(r.sessions.values()):
            if s.who.id == user and not s.over:
                self._set_role(r, s, may_host(room, s.who, r.cohosts))
        if not on:
            self._drop_if_empty(room_id)

    def _set_role(self, r: _MediaRoom, s: MediaSession, host: bool) -> None:
        """A joined participant's role follows a co-host change (see the module rules)."""
        if s.want == "viewer" or (s.role == "host") == host:
            return
        if s.want == "host":  # WHIP publishes or is nothing
            self.end(s)
            return
        peer = s.require_peer()
        others = [o for o in r.sessions.values() if o is not s and o.sink is not None]
        if host:
            s.role = "host"
            r.viewers -= 1
            for o in others:  # as the SFU would have announced it, had it joined a host
                assert o.sink is not None
                o.sink("media.participant_joined", _participant(s))
        else:
            for track in peer.tracks:  # TrackUnpublished to the room, while still shown
                peer.unpublish(track.track_id)
            for o in others:
                assert o.sink is not None
                o.sink("media.participant_left", _participant(s))
            s.role = "viewer"
            r.viewers += 1
        if s.sink is not None:
            s.sink("media.role", {"room": s.room, "participant": s.id, "role": s.role})
        log("media_role", room=s.room, participant=s.id, role=s.role)

    async def _viewer_ticker(self) -> None:
        while True:
            await trio.sleep(self.limits.media_viewer_interval_s)
            for room_id, r in list(self._rooms.items()):
                if r.kind != "live" or r.viewers == r.viewers_sent:
                    continue
                r.viewers_sent = r.viewers
                self.broadcast(room_id, "media.viewers", {"room": room_id, "count": r.viewers})

    def broadcast(self, room_id: str, type_: str, fields: dict[str, Any]) -> None:
        """An event to every WebSocket session in the room's media on this edge."""
        r = self._rooms.get(room_id)
        for s in list(r.sessions.values()) if r is not None else ():
            if s.sink is not None:
                s.sink(type_, fields)

    # --- membership ----------------------------------------------------------------------

    def on_members(self, change: MembershipChange) -> None:
        """The origin's membership listener: removed members leave the room's media."""
        r = self._rooms.get(change.room)
        if r is None or not change.removed:
            return
        removed = set(change.removed)
        for s in list(r.sessions.values()):
            if s.who.id in removed:
                self._close(s)

    def on_tenancy(self, record: Instance | User) -> None:
        """The origin's tenancy listener: the sessions of an instance no longer active, or of
        a deleted user, end (WHIP/WHEP ones have no socket the gateway would close with
        4003; a WebSocket's are ended by that close already)."""
        if record.status == "active":
            return
        by_instance = isinstance(record, Instance)
        for r in list(self._rooms.values()):
            for s in list(r.sessions.values()):
                if (s.who.instance.id if by_instance else s.who.id) == record.id:
                    self._close(s)

    # --- a cluster edge's link to a shard: lost and back --------------------------------------

    def on_origin_lost(self, rooms: set[str], instances: set[str], for_good: bool) -> None:
        """A shard's link broke: the origin freed this edge's slots of `instances`, but media
        flows through this edge's SFU alone, so the sessions go on (`on_origin_restored`
        takes their slots again). A link ended for good (the shard moved) ends them: nothing
        will take their slots again."""
        if for_good:
            for s in self._sessions_of(instances):
                self._close(s)

    def on_origin_restored(self, instances: set[str]) -> None:
        """The shard's link is back: each session of `instances` takes its slot again; one
        refused (taken meanwhile on other edges) ends, its client told `media.state` closed."""
        if self._nursery is None:
            return
        for s in self._sessions_of(instances):
            self._nursery.start_soon(self._take_slot_again, s)

    def _sessions_of(self, instances: set[str]) -> list[MediaSession]:
        return [
            s
            for r in self._rooms.values()
            for s in r.sessions.values()
            if s.who.instance.id in instances and not s.over
        ]

    async def _take_slot_again(self, session: MediaSession) -> None:
        async def take() -> Callable[[], None] | None:
            if session.over:  # ended meanwhile: no slot to take
                return None
            try:
                return await self.origin.acquire_slot(session.who.instance.id, "media_participants")
            except LinkLost:
                return None  # lost again: taken again when it is back

        try:
            # Busy, or its shard not known for a moment: asked again rather than ending a call.
            release = await while_unavailable(take, _SLOT_AGAIN_RETRY_S)
        except GB6Error as exc:  # the plan's limit reached meanwhile, say
            log("media_slot_lost", participant=session.id, error=exc.message)
            self._close(session)
            return
        if release is None:
            return
        if session.over:
            release()
            return
        # The one it replaces is of an earlier link (its release does nothing), or, if two
        # restores' takes both got a slot, this one's twin: given back, not kept twice.
        old, session.release_slot = session.release_slot, release
        old()

    def _close(self, session: MediaSession) -> None:
        """End a session the server takes away (a WebSocket client is told `media.state`
        closed; a WHIP/WHEP client sees its transport close)."""
        if session.sink is not None and not session.over:
            session.sink("media.state", {"room": session.room, "state": "closed"})
        self.end(session)

    def connection(self, write: Sink) -> ConnectionMedia:
        return ConnectionMedia(self, write)


class ConnectionMedia:
    """One WebSocket's media: `await handle(who, req)` answers a `media.*` request with the
    `ok`'s fields; `close()` when the socket ends."""

    def __init__(self, rooms: MediaRooms, write: Sink) -> None:
        self.rooms = rooms
        self.write = write
        self.sessions: dict[str, MediaSession] = {}
        self._joining: set[str] = set()  # rooms whose join awaits its slot
        self.closed = False

    @property
    def live(self) -> bool:
        """Whether a media session of this socket goes on."""
        return any(not s.over for s in self.sessions.values())

    def close(self) -> None:
        self.closed = True
        for session in self.sessions.values():
            self.rooms.end(session)
        self.sessions.clear()

    def _session(self, room: str) -> MediaSession:
        s = self.sessions.get(room)
        if s is None or s.over:
            self.sessions.pop(room, None)
            raise invalid(f"join the media of room {room} first (media.join)")
        return s

    async def handle(self, who: Principal, req: MediaRequest) -> dict[str, Any]:
        op = req.op
        if op == "media.join":
            return await self._join(who, req.room)
        if op == "media.cohost":
            self.rooms.cohost(who, req.room, req.user, req.on)
            return {}
        if op == "media.record":
            recordings = self.rooms.recordings
            if recordings is None:
                raise GB6Error(UNAVAILABLE, "this edge does not record")
            return await recordings.control(who, req.room, req.on)
        s = self._session(req.room)
        match op:
            case "media.leave":
                self.sessions.pop(req.room, None)
                await s.leave()
                return {}
            case "media.publish":
                peer = s.require_host()
                return {"track": peer.publish(req.kind, req.source, msid_track=req.track or None)}
            case "media.unpublish":
                s.require_host().unpublish(req.track)
                return {}
            case "media.mute":
                s.require_host().mute(req.track, req.muted)
                return {}
            case "media.offer":
                return {"sdp": await s.answer(req.sdp)}
            case "media.answer":
                await s.require_peer().set_answer(req.sdp)
                return {}
            case "media.subscribe":
                return await self._subscribe(s, req.tracks)
            case "media.unsubscribe":
                return await self._unsubscribe(s, req.tracks)
            case "media.renegotiate":
                return await _offer_if_needed(s.require_peer())
            case "media.ice":
                await s.require_peer().add_ice_candidate(req.candidate)
                return {}
        raise invalid(f"unsupported media op {op}")

    async def _join(self, who: Principal, room: str) -> dict[str, Any]:
        existing = self.sessions.get(room)
        if room in self._joining or (existing is not None and not existing.over):
            raise GB6Error(CONFLICT, f"this connection is already in the media of room {room}")
        self.sessions.pop(room, None)
        if len(self.sessions) + len(self._joining) >= self.rooms.limits.media_rooms_per_connection:
            limit = self.rooms.limits.media_rooms_per_connection
            raise GB6Error(QUOTA_EXCEEDED, f"at most {limit} rooms' media per connection")
        self._joining.add(room)
        try:
            session = await self.rooms.join(who, room, self.write, "auto")
        finally:
            self._joining.discard(room)
        if self.closed:  # the socket ended while the slot was on its way
            self.rooms.end(session)
            raise GB6Error(UNAVAILABLE, "the connection closed")
        self.sessions[room] = session
        return self.rooms.snapshot(session)

    async def _subscribe(self, s: MediaSession, tracks: tuple[str, ...]) -> dict[str, Any]:
        peer = s.require_peer()
        known = {t.track_id: t for t in self.rooms.sfu.tracks(s.room)}
        for t in tracks:
            info = known.get(t)
            if info is None:
                raise GB6Error("not_found", f"no track {t} in room {s.room}")
            if info.participant == s.id:
                raise invalid("a participant does not subscribe to its own track")
        done: list[str] = []
        try:
            for t in tracks:
                if t not in peer.subscriptions:
                    peer.subscribe(t)
                    done.append(t)
        except GB6Error:
            for t in done:  # all or nothing
                peer.unsubscribe(t)
            raise
        return await _offer_if_needed(peer)

    async def _unsubscribe(self, s: MediaSession, tracks: tuple[str, ...]) -> dict[str, Any]:
        peer = s.require_peer()
        subscribed = set(peer.subscriptions)
        for t in tracks:
            if t not in subscribed:
                raise GB6Error("not_found", f"not subscribed to {t}")
        for t in tracks:
            peer.unsubscribe(t)
        return await _offer_if_needed(peer)


async def _offer_if_needed(peer: Peer) -> dict[str, Any]:
    """The SFU's offer when the subscriptions changed since the last negotiation, else none."""
    if not peer.needs_negotiation:
        return {"sdp": None}
    return {"sdp": await peer.offer()}


async def start_media(
    nursery: trio.Nursery,
    config: Config,
    gateway: Any,
    blobs: Any = None,
    charge: Any = None,
    *,
    recording: Any = None,
) -> MediaRooms:
    """Start the SFU and the media rooms in `nursery` (inside the process's trio-asyncio
    loop) for `gateway` (edge/gateway.py), and hand the gateway its `media.*` ops. The edge
    records (edge/media_recording.py) into the instance's origin: `blobs` and `charge` are the
    shard's blob store and `charge_usage` in one process (`gb6 run`); `recording` is the
    origin as a cluster edge reaches it (`RemoteOrigin`, over the link)."""
    sfu = Sfu(config.media)
    await nursery.start(sfu.run)
    rooms = MediaRooms(config, sfu, gateway.origin)
    await nursery.start(rooms.run)
    if recording is None and blobs is not None and charge is not None:
        from origin.recording_store import RecordingStore

        store = RecordingStore(blobs, config.limits.recording_track_bytes)
        from edge.media_recording import LocalBackend  # it imports this module

        recording = LocalBackend(store, charge)
    if recording is not None:
        from edge.media_recording import Recordings

        await nursery.start(Recordings(config, rooms, recording).run)
    gateway.media = rooms
    gateway.origin.member_listeners.append(rooms.on_members)
    gateway.origin.tenancy_listeners.append(rooms.on_tenancy)
    if isinstance(gateway.origin, RemoteOrigin):
        gateway.origin.lost_listeners.append(rooms.on_origin_lost)
        gateway.origin.restored_listeners.append(rooms.on_origin_restored)
    return rooms
