"""Reassembles a client's text messages from wsproto's partial chunks, enforcing size limits.

Pure: no I/O. A message above `limit` bytes is dropped whole and reported as TOO_LARGE once it
ends (the connection stays usable); one that grows beyond `transport_limit` is reported at once
as TRANSPORT_LIMIT (the gateway closes with 1009) so the server never buffers more than that.
"""

from __future__ import annotations

import enum


class Verdict(enum.Enum):
    PARTIAL = "partial"
    COMPLETE = "complete"
    TOO_LARGE = "too_large"
    TRANSPORT_LIMIT = "transport_limit"


class MessageAssembler:
    def __init__(self, limit: int, transport_limit: int) -> None:
        self.limit = limit
        self.transport_limit = max(transport_limit, 2 * limit)
        self._parts: list[str] = []
        self._size = 0

    def feed(self, chunk: str, finished: bool) -> tuple[Verdict, str]:
        self._size += len(chunk.encode("utf-8")) if not chunk.isascii() else len(chunk)
        if self._size > self.transport_limit:
            self._parts.clear()
            return Verdict.TRANSPORT_LIMIT, ""
        if self._size <= self.limit:
            self._parts.append(chunk)
        else:
            self._parts.clear()
        if not finished:
            return Verdict.PARTIAL, ""
        size, self._size = self._size, 0
        if size > self.limit:
            return Verdict.TOO_LARGE, ""
        text = self._parts[0] if len(self._parts) == 1 else "".join(self._parts)
        self._parts.clear()
        return Verdict.COMPLETE, text
