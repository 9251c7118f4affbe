"""A room's recording: a Trio component fed the SFU's forwarded RTP packets.

Rules:
- `feed()` never blocks and never raises: it puts the packet on a bounded channel
  (`limits.recording_queue_packets`) and, when that is full, drops it and counts it. The
  forwarder is never slowed by the recorder. Call it from the Trio thread (a Trio task, or an
  asyncio callback of the process's trio-asyncio loop); it is not thread-safe.
- `run()` is the only consumer: it drives each track's pure core (edge/recording/_track.py:
  reorder, depacketize, mux) in arrival order. No decoding or encoding happens anywhere.
- Tracks come and go while it runs. `remove_track()` stops taking that track's packets; once
  the ones already queued are muxed, its file is written to the blob store by a task of its
  own (shielded, each write bounded by `limits.recording_finish_s`), so that a slow upload
  (a large file, an origin briefly unreachable) holds up no other track's packets. `stop()` (or
  `limits.recording_max_duration_s`, or the owner cancelling `run()`) finishes every track,
  writes the files and then the manifest (blob id = the recording id), and `run()` returns it.
- Finishing is shielded from cancellation, bounded by `limits.recording_finish_s` (the files
  of tracks removed just before wait for theirs, each bounded the same), so an edge shutting
  down still leaves playable files and a manifest behind; only the owner's `Shields.drop_all`
  (the operator's "stop now") ends it sooner, leaving what was not stored. The files take at
  most 80 % of it: the manifest always has its share, and lists a file not written by then
  `store_failed`.
- Each track's file is held in memory until the track ends (the blob store takes whole blobs),
  at most `limits.recording_track_bytes`; past that the track is truncated, not the recording.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import attrs
import orjson
import trio

from edge.recording._manifest import Manifest, TrackFile
from edge.recording._track import CODECS, CONTAINERS, Track, TrackLimits
from node.channels import take_all_waiting, take_waiting
from node.config import Limits
from node.errors import CONFLICT, QUOTA_EXCEEDED, UNAVAILABLE, GB6Error, invalid, not_found
from node.ids import new_id
from node.shields import Shields
from origin.sqlite_store import now_ms

_TRACK_ID_CHARS = 128
_CONTAINERS_OF = {"vp8": ("webm",), "opus": ("ogg", "webm"), "h264": ("mp4",)}
_BATCH = 256  # packets muxed between checks for removed tracks
_MANIFEST_SHARE_OF_FINISHING = 0.2  # of `recording_finish_s`, kept for the manifest


class BlobStore(Protocol):
    """Where files go: origin/blobs.py LocalBlobStore fits."""

    async def put(self, blob_id: str, data: bytes) -> None: ...


@attrs.define
class _Entry:
    track: Track | None  # None once its file is stored: the memory goes with it
    queued: int = 0  # fed, not yet muxed
    dropped: int = 0  # fed while the queue was full
    removed: bool = False
    result: TrackFile | None = None


_Item = tuple[_Entry, bytes, float] | None  # None only wakes the loop


@attrs.frozen
class RecorderStats:
    queued: int  # packets waiting in the channel
    dropped: int  # packets dropped because it was full
    unknown: int  # packets for track ids not being recorded
    tracks: int  # being recorded now


class Recorder:
    """One room's recording. Create it, `nursery.start(recorder.run)`, add tracks, feed, stop.

    `run()` returns the `Manifest` (also `await recorder.wait()` from elsewhere). Errors from
    `add_track`/`remove_track` are `GB6Error`s with the protocol's codes; nothing else raises.
    """

    def __init__(
        self,
        room: str,
        blobs: BlobStore,
        limits: Limits,
        *,
        recording_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        shields: Shields | None = None,
    ) -> None:
        """`shields`: those of the finishing (its owner's `drop_all` ends it, unfinished)."""
        self.id = recording_id or new_id("rec")
        self._shields = shields if shields is not None else Shields()
        self.room = room
        self.blobs = blobs
        self.limits = limits
        self.clock = clock
        self.manifest: Manifest | None = None
        self._send, self._recv = trio.open_memory_channel[_Item](limits.recording_queue_packets)
        self._active: dict[str, _Entry] = {}
        self._entries: list[_Entry] = []
        self._stopping = False
        self._stop_reason = "stopped"
        self._dropped = 0
        self._unknown = 0
        self._done = trio.Event()
        self._track_limits = TrackLimits(
            max_bytes=limits.recording_track_bytes,
            max_packet_bytes=limits.recording_packet_bytes,
            max_frame_bytes=limits.recording_frame_bytes,
            reorder_packets=limits.recording_reorder_packets,
        )

    # --- called by the SFU / signaling (non-blocking) ---------------------------------------

    def add_track(
        self, track_id: str, codec: str, *, channels: int = 2, container: str | None = None
    ) -> None:
        """Start recording `track_id`. `codec`: "vp8", "opus", "h264" (or a MIME type such as
        "video/VP8"). `container`: "webm" for VP8, "ogg" (default) or "webm" for Opus, "mp4"
        for H.264. Raises GB6Error: invalid, conflict (already recorded, or stopped),
        quota_exceeded (`limits.recording_tracks`)."""
        name = codec.lower().rpartition("/")[2]
        if name not in CODECS:
            raise invalid(f"recording supports vp8, opus and h264, not {codec!r}")
        container = container or CODECS[name][2]
        if container not in _CONTAINERS_OF[name]:
            raise invalid(f"{name} cannot be recorded into {container!r}")
        if not track_id or len(track_id) > _TRACK_ID_CHARS:
            raise invalid(f"a track id has 1 to {_TRACK_ID_CHARS} characters")
        if not 1 <= channels <= 2:
            raise invalid("an Opus track has 1 or 2 channels")
        if self._stopping:
            raise GB6Error(CONFLICT, "the recording has stopped")
        if track_id in self._active:
            raise GB6Error(CONFLICT, f"track {track_id} is already being recorded")
        if len(self._entries) >= self.limits.recording_tracks:
            raise GB6Error(
                QUOTA_EXCEEDED, f"a recording has at most {self.limits.recording_tracks} tracks"
            )
        track = Track(track_id, name, self._track_limits, container=container, channels=channels)
        entry = _Entry(track)
        self._active[track_id] = entry
        self._entries.append(entry)

    def remove_track(self, track_id: str) -> None:
        """Stop recording `track_id`; its file is written once its queued packets are muxed.
        Raises GB6Error not_found if it is not being recorded."""
        entry = self._active.pop(track_id, None)
        if entry is None:
            raise not_found(f"track {track_id} is not being recorded")
        entry.removed = True
        self._wake()

    def feed(self, track_id: str, packet: bytes, arrival: float | None = None) -> None:
        """Queue one RTP packet of `track_id` (decrypted, as the publisher sent it). `arrival`:
        when it arrived, in seconds on `time.monotonic()`'s clock (default: now). Never blocks,
        never raises: a full queue or an unknown track drops the packet and counts it."""
        entry = self._active.get(track_id)
        if entry is None or self._stopping:
            self._unknown += 1
            return
        try:
            self._send.send_nowait((entry, packet, self.clock() if arrival is None else arrival))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._dropped += 1
            entry.dropped += 1
            return
        entry.queued += 1

    def stop(self, reason: str = "stopped") -> None:
        """Ask `run()` to finish: files, then manifest (`stop_reason`: `reason`, `stopped` or
        `shutdown`). Idempotent; returns at once."""
        if not self._stopping:
            self._stop_reason = reason
        self._stopping = True
        self._wake()

    @property
    def stopping(self) -> bool:
        """`stop` was called: no packet is recorded from then on."""
        return self._stopping

    async def wait(self) -> Manifest:
        """The manifest, once `run()` has written it. Raises GB6Error unavailable if finishing
        failed or took longer than `limits.recording_finish_s`."""
        await self._done.wait()
        if self.manifest is None:
            raise GB6Error(UNAVAILABLE, "the recording could not be finished")
        return self.manifest

    def statistics(self) -> RecorderStats:
        return RecorderStats(
            queued=self._send.statistics().current_buffer_used,
            dropped=self._dropped,
            unknown=self._unknown,
            tracks=len(self._active),
        )

    # --- the component ----------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> Manifest:
        """Record until `stop()`, the duration limit, or cancellation; return the manifest.

        The manifest and files are written even when cancelled (shielded, bounded). Raises only
        what the blob store raises for the manifest itself (files that fail are marked)."""
        started_at = now_ms()
        start = self.clock()
        task_status.started()
        try:
            with trio.move_on_after(self.limits.recording_max_duration_s) as scope:
                await self._loop(start)
            if scope.cancelled_caught:
                self._stop_reason = "max_duration"
        except* trio.Cancelled:  # `_loop`'s nursery groups it
            self._stop_reason = "shutdown"
            raise
        finally:
            self._stopping = True
            try:
                with self._shields.shielded(self.limits.recording_finish_s):
                    await self._finish(start, started_at)
            finally:
                self._done.set()
        if self.manifest is None:
            why = (
                "was abandoned (stop now)" if self._shields.dropped else "failed or ran out of time"
            )
            raise GB6Error(UNAVAILABLE, f"the recording could not be finished: its finishing {why}")
        return self.manifest

    async def _loop(self, start: float) -> None:
        async with trio.open_nursery() as storing:  # left once the files under way are stored
            while not self._stopping:
                item = await self._recv.receive()
                self._mux(item)
                for item in take_waiting(self._recv, _BATCH):
                    self._mux(item)
                for entry in self._entries:
                    if entry.removed and entry.queued == 0 and entry.track is not None:
                        track, entry.track = entry.track, None  # taken now: stored once
                        storing.start_soon(self._store_removed, entry, track, start)

    async def _store_removed(self, entry: _Entry, track: Track, start: float) -> None:
        by = trio.current_time() + self.limits.recording_finish_s
        with self._shields.shielded(self.limits.recording_finish_s):
            await self._store(entry, track, start, by)

    def _mux(self, item: _Item) -> None:
        if item is None:
            return
        entry, packet, arrival = item
        entry.queued -= 1
        if entry.track is not None:
            entry.track.push(packet, arrival)

    async def _finish(self, start: float, started_at: int) -> None:
        for item in take_all_waiting(self._recv):
            self._mux(item)
        self._send.close()
        self._active.clear()
        stopped_at = now_ms()
        # The files, side by side, may take what finishing may but the manifest's share: one
        # that cannot be written (an origin unreachable) is `store_failed`, and the recording
        # still has its manifest.
        files_by = (
            trio.current_effective_deadline()
            - self.limits.recording_finish_s * _MANIFEST_SHARE_OF_FINISHING
        )
        async with trio.open_nursery() as storing:
            for entry in self._entries:
                if entry.track is not None:
                    track, entry.track = entry.track, None
                    storing.start_soon(self._store, entry, track, start, files_by)
        manifest = Manifest(
            id=self.id,
            room=self.room,
            started_at=started_at,
            stopped_at=stopped_at,
            stop_reason=self._stop_reason,
            tracks=tuple(e.result for e in self._entries if e.result is not None),
            unknown_packets=self._unknown,
        )
        await self.blobs.put(self.id, orjson.dumps(manifest.to_json()))
        self.manifest = manifest  # only once stored: `wait()` returning means it is durable

    async def _store(self, entry: _Entry, track: Track, start: float, by: float) -> None:
        """Write the track's file (`store_failed` if not written by `by`) and its entry."""
        data = track.finish()
        file_id: str | None = None
        error: str | None = None
        if data is not None:
            file_id = new_id("recf")
            try:
                with trio.move_on_at(by) as writing:
                    await self.blobs.put(file_id, data)
            except (OSError, GB6Error):  # the origin unreachable, say: the other files go on
                writing = None
            if writing is None or writing.cancelled_caught:
                file_id, error = None, "store_failed"
        first = track.start_s()
        s = track.stats
        entry.result = TrackFile(
            id=track.id,
            kind=track.kind,
            codec=track.codec,
            container=track.container,
            content_type=CONTAINERS[track.container],
            file=file_id,
            bytes=len(data) if data is not None and file_id else 0,
            start_ms=None if first is None else max(0, round((first - start) * 1000)),
            duration_ms=round(track.duration_ms),
            frames=s.frames,
            packets=s.packets,
            lost=s.lost,
            late=s.late,
            malformed=s.malformed,
            dropped_frames=s.dropped_frames,
            dropped_packets=entry.dropped,
            truncated=track.truncated,
            error=error,
        )

    def _wake(self) -> None:
        try:
            self._send.send_nowait(None)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # a full queue wakes the loop anyway
