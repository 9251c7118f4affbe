"""One thread that owns one SQLite connection and runs calls on it, one at a time.

For the embedded stores whose calls are few and each one transaction (billing, audit): the
message store (origin/sqlite_store.py) and the kv (origin/kv_sqlite.py) group-commit and have
writers of their own.

A component: `await nursery.start(worker.run)` opens the connection (with `opener`, in the
thread) and serves; cancelling `run` finishes the calls queued before it, then joins the thread.
`call(fn)` runs `fn(conn)` there and returns its result; a failed call's open transaction is
rolled back, and sqlite3 errors become `GB6Error` through the store's own `translate` (which
names the store). A caller cancelled while waiting may still see its call applied: the call is
handed over, so the caller waits (shielded) for the truth.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

import attrs
import outcome
import trio

from node.errors import UNAVAILABLE, GB6Error

T = TypeVar("T")
_STOP: Final = object()


@attrs.define
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    done: trio.Event = attrs.field(factory=trio.Event)
    result: outcome.Outcome[Any] | None = None


class SqliteWorker:
    def __init__(
        self,
        name: str,
        opener: Callable[[], sqlite3.Connection],
        translate: Callable[[sqlite3.Error], GB6Error],
    ) -> None:
        self._name = name
        self._opener = opener
        self._translate = translate
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._running = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        token = trio.lowlevel.current_trio_token()
        opened = trio.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                conn = self._opener()
            except BaseException as exc:  # reported to run, which raises it
                failure.append(exc)
                token.run_sync_soon(opened.set)
                return
            token.run_sync_soon(opened.set)
            try:
                while (job := self._queue.get()) is not _STOP:
                    assert isinstance(job, _Job)
                    job.result = outcome.capture(job.fn, conn)
                    if isinstance(job.result, outcome.Error) and conn.in_transaction:
                        conn.execute("ROLLBACK")
                    try:
                        token.run_sync_soon(job.done.set)
                    except trio.RunFinishedError:
                        return
            finally:
                conn.close()

        thread = threading.Thread(target=main, name=self._name, daemon=True)
        thread.start()
        try:
            with trio.CancelScope(shield=True):
                await opened.wait()
            if failure:
                exc = failure[0]
                raise self._translate(exc) if isinstance(exc, sqlite3.Error) else exc
            self._running = True
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._running = False
            self._queue.put(_STOP)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not self._running:
            raise GB6Error(UNAVAILABLE, f"{self._name} is not running")
        job = _Job(fn)
        self._queue.put(job)
        with trio.CancelScope(shield=True):  # handed over: wait for the truth
            await job.done.wait()
        assert job.result is not None
        try:
            return job.result.unwrap()  # type: ignore[no-any-return]
        except sqlite3.Error as exc:
            raise self._translate(exc) from None
