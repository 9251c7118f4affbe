"""Recordings in the origin's blob store: what an edge's recorder writes and its HTTP API reads.

One class for both shapes: `gb6 run` calls it in process; a cluster edge reaches it over the
link (`rec.*` requests, replication/origin_link.py), so a recording made on any edge lands in
the blob store of the instance's origin shard.

Rules:
- Only recording blobs: ids `rec_…` (a manifest), `recf_…` (a track file), `recs_…` (a
  room's index); anything else is `invalid` (an edge cannot touch attachments).
- A file arrives whole (`put`) or in chunks (`write`, each at the offset where the previous
  ended, at most `CHUNK` bytes; `last` makes it durable and visible under its id, as `put`
  does: fsync, rename). Memory per call is one chunk; a file is at most `max_bytes`.
- Reads are by range (`read`: at most `CHUNK` bytes from `offset`, with the blob's size), so
  a download never holds a whole file. A missing blob is `not_found`.
- Each room keeps an index of its recordings (newest last, at most `index_size` ids, each
  once: adding one again changes nothing), changed only under this object's lock:
  recordings of one room finishing on two edges at once both stay listed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Final

import orjson
import trio

from node.errors import TOO_LARGE, GB6Error, invalid, not_found
from origin.blobs import LocalBlobStore

CHUNK: Final = 256 << 10
_IDS = re.compile(r"^rec[fs]?_[a-z0-9_]{1,60}$")


def index_blob(room: str) -> str:
    return "recs_" + room


def _check(blob_id: str) -> None:
    if not isinstance(blob_id, str) or not _IDS.match(blob_id):
        raise invalid(f"not a recording blob id: {blob_id!r}")


class RecordingStore:
    def __init__(self, blobs: LocalBlobStore, max_bytes: int, index_size: int = 1_000) -> None:
        self.blobs = blobs
        self.max_bytes = max_bytes
        self.index_size = index_size
        self._index_lock = trio.Lock()

    async def put(self, blob_id: str, data: bytes) -> None:
        """A whole blob, durable on return."""
        _check(blob_id)
        if len(data) > self.max_bytes:
            raise GB6Error(TOO_LARGE, f"a recording file is at most {self.max_bytes} bytes")
        await self.blobs.put(blob_id, data)

    async def write(self, blob_id: str, offset: int, data: bytes, last: bool) -> None:
        """One chunk of a blob being uploaded; `last`: the blob is complete (durable, then
        readable under its id). Raises invalid (bad id, offset not where the upload is),
        too_large."""
        _check(blob_id)
        if len(data) > CHUNK:
            raise GB6Error(TOO_LARGE, f"a chunk is at most {CHUNK} bytes")
        if offset < 0 or offset + len(data) > self.max_bytes:
            raise GB6Error(TOO_LARGE, f"a recording file is at most {self.max_bytes} bytes")
        path = self.blobs.path(blob_id)
        await trio.to_thread.run_sync(_write, path, offset, data, last)

    async def read(self, blob_id: str, offset: int, limit: int = CHUNK) -> tuple[bytes, int]:
        """Up to `limit` (≤ CHUNK) bytes from `offset`, and the blob's size."""
        _check(blob_id)
        if offset < 0:
            raise invalid("offset must be >= 0")
        path = self.blobs.path(blob_id)
        return await trio.to_thread.run_sync(_read, path, offset, min(max(limit, 0), CHUNK))

    async def read_all(self, blob_id: str) -> bytes:
        """A small blob (an index, a manifest) whole."""
        data, size = await self.read(blob_id, 0)
        while len(data) < size:
            more, _ = await self.read(blob_id, len(data))
            if not more:
                break
            data += more
        return data

    async def index(self, room: str) -> list[str]:
        """The room's recording ids, oldest first."""
        try:
            raw = await self.read_all(index_blob(room))
        except GB6Error as exc:
            if exc.code == "not_found":
                return []
            raise
        ids = orjson.loads(raw)
        return [i for i in ids if isinstance(i, str)]

    async def add_to_index(self, room: str, recording: str) -> None:
        _check(recording)
        async with self._index_lock:
            ids = await self.index(room)
            if recording in ids:
                return  # a repeat (an edge asks again when an answer was lost)
            await self.blobs.put(
                index_blob(room), orjson.dumps([*ids, recording][-self.index_size :])
            )


def _write(path: Path, offset: int, data: bytes, last: bool) -> None:
    part = path.with_suffix(".upload")
    path.parent.mkdir(parents=True, exist_ok=True)
    if offset == 0:
        mode = "wb"
    else:
        try:
            size = part.stat().st_size
        except FileNotFoundError:
            raise invalid("no upload of this blob is under way") from None
        if size != offset:
            raise invalid(f"the upload is at byte {size}, not {offset}")
        mode = "ab"
    with open(part, mode) as f:
        f.write(data)
        if last:
            f.flush()
            os.fsync(f.fileno())
    if last:
        os.replace(part, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read(path: Path, offset: int, limit: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(offset)
            return f.read(limit), size
    except FileNotFoundError:
        raise not_found("no such recording blob") from None
