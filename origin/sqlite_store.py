"""The embedded store: relational data and the log of record in one SQLite file.

Durability: WAL with `synchronous=FULL`, so a commit has reached the disk (fsync) before any
caller hears of it. One writer thread owns the only write connection and group-commits: it takes
every job waiting in its queue (up to `writer_batch`) and commits them at once. A batch of plain
sends is one INSERT of all its rows (its own transaction: the fewer SQLite calls, the fewer times
the writer waits for the GIL); any other batch applies each job inside its own savepoint and
commits once. Results cross back to Trio once per batch, through a channel that one committer
task drains in commit order, so the origin can acknowledge and publish in seq order.

WAL checkpoints stay off the commit path: a checkpointer thread with its own connection copies
the log into the database (PASSIVE, so it never blocks the writer) while the writer commits.
Such a side checkpoint never catches up with a log that keeps growing, and only a writer can
restart the log, so once the log is past `_RESTART_FRAMES` the writer, between two commits and
after handing off the first one's results, checkpoints the few frames committed since the side
pass began; its next transaction then writes the log from its start again.

Reads run on a small pool of read connections in worker threads (WAL readers never block the
writer). Seqs are assigned inside the writer's transaction from a per-room head cache; a failed
commit drops that cache, so a seq is never skipped or reused. The log holds no index of cids:
the writer finds repeats among the keys it holds and in `search.db` (cid_index.py).
"""

from __future__ import annotations

import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import orjson
import outcome
import trio

from node.config import Limits
from node.errors import CONFLICT, INTERNAL, UNAVAILABLE, GB6Error, forbidden, not_found
from node.events import Event
from node.log import log
from origin import cid_index
from origin.records import (
    API_KEY_COLS,
    ApiKey,
    FileRecord,
    Instance,
    Org,
    OrgMember,
    RoomRecord,
    Token,
    User,
    api_key_from_row,
    event_from_row,
    hit_from_row,
)
from origin.schema_version import migrate_sqlite
from origin.search_index import SearchIndex

T = TypeVar("T")

_MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE orgs(
        id TEXT PRIMARY KEY, name TEXT NOT NULL, parent TEXT REFERENCES orgs(id),
        created_at INTEGER NOT NULL);
    CREATE TABLE instances(
        id TEXT PRIMARY KEY, org TEXT NOT NULL REFERENCES orgs(id), name TEXT NOT NULL,
        region TEXT NOT NULL, plan TEXT NOT NULL, status TEXT NOT NULL,
        created_at INTEGER NOT NULL);
    CREATE TABLE users(
        id TEXT PRIMARY KEY, instance TEXT NOT NULL REFERENCES instances(id),
        name TEXT NOT NULL, role TEXT NOT NULL, created_at INTEGER NOT NULL);
    CREATE TABLE tokens(
        id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, user TEXT NOT NULL REFERENCES users(id),
        expires_at INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL);
    CREATE TABLE rooms(
        id TEXT PRIMARY KEY, instance TEXT NOT NULL REFERENCES instances(id),
        name TEXT NOT NULL, kind TEXT NOT NULL, open INTEGER NOT NULL, creator TEXT NOT NULL,
        created_at INTEGER NOT NULL);
    CREATE TABLE members(
        room TEXT NOT NULL, user TEXT NOT NULL, read INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY(room, user)) WITHOUT ROWID;
    CREATE INDEX members_by_user ON members(user);
    CREATE TABLE events(
        id INTEGER PRIMARY KEY, room TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,
        type TEXT NOT NULL, sender TEXT NOT NULL, cid TEXT NOT NULL, body BLOB,
        thread INTEGER, target INTEGER, emoji TEXT, deleted INTEGER NOT NULL DEFAULT 0,
        current BLOB, edited INTEGER,
        UNIQUE(room, seq), UNIQUE(room, sender, cid));
    CREATE VIRTUAL TABLE events_fts USING fts5(text, tokenize='unicode61 remove_diacritics 2');
    CREATE TABLE files(
        id TEXT PRIMARY KEY, room TEXT NOT NULL REFERENCES rooms(id), uploader TEXT NOT NULL,
        size INTEGER NOT NULL, type TEXT NOT NULL, created_at INTEGER NOT NULL);
    CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # The full-text index moved to search.db, fed by a consumer of the log (search_index.py).
    """
    DROP TABLE events_fts;
    """,
    # Tenancy (origin/tenancy.py): soft-deleted orgs and users, org members and their
    # tokens, API keys (digests only, like tokens).
    """
    ALTER TABLE orgs ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE users ADD COLUMN status TEXT NOT NULL DEFAULT 'active';
    CREATE TABLE org_members(
        id TEXT PRIMARY KEY, org TEXT NOT NULL REFERENCES orgs(id), name TEXT NOT NULL,
        role TEXT NOT NULL, created_at INTEGER NOT NULL);
    CREATE TABLE member_tokens(
        id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE,
        member TEXT NOT NULL REFERENCES org_members(id), expires_at INTEGER NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);
    CREATE TABLE api_keys(
        id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, org TEXT NOT NULL REFERENCES orgs(id),
        instance TEXT REFERENCES instances(id), name TEXT NOT NULL, permissions TEXT NOT NULL,
        created_by TEXT NOT NULL, expires_at INTEGER, revoked INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL);
    """,
    # Idempotency keys moved to search.db (cid_index.py): the log keeps no index of them, so
    # a commit writes half the pages. A unique constraint cannot be dropped: rebuild the table.
    """
    CREATE TABLE events_rebuilt(
        id INTEGER PRIMARY KEY, room TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,
        type TEXT NOT NULL, sender TEXT NOT NULL, cid TEXT NOT NULL, body BLOB,
        thread INTEGER, target INTEGER, emoji TEXT, deleted INTEGER NOT NULL DEFAULT 0,
        current BLOB, edited INTEGER,
        UNIQUE(room, seq));
    INSERT INTO events_rebuilt(id, room, seq, ts, type, sender, cid, body, thread, target, emoji,
        deleted, current, edited)
        SELECT id, room, seq, ts, type, sender, cid, body, thread, target, emoji, deleted,
        current, edited FROM events;
    DROP TABLE events;
    ALTER TABLE events_rebuilt RENAME TO events;
    """,
)

# How often the checkpointer copies the log into the database. Each pass writes a page once
# however often commits rewrote it since the last: 0.5 s wrote 25% fewer bytes than 0.05 s at
# 2,000 appends/s (161 vs 213 MB in the store bench), p99 no worse.
_SIDE_PASS_S: Final = 0.5
_RESTART_FRAMES: Final = 4096  # past this many log pages (16 MiB) the writer restarts the log
_SEARCH_CATCH_UP_S: Final = 2.0  # a search waits at most this long for the index
# Keys written but not yet indexed in search.db, held by the writer (cid_index.py): ~1 minute
# of a busy store; past it the index has stalled and sends are refused until it catches up.
_MAX_RECENT_KEYS: Final = 200_000
# A batch of plain sends in one statement: ?1 their ts, ?2 a JSON array of rows (room, seq,
# type, sender, cid, body, emoji), inserted in its order. (No joins of json_each: SQLite would
# loop over one inside the other.)
_INSERT_PLAIN: Final = (
    "INSERT INTO events(room, seq, ts, type, sender, cid, body, emoji)"
    " SELECT value->>0, value->>1, ?1, value->>2, value->>3, value->>4,"
    " CAST(json_extract(value, '$[5]') AS BLOB), value->>6"
    " FROM json_each(?2) ORDER BY key"
)
_EVENT_COLS: Final = "room, seq, ts, type, sender, cid, body, thread, target, emoji, deleted"
_WORD = re.compile(r"\w+", re.UNICODE)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # see the module docstring
    conn.execute("PRAGMA foreign_keys=ON")
    if readonly:
        conn.execute("PRAGMA query_only=ON")
    return conn


# A user deleted meanwhile is not added (the store writes one transaction at a time).
_ADD_MEMBER: Final = (
    "INSERT OR IGNORE INTO members(room, user)"
    " SELECT ?, id FROM users WHERE id = ? AND status = 'active'"
)


@attrs.frozen
class AppendItem:
    """One seq-taking op, already authorized against membership by the origin."""

    room: str
    sender: str
    type: str
    cid: str
    body: dict[str, Any] | None = None
    thread: int | None = None
    target: int | None = None
    emoji: str | None = None
    may_moderate: bool = False  # may delete other people's messages
    reply: Any = None  # opaque to the store: how the origin answers the requester

    def event(self, seq: int, ts: int) -> Event:
        """The event this op becomes at `seq`, committed at `ts`."""
        return Event(
            room=self.room,
            seq=seq,
            ts=ts,
            type=self.type,
            sender=self.sender,
            cid=self.cid,
            body=self.body,
            thread=self.thread,
            target=self.target,
            emoji=self.emoji,
        )


@attrs.frozen
class Appended:
    event: Event
    duplicate: bool


# What a seq-taking op comes to: its event, or its refusal. A plain union, not an `outcome`:
# no wrapper to allocate per op, and no ABC isinstance checks on it (7% of an origin's
# samples in a profile under load; bench/RESULTS.md, 2026-11-26 evening).
AppendResult = Appended | GB6Error
AppendCallback = Callable[[list[tuple[AppendItem, AppendResult]]], None]


def _index_behind() -> GB6Error:
    return GB6Error(UNAVAILABLE, "the idempotency index is behind; retry the send")


def _plain(item: AppendItem) -> bool:
    """A send that checks nothing the log holds: no target, no thread."""
    return item.target is None and item.thread is None


@attrs.define
class _Job:
    append: AppendItem | None
    call: Callable[[sqlite3.Connection], Any] | None
    done: Callable[[outcome.Outcome[Any]], None] | None = None


_STOP: Final = object()


class SqliteStore:
    """The embedded relational store and log of record. A component: `await nursery.start(run)`.

    `on_appended` is called in the committer task, once per committed batch, in commit order.
    """

    def __init__(self, path: Path, limits: Limits, on_appended: AppendCallback) -> None:
        self.path = path
        self.limits = limits
        self._on_appended = on_appended
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._slots = trio.Semaphore(limits.max_inflight_appends)
        self._readers: list[sqlite3.Connection] = []
        self._read_limiter = trio.CapacityLimiter(2)
        self._heads: dict[str, int] = {}  # writer thread only
        self._recent = cid_index.RecentKeys()  # writer thread only
        self._keys: sqlite3.Connection | None = None  # writer thread only: reads search.db
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._stopping = threading.Event()
        # Held by whichever thread checkpoints; the writer never waits for it.
        self._checkpoint_lock = threading.Lock()
        self._restart_wanted = threading.Event()
        self._index = SearchIndex(path.parent / "search.db", path)
        self._results_send, self._results_recv = trio.open_memory_channel[
            list[tuple[_Job, outcome.Outcome[Any]]]
        ](limits.max_inflight_appends)
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()
        self.commits = 0  # batches committed; for metrics and tests
        self.stopped: GB6Error | None = None  # never: a failed batch fails alone

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        opened: list[sqlite3.Connection] = []  # closed again if the start fails or is cancelled
        try:
            writer = await trio.to_thread.run_sync(self._open_writer)
            opened.append(writer)
            await trio.to_thread.run_sync(self._index.open)
            await trio.to_thread.run_sync(self._index.catch_up_keys)
            self._keys = await trio.to_thread.run_sync(self._open_keys)
            opened.append(self._keys)
            self._readers = []
            for _ in range(2):
                self._readers.append(await trio.to_thread.run_sync(self._open_reader))
                opened.append(self._readers[-1])
            side = await trio.to_thread.run_sync(lambda: _connect(self.path, readonly=False))
        except BaseException:
            for conn in opened:
                conn.close()
            raise
        # No checkpoint from here to the `try` below: the threads started are always stopped.
        token = trio.lowlevel.current_trio_token()
        self._index.start(token)
        self._thread = threading.Thread(
            target=self._writer_main, args=(writer, token), name="gb6-sqlite-writer", daemon=True
        )
        self._thread.start()
        self._checkpointer = threading.Thread(
            target=self._checkpointer_main, args=(side,), name="gb6-sqlite-ckpt", daemon=True
        )
        self._checkpointer.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._committer)
                task_status.started()
                await trio.sleep_forever()
        finally:
            # The writer finishes every job queued before the stop marker, then exits.
            self._queue.put(_STOP)
            self._stopping.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._thread.join)
                # What the writer committed after the committer was cancelled is answered too
                # (its hand-offs ran before the join's own completion, in order).
                while True:
                    try:
                        self._answer(self._results_recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await trio.to_thread.run_sync(self._checkpointer.join)
                await trio.to_thread.run_sync(self._index.stop)
                for conn in self._readers:
                    conn.close()

    async def wait_idle(self) -> None:
        """Return once every submitted job has been committed and answered."""
        await self._idle.wait()

    def _open_reader(self) -> sqlite3.Connection:
        conn = _connect(self.path, readonly=True)
        conn.execute("ATTACH DATABASE ? AS idx", (str(self._index.path),))
        return conn

    def _open_keys(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self._index.path), isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA query_only=ON")
        return conn

    def _open_writer(self) -> sqlite3.Connection:
        conn = _connect(self.path, readonly=False)
        try:
            migrate_sqlite(conn, str(self.path), _MIGRATIONS)
        except BaseException:
            conn.close()
            raise
        return conn

    # --- the writer thread ---------------------------------------------------------------

    def _writer_main(self, conn: sqlite3.Connection, token: trio.lowlevel.TrioToken) -> None:
        last_batch = 0
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                if (
                    last_batch > 1
                    and self.limits.writer_linger_s > 0
                    and self._queue.qsize() < last_batch
                ):
                    # Under load (the last commit carried several jobs), give the batch a
                    # moment to fill: fewer, larger commits write far fewer WAL pages and
                    # spend far less CPU per message. A lone message never waits, nor does a
                    # backlog at least as large as the last batch (a slow commit left it: the
                    # batch is full enough, and waiting would only add to its latency).
                    time.sleep(self.limits.writer_linger_s)
                batch: list[_Job] = [first]  # type: ignore[list-item]
                stop = False
                while len(batch) < self.limits.writer_batch:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stop = True
                        break
                    batch.append(nxt)  # type: ignore[arg-type]
                last_batch = len(batch)
                results = self._apply(conn, batch)
                try:
                    token.run_sync_soon(self._results_send.send_nowait, results)
                except trio.RunFinishedError:
                    return
                self._index.notify()
                if stop:
                    return
                if self._restart_wanted.is_set():
                    self._restart_log(conn)
        finally:
            conn.close()
            if self._keys is not None:
                self._keys.close()

    def _restart_log(self, conn: sqlite3.Connection) -> None:
        """Copy the frames the side pass has not, so the next transaction restarts the log."""
        if not self._checkpoint_lock.acquire(blocking=False):
            return  # a side pass is running; try after the next commit
        try:
            self._restart_wanted.clear()
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log("checkpoint_failed", error=str(exc))
        finally:
            self._checkpoint_lock.release()

    def _checkpointer_main(self, conn: sqlite3.Connection) -> None:
        try:
            while not self._stopping.wait(_SIDE_PASS_S):
                with self._checkpoint_lock:
                    try:
                        _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    except sqlite3.Error as exc:
                        log("checkpoint_failed", error=str(exc))
                        continue
                if frames > _RESTART_FRAMES:
                    self._restart_wanted.set()
        finally:
            conn.close()

    def _apply(
        self, conn: sqlite3.Connection, batch: list[_Job]
    ) -> list[tuple[_Job, outcome.Outcome[Any]]]:
        self._recent.forget_upto(self._index.keys_indexed)
        if all(job.append is not None and _plain(job.append) for job in batch):
            return self._apply_plain(conn, batch)
        results: list[tuple[_Job, outcome.Outcome[Any]]] = []
        mark = self._recent.mark()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                # Plain messages write with single statements that fail whole, so they need
                # no savepoint; everything else may fail halfway and gets one.
                simple = job.append is not None and job.append.target is None
                if not simple:
                    conn.execute("SAVEPOINT job")
                try:
                    if job.append is not None:
                        value: Any = self._append(conn, job.append)
                    else:
                        assert job.call is not None
                        value = job.call(conn)
                except (GB6Error, sqlite3.IntegrityError) as exc:
                    # The job's own fault: undo just its writes, keep the rest of the batch.
                    if not simple:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                    if job.append is not None:
                        self._heads.pop(job.append.room, None)
                    err = exc if isinstance(exc, GB6Error) else GB6Error(CONFLICT, str(exc))
                    results.append((job, outcome.Error(err)))
                    continue
                except sqlite3.Error:
                    raise  # the storage itself failed: the whole batch is refused below
                except Exception as exc:  # a bug in one job must not stop the writer thread
                    log("writer_job_failed", error=repr(exc))
                    if not simple:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                    self._heads.clear()
                    results.append((job, outcome.Error(GB6Error(INTERNAL, "internal error"))))
                    continue
                if not simple:
                    conn.execute("RELEASE job")
                results.append((job, outcome.Value(value)))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._recent.undo(mark)
            self._heads.clear()  # reloaded from the log on next use: no seq skipped or reused
            failure = GB6Error(UNAVAILABLE, f"storage failed, nothing was written: {exc}")
            return [(job, outcome.Error(failure)) for job in batch]
        return results

    def _apply_plain(
        self, conn: sqlite3.Connection, batch: list[_Job]
    ) -> list[tuple[_Job, outcome.Outcome[Any]]]:
        """A batch of plain sends: one read for the keys the writer does not hold and one
        INSERT, which is its own transaction. Every SQLite call lets the event loop's thread
        take the GIL, and the writer waits up to the switch interval to get it back: two
        calls per batch instead of two per send (plus BEGIN and COMMIT)."""
        items = [job.append for job in batch if job.append is not None]
        ts = now_ms()
        try:
            priors = self._priors(conn, [(i.room, i.sender, i.cid) for i in items])
            results: list[tuple[_Job, outcome.Outcome[Any]]] = []
            fresh: dict[cid_index.Key, Appended] = {}
            rows: list[list[Any]] = []  # the new events, as `_INSERT_PLAIN` takes them
            for job, item in zip(batch, items, strict=True):
                key = (item.room, item.sender, item.cid)
                prior = priors.get(key)
                if prior is None and key in fresh:
                    prior = fresh[key].event
                if prior is not None:
                    results.append((job, outcome.Value(Appended(prior, duplicate=True))))
                    continue
                if len(self._recent) + len(fresh) >= _MAX_RECENT_KEYS:
                    results.append((job, outcome.Error(_index_behind())))
                    continue
                seq = self._head(conn, item.room) + 1
                self._heads[item.room] = seq
                fresh[key] = Appended(item.event(seq, ts), duplicate=False)
                row = [item.room, seq, item.type, item.sender, item.cid, item.body, item.emoji]
                rows.append(row)
                results.append((job, outcome.Value(fresh[key])))
            if rows:
                cur = conn.execute(_INSERT_PLAIN, (ts, orjson.dumps(rows).decode()))
                last = cur.lastrowid
                assert last is not None
                # One statement gives its rows consecutive ids, in the order it inserts them.
                for event_id, key in enumerate(fresh, start=last - len(fresh) + 1):
                    self._recent.add(key, event_id)
        except Exception as exc:
            self._heads.clear()  # reloaded from the log on next use: no seq skipped or reused
            if isinstance(exc, sqlite3.Error):
                failure = GB6Error(UNAVAILABLE, f"storage failed, nothing was written: {exc}")
            else:  # a bug must not stop the writer thread
                log("writer_batch_failed", error=repr(exc))
                failure = GB6Error(INTERNAL, "internal error")
            return [(job, outcome.Error(failure)) for job in batch]
        return results

    def _head(self, conn: sqlite3.Connection, room: str) -> int:
        head = self._heads.get(room)
        if head is None:
            row = conn.execute("SELECT MAX(seq) FROM events WHERE room=?", (room,)).fetchone()
            head = row[0] or 0
            self._heads[room] = head
        return head

    def _append(self, conn: sqlite3.Connection, item: AppendItem) -> Appended:
        """Raises GB6Error only before it writes anything."""
        key = (item.room, item.sender, item.cid)
        # Idempotency first: a repeat answers with the original even if its checks would
        # fail now.
        prior = self._prior(conn, key)
        if prior is not None:
            return Appended(prior, duplicate=True)
        if len(self._recent) >= _MAX_RECENT_KEYS:
            raise _index_behind()
        if item.target is not None:
            self._check_target(conn, item)
        if item.thread is not None:
            row = conn.execute(
                "SELECT type FROM events WHERE room=? AND seq=?", (item.room, item.thread)
            ).fetchone()
            if row is None or row[0] != "message":
                raise not_found(f"thread root {item.thread} is not a message of this room")
        seq = self._head(conn, item.room) + 1
        ts = now_ms()
        body = orjson.dumps(item.body) if item.body is not None else None
        cur = conn.execute(
            "INSERT INTO events(room, seq, ts, type, sender, cid, body, thread, target, emoji)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                item.room,
                seq,
                ts,
                item.type,
                item.sender,
                item.cid,
                body,
                item.thread,
                item.target,
                item.emoji,
            ),
        )
        event_id = cur.lastrowid
        assert event_id is not None
        # The search index follows the log on its own (search_index.py).
        if item.type == "edit":
            conn.execute(
                "UPDATE events SET current=?, edited=? WHERE room=? AND seq=?",
                (body, seq, item.room, item.target),
            )
        elif item.type == "delete":
            conn.execute(
                "UPDATE events SET deleted=1, body=NULL, current=NULL"
                " WHERE room=? AND (seq=? OR (type='edit' AND target=?))",
                (item.room, item.target, item.target),
            )
        self._heads[item.room] = seq
        self._recent.add(key, event_id)  # last: nothing after it can fail
        return Appended(item.event(seq, ts), duplicate=False)

    def _priors(
        self, conn: sqlite3.Connection, keys: list[cid_index.Key]
    ) -> dict[cid_index.Key, Event]:
        """`_prior` for many keys, in at most two statements."""
        ids: dict[cid_index.Key, int] = {}
        missing: list[cid_index.Key] = []
        for key in keys:
            event_id = self._recent.get(key)
            if event_id is None:
                missing.append(key)
            else:
                ids[key] = event_id
        if missing:
            assert self._keys is not None
            ids.update(cid_index.lookup_many(self._keys, missing))
        if not ids:
            return {}
        rows = conn.execute(
            f"SELECT id, {_EVENT_COLS} FROM events WHERE id IN (SELECT value FROM json_each(?))",
            (orjson.dumps(list(ids.values())).decode(),),
        ).fetchall()
        by_id = {row[0]: event_from_row(row[1:]) for row in rows}
        return {key: by_id[event_id] for key, event_id in ids.items()}

    def _prior(self, conn: sqlite3.Connection, key: cid_index.Key) -> Event | None:
        """The event that used `key`, in the writer thread: the keys it holds, then the index
        (which holds every key the writer has forgotten)."""
        event_id = self._recent.get(key)
        if event_id is None:
            assert self._keys is not None
            event_id = cid_index.lookup(self._keys, key)
            if event_id is None:
                return None
        row = conn.execute(f"SELECT {_EVENT_COLS} FROM events WHERE id=?", (event_id,)).fetchone()
        return event_from_row(row)

    def _check_target(self, conn: sqlite3.Connection, item: AppendItem) -> None:
        row = conn.execute(
            "SELECT type, sender, deleted FROM events WHERE room=? AND seq=?",
            (item.room, item.target),
        ).fetchone()
        if row is None or row[0] != "message":
            raise not_found(f"target {item.target} is not a message of this room")
        if row[2]:
            raise GB6Error(CONFLICT, f"message {item.target} was deleted")
        if item.type == "edit" and row[1] != item.sender:
            raise forbidden("only the sender can edit a message")
        if item.type == "delete" and row[1] != item.sender and not item.may_moderate:
            raise forbidden("only the sender, the room's creator or an admin can delete")

    # --- committer: results back into Trio, in commit order -------------------------------

    async def _committer(self) -> None:
        async for results in self._results_recv:
            self._answer(results)

    def _answer(self, results: list[tuple[_Job, outcome.Outcome[Any]]]) -> None:
        appended: list[tuple[AppendItem, AppendResult]] = []
        for job, result in results:
            if job.append is not None:
                if type(result) is outcome.Value:
                    appended.append((job.append, result.value))
                else:
                    assert isinstance(result, outcome.Error)
                    err = result.error  # a GB6Error: `_apply` wraps every failure
                    if not isinstance(err, GB6Error):
                        err = GB6Error(INTERNAL, "internal error")
                    appended.append((job.append, err))
            elif job.done is not None:
                job.done(result)
        self.commits += 1
        if appended:
            self._on_appended(appended)
        self._release(len(results))

    def _release(self, n: int) -> None:
        self._inflight -= n
        for _ in range(n):
            self._slots.release()
        if self._inflight == 0:
            self._idle.set()

    async def _acquire(self) -> None:
        try:
            # The common case takes no schedule point: the caller (a connection's reader)
            # checkpoints on every receive anyway, and a yield per message was measurable.
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        if self._inflight == 0:
            self._idle = trio.Event()
        self._inflight += 1

    # --- writes --------------------------------------------------------------------------

    async def submit_append(self, item: AppendItem) -> None:
        """Queue an append; waits only for a free slot (backpressure). The result reaches
        `on_appended` once durable."""
        await self._acquire()
        self._queue.put(_Job(append=item, call=None))

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in the writer's next group commit; return its value once durable.

        Cancelling the caller does not cancel the write: it is queued and will commit."""
        await self._acquire()
        done = trio.Event()
        box: list[outcome.Outcome[T]] = []

        def finish(result: outcome.Outcome[T]) -> None:
            box.append(result)
            done.set()

        self._queue.put(_Job(append=None, call=fn, done=finish))
        await done.wait()
        return box[0].unwrap()

    async def create_org(self, org: Org) -> None:
        def tx(c: sqlite3.Connection) -> None:
            if (
                org.parent is not None
                and not c.execute("SELECT 1 FROM orgs WHERE id=?", (org.parent,)).fetchone()
            ):
                raise not_found(f"organization {org.parent} not found")
            c.execute(
                "INSERT INTO orgs(id, name, parent, created_at) VALUES (?,?,?,?)",
                (org.id, org.name, org.parent, org.created_at),
            )

        await self.write(tx)

    async def create_instance(self, inst: Instance) -> None:
        await self.write(
            lambda c: c.execute(
                "INSERT INTO instances(id, org, name, region, plan, status, created_at)"
                " VALUES (?,?,?,?,?,?,?)",
                (
                    inst.id,
                    inst.org,
                    inst.name,
                    inst.region,
                    inst.plan,
                    inst.status,
                    inst.created_at,
                ),
            )
        )

    async def create_user(self, user: User) -> None:
        await self.write(
            lambda c: c.execute(
                "INSERT INTO users(id, instance, name, role, created_at, status)"
                " VALUES (?,?,?,?,?,?)",
                (user.id, user.instance, user.name, user.role, user.created_at, user.status),
            )
        )

    async def create_token(self, token: Token, digest: str) -> None:
        await self.write(
            lambda c: c.execute(
                "INSERT INTO tokens(id, digest, user, expires_at, revoked, created_at)"
                " VALUES (?,?,?,?,0,?)",
                (token.id, digest, token.user, token.expires_at, now_ms()),
            )
        )

    async def revoke_token(self, user: str, token_id: str) -> bool:
        def tx(c: sqlite3.Connection) -> bool:
            cur = c.execute("UPDATE tokens SET revoked=1 WHERE id=? AND user=?", (token_id, user))
            return cur.rowcount > 0

        return await self.write(tx)

    async def create_room(self, room: RoomRecord, members: Iterable[str]) -> None:
        users = list(members)

        def tx(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO rooms(id, instance, name, kind, open, creator, created_at)"
                " VALUES (?,?,?,?,?,?,?)",
                (
                    room.id,
                    room.instance,
                    room.name,
                    room.kind,
                    int(room.open),
                    room.creator,
                    room.created_at,
                ),
            )
            c.executemany(_ADD_MEMBER, [(room.id, u) for u in users])

        await self.write(tx)

    async def add_members(self, room: str, users: Iterable[str]) -> None:
        rows = [(room, u) for u in users]
        await self.write(lambda c: c.executemany(_ADD_MEMBER, rows))

    async def remove_members(self, room: str, users: Iterable[str]) -> None:
        rows = [(room, u) for u in users]
        await self.write(
            lambda c: c.executemany("DELETE FROM members WHERE room=? AND user=?", rows)
        )

    async def set_read(self, room: str, user: str, seq: int) -> None:
        await self.write(
            lambda c: c.execute(
                "UPDATE members SET read=MAX(read, ?) WHERE room=? AND user=?", (seq, room, user)
            )
        )

    async def create_file(self, rec: FileRecord) -> None:
        await self.write(
            lambda c: c.execute(
                "INSERT INTO files(id, room, uploader, size, type, created_at)"
                " VALUES (?,?,?,?,?,?)",
                (rec.id, rec.room, rec.uploader, rec.size, rec.type, rec.created_at),
            )
        )

    async def set_meta(self, key: str, value: str) -> None:
        await self.write(
            lambda c: c.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )
        )

    # --- reads ---------------------------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on a read connection in a worker thread."""
        async with self._read_limiter:
            conn = self._readers.pop()
            try:
                return await trio.to_thread.run_sync(fn, conn)
            except sqlite3.Error as exc:
                raise GB6Error(UNAVAILABLE, f"storage read failed: {exc}") from exc
            finally:
                self._readers.append(conn)

    async def events_after(self, room: str, after: int, limit: int) -> list[Event]:
        def q(c: sqlite3.Connection) -> list[Event]:
            rows = c.execute(
                f"SELECT {_EVENT_COLS} FROM events WHERE room=? AND seq>? ORDER BY seq LIMIT ?",
                (room, after, limit),
            ).fetchall()
            return [event_from_row(r) for r in rows]

        return await self.read(q)

    async def history(self, room: str, before: int | None, limit: int) -> list[Event]:
        def q(c: sqlite3.Connection) -> list[Event]:
            rows = c.execute(
                f"SELECT {_EVENT_COLS} FROM events WHERE room=? AND seq<? ORDER BY seq DESC"
                " LIMIT ?",
                (room, before if before is not None else 2**62, limit),
            ).fetchall()
            return [event_from_row(r) for r in reversed(rows)]

        return await self.read(q)

    async def search(self, rooms: Sequence[str], query: str, limit: int) -> list[Event]:
        words = _WORD.findall(query)
        if not words or not rooms:
            return []
        match = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        room_list = orjson.dumps(list(rooms)).decode()

        # Read your writes: wait for the index to hold every event committed so far.
        newest = await self.read(lambda c: c.execute("SELECT MAX(id) FROM events").fetchone()[0])
        with trio.move_on_after(_SEARCH_CATCH_UP_S):
            await self._index.caught_up(newest or 0)

        def q(c: sqlite3.Connection) -> list[Event]:
            rows = c.execute(
                f"SELECT {', '.join('e.' + x.strip() for x in _EVENT_COLS.split(','))},"
                " e.current, e.edited FROM idx.events_fts f JOIN events e ON e.id = f.rowid"
                " WHERE f.text MATCH ? AND e.deleted = 0"
                " AND e.room IN (SELECT value FROM json_each(?))"
                " ORDER BY e.id DESC LIMIT ?",
                (match, room_list, limit),
            ).fetchall()
            return [hit_from_row(r) for r in rows]

        return await self.read(q)

    async def token(self, digest: str) -> Token | None:
        def q(c: sqlite3.Connection) -> Token | None:
            row = c.execute(
                "SELECT id, user, expires_at, revoked FROM tokens WHERE digest=?", (digest,)
            ).fetchone()
            return Token(row[0], row[1], row[2], bool(row[3])) if row else None

        return await self.read(q)

    async def load_tenancy(self) -> tuple[list[Org], list[Instance], list[User]]:
        def q(c: sqlite3.Connection) -> tuple[list[Org], list[Instance], list[User]]:
            orgs = [
                Org(*r)
                for r in c.execute("SELECT id, name, parent, created_at FROM orgs WHERE deleted=0")
            ]
            insts = [
                Instance(*r)
                for r in c.execute(
                    "SELECT id, org, name, region, plan, status, created_at FROM instances"
                )
            ]
            users = [
                User(*r)
                for r in c.execute(
                    "SELECT id, instance, name, role, created_at, status FROM users"
                    " WHERE status != 'deleted'"
                )
            ]
            return orgs, insts, users

        return await self.read(q)

    async def load_rooms(
        self,
    ) -> list[tuple[RoomRecord, int, dict[str, int]]]:
        """Every room with its head seq and members (user → read seq)."""

        def q(c: sqlite3.Connection) -> list[tuple[RoomRecord, int, dict[str, int]]]:
            rooms = {
                r[0]: RoomRecord(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6])
                for r in c.execute(
                    "SELECT id, instance, name, kind, open, creator, created_at FROM rooms"
                )
            }
            members: dict[str, dict[str, int]] = {rid: {} for rid in rooms}
            for room, user, read in c.execute("SELECT room, user, read FROM members"):
                members[room][user] = read
            heads = dict(c.execute("SELECT room, MAX(seq) FROM events GROUP BY room").fetchall())
            return [(rec, heads.get(rid, 0), members[rid]) for rid, rec in rooms.items()]

        return await self.read(q)

    async def file(self, file_id: str) -> FileRecord | None:
        def q(c: sqlite3.Connection) -> FileRecord | None:
            row = c.execute(
                "SELECT id, room, uploader, size, type, created_at FROM files WHERE id=?",
                (file_id,),
            ).fetchone()
            return FileRecord(*row) if row else None

        return await self.read(q)

    async def meta(self, key: str) -> str | None:
        def q(c: sqlite3.Connection) -> str | None:
            row = c.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            return row[0] if row else None

        return await self.read(q)

    # --- quota counts at start -----------------------------------------------------------

    async def messages_since(self, since_ms: int) -> dict[str, int]:
        # Once at start; events has no ts index (it would cost every append), so this scans.
        return await self.read(
            lambda c: dict(
                c.execute(
                    "SELECT r.instance, COUNT(*) FROM events e JOIN rooms r ON r.id = e.room"
                    " WHERE e.type = 'message' AND e.ts >= ? GROUP BY r.instance",
                    (since_ms,),
                ).fetchall()
            )
        )

    async def stored_bytes(self) -> dict[str, int]:
        return await self.read(
            lambda c: dict(
                c.execute(
                    "SELECT r.instance, SUM(f.size) FROM files f JOIN rooms r ON r.id = f.room"
                    " GROUP BY r.instance"
                ).fetchall()
            )
        )

    async def event_by_cid(self, room: str, sender: str, cid: str) -> Event | None:
        # Through the writer: only it knows the keys not yet indexed.
        return await self.write(lambda c: self._prior(c, (room, sender, cid)))

    # --- the org tree, lifecycles, org members and API keys ------------------------------

    async def _update(self, sql: str, args: tuple[Any, ...], what: str) -> None:
        """One UPDATE that must hit a row: `not_found` naming `what` otherwise."""

        def tx(c: sqlite3.Connection) -> None:
            if c.execute(sql, args).rowcount == 0:
                raise not_found(f"{what} not found")

        await self.write(tx)

    async def update_org(self, org: Org) -> None:
        await self._update(
            "UPDATE orgs SET name=? WHERE id=? AND deleted=0",
            (org.name, org.id),
            f"organization {org.id}",
        )

    async def delete_org(self, org_id: str) -> None:
        def tx(c: sqlite3.Connection) -> None:
            cur = c.execute("UPDATE orgs SET deleted=1 WHERE id=? AND deleted=0", (org_id,))
            if cur.rowcount == 0:
                raise not_found(f"organization {org_id} not found")
            c.execute(
                "DELETE FROM member_tokens WHERE member IN"
                " (SELECT id FROM org_members WHERE org=?)",
                (org_id,),
            )
            c.execute("DELETE FROM org_members WHERE org=?", (org_id,))
            c.execute("DELETE FROM api_keys WHERE org=?", (org_id,))

        await self.write(tx)

    async def update_instance(self, inst: Instance) -> None:
        await self._update(
            "UPDATE instances SET name=?, plan=?, status=? WHERE id=?",
            (inst.name, inst.plan, inst.status, inst.id),
            f"instance {inst.id}",
        )

    async def update_user(self, user: User) -> None:
        await self._update(
            "UPDATE users SET name=?, role=? WHERE id=? AND status != 'deleted'",
            (user.name, user.role, user.id),
            f"user {user.id}",
        )

    async def delete_user(self, user_id: str) -> None:
        def tx(c: sqlite3.Connection) -> None:
            cur = c.execute(
                "UPDATE users SET status='deleted' WHERE id=? AND status != 'deleted'", (user_id,)
            )
            if cur.rowcount == 0:
                raise not_found(f"user {user_id} not found")
            c.execute("UPDATE tokens SET revoked=1 WHERE user=?", (user_id,))
            c.execute("DELETE FROM members WHERE user=?", (user_id,))

        await self.write(tx)

    async def create_org_member(self, member: OrgMember) -> None:
        await self.write(
            lambda c: c.execute(
                "INSERT INTO org_members(id, org, name, role, created_at) VALUES (?,?,?,?,?)",
                (member.id, member.org, member.name, member.role, member.created_at),
            )
        )

    async def update_org_member(self, member: OrgMember) -> None:
        await self._update(
            "UPDATE org_members SET name=?, role=? WHERE id=?",
            (member.name, member.role, member.id),
            f"member {member.id}",
        )

    async def delete_org_member(self, member_id: str) -> None:
        def tx(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM member_tokens WHERE member=?", (member_id,))
            if c.execute("DELETE FROM org_members WHERE id=?", (member_id,)).rowcount == 0:
                raise not_found(f"member {member_id} not found")

        await self.write(tx)

    async def create_member_token(self, token: Token, digest: str) -> None:
        await self.write(
            lambda c: c.execute(
                "INSERT INTO member_tokens(id, digest, member, expires_at, revoked, created_at)"
                " VALUES (?,?,?,?,0,?)",
                (token.id, digest, token.user, token.expires_at, now_ms()),
            )
        )

    async def revoke_member_token(self, member: str, token_id: str) -> bool:
        def tx(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "UPDATE member_tokens SET revoked=1 WHERE id=? AND member=?", (token_id, member)
            )
            return cur.rowcount > 0

        return await self.write(tx)

    async def member_token(self, digest: str) -> Token | None:
        def q(c: sqlite3.Connection) -> Token | None:
            row = c.execute(
                "SELECT id, member, expires_at, revoked FROM member_tokens WHERE digest=?",
                (digest,),
            ).fetchone()
            return Token(row[0], row[1], row[2], bool(row[3])) if row else None

        return await self.read(q)

    async def create_api_key(self, key: ApiKey, digest: str) -> None:
        await self.write(
            lambda c: c.execute(
                "INSERT INTO api_keys(id, digest, org, instance, name, permissions, created_by,"
                " expires_at, revoked, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    key.id,
                    digest,
                    key.org,
                    key.instance,
                    key.name,
                    " ".join(key.permissions),
                    key.created_by,
                    key.expires_at,
                    int(key.revoked),
                    key.created_at,
                ),
            )
        )

    async def revoke_api_key(self, key_id: str) -> bool:
        def tx(c: sqlite3.Connection) -> bool:
            return c.execute("UPDATE api_keys SET revoked=1 WHERE id=?", (key_id,)).rowcount > 0

        return await self.write(tx)

    async def api_key(self, digest: str) -> ApiKey | None:
        def q(c: sqlite3.Connection) -> ApiKey | None:
            sql = f"SELECT {API_KEY_COLS} FROM api_keys WHERE digest=?"
            row = c.execute(sql, (digest,)).fetchone()
            return api_key_from_row(row) if row else None

        return await self.read(q)

    async def load_access(self) -> tuple[list[OrgMember], list[ApiKey]]:
        def q(c: sqlite3.Connection) -> tuple[list[OrgMember], list[ApiKey]]:
            members = [
                OrgMember(*r)
                for r in c.execute("SELECT id, org, name, role, created_at FROM org_members")
            ]
            rows = c.execute(f"SELECT {API_KEY_COLS} FROM api_keys")
            keys = [api_key_from_row(r) for r in rows]
            return members, keys

        return await self.read(q)
