"""Recording control: `media.record` starts and stops a room's recording, the recorder taps the
SFU's forwarded packets, and the files and manifest land in the blob store, listed per room.

Who holds what: `Recordings` (one per edge, a component) owns one task per room
being recorded, which owns that room's `edge.recording.Recorder` and its minute charger.

Rules:
- Only a meeting or live room's creator or the instance's owners and admins start or stop its
  recording (`forbidden` for other members; `not_found` for those who cannot see the room).
  One recording per room at a time (`conflict`); stopping when none runs is `not_found`.
- Recording minutes are charged to the instance (`charge_usage`, quota and billing in one) as
  each minute starts, the first before anything is recorded: past the quota, starting is
  `quota_exceeded` and a running recording stops (`media.recording` with `reason`). A
  minute the origin cannot be charged for (a cluster edge's link down) is owed and charged
  later, under the same key (`_charge_owed`).
- Every track published in the room while recording (and those already there) is recorded
  from the SFU's forwarded packets (`Sfu.tap`: one SSRC, keyframe first, nothing decoded);
  its file is finished when it is unpublished. `media.record` with `on: false` answers once
  the manifest is stored, so what it names can be downloaded at once.
- Everything lands at the instance's origin shard (`Backend`): in one process the shard's
  blob store directly, on a cluster edge over the link: each file uploaded in chunks as its
  track ends, the manifest last, then the recording is added to the room's index
  (origin/recording_store.py). Minutes are charged at the origin too (`charge_usage`), so the
  plan's `recording_minutes` hold across edges.
- The HTTP API (edge/media_http.py, on every edge) lists and serves a room's recordings to its
  members only, reading them from the origin by range (a download holds one chunk).
- Nothing here may take the edge down: a recording that fails to finish is logged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, Protocol

import attrs
import orjson
import trio

from edge.media_signaling import MEDIA_KINDS, MediaRooms
from edge.recording import Manifest, Recorder
from edge.sfu import TrackInfo
from node.config import Config
from node.errors import (
    CONFLICT,
    QUOTA_EXCEEDED,
    UNAVAILABLE,
    GB6Error,
    forbidden,
    invalid,
    not_found,
)
from node.log import log
from node.retry import while_unavailable
from node.shields import Shields
from origin.membership import Principal
from origin.recording_store import CHUNK, RecordingStore


class Backend(Protocol):
    """Where an instance's recordings go and where its minutes are charged: the instance's
    origin shard. `LocalBackend` in one process (`gb6 run`); on a cluster edge
    `replication.edge_link.RemoteOrigin`, the same calls over the link."""

    async def charge_usage(self, instance: str, resource: str, n: int, key: str) -> None: ...

    async def recording_write(
        self, instance: str, blob_id: str, offset: int, data: bytes, last: bool
    ) -> None: ...

    async def recording_read(
        self, instance: str, blob_id: str, offset: int
    ) -> tuple[bytes, int]: ...

    async def recording_index(self, instance: str, room: str) -> list[str]: ...

    async def recording_indexed(self, instance: str, room: str, recording: str) -> None: ...


class LocalBackend:
    """The origin shard in this process: its blob store (origin/recording_store.py) and its
    `charge_usage`."""

    def __init__(self, store: RecordingStore, charge: Any) -> None:
        self.store = store
        self.charge_usage = charge

    async def recording_write(
        self, instance: str, blob_id: str, offset: int, data: bytes, last: bool
    ) -> None:
        await self.store.write(blob_id, offset, data, last)

    async def recording_read(self, instance: str, blob_id: str, offset: int) -> tuple[bytes, int]:
        return await self.store.read(blob_id, offset)

    async def recording_index(self, instance: str, room: str) -> list[str]:
        return await self.store.index(room)

    async def recording_indexed(self, instance: str, room: str, recording: str) -> None:
        await self.store.add_to_index(room, recording)


# A minute's charge is asked again while the origin is `unavailable` (a cluster edge's link
# reconnecting: media goes on through an outage, and so does its recording) until shortly
# before the next minute's is due; then it is owed (see `_charge_owed`).
CHARGE_RETRY_S = 50.0


class _Uploads:
    """The recorder's blob store for one instance: each blob goes to the origin in chunks of
    at most `CHUNK` bytes, one after the other (what is in flight is one chunk). An upload
    the origin could not take (`unavailable`) starts again from the first byte (the offset
    0 chunk starts the file anew; a repeat of a finished one writes it again whole), for up
    to `retry_s`."""

    def __init__(self, backend: Backend, instance: str, retry_s: float) -> None:
        self.backend = backend
        self.instance = instance
        self.retry_s = retry_s

    async def put(self, blob_id: str, data: bytes) -> None:
        await while_unavailable(partial(self._upload, blob_id, data), self.retry_s)

    async def _upload(self, blob_id: str, data: bytes) -> None:
        view = memoryview(data)
        offset = 0
        while True:
            chunk = bytes(view[offset : offset + CHUNK])
            last = offset + len(chunk) >= len(data)
            await self.backend.recording_write(self.instance, blob_id, offset, chunk, last)
            offset += len(chunk)
            if last:
                return


@attrs.define(eq=False)
class _Active:
    room: str
    instance: str
    recorder: Recorder
    taps: dict[str, Callable[[], None]] = attrs.Factory(dict)
    reason: str = "stopped"
    owed: list[int] = attrs.Factory(list)  # minutes whose charge the origin did not take yet
    started: bool = False  # its recorder runs (`_record`)


class Recordings:
    """`await nursery.start(recordings.run)`; `MediaRooms.recordings` points here."""

    def __init__(self, config: Config, media: MediaRooms, backend: Backend) -> None:
        self.limits = config.limits
        self.media = media
        self.backend = backend
        self._active: dict[str, _Active] = {}
        self._nursery: trio.Nursery | None = None
        self._running = 0  # `_record` tasks, from start to their last charge
        self._none_running = trio.Event()
        self._none_running.set()
        self._finishing = False  # `finish_all` was called: no new recording starts
        self.shields = Shields()  # of every recording's finishing: `abandon` drops them

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; cancelling finishes every running recording (files and
        manifest written, shielded and bounded by `limits.recording_finish_s`)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.media.recordings = self
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def running(self, room: str) -> str | None:
        """The id of the room's recording on this edge, from its start (`started` is sent
        then) until it is stopped; what a joining participant is told (`media.join`)."""
        active = self._active.get(room)
        if active is None or not active.started or active.recorder.stopping:
            return None
        return active.recorder.id

    # --- control (media.record) ----------------------------------------------------------

    async def control(self, who: Principal, room_id: str, on: bool) -> dict[str, Any]:
        room = self.media.origin.room_for_member(who, room_id)
        if room.record.kind not in MEDIA_KINDS:
            raise invalid("only meeting and live rooms are recorded")
        if room.record.creator != who.id and not who.moderator:
            raise forbidden("only the room's creator or an instance owner or admin records it")
        if not on:
            return await self._stop(room_id)
        if room_id in self._active:
            raise GB6Error(CONFLICT, f"room {room_id} is being recorded already")
        if self._nursery is None or self._finishing:
            raise GB6Error(UNAVAILABLE, "recording is not running on this edge")
        instance = room.record.instance
        # Each write is bounded by `recording_finish_s` (edge/recording/recorder.py).
        uploads = _Uploads(self.backend, instance, self.limits.recording_finish_s)
        recorder = Recorder(room_id, uploads, self.limits, shields=self.shields)
        active = _Active(room_id, instance, recorder)
        # Known from here on (to `finish_all` and a second start), before the charge's await:
        # `_record` takes it over once started. A drain that began meanwhile has stopped its
        # recorder already: it starts and ends at once.
        nursery = self._nursery
        self._active[room_id] = active
        self._begin()
        try:
            await self.backend.charge_usage(instance, "recording_minutes", 1, f"{recorder.id}:0")
            await nursery.start(self._record, active)
        except BaseException:
            if not active.started:  # `_record` never ran (it undoes both itself)
                del self._active[room_id]
                self._end()
            raise
        return {"recording": recorder.id}

    async def _stop(self, room_id: str) -> dict[str, Any]:
        active = self._active.get(room_id)
        if active is None:
            raise not_found(f"room {room_id} is not being recorded")
        if not active.started:  # its first minute is being charged
            raise GB6Error(CONFLICT, f"the recording of room {room_id} is starting; retry")
        del self._active[room_id]  # a second stop is not_found at once
        for end in active.taps.values():
            end()
        active.recorder.stop()
        manifest = await active.recorder.wait()
        return {"recording": manifest.id, "manifest": manifest.to_json()}

    # --- the SFU's tracks (from MediaSession listeners, synchronously) -------------------

    def track_published(self, room: str, track: TrackInfo) -> None:
        active = self._active.get(room)
        if active is not None:
            self._add(active, track)

    def track_unpublished(self, room: str, track_id: str) -> None:
        active = self._active.get(room)
        if active is None:
            return
        end = active.taps.pop(track_id, None)
        if end is not None:
            end()
            try:
                active.recorder.remove_track(track_id)
            except GB6Error:
                pass  # it was never being recorded

    def _add(self, active: _Active, track: TrackInfo) -> None:
        if track.track_id in active.taps:
            return
        recorder = active.recorder
        try:
            recorder.add_track(track.track_id, track.codec)
            feed = recorder.feed
            track_id = track.track_id
            active.taps[track_id] = self.media.sfu.tap(
                active.room, track_id, f"rec:{recorder.id}", lambda data: feed(track_id, data)
            )
        except GB6Error as exc:  # an unsupported codec, too many tracks: the rest go on
            log(
                "recording_track_refused", room=active.room, track=track.track_id, error=exc.message
            )

    # --- one recording -------------------------------------------------------------------

    async def finish_all(self) -> None:
        """Stop every recording (`shutdown`) and wait until each has finished: files, manifest,
        charges and index. A draining edge does this first, while its origins still answer
        (on a cluster edge they are reached over links that stop with the process)."""
        self._finishing = True
        for active in list(self._active.values()):
            if active.reason == "stopped":  # not stopping over its quota already
                active.reason = "shutdown"
            for end in active.taps.values():
                end()
            active.recorder.stop("shutdown")
        await self._none_running.wait()

    def abandon(self) -> None:
        """Stop now: the finishing under way ends where it is (files or manifest not stored
        are lost, minutes owed not charged), and any later one at once. The operator's second
        signal, or a drain whose budget for the recordings ran out."""
        if not self.shields.dropped:
            log("recordings_abandoned", finishing=self._running)
        self.shields.drop_all()

    def _begin(self) -> None:
        if self._running == 0:
            self._none_running = trio.Event()
        self._running += 1

    def _end(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._none_running.set()

    async def _record(
        self, active: _Active, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """One recording, counted by `control` (`_begin`) until it ends here."""
        try:
            await self._record_until_done(active, task_status)
        finally:
            self._end()

    async def _record_until_done(self, active: _Active, task_status: trio.TaskStatus[None]) -> None:
        recorder = active.recorder
        room = active.room
        active.started = True
        manifest: Manifest | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run_recorder, recorder)
                for track in self.media.sfu.tracks(room):
                    self._add(active, track)
                task_status.started()
                self.media.broadcast(room, "media.recording", _event(room, recorder.id, "started"))
                nursery.start_soon(self._charge_minutes, active)
                try:
                    await recorder.wait()
                except GB6Error as exc:
                    log("recording_failed", room=room, recording=recorder.id, error=exc.message)
                nursery.cancel_scope.cancel()  # the charger
        finally:
            # Set once stored, even by a finish that outlived this task's cancellation.
            manifest = recorder.manifest
            for end in active.taps.values():
                end()
            active.taps.clear()
            if self._active.get(room) is active:
                del self._active[room]
            stopped = _event(room, recorder.id, "stopped")
            stopped["reason"] = active.reason if manifest is not None else "failed"
            self.media.broadcast(room, "media.recording", stopped)
            # One budget for both, so that a process stopping with its origin unreachable
            # waits for it once: the owed minutes take at most half.
            finish_s = self.limits.recording_finish_s
            indexed = False
            with self.shields.shielded(finish_s):
                # The minutes recorded while the origin could not be charged (one past the
                # quota is refused: it was recorded already, and is not billed).
                with trio.move_on_after(finish_s / 2):
                    await self._charge_owed(active, finish_s / 2)
                if manifest is not None:
                    await self._index(active, manifest.id)
                    indexed = True
            # Told after the shield: also when the finishing was cut short (abandoned).
            if active.owed:
                log("recording_minutes_unbilled", room=room, minutes=len(active.owed))
            if manifest is not None and not indexed:
                log("recording_not_indexed", room=room, recording=manifest.id, error="cut short")

    async def _run_recorder(
        self, recorder: Recorder, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await recorder.run(task_status=task_status)
        except (GB6Error, OSError) as exc:  # the manifest could not be stored: wait() says so
            log("recording_not_stored", room=recorder.room, recording=recorder.id, error=str(exc))

    async def _charge_minutes(self, active: _Active) -> None:
        """Charge each minute as it starts (the first was, at `media.record`): past the quota
        the recording stops."""
        started = trio.current_time()
        minute = 0
        while True:
            minute += 1
            await trio.sleep_until(started + 60 * minute)
            active.owed.append(minute)
            if not await self._charge_owed(active, CHARGE_RETRY_S):
                active.reason = "quota_exceeded"
                active.recorder.stop()
                return

    async def _charge_owed(self, active: _Active, retry_s: float) -> bool:
        """Charge the minutes owed, oldest first, each under its own key (a repeat counts
        nothing). One the origin cannot take (unreachable past `retry_s`) stays owed: asked
        again with the next minute's, and as the recording ends. False: over the quota."""
        while active.owed:
            minute = active.owed[0]
            charge = partial(
                self.backend.charge_usage,
                active.instance,
                "recording_minutes",
                1,
                f"{active.recorder.id}:{minute}",
            )
            try:
                await while_unavailable(charge, retry_s)
            except GB6Error as exc:
                if exc.code == QUOTA_EXCEEDED:
                    return False
                log("recording_charge_failed", room=active.room, minute=minute, error=exc.message)
                if exc.code == UNAVAILABLE:
                    return True  # owed: the origin may answer at the next minute
                # Refused for good (a bug, or the instance gone): not asked again, so that
                # the minutes after it are still charged.
            del active.owed[0]
        return True

    async def _index(self, active: _Active, recording: str) -> None:
        index = partial(self.backend.recording_indexed, active.instance, active.room, recording)
        try:
            await while_unavailable(index, self.limits.recording_finish_s)
        except GB6Error as exc:
            log("recording_not_indexed", room=active.room, recording=recording, error=exc.message)

    # --- reading (the HTTP API) ----------------------------------------------------------

    async def _read_all(self, instance: str, blob_id: str) -> bytes:
        data, size = await self.backend.recording_read(instance, blob_id, 0)
        while len(data) < size:
            more, _ = await self.backend.recording_read(instance, blob_id, len(data))
            if not more:
                break
            data += more
        return data

    async def manifest(self, instance: str, room: str, recording: str) -> dict[str, Any]:
        if recording not in await self.backend.recording_index(instance, room):
            raise not_found(f"no recording {recording} in room {room}")
        out: dict[str, Any] = orjson.loads(await self._read_all(instance, recording))
        return out

    async def list(self, instance: str, room: str) -> list[dict[str, Any]]:
        """The room's recordings' manifests, newest first."""
        ids = await self.backend.recording_index(instance, room)
        return [await self.manifest(instance, room, i) for i in reversed(ids)]

    async def file(
        self, instance: str, room: str, recording: str, file_id: str
    ) -> tuple[str, int, AsyncIterator[bytes]]:
        """(content type, size, the bytes in chunks): a download holds one chunk at a time."""
        manifest = await self.manifest(instance, room, recording)
        track = next((t for t in manifest["tracks"] if t.get("file") == file_id), None)
        if track is None:
            raise not_found(f"no file {file_id} in recording {recording}")
        first, size = await self.backend.recording_read(instance, file_id, 0)

        async def chunks() -> AsyncIterator[bytes]:
            data, offset = first, 0
            while data:
                yield data
                offset += len(data)
                if offset >= size:
                    return
                data, _ = await self.backend.recording_read(instance, file_id, offset)

        return str(track["content_type"]), size, chunks()


def _event(room: str, recording: str, state: str) -> dict[str, Any]:
    return {"room": room, "recording": recording, "state": state}
