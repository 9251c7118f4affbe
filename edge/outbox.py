"""One connection's outgoing bytes, in order, with a bound.

`write()` is synchronous so the fan-out path can hand the same bytes to hundreds of connections
without a scheduler round-trip each: when nothing is queued it tries a non-blocking `send()` right
away, and only what the kernel does not take is queued for the connection's writer task. Queued
bytes beyond `limit` mean the client cannot keep up: the outbox calls `on_overflow` once (the
gateway closes with 4008) and refuses further writes.

A `Cork` shared by a gateway's outboxes batches a synchronous burst of writes (one committed
batch: acks and events for many rooms): while it is held, outboxes only collect; on release each
one sends what it collected with a single `send()`.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable

import trio


class Cork:
    """Held around synchronous code only: nothing written while it is held leaves before."""

    def __init__(self) -> None:
        self.held = False
        self._dirty: list[Outbox] = []

    def __enter__(self) -> Cork:
        self.held = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.held = False
        dirty, self._dirty = self._dirty, []
        for outbox in dirty:
            outbox.uncork()


class Outbox:
    def __init__(self, sock: socket.socket, limit: int, cork: Cork | None = None) -> None:
        self._sock = sock
        self.limit = limit
        self._cork = cork
        self._corked: list[bytes] | None = None
        self.on_overflow: Callable[[], None] = lambda: None
        self._queue: deque[bytes] = deque()
        self.queued_bytes = 0
        self._wake = trio.lowlevel.ParkingLot()
        self._drained = trio.lowlevel.ParkingLot()
        self.accepting = True  # false once closing or broken: writes are dropped
        self._finish = False  # the writer exits once the queue is empty
        self.broken = False
        self.sent_bytes = 0
        # Bytes of replies the client asked for (history, search pages) that the bound does
        # not count: a page may be larger than the bound itself. Shrinks as bytes go out.
        self._allowance = 0

    def write(self, data: bytes) -> bool:
        """Queue `data` after everything written before. False if it was dropped."""
        if not self.accepting:
            return False
        if self._cork is not None and self._cork.held:
            if self._corked is None:
                self._corked = []
                self._cork._dirty.append(self)
            self._corked.append(data)
            return True
        return self._put(data, bounded=True)

    def write_reply(self, data: bytes) -> bool:
        """Queue a reply the client requested, however large; only what else is queued counts
        against the bound. Callers wait for room first (`wait_below`), one reply at a time."""
        self._allowance += len(data)
        return self.write(data)

    def uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked and self.accepting:
            self._put(corked[0] if len(corked) == 1 else b"".join(corked), bounded=True)

    def _put(self, data: bytes, *, bounded: bool) -> bool:
        if not self._queue:
            try:
                n = self._sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._break()
                return False
            self.sent_bytes += n
            self._allowance = max(0, self._allowance - n)
            if n == len(data):
                return True
            data = data[n:]
        self._queue.append(data)
        self.queued_bytes += len(data)
        if bounded and self.queued_bytes > self.limit + self._allowance:
            self.accepting = False
            self.on_overflow()
            return False
        self._wake.unpark()
        return True

    def write_last(self, data: bytes) -> None:
        """Queue a final frame (a close): it goes out after what is queued; then nothing."""
        if self.broken or self._finish:
            return
        self.uncork()  # what was written before the final frame goes first
        self.accepting = False
        self._put(data, bounded=False)
        self._finish = True
        self._wake.unpark()

    def drop_queued(self) -> None:
        """Forget queued bytes that have not started to go out (keeps a partial frame whole)."""
        if len(self._queue) > 1:
            first = self._queue[0]
            self._queue.clear()
            self._queue.append(first)
            self.queued_bytes = len(first)

    def _break(self) -> None:
        self.broken = True
        self.accepting = False
        self._queue.clear()
        self.queued_bytes = 0
        self._wake.unpark()
        self._drained.unpark_all()

    async def wait_below(self, threshold: int) -> None:
        """Wait until at most `threshold` bytes are queued (for bulk senders like catch-up)."""
        while self.queued_bytes > threshold and not self.broken:
            await self._drained.park()

    async def run_writer(self) -> None:
        """The connection's writer task: sends what `write` queued; returns after a final
        frame has gone out, or when the socket breaks."""
        while True:
            if not self._queue:
                if self._finish or self.broken:
                    return
                await self._wake.park()
                continue
            await trio.lowlevel.wait_writable(self._sock)
            while self._queue:
                chunk = self._queue[0]
                try:
                    n = self._sock.send(chunk)
                except BlockingIOError:
                    break
                except OSError:
                    self._break()
                    return
                self.sent_bytes += n
                self.queued_bytes -= n
                self._allowance = max(0, self._allowance - n)
                if n == len(chunk):
                    self._queue.popleft()
                else:
                    self._queue[0] = chunk[n:]
                    break
            self._drained.unpark_all()
