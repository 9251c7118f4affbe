"""The relational store on PostgreSQL (asyncpg through trio-asyncio): the `RelationalStore` port.

Ownership: `run` opens an asyncpg pool (the caller has opened the trio-asyncio loop), migrates
the schema (pg_schema.py), serves, and on exit commits what was queued, then closes the pool.
Every call into asyncpg is one `aio_as_trio` crossing that does a whole unit of work (a batch,
a write, a read), so the ~140 µs of CPU a crossing costs here is paid once per unit, not per
statement.

Group commit, like the embedded writer: `submit_append` takes a slot (at most
`max_inflight_appends` in flight) and puts the op on a bounded channel; one writer task takes
every op waiting (at most `writer_batch`), and under load lingers `writer_linger_s` for the batch
to fill. A batch of plain ops (no target or thread, no cid twice) is staged on the writer's
cached heads (a crossing only to read the heads, instances or partitions it lacks) and written
by a single INSERT in one crossing, so that statement is the transaction (no BEGIN/COMMIT round
trips). When that INSERT finds a repeated (room, sender, cid), it wrote nothing, and the batch
runs again as any other batch does: in one transaction in one crossing, reading earlier cids
first (pg_append.py). Then `on_appended` gets the batch's outcomes once, so batches reach the
shard in commit order. Crossings are shielded: once a batch is sent to PostgreSQL the writer
learns its outcome, whatever is cancelled meanwhile (asyncpg's `command_timeout` bounds that
wait).

Pipelined: while one batch's INSERT runs, the writer stages the next (its seqs follow the
cached heads, which already count the first batch) and has it sent on a second connection as
soon as the first committed. So the origin's Python and the hops between the loops overlap
PostgreSQL's inserts instead of taking turns: with one batch at a time PostgreSQL sat idle a
third of each cycle (bench/RESULTS.md). The second INSERT waits for the first's commit, not
only its own: event ids (`nextval`) then follow commit order, which the meter relies on (it
reads `id > offset`; two INSERTs at once took ids at once, and a meter pass between their
commits skipped the second's lower ids for good). If the first batch failed or ran again for a
repeat, the second is not sent (its seqs would follow a gap, or be taken twice) and runs again
once the first is written, on heads read then.
A batch that repeats a key of the one in flight, or is not plain, waits for it to finish first
(its reads must see what it wrote).

Durability: every connection sets `synchronous_commit=on`, so a batch is acknowledged only
once PostgreSQL has it on disk (and on its synchronous standbys, where it has some).

Per-room heads are cached by the writer and dropped whole when a transaction fails, so no seq is
skipped or reused. A failure while committing leaves the outcome unknown: every op of the batch
is told `unavailable`, and a resend with the same cid answers with the original if it did
commit. Room → instance is cached too (a room never changes instance); an append to a room the
store does not hold is `not_found`.

Tenancy writes each run in their own transaction, straight from the caller (no queue: they
never compete for seqs), and are shielded like the batches. Search matches the `tsv` column
(GIN-indexed), which the writer keeps in step with edits and deletes in the same transaction,
so a search sees every committed message.

One writer per room is the design's (DESIGN §3.1). Should two stores append to the same room,
`event_keys`' unique keys make the later batch fail whole (`unavailable`, heads reloaded before
the next): never a duplicate or a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import attrs
import trio
from trio_asyncio import aio_as_trio

from node.channels import take_waiting
from node.config import Limits
from node.errors import INTERNAL, UNAVAILABLE, GB6Error, invalid, not_found
from node.events import Event
from node.log import log
from origin.pg_append import (
    EVENT_COLS,
    AppendBatch,
    Results,
    Staged,
    fetch_priors,
    insert_staged,
    is_repeat,
    single_write,
)
from origin.pg_errors import DB_ERRORS, translate
from origin.pg_schema import Partitions, check_schema_name, migrate
from origin.pg_search import tsquery_literal
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
from origin.sqlite_store import AppendCallback, AppendItem, now_ms

T = TypeVar("T")

_COMMAND_TIMEOUT_S: Final = 30.0  # one statement; bounds every shielded wait
# A search of a common word over a large instance reads every row that has it: given up after
# this, and one at a time per connection left to the rest (the writer holds two, and stages
# on a third: searches holding every other one stalled every send behind them).
_SEARCH_TIMEOUT_S: Final = 5.0
_WRITER_CONNS: Final = 3  # the appends' writer's pool: two INSERTs in flight, and its reads
_CONNECT_TIMEOUT_S: Final = 10.0
_CLOSE_TIMEOUT_S: Final = 10.0


async def open_pool(dsn: str, schema: str, name: str, size: int, *, min_size: int = 1) -> Any:
    """An asyncpg pool (through trio-asyncio) whose connections use `schema`, commit durably
    and plan every execution for its parameters and the tables as they are; connection
    failures become GB6Error, without JIT compilation.

    Why custom plans: asyncpg prepares each statement, and after five executions PostgreSQL
    may keep a generic plan. One made while the tables were small (a fresh schema) scans them,
    and is kept until the next ANALYZE: the Kafka sequencer's key lookup grew with the log
    and a cluster ran away (bench/RESULTS.md, 2026-11-26). Planning each time cost nothing
    measurable in `links --store postgres` (A/B pairs, same file)."""
    settings = {
        "search_path": schema,
        "application_name": name,
        # A commit is acknowledged once durable, whatever the server's default.
        "synchronous_commit": "on",
        "plan_cache_mode": "force_custom_plan",
        # Our statements are short OLTP ones planned per execution; JIT would compile one
        # whose estimate crosses `jit_above_cost` (a batch's key lookup over a large table)
        # for tens to hundreds of ms, which no short statement wins back.
        "jit": "off",
    }
    try:
        return await aio_as_trio(asyncpg.create_pool)(
            dsn,
            min_size=min_size,
            max_size=size,
            timeout=_CONNECT_TIMEOUT_S,
            command_timeout=_COMMAND_TIMEOUT_S,
            server_settings=settings,
            reset=keep_session,
        )
    except DB_ERRORS as exc:
        raise translate(exc, "connecting to PostgreSQL") from exc


async def keep_session(conn: Any) -> None:
    """A connection goes back to the pool as it is. asyncpg's default reset is one more round
    trip per use (as many as the batch's INSERT), and there is nothing to reset: our
    connections keep no session state (SET LOCAL and transaction advisory locks only), and
    asyncpg rolls back an open transaction itself."""


_BACKLOG_PART: Final = 4  # a backlog is a quarter of `writer_batch` waiting, or more


# Active users only. FOR SHARE: a user's deletion under way (which removes their memberships)
# commits first, and the user is then seen deleted, or waits for this insert and removes it.
_ADD_MEMBERS: Final = (
    "INSERT INTO members(room, user_id) SELECT $1, id FROM users"
    " WHERE id = ANY($2::text[]) AND status = 'active' FOR SHARE ON CONFLICT DO NOTHING"
)


@attrs.define(eq=False)
class _InFlight:
    """A staged batch whose INSERT the writer has sent."""

    keys: set[tuple[str, str, str]]
    conn: int  # which of the writer's connections
    depends: bool  # sent before `after` was written: commits only if that one did as staged
    after: _InFlight | None = None  # the batch before it, until that one is answered
    sent: trio.Event = attrs.Factory(trio.Event)  # its INSERT is on the wire (or over)
    written: trio.Event = attrs.Factory(trio.Event)  # its outcome is known, `ok` and `restage`
    done: trio.Event = attrs.Factory(trio.Event)  # answered too
    ok: bool = False
    restage: bool = False  # it ran again for a repeat: the batch staged behind it is wrong
    # Committed as staged (True) or not (False): what the next batch's transaction waits for
    # before it commits (asyncio side, made by whichever of the two asks first).
    status: asyncio.Future[bool] | None = None

    def status_future(self) -> asyncio.Future[bool]:
        if self.status is None:
            self.status = asyncio.get_running_loop().create_future()
        return self.status


class _Unwritten(enum.Enum):
    """Outcomes of an INSERT that wrote nothing and is run again."""

    REPEATS = "repeats"
    BEFORE = "before"


_REPEATS: Final = _Unwritten.REPEATS  # an INSERT that found a repeated key, and wrote nothing
_BEFORE: Final = _Unwritten.BEFORE  # rolled back: the batch before did not commit as staged


class _BeforeNotWritten(Exception):
    """The batch before did not commit as staged: roll this one back."""


def _refused(batch: list[AppendItem], exc: BaseException) -> Results:
    """Every op of `batch` refused with what `exc` means for it."""
    if isinstance(exc, GB6Error):
        failure = exc
    elif isinstance(exc, DB_ERRORS):
        failure = GB6Error(
            UNAVAILABLE,
            f"storage failed; the batch may not have been written (resend with the same"
            f" cid): {exc}",
        )
    else:
        log("writer_batch_failed", error=repr(exc))
        failure = GB6Error(INTERNAL, "internal error")
    return [(item, failure) for item in batch]


class PgStore:
    """The PostgreSQL relational store. A component: `await nursery.start(store.run)` inside
    `trio_asyncio.open_loop()`.

    `schema` isolates one store's tables (tests use a random one); `pool_size` bounds the
    connections of its reads and of its writes other than appends. The appends' writer has a
    pool of its own (`_WRITER_CONNS`: two for its INSERTs, one to read what it lacks and for
    the batches it runs again), so no read, however slow or many, holds up a send. Searches
    take at most half of the readers' connections, and one instance's one at a time: a user's
    slow searches over a large instance do not queue every other instance's behind them.
    """

    def __init__(
        self,
        dsn: str,
        limits: Limits,
        on_appended: AppendCallback,
        *,
        schema: str = "gb6",
        pool_size: int = 4,
    ) -> None:
        if not 2 <= pool_size <= 64:
            raise invalid(f"pool_size must be between 2 and 64, not {pool_size}")
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self.limits = limits
        self._on_appended = on_appended
        self._pool_size = pool_size
        self._searches = trio.Semaphore(pool_size // 2)
        self._instance_searches: dict[str, trio.Lock] = {}  # those with a search under way
        self._pool: Any = None
        self._writer_pool: Any = None
        self._insert_conns: list[Any] = [None, None]  # the writer's, for its INSERTs (asyncio side)
        self._partitions = Partitions(self.schema)
        self._heads: dict[str, int] = {}  # writer only
        self._in_flight: _InFlight | None = None  # writer only
        self._stale = False  # an INSERT failed: heads to be read again once none is in flight
        self._instances: dict[str, str] = {}  # room → instance
        self._slots = trio.Semaphore(limits.max_inflight_appends)
        self._send, self._recv = trio.open_memory_channel[AppendItem](limits.max_inflight_appends)
        self._closed = True  # until run serves
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()
        self.commits = 0  # transactions committed (batches and writes); for metrics and tests
        self.stopped: GB6Error | None = None  # never: a failed batch fails alone

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._pool = await open_pool(self.dsn, self.schema, "gb6-origin", self._pool_size)
        try:
            # None opened until the first append (the Kafka store's PgStore never appends).
            self._writer_pool = await open_pool(
                self.dsn, self.schema, "gb6-origin-writer", _WRITER_CONNS, min_size=0
            )
        except BaseException:
            self._pool.terminate()
            raise
        try:
            await self._call(self._migrate, "migration")
            self._closed = False
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._closed = True
            with trio.CancelScope(shield=True):
                await self._commit_queued()
                with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
                    for i in range(len(self._insert_conns)):
                        await aio_as_trio(self._give_back_insert_conn)(i)
                    await aio_as_trio(self._writer_pool.close)()
                    await aio_as_trio(self._pool.close)()
                if scope.cancelled_caught:
                    self._writer_pool.terminate()
                    self._pool.terminate()

    async def wait_idle(self) -> None:
        """Return once every submitted append and write has been committed and answered."""
        await self._idle.wait()

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn:
            await migrate(conn, self.schema)

    # --- the writer ----------------------------------------------------------------------

    async def _writer(self) -> None:
        last_batch = 0
        async with trio.open_nursery() as inserts:
            while True:
                first = await self._recv.receive()
                # Shielded from here: `first` is taken, and must be committed on shutdown.
                with trio.CancelScope(shield=True):
                    waiting = self._recv.statistics().current_buffer_used
                    before = self._in_flight
                    if (
                        before is not None
                        and not before.written.is_set()
                        and waiting + 1 < self.limits.writer_batch // _BACKLOG_PART
                    ):
                        # No backlog: the ops gather while the INSERT in flight commits. A
                        # second INSERT at once pays off under a backlog only. It costs a
                        # transaction's round trips (~1 ms), which a batch of a quarter of
                        # `writer_batch` (~20 ms of PostgreSQL's work here) dwarfs; at 2,000
                        # ops/s in the cluster it made smaller batches and a higher latency.
                        await before.written.wait()
                    elif (
                        last_batch > 1 and self.limits.writer_linger_s > 0 and waiting < last_batch
                    ):
                        # Under load, let the batch fill: fewer, larger transactions. A lone op
                        # never waits, nor does a backlog at least as large as the last batch
                        # (as in SqliteStore).
                        await trio.sleep(self.limits.writer_linger_s)
                    batch = [first, *take_waiting(self._recv, self.limits.writer_batch - 1)]
                    last_batch = len(batch)
                    await self._commit(batch, inserts)

    async def _commit_queued(self) -> None:
        """On exit: commit what was queued before the store closed (shielded by the caller)."""
        async with trio.open_nursery() as inserts:
            while batch := take_waiting(self._recv, self.limits.writer_batch):
                await self._commit(batch, inserts)

    async def _commit(self, batch: list[AppendItem], inserts: trio.Nursery) -> None:
        """Stage `batch` (while INSERTs run) and start its INSERT in `inserts`; or, for a batch
        that is not plain, run its transaction once the one before is done."""
        before = self._in_flight
        plain = single_write(batch)
        if before is not None and (
            not plain or not before.keys.isdisjoint((i.room, i.sender, i.cid) for i in batch)
        ):
            await before.done.wait()
            before = None
        if before is not None and before.after is not None:
            await before.after.written.wait()  # two INSERTs at a time: its connection is free
        if before is not None and self._stale:
            # A batch failed or ran again: the heads are wrong until read again, and every
            # batch staged on them would roll back behind it.
            await before.written.wait()
        if before is None and self._stale:
            self._forget()
        if not plain:
            self._answer(batch, await aio_as_trio(self._apply)(batch, self._heads))
            return
        staged = await self._stage(batch)
        if before is not None and before.written.is_set() and (before.restage or not before.ok):
            # Staged on heads that counted it as written: again, on heads read afresh.
            self._forget()
            staged = await self._stage(batch)
        if not isinstance(staged, Staged):  # refused whole: drop what it staged
            if before is not None:
                # Heads are read again only with no INSERT in flight: read now, they would
                # lack `before`'s, and the next batch would take its seqs again (and fail).
                await before.written.wait()
            self._forget()
            self._answer(batch, staged)
            return
        # Sent now and committed once `before` is (no checkpoint since the test above).
        depends = before is not None and not before.written.is_set()
        conn = 0 if before is None else 1 - before.conn
        in_flight = _InFlight(staged.keys, conn, depends, before)
        self._in_flight = in_flight
        inserts.start_soon(self._insert, batch, staged, in_flight)
        # Staging the next batch takes the event loop for milliseconds without a checkpoint:
        # this INSERT goes out first, or PostgreSQL would wait for that too.
        await in_flight.sent.wait()

    async def _insert(self, batch: list[AppendItem], staged: Staged, in_flight: _InFlight) -> None:
        with trio.CancelScope(shield=True):
            try:
                failure = await aio_as_trio(self._insert_staged)(batch, staged, in_flight)
            finally:
                in_flight.sent.set()
            results = staged.results if failure is None else failure
            if failure is _REPEATS or failure is _BEFORE:
                # Nothing was written. Run it again reading earlier cids, on heads of its own
                # (the next batch may be staging on the writer's), read once the batch before
                # is written: heads read while it runs would not count it.
                if in_flight.after is not None:  # cleared only below
                    await in_flight.after.written.wait()
                in_flight.restage = True
                results = await aio_as_trio(self._apply)(batch, {})
                failure = None
            if failure is not None or in_flight.restage:
                self._stale = True  # not cleared here: the next batch may be staging on them
            in_flight.ok = failure is None
            in_flight.written.set()
            if in_flight.after is not None:
                await in_flight.after.done.wait()  # answers in commit order
                in_flight.after = None
        if self._in_flight is in_flight:
            self._in_flight = None
        self._answer(batch, results)
        in_flight.done.set()

    def _answer(self, batch: list[AppendItem], results: Results) -> None:
        self.commits += 1
        try:
            self._on_appended(results)
        finally:
            self._release(len(batch))

    def _forget(self) -> None:
        """After a failure: heads and partitions are read again, so no seq is skipped or
        reused (the writer calls this only when no INSERT is in flight)."""
        self._heads.clear()
        self._partitions.forget()
        self._stale = False

    async def _stage(self, batch: list[AppendItem]) -> Staged | Results:
        """Stage a plain batch: here when the writer has cached all it needs, else in one
        crossing. Never raises: failures are outcomes."""
        ts = now_ms()
        rooms = {item.room for item in batch}
        instances = {r: self._instances[r] for r in rooms if r in self._instances}
        if (
            len(instances) < len(rooms)
            or not self._heads.keys() >= rooms
            or not self._partitions.known(set(instances.values()), ts)
        ):
            result: Staged | Results = await aio_as_trio(self._read_and_stage)(batch, ts)
            return result
        try:
            return AppendBatch(None, self._heads, instances, ts).stage_loaded(batch)
        except Exception as exc:
            return _refused(batch, exc)

    async def _read_and_stage(self, batch: list[AppendItem], ts: int) -> Staged | Results:
        """Read what the writer lacks and stage a plain batch (asyncio side). Never raises."""
        try:
            async with self._writer_pool.acquire() as conn:
                appender = await self._appender(conn, batch, ts, self._heads)
                return await appender.stage(batch)
        except Exception as exc:
            return _refused(batch, exc)

    async def _insert_staged(
        self, batch: list[AppendItem], staged: Staged, in_flight: _InFlight
    ) -> Results | _Unwritten | None:
        """Write a staged batch (asyncio side): None once committed, `_REPEATS` when a key of
        it was written before, `_BEFORE` when the batch before it (still running when this one
        was sent) did not commit as staged (nothing is written in either case), else its
        refusals. Sets its `status` for the batch after it, whatever happens.

        The INSERTs go over two connections the writer keeps: taking one from the pool and
        giving it back cost ~300 µs of CPU per batch on this project's machines."""
        status = in_flight.status_future()
        # Taken now: `after` is cleared once the batch before is answered, and that waits for
        # this batch's outcome when it depends on it.
        waits = in_flight.after.status_future() if in_flight.depends and in_flight.after else None
        try:
            i = in_flight.conn
            if self._insert_conns[i] is None:
                self._insert_conns[i] = await self._writer_pool.acquire()
            conn = self._insert_conns[i]
            if waits is not None and not await waits:
                raise _BeforeNotWritten
            # Runs once this coroutine first waits: asyncpg has sent its statement by then.
            asyncio.get_running_loop().call_soon(in_flight.sent.set)
            await insert_staged(conn, staged)  # the statement is the transaction
            status.set_result(True)
            return None
        except _BeforeNotWritten:
            return _BEFORE
        except Exception as exc:
            if is_repeat(exc):
                return _REPEATS
            # The pool knows how to bring a connection back from a failure (a timeout's
            # cancellation, a broken socket): the next batch takes a fresh one.
            await self._give_back_insert_conn(in_flight.conn)
            return _refused(batch, exc)
        finally:
            if not status.done():
                status.set_result(False)

    async def _give_back_insert_conn(self, i: int) -> None:
        """To the pool, which replaces a broken one (asyncio side)."""
        conn, self._insert_conns[i] = self._insert_conns[i], None
        if conn is not None:
            with contextlib.suppress(Exception):  # it failed to reset: the pool dropped it
                await self._writer_pool.release(conn)

    async def _apply(self, batch: list[AppendItem], heads: dict[str, int]) -> Results:
        """One batch in one transaction, reading earlier cids (asyncio side). Never raises."""
        try:
            async with self._writer_pool.acquire() as conn:
                appender = await self._appender(conn, batch, now_ms(), heads)
                async with conn.transaction():
                    return await appender.apply(batch)
        except Exception as exc:
            self._stale = True
            return _refused(batch, exc)

    async def _appender(
        self, conn: Any, batch: list[AppendItem], ts: int, heads: dict[str, int]
    ) -> AppendBatch:
        rooms = {item.room for item in batch}
        await self._learn_instances(conn, rooms)
        instances = {r: self._instances[r] for r in rooms if r in self._instances}
        await self._partitions.ensure(conn, set(instances.values()), ts)
        return AppendBatch(conn, heads, instances, ts)

    async def _learn_instances(self, conn: Any, rooms: Iterable[str]) -> None:
        missing = [r for r in rooms if r not in self._instances]
        if missing:
            rows = await conn.fetch("SELECT id, instance FROM rooms WHERE id = ANY($1)", missing)
            self._instances.update((r[0], r[1]) for r in rows)

    def _release(self, n: int) -> None:
        self._inflight -= n
        for _ in range(n):
            self._slots.release()
        if self._inflight == 0:
            self._idle.set()

    async def _acquire(self) -> None:
        if self._closed:
            raise GB6Error(UNAVAILABLE, "the store is not serving")
        try:
            self._slots.acquire_nowait()  # no schedule point when a slot is free
        except trio.WouldBlock:
            await self._slots.acquire()
        if self._closed:
            self._slots.release()
            raise GB6Error(UNAVAILABLE, "the store is not serving")
        if self._inflight == 0:
            self._idle = trio.Event()
        self._inflight += 1

    # --- writes --------------------------------------------------------------------------

    async def submit_append(self, item: AppendItem) -> None:
        """Queue an append; waits only for a free slot (backpressure). The result reaches
        `on_appended` once durable. Raises `unavailable` once the store has stopped."""
        await self._acquire()
        # A slot is held, and the channel has room for every slot: this never blocks.
        self._send.send_nowait(item)

    async def _write(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run `fn(conn)` in a transaction of its own; return its value once durable.

        Cancelling the caller does not cancel the write once it has started."""
        await self._acquire()
        try:
            with trio.CancelScope(shield=True):
                value: T = await self._call(self._in_transaction, "storage write", fn)
            self.commits += 1
            return value
        finally:
            self._release(1)

    async def _in_transaction(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async with self._pool.acquire() as conn, conn.transaction():
            return await fn(conn)

    async def _call(self, fn: Callable[..., Awaitable[T]], doing: str, *args: Any) -> T:
        """One crossing into asyncio; driver errors come back as GB6Error."""
        try:
            value: T = await aio_as_trio(fn)(*args)
            return value
        except DB_ERRORS as exc:
            raise translate(exc, doing) from exc

    async def create_org(self, org: Org) -> None:
        async def tx(c: Any) -> None:
            if org.parent is not None and not await c.fetchval(
                "SELECT 1 FROM orgs WHERE id = $1", org.parent
            ):
                raise not_found(f"organization {org.parent} not found")
            await c.execute(
                "INSERT INTO orgs(id, name, parent, created_at) VALUES ($1, $2, $3, $4)",
                org.id,
                org.name,
                org.parent,
                org.created_at,
            )

        await self._write(tx)

    async def create_instance(self, inst: Instance) -> None:
        async def tx(c: Any) -> None:
            await c.execute(
                "INSERT INTO instances(id, org, name, region, plan, status, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                *attrs.astuple(inst),
            )

        await self._write(tx)

    async def create_user(self, user: User) -> None:
        async def tx(c: Any) -> None:
            await c.execute(
                "INSERT INTO users(id, instance, name, role, created_at, status)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                *attrs.astuple(user),
            )

        await self._write(tx)

    async def create_token(self, token: Token, digest: str) -> None:
        async def tx(c: Any) -> None:
            await c.execute(
                "INSERT INTO tokens(id, digest, user_id, expires_at, revoked, created_at)"
                " VALUES ($1, $2, $3, $4, false, $5)",
                token.id,
                digest,
                token.user,
                token.expires_at,
                now_ms(),
            )

        await self._write(tx)

    async def revoke_token(self, user: str, token_id: str) -> bool:
        async def tx(c: Any) -> bool:
            status: str = await c.execute(
                "UPDATE tokens SET revoked = true WHERE id = $1 AND user_id = $2", token_id, user
            )
            return status != "UPDATE 0"

        return await self._write(tx)

    async def create_room(self, room: RoomRecord, members: Iterable[str]) -> None:
        users = list(members)

        async def tx(c: Any) -> None:
            await c.execute(
                "INSERT INTO rooms(id, instance, name, kind, open, creator, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                *attrs.astuple(room),
            )
            await c.execute(_ADD_MEMBERS, room.id, users)

        await self._write(tx)
        self._instances[room.id] = room.instance

    async def add_members(self, room: str, users: Iterable[str]) -> None:
        rows = list(users)

        async def tx(c: Any) -> None:
            await c.execute(_ADD_MEMBERS, room, rows)

        await self._write(tx)

    async def remove_members(self, room: str, users: Iterable[str]) -> None:
        rows = list(users)

        async def tx(c: Any) -> None:
            await c.execute(
                "DELETE FROM members WHERE room = $1 AND user_id = ANY($2::text[])", room, rows
            )

        await self._write(tx)

    async def set_read(self, room: str, user: str, seq: int) -> None:
        async def tx(c: Any) -> None:
            await c.execute(
                "UPDATE members SET read = GREATEST(read, $1) WHERE room = $2 AND user_id = $3",
                seq,
                room,
                user,
            )

        await self._write(tx)

    async def create_file(self, rec: FileRecord) -> None:
        async def tx(c: Any) -> None:
            await c.execute(
                "INSERT INTO files(id, room, uploader, size, type, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                *attrs.astuple(rec),
            )

        await self._write(tx)

    async def set_meta(self, key: str, value: str) -> None:
        async def tx(c: Any) -> None:
            await c.execute(
                "INSERT INTO meta(key, value) VALUES ($1, $2)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                key,
                value,
            )

        await self._write(tx)

    # --- reads ---------------------------------------------------------------------------

    async def _read(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async def on_conn() -> T:
            async with self._pool.acquire() as conn:
                return await fn(conn)

        return await self._call(on_conn, "storage read")

    async def _instance_of(self, room: str) -> str | None:
        if room not in self._instances:
            await self._read(lambda c: self._learn_instances(c, [room]))
        return self._instances.get(room)

    async def events_after(self, room: str, after: int, limit: int) -> list[Event]:
        instance = await self._instance_of(room)
        if instance is None or limit <= 0:
            return []

        async def q(c: Any) -> list[Event]:
            rows = await c.fetch(
                f"SELECT {EVENT_COLS} FROM events WHERE instance = $1 AND room = $2 AND seq > $3"
                " ORDER BY seq LIMIT $4",
                instance,
                room,
                after,
                limit,
            )
            return [event_from_row(r) for r in rows]

        return await self._read(q)

    async def history(self, room: str, before: int | None, limit: int) -> list[Event]:
        instance = await self._instance_of(room)
        if instance is None or limit <= 0:
            return []

        async def q(c: Any) -> list[Event]:
            rows = await c.fetch(
                f"SELECT {EVENT_COLS} FROM events WHERE instance = $1 AND room = $2 AND seq < $3"
                " ORDER BY seq DESC LIMIT $4",
                instance,
                room,
                before if before is not None else 2**62,
                limit,
            )
            return [event_from_row(r) for r in reversed(rows)]

        return await self._read(q)

    async def search(self, rooms: Sequence[str], query: str, limit: int) -> list[Event]:
        tsquery = tsquery_literal(query)
        if tsquery is None or not rooms or limit <= 0:
            return []
        room_list = list(dict.fromkeys(rooms))

        # Newest first: by ts (a batch's commit time), then id (the order of writes). ts first
        # for the Kafka store: with several partitions its persister writes, and so numbers,
        # events in log order only per partition; its sequencer gives each batch a later ts.
        async def q(c: Any) -> list[Event]:
            await self._learn_instances(c, room_list)
            instances = sorted({self._instances[r] for r in room_list if r in self._instances})
            rows = await c.fetch(
                f"SELECT {EVENT_COLS}, current_body, edited FROM events"
                " WHERE instance = ANY($1::text[]) AND room = ANY($2::text[])"
                " AND tsv @@ $3::tsquery AND NOT deleted ORDER BY ts DESC, id DESC LIMIT $4",
                instances,
                room_list,
                tsquery,
                limit,
                timeout=_SEARCH_TIMEOUT_S,
            )
            return [hit_from_row(r) for r in rows]

        # Keyed by the instance (its rooms' are one user's): its searches wait their turn
        # on its lock, and only its first competes with other instances' for a connection.
        key = self._instances.get(room_list[0], room_list[0])
        lock = self._instance_searches.setdefault(key, trio.Lock())
        try:
            async with lock, self._searches:
                return await self._read(q)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._instance_searches.pop(key, None)

    async def token(self, digest: str) -> Token | None:
        async def q(c: Any) -> Token | None:
            row = await c.fetchrow(
                "SELECT id, user_id, expires_at, revoked FROM tokens WHERE digest = $1", digest
            )
            return Token(row[0], row[1], row[2], bool(row[3])) if row else None

        return await self._read(q)

    async def load_tenancy(self) -> tuple[list[Org], list[Instance], list[User]]:
        async def q(c: Any) -> tuple[list[Org], list[Instance], list[User]]:
            orgs = [
                Org(*r)
                for r in await c.fetch(
                    "SELECT id, name, parent, created_at FROM orgs WHERE NOT deleted"
                )
            ]
            insts = [
                Instance(*r)
                for r in await c.fetch(
                    "SELECT id, org, name, region, plan, status, created_at FROM instances"
                )
            ]
            users = [
                User(*r)
                for r in await c.fetch(
                    "SELECT id, instance, name, role, created_at, status FROM users"
                    " WHERE status <> 'deleted'"
                )
            ]
            return orgs, insts, users

        return await self._read(q)

    async def load_rooms(self) -> list[tuple[RoomRecord, int, dict[str, int]]]:
        """Every room with its head seq and members (user → read seq)."""

        async def q(c: Any) -> list[tuple[RoomRecord, int, dict[str, int]]]:
            rows = await c.fetch(
                "SELECT id, instance, name, kind, open, creator, created_at,"
                " COALESCE((SELECT max(seq) FROM event_keys k WHERE k.room = r.id), 0)"
                " FROM rooms r"
            )
            rooms = {r[0]: (RoomRecord(*r[:7]), int(r[7])) for r in rows}
            members: dict[str, dict[str, int]] = {rid: {} for rid in rooms}
            for room, user, read in await c.fetch("SELECT room, user_id, read FROM members"):
                if room in members:
                    members[room][user] = read
            self._instances.update((rid, rec.instance) for rid, (rec, _) in rooms.items())
            return [(rec, head, members[rid]) for rid, (rec, head) in rooms.items()]

        return await self._read(q)

    async def file(self, file_id: str) -> FileRecord | None:
        async def q(c: Any) -> FileRecord | None:
            row = await c.fetchrow(
                "SELECT id, room, uploader, size, type, created_at FROM files WHERE id = $1",
                file_id,
            )
            return FileRecord(*row) if row else None

        return await self._read(q)

    async def meta(self, key: str) -> str | None:
        async def q(c: Any) -> str | None:
            value: str | None = await c.fetchval("SELECT value FROM meta WHERE key = $1", key)
            return value

        return await self._read(q)

    # --- quota counts at start -----------------------------------------------------------

    async def messages_since(self, since_ms: int) -> dict[str, int]:
        async def q(c: Any) -> dict[str, int]:
            # `ts` prunes to the current month's partition of each instance.
            rows = await c.fetch(
                "SELECT instance, count(*) FROM events WHERE type = 'message' AND ts >= $1"
                " GROUP BY instance",
                since_ms,
            )
            return {r[0]: int(r[1]) for r in rows}

        return await self._read(q)

    async def stored_bytes(self) -> dict[str, int]:
        async def q(c: Any) -> dict[str, int]:
            rows = await c.fetch(
                "SELECT r.instance, sum(f.size) FROM files f JOIN rooms r ON r.id = f.room"
                " GROUP BY r.instance"
            )
            return {r[0]: int(r[1]) for r in rows}

        return await self._read(q)

    async def event_by_cid(self, room: str, sender: str, cid: str) -> Event | None:
        async def q(c: Any) -> Event | None:
            return (await fetch_priors(c, [(room, sender, cid)])).get((room, sender, cid))

        return await self._read(q)

    # --- the org tree, lifecycles, org members and API keys ------------------------------

    async def _update(self, sql: str, args: tuple[Any, ...], what: str) -> None:
        """One UPDATE that must hit a row: `not_found` naming `what` otherwise."""

        async def tx(c: Any) -> None:
            if await c.execute(sql, *args) == "UPDATE 0":
                raise not_found(f"{what} not found")

        await self._write(tx)

    async def update_org(self, org: Org) -> None:
        await self._update(
            "UPDATE orgs SET name = $1 WHERE id = $2 AND NOT deleted",
            (org.name, org.id),
            f"organization {org.id}",
        )

    async def delete_org(self, org_id: str) -> None:
        async def tx(c: Any) -> None:
            status = await c.execute(
                "UPDATE orgs SET deleted = true WHERE id = $1 AND NOT deleted", org_id
            )
            if status == "UPDATE 0":
                raise not_found(f"organization {org_id} not found")
            await c.execute(
                "DELETE FROM member_tokens WHERE member IN"
                " (SELECT id FROM org_members WHERE org = $1)",
                org_id,
            )
            await c.execute("DELETE FROM org_members WHERE org = $1", org_id)
            await c.execute("DELETE FROM api_keys WHERE org = $1", org_id)

        await self._write(tx)

    async def update_instance(self, inst: Instance) -> None:
        await self._update(
            "UPDATE instances SET name = $1, plan = $2, status = $3 WHERE id = $4",
            (inst.name, inst.plan, inst.status, inst.id),
            f"instance {inst.id}",
        )

    async def update_user(self, user: User) -> None:
        await self._update(
            "UPDATE users SET name = $1, role = $2 WHERE id = $3 AND status <> 'deleted'",
            (user.name, user.role, user.id),
            f"user {user.id}",
        )

    async def delete_user(self, user_id: str) -> None:
        async def tx(c: Any) -> None:
            status = await c.execute(
                "UPDATE users SET status = 'deleted' WHERE id = $1 AND status <> 'deleted'",
                user_id,
            )
            if status == "UPDATE 0":
                raise not_found(f"user {user_id} not found")
            await c.execute("UPDATE tokens SET revoked = true WHERE user_id = $1", user_id)
            await c.execute("DELETE FROM members WHERE user_id = $1", user_id)

        await self._write(tx)

    async def create_org_member(self, member: OrgMember) -> None:
        async def tx(c: Any) -> None:
            await c.execute(
                "INSERT INTO org_members(id, org, name, role, created_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                *attrs.astuple(member),
            )

        await self._write(tx)

    async def update_org_member(self, member: OrgMember) -> None:
        await self._update(
            "UPDATE org_members SET name = $1, role = $2 WHERE id = $3",
            (member.name, member.role, member.id),
            f"member {member.id}",
        )

    async def delete_org_member(self, member_id: str) -> None:
        async def tx(c: Any) -> None:
            await c.execute("DELETE FROM member_tokens WHERE member = $1", member_id)
            if await c.execute("DELETE FROM org_members WHERE id = $1", member_id) == "DELETE 0":
                raise not_found(f"member {member_id} not found")

        await self._write(tx)

    async def create_member_token(self, token: Token, digest: str) -> None:
        async def tx(c: Any) -> None:
            await c.execute(
                "INSERT INTO member_tokens(id, digest, member, expires_at, revoked, created_at)"
                " VALUES ($1, $2, $3, $4, false, $5)",
                token.id,
                digest,
                token.user,
                token.expires_at,
                now_ms(),
            )

        await self._write(tx)

    async def revoke_member_token(self, member: str, token_id: str) -> bool:
        async def tx(c: Any) -> bool:
            status: str = await c.execute(
                "UPDATE member_tokens SET revoked = true WHERE id = $1 AND member = $2",
                token_id,
                member,
            )
            return status != "UPDATE 0"

        return await self._write(tx)

    async def member_token(self, digest: str) -> Token | None:
        async def q(c: Any) -> Token | None:
            row = await c.fetchrow(
                "SELECT id, member, expires_at, revoked FROM member_tokens WHERE digest = $1",
                digest,
            )
            return Token(row[0], row[1], row[2], bool(row[3])) if row else None

        return await self._read(q)

    async def create_api_key(self, key: ApiKey, digest: str) -> None:
        async def tx(c: Any) -> None:
            await c.execute(
                "INSERT INTO api_keys(id, digest, org, instance, name, permissions, created_by,"
                " expires_at, revoked, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                key.id,
                digest,
                key.org,
                key.instance,
                key.name,
                " ".join(key.permissions),
                key.created_by,
                key.expires_at,
                key.revoked,
                key.created_at,
            )

        await self._write(tx)

    async def revoke_api_key(self, key_id: str) -> bool:
        async def tx(c: Any) -> bool:
            status: str = await c.execute(
                "UPDATE api_keys SET revoked = true WHERE id = $1", key_id
            )
            return status != "UPDATE 0"

        return await self._write(tx)

    async def api_key(self, digest: str) -> ApiKey | None:
        async def q(c: Any) -> ApiKey | None:
            row = await c.fetchrow(f"SELECT {API_KEY_COLS} FROM api_keys WHERE digest = $1", digest)
            return api_key_from_row(row) if row else None

        return await self._read(q)

    async def load_access(self) -> tuple[list[OrgMember], list[ApiKey]]:
        async def q(c: Any) -> tuple[list[OrgMember], list[ApiKey]]:
            members = [
                OrgMember(*r)
                for r in await c.fetch("SELECT id, org, name, role, created_at FROM org_members")
            ]
            keys = [
                api_key_from_row(r) for r in await c.fetch(f"SELECT {API_KEY_COLS} FROM api_keys")
            ]
            return members, keys

        return await self._read(q)


if TYPE_CHECKING:  # PgStore fits the port (checked by mypy)
    from origin.store_port import RelationalStore

    def _fits(store: PgStore) -> RelationalStore:
        return store
