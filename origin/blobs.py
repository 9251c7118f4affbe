"""The embedded blob store: one file per blob in a local directory, written atomically."""

from __future__ import annotations

import os
import re
from pathlib import Path

import trio

from node.errors import invalid

_SAFE = re.compile(r"^[a-z0-9_]{1,64}$")


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, blob_id: str) -> Path:
        if not _SAFE.match(blob_id):
            raise invalid("bad blob id")
        return self.root / blob_id[-2:] / blob_id

    async def put(self, blob_id: str, data: bytes) -> None:
        """Durable once this returns: written to a temporary name, fsynced, renamed."""
        await trio.to_thread.run_sync(self._put, self.path(blob_id), data)

    @staticmethod
    def _put(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
