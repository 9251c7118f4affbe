"""Media over HTTP: WHIP ingest and WHEP playback (RFC 9725 and the WHEP draft), and a room's
recordings, as one quart-trio blueprint of the edge's HTTP listener.

Rules:
- Every call takes a room member's bearer token (`authenticate`); what a member may do is
  decided by `MediaRooms` exactly as for the WebSocket: WHIP only by those who may publish
  (`forbidden` for a live room's viewers), WHEP by any member; only meeting and live rooms
  (`invalid` otherwise); `not_found` for rooms the caller cannot see.
- `POST .../whip` and `.../whep` take an `application/sdp` offer (at most `[media]
  sdp_bytes`) and answer `201 Created` with the SDP answer and a `Location` naming the session;
  `DELETE` on it ends the session (only by the user who made it: others get `404`), `PATCH`
  with an `application/trickle-ice-sdpfrag` body adds the candidates it carries (`204`).
- A WHEP session's recvonly m-lines are slots (WHEP has no renegotiation): each plays the
  newest track of its kind (and codec) published in the room (a live room: by its hosts), and
  when that track goes, the next one published, with no new offer (`Peer.fill`). A session
  may start before anything is published: its slots wait.
- A session whose transport fails or closes (or never connects within `[media]
  connect_timeout_s`) ends by itself; at most `limits.media_http_sessions` at once per edge
  (`503 unavailable` past it).
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, request

from edge.media_recording import Recordings
from edge.media_signaling import MediaRooms, MediaSession, Want
from node.auth_failures import UserAuth
from node.errors import TOO_LARGE, UNAVAILABLE, GB6Error, invalid, not_found
from origin.admin_api import bearer

SDP = "application/sdp"
TRICKLE = "application/trickle-ice-sdpfrag"


def media_blueprint(media: MediaRooms, authenticate: UserAuth) -> Blueprint:
    bp = Blueprint("media", __name__)

    async def body_text(content_type: str) -> str:
        if request.mimetype != content_type:
            raise invalid(f"Content-Type must be {content_type}")
        data = await request.get_data(cache=True, as_text=False)
        assert isinstance(data, bytes)
        if len(data) > media.sfu.media.sdp_bytes:
            raise GB6Error(TOO_LARGE, f"at most {media.sfu.media.sdp_bytes} bytes of SDP")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("the body is not UTF-8") from None

    async def start(room: str, want: Want, path: str) -> Response:
        who = await authenticate(bearer(), request.remote_addr or "unknown")
        offer = await body_text(SDP)
        if len(media.http) >= media.limits.media_http_sessions:
            raise GB6Error(UNAVAILABLE, "too many WHIP/WHEP sessions on this edge; retry later")
        session = await media.join(who, room, None, want)
        try:
            if want == "viewer":
                # Every recvonly m-line is a slot (no renegotiation in WHEP): fed now by the
                # hosts' newest track of its kind and codec, later by whatever replaces it.
                tracks = media.tracks_of_hosts(room)
                peer = session.require_peer()
                peer.accept_slots({t.kind: t.codec for t in tracks})
            answer = await session.answer(offer)
            if want == "viewer":
                session.fill_slots()
        except BaseException:
            await session.leave()
            raise
        if session.over:  # taken away while its answer was made
            await session.leave()
            raise GB6Error(UNAVAILABLE, "the media session ended as it started; retry")
        media.http[session.id] = session
        session.on_state = lambda state: _ended(media, session, state)
        resp = Response(answer, status=201, content_type=SDP)
        resp.headers["Location"] = f"/v1/rooms/{room}/{path}/{session.id}"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    async def session_of(room: str, session_id: str) -> MediaSession:
        who = await authenticate(bearer(), request.remote_addr or "unknown")
        session = media.http.get(session_id)
        if session is None or session.room != room or session.who.id != who.id:
            raise not_found(f"no media session {session_id}")
        return session

    @bp.post("/v1/rooms/<room>/whip")
    async def whip(room: str) -> Response:
        return await start(room, "host", "whip")

    @bp.post("/v1/rooms/<room>/whep")
    async def whep(room: str) -> Response:
        return await start(room, "viewer", "whep")

    @bp.delete("/v1/rooms/<room>/<any(whip, whep):kind>/<session_id>")
    async def end(room: str, kind: str, session_id: str) -> tuple[str, int]:
        session = await session_of(room, session_id)
        await session.leave()
        return "", 200

    @bp.patch("/v1/rooms/<room>/<any(whip, whep):kind>/<session_id>")
    async def trickle(room: str, kind: str, session_id: str) -> tuple[str, int]:
        session = await session_of(room, session_id)
        frag = await body_text(TRICKLE)
        candidates = parse_sdpfrag(frag)
        peer = session.require_peer()
        for c in candidates:
            await peer.add_ice_candidate(c)
        return "", 204

    async def recordings_of(room: str) -> tuple[Recordings, str]:
        """The room's recordings and its instance, for its members only."""
        who = await authenticate(bearer(), request.remote_addr or "unknown")
        state = media.origin.room_for_member(who, room)
        recordings = media.recordings
        if not isinstance(recordings, Recordings):
            raise GB6Error(UNAVAILABLE, "this edge does not record")
        return recordings, state.record.instance

    @bp.get("/v1/rooms/<room>/recordings")
    async def list_recordings(room: str) -> dict[str, Any]:
        recordings, instance = await recordings_of(room)
        return {"recordings": await recordings.list(instance, room)}

    @bp.get("/v1/rooms/<room>/recordings/<recording>")
    async def get_recording(room: str, recording: str) -> dict[str, Any]:
        recordings, instance = await recordings_of(room)
        return await recordings.manifest(instance, room, recording)

    @bp.get("/v1/rooms/<room>/recordings/<recording>/files/<file_id>")
    async def get_recording_file(room: str, recording: str, file_id: str) -> Response:
        recordings, instance = await recordings_of(room)
        content_type, size, chunks = await recordings.file(instance, room, recording, file_id)
        resp = Response(chunks, status=200, content_type=content_type)
        resp.headers["Content-Length"] = str(size)
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Content-Disposition"] = f'attachment; filename="{file_id}"'
        resp.headers["Cache-Control"] = "private, max-age=0"
        return resp

    return bp


def _ended(media: MediaRooms, session: MediaSession, state: str) -> None:
    if state in ("failed", "closed"):
        media.end(session)


def parse_sdpfrag(frag: str, max_candidates: int = 32) -> list[str | None]:
    """The candidates of a trickle-ice-sdpfrag body (RFC 8840), in order; None for
    `a=end-of-candidates`. Other lines (ice-ufrag, m=, mid) are ignored: no ICE restarts."""
    out: list[str | None] = []
    for raw in frag.splitlines():
        line = raw.strip()
        if line.startswith("a=candidate:"):
            out.append(line[2:])
        elif line == "a=end-of-candidates":
            out.append(None)
        if len(out) > max_candidates:
            raise invalid(f"at most {max_candidates} candidates per PATCH")
    return out
