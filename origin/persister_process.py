"""The Kafka store's persister in a child process (origin/persister_main.py), supervised.

Rules:
- One child at a time. `run` starts it, gives it its settings on stdin, and serves once the
  child says it reads from its stored offsets. Each `heads` line it prints goes to
  `on_persisted`, in this task.
- The child dies with us: its stdin is our pipe, and its end (we closed it, or the kernel did
  because we died, kill -9 included) makes it finish the batch it writes and exit. On
  cancellation we close stdin, wait `_STOP_S` for it, then kill it.
- A child that fails before it is ready makes `run` raise (`unavailable`, with its exit code):
  a store that cannot persist must not serve. One that dies later is started again, from the
  offsets it stored; nothing acknowledged is lost (the log holds it) and reads that wait for
  the persister wait a little longer. The pause before a restart doubles from `_RESTART_S` up
  to `_RESTART_MAX_S` while children keep dying young (Kafka or PostgreSQL down: a Python
  process started every second would take a core), and is back to `_RESTART_S` after one lived
  `_LIVED_S`.
- A child reports what it wrote after each commit, so one that dies may have written batches it
  never reported. Its successor starts after them (their offsets are stored with their rows);
  once it is ready, `on_restarted` is called so that the owner asks PostgreSQL how far the rooms
  it still waits on are.
- The child runs in a session of its own: a terminal's Ctrl-C reaches the origin, which stops
  it in order, not the child mid-batch.
- Every size is bounded: a line from the child above `MAX_LINE` bytes is an error (the child
  is killed and restarted).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import orjson
import trio

from node.errors import UNAVAILABLE, GB6Error
from node.log import log
from origin.persister_main import Settings

MAX_LINE: Final = 16 << 20
_START_TIMEOUT_S: Final = 60.0  # imports, the pool, the topic's metadata (15 s at most)
_STOP_S: Final = 30.0  # a batch under way is written before the child exits
_RESTART_S: Final = 1.0
_RESTART_MAX_S: Final = 30.0
_LIVED_S: Final = 60.0
# The directory `origin` is imported from: the child imports the same code as its parent.
_ROOT: Final = str(Path(__file__).resolve().parent.parent)


class _ChildFailed(Exception):
    """The child stopped or spoke out of turn; the reason is the message."""


class PersisterProcess:
    """Runs and restarts the persister's child (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        on_persisted: Callable[[Mapping[str, int]], None],
        on_restarted: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._on_persisted = on_persisted
        self._on_restarted = on_restarted
        self.restarts = 0  # children started again after one died; for metrics and tests
        self.pid: int | None = None  # the child's, while one runs

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        pause = 0.0
        while True:
            born = trio.current_time()
            try:
                await self._child(ready)
            except _ChildFailed as exc:
                if not started:
                    raise GB6Error(UNAVAILABLE, f"the persister did not start: {exc}") from None
                pause = restart_pause(pause, trio.current_time() - born)
                log("persister_restart", topic=self._settings.topic, reason=str(exc), pause=pause)
            self.restarts += 1
            await trio.sleep(pause)

    async def _child(self, ready: Callable[[], None]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "origin.persister_main"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:  # EAGAIN, ENOMEM, EMFILE: tried again like a child that died
            raise _ChildFailed(f"could not be started: {exc}") from None
        assert proc.stdin is not None and proc.stdout is not None
        self.pid = proc.pid
        try:
            lines = _Lines(proc.stdout)
            try:
                await proc.stdin.send_all(self._settings.encode())
            except trio.BrokenResourceError:
                raise _ChildFailed(f"exited at start with {await proc.wait()}") from None
            with trio.move_on_after(_START_TIMEOUT_S) as waiting:
                first = await lines.next()
            if waiting.cancelled_caught:
                raise _ChildFailed(f"not ready within {_START_TIMEOUT_S:.0f} s")
            if first is None or "ready" not in first:
                raise _ChildFailed(f"exited at start with {await proc.wait()}")
            ready()
            if self.restarts:
                self._on_restarted()
            while (message := await lines.next()) is not None:
                heads = message.get("heads")
                if not isinstance(heads, dict):
                    raise _ChildFailed(f"unexpected line {message!r:.200}")
                self._on_persisted(heads)
            raise _ChildFailed(f"exited with {await proc.wait()}")
        finally:
            self.pid = None
            with trio.CancelScope(shield=True):
                await _stop(proc)


def restart_pause(previous: float, lived_s: float) -> float:
    """The pause before starting a child again, after the last one lived `lived_s`."""
    if lived_s >= _LIVED_S or previous <= 0:
        return _RESTART_S
    return min(previous * 2, _RESTART_MAX_S)


async def _stop(proc: trio.Process) -> None:
    """Close the child's stdin (its signal to stop), wait for it; kill it if it lingers."""
    assert proc.stdin is not None
    try:
        await proc.stdin.aclose()
    except trio.BrokenResourceError:
        pass
    with trio.move_on_after(_STOP_S):
        await proc.wait()
    if proc.returncode is None:
        log("persister_killed", pid=proc.pid)
        proc.kill()
        await proc.wait()
    if proc.stdout is not None:
        await proc.stdout.aclose()  # one pipe per child, not one more per restart


class _Lines:
    """JSON objects, one per line, from a stream; None at its end."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> dict[str, Any] | None:
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > MAX_LINE:
                raise _ChildFailed(f"a line longer than {MAX_LINE} bytes")
            chunk = await self._stream.receive_some(1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise _ChildFailed(f"not JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise _ChildFailed(f"not an object: {line[:200]!r}")
        return message
