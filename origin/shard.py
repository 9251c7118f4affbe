"""One origin shard: the only writer of its rooms.

It authorizes every change against the tenancy and membership it keeps in memory (loaded from
the store at start, changed only through it), hands seq-taking ops to the store's group-commit
writer, and once a batch is durable answers each requester and publishes the new events to its
listeners (the edges) in seq order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

from node.config import Config
from node.errors import (
    INTERNAL,
    INVALID,
    QUOTA_EXCEEDED,
    UNAUTHORIZED,
    UNAVAILABLE,
    UNKNOWN_TOKEN,
    GB6Error,
    invalid,
    not_found,
)
from node.events import Event
from node.ids import new_id, new_secret, secret_digest
from node.log import log
from origin.audit_log import AuditLog, open_audit
from origin.blobs import LocalBlobStore
from origin.invoicing import open_billing
from origin.membership import Membership, MembershipChange, Principal, RoomState
from origin.plans import KINDS
from origin.quotas import Quotas, day_start_ms
from origin.rbac import OPERATOR, ROOM_CREATE, authorize
from origin.records import (
    INSTANCE_ROLES,
    FileRecord,
    Instance,
    Org,
    RoomRecord,
    Token,
    User,
)
from origin.sqlite_store import Appended, AppendItem, AppendResult, SqliteStore, now_ms
from origin.store_port import RelationalStore
from origin.tenancy import Tenancy
from replication.shard_map import check_region

AppendReply = Callable[[AppendResult], None]
_QUOTA_OVERRIDES = "quota_overrides"  # meta key: {instance: {resource: limit}} as JSON
EventListener = Callable[[str, list[Event]], None]


@attrs.define
class AppendCounts:
    """What the shard's appends came to, since it started (counters of `/metrics`)."""

    appended: int = 0  # new events, committed
    repeats: int = 0  # resends answered with their original event
    refused: int = 0  # ops the store answered with an error (its checks, or a failure)


_REPEAT_LOOKUPS = 16  # sends over the daily quota looked up at once (see `_look_for_repeat`)


class OriginShard:
    """A component: `await nursery.start(shard.run)`; serves once its state is loaded."""

    pushes_lag = False  # in one process the hubs see every event as it is published
    reachable = True  # the gateway's origin, in the same process
    pushes_need_watch = False  # and need no `watch` for it

    def __init__(self, config: Config) -> None:
        self.draining = False  # `drain` began: /readyz says so
        self.config = config
        self.limits = config.limits
        self.store: RelationalStore
        if config.store_backend == "postgres":
            from origin.pg_store import PgStore  # asyncpg only where it is used

            self.store = PgStore(
                config.pg_dsn, config.limits, self._on_appended, schema=config.pg_schema
            )
        elif config.store_backend == "kafka":
            from origin.kafka_store import KafkaStore, default_topic  # confluent-kafka only here

            self.store = KafkaStore(
                config.pg_dsn,
                config.kafka_bootstrap,
                config.kafka_topic or default_topic(config.shard),
                config.shard,
                config.limits,
                self._on_appended,
                schema=config.pg_schema,
                partitions=config.kafka_partitions,
                commit_timeout_s=config.kafka_commit_timeout_s,
            )
            self.store.on_recovered = self._on_recovered
        else:
            self.store = SqliteStore(config.data_dir / "gb6.db", config.limits, self._on_appended)
        self.blobs = LocalBlobStore(config.data_dir / "blobs")
        self.orgs: dict[str, Org] = {}
        self.state = Membership()
        # The same dicts, by their old names: the shard's own code and its callers read them.
        self.instances = self.state.instances
        self.users = self.state.users
        self.rooms = self.state.rooms
        self.user_rooms = self.state.user_rooms
        self.tenancy_listeners: list[Callable[[Instance | User], None]] = []
        # Orgs, members, lifecycles, API keys, authorization (origin/tenancy.py).
        self.tenancy = Tenancy(self)
        # Cluster: place (instance, region) in the shard map, which checks the region too.
        self.placement: Callable[[str, str], Awaitable[None]] | None = None
        self._room_locks: dict[str, trio.Lock] = {}  # only while someone holds or waits
        # Quota overrides are stored as ONE meta value for every instance: each change reads
        # it, changes one entry and rewrites it whole, so changes go one at a time (any two
        # interleaved across the store's await would store only the later one).
        self._overrides_lock = trio.Lock()
        self.watch_listeners: list[Callable[[str, int], object]] = []  # edges in other processes
        self.event_listeners: list[EventListener] = []
        self.counts = AppendCounts()  # for /metrics
        self.member_listeners: list[Callable[[MembershipChange], None]] = []
        self.read_listeners: list[Callable[[str, str, int], None]] = []
        # Entered around each committed batch's replies and publications (all synchronous),
        # so an edge can coalesce its writes per connection.
        self.publish_context: Callable[[], AbstractContextManager[object]] = nullcontext
        # Usage metering and invoices (origin/invoicing.py): a consumer of this shard's log.
        self.billing = open_billing(
            config, self.instances.get, usage_from=lambda: getattr(self.store, "usage_from", None)
        )
        # Quotas of every instance here (origin/quotas.py): checked where resources are made.
        self.quotas = Quotas(config.plans, self._plan_of, now_ms)
        self.tenancy_listeners.append(self._quota_limits_changed)
        # The audit log (origin/audit_log.py): security events from here, admin actions from
        # the admin API; quota events and instance status changes through listeners.
        self.audit: AuditLog = open_audit(config)
        self._repeat_lookups = 0  # running (see `_look_for_repeat`)
        self._repeats_done = trio.Event()
        self._repeats_done.set()
        # Sends taken and not answered yet, (room, sender, cid) → how many: a resend over the
        # quota while its original is under way waits for the original's answer, which the
        # store could not give it yet (DESIGN §3.3).
        self._sending: dict[tuple[str, str, str], int] = {}
        self._sends_answered = trio.Event()  # set and replaced while someone waits on one
        self._send_waiters = 0
        self._tasks: trio.Nursery  # `run`'s, once it runs
        self.audit.org_of = lambda i: x.org if (x := self.instances.get(i)) else None
        self.quotas.listeners.append(self.audit.quota_event)
        self.tenancy_listeners.append(self._audit_tenancy)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._tasks = nursery
            await nursery.start(self.store.run)
            await nursery.start(self.audit.run)
            await nursery.start(self.billing.run)  # after the store: it reads the store's log
            orgs, insts, users = await self.store.load_tenancy()
            self.orgs = {o.id: o for o in orgs}
            self.instances.update((i.id, i) for i in insts)
            self.users.update((u.id, u) for u in users)
            for inst in insts:
                self.audit.instance_seen(inst.id, inst.status)
            self.tenancy.load(*await self.store.load_access())
            for rec, head, members in await self.store.load_rooms():
                self.state.add_room(RoomState(rec, head, members))
            await self._load_quotas()
            task_status.started()

    async def drain(self) -> None:
        """Wait until every accepted write is durable and answered (/readyz says "draining"
        from now on)."""
        self.draining = True
        await self._repeats_done.wait()
        await self.store.wait_idle()
        await self.audit.wait_idle()

    # --- tenancy (admin) -----------------------------------------------------------------

    async def create_org(self, name: str, parent: str | None) -> Org:
        """As the operator; `tenancy.create_org` for anyone else."""
        return await self.tenancy.create_org(OPERATOR, name, parent)

    async def create_instance(
        self, org: str, name: str, region: str | None, plan: str | None
    ) -> Instance:
        if org not in self.orgs:
            raise not_found(f"organization {org} not found")
        plan = plan or "free"
        if plan not in self.config.plans:  # PLANS and the config's [plans.*] (origin/plans.py)
            raise invalid(f"unknown plan {plan!r}; plans: {', '.join(self.config.plans)}")
        region = region or self.config.region
        check_region(region, self.config.region_shards(region), self.config.shard)
        inst = Instance(new_id("ins"), org, name, region, plan, "active", now_ms())
        if self.placement is not None:
            await self.placement(inst.id, region)  # in the map first: never an unplaced one
        await self.store.create_instance(inst)
        self.instances[inst.id] = inst
        self._tenancy_changed(inst)
        return inst

    async def create_user(self, instance: str, name: str, role: str) -> User:
        if instance not in self.instances:
            raise not_found(f"instance {instance} not found")
        if role not in INSTANCE_ROLES:
            raise invalid(f"role must be one of {', '.join(INSTANCE_ROLES)}")
        user = User(new_id("usr"), instance, name, role, now_ms())
        # Held until the row is durable: concurrent creators cannot both take the last slot.
        with (
            self.quotas.reserve(instance, "bots" if role == "bot" else "users"),
            trio.CancelScope(shield=True),  # once queued it commits: memory and count follow
        ):
            await self.store.create_user(user)
        self.users[user.id] = user
        self._tenancy_changed(user)
        return user

    def _tenancy_changed(self, record: Instance | User) -> None:
        for listener in self.tenancy_listeners:
            listener(record)

    def user_of_instance(self, instance: str, user_id: str) -> User:
        user = self.users.get(user_id)
        if instance not in self.instances or user is None or user.instance != instance:
            raise not_found(f"user {user_id} not found in instance {instance}")
        return user

    async def issue_token(
        self, instance: str, user_id: str, ttl_s: int | None, *, actor: str = "admin"
    ) -> tuple[str, Token]:
        self.user_of_instance(instance, user_id)
        ttl = self.limits.token_ttl_s if ttl_s is None else ttl_s
        if not 1 <= ttl <= self.limits.token_ttl_max_s:
            raise invalid(f"ttl_seconds must be between 1 and {self.limits.token_ttl_max_s}")
        # The instance in clear, so an edge can route the token to its shard (see
        # replication/edge_link.py); the secret part is what authenticates.
        secret = f"gb6u_{instance}.{new_secret()}"
        token = Token(new_id("tok"), user_id, now_ms() + ttl * 1000, False)
        await self.store.create_token(token, secret_digest(secret))
        await self.audit.record(  # answered only once audited
            actor=actor,
            action="token.issue",
            instance=instance,
            target=token.id,
            details={"user": user_id, "expires_at": token.expires_at},
        )
        return secret, token

    async def revoke_token(
        self, instance: str, user_id: str, token_id: str, *, actor: str = "admin"
    ) -> None:
        self.user_of_instance(instance, user_id)
        if not await self.store.revoke_token(user_id, token_id):
            raise not_found(f"token {token_id} not found")
        await self.audit.record(
            actor=actor,
            action="token.revoke",
            instance=instance,
            target=token_id,
            details={"user": user_id},
        )

    async def authenticate(self, secret: str) -> Principal:
        """The principal a user token stands for; `unauthorized` otherwise (a security event
        for the audit log, aggregated there so a flood of bad tokens stays a few records)."""
        try:
            return await self._check_token(secret)
        except GB6Error as exc:
            if exc.code == UNAUTHORIZED:
                named = secret[5:].partition(".")[0] if secret.startswith("gb6u_") else ""
                self.audit.hello_refused(exc.message, named if named in self.instances else None)
            raise

    def _audit_tenancy(self, record: Instance | User) -> None:
        if isinstance(record, Instance):  # lifecycle changes: suspended, resumed, deleted
            self.audit.instance_seen(record.id, record.status)

    async def _check_token(self, secret: str) -> Principal:
        token = await self.store.token(secret_digest(secret))
        if token is None:
            raise GB6Error(UNAUTHORIZED, UNKNOWN_TOKEN)
        if token.revoked:
            raise GB6Error(UNAUTHORIZED, "token revoked")
        if token.expires_at <= now_ms():
            raise GB6Error(UNAUTHORIZED, "token expired")
        who = self.state.principal(token.user)
        if who is None:
            raise GB6Error(UNAUTHORIZED, UNKNOWN_TOKEN)
        if who.instance.status != "active":
            raise GB6Error(UNAUTHORIZED, f"instance is {who.instance.status}")
        return who

    # --- rooms and membership ------------------------------------------------------------

    def room_visible(self, who: Principal, room_id: str) -> RoomState:
        return self.state.room_visible(who, room_id)

    def room_for_member(self, who: Principal, room_id: str) -> RoomState:
        return self.state.room_for_member(who, room_id)

    def rooms_of(self, who: Principal) -> list[dict[str, Any]]:
        return self.state.rooms_of(who)

    async def watch(self, room_id: str) -> None:
        """Nothing to do in one process: the gateway's hubs see every publication."""

    def unwatch(self, room_id: str) -> None:
        """Nothing to do in one process."""

    async def create_room(
        self, who: Principal, name: str, kind: str, members: Iterable[str], open_: bool
    ) -> RoomState:
        authorize(who.actor, ROOM_CREATE, instance=who.instance.id)  # not for guests
        users = [who.id, *(u for u in self.state.same_instance_users(who, members) if u != who.id)]
        if len(users) > self.limits.members_per_room:
            raise GB6Error(
                QUOTA_EXCEEDED, f"a room has at most {self.limits.members_per_room} members"
            )
        rec = RoomRecord(new_id("room"), who.instance.id, name, kind, open_, who.id, now_ms())
        with (
            self.quotas.reserve(who.instance.id, "rooms"),
            trio.CancelScope(shield=True),  # once queued it commits: memory must follow
        ):
            await self.store.create_room(rec, users)
        users = self.state.active(users)  # as the store added them
        state = RoomState(rec, 0, dict.fromkeys(users, 0))
        self.state.add_room(state)
        self._members_changed(MembershipChange(rec.id, tuple(users), (), created=True))
        return state

    async def join(self, who: Principal, room_id: str) -> RoomState:
        async with self._room_lock(room_id):
            room = self.room_visible(who, room_id)
            if who.id not in room.members:
                if not room.record.open:
                    raise not_found(f"room {room_id} not found")
                self._check_room_size(room, 1)
                await self._add(room, [who.id])
            return room

    async def leave(self, who: Principal, room_id: str) -> RoomState:
        room = self.room_for_member(who, room_id)
        await self._remove(room, [who.id])
        return room

    async def add_members(self, who: Principal, room_id: str, users: Iterable[str]) -> RoomState:
        async with self._room_lock(room_id):
            room = self.state.manageable(who, room_id)
            new = [u for u in self.state.same_instance_users(who, users) if u not in room.members]
            self._check_room_size(room, len(new))
            if new:
                await self._add(room, new)
            return room

    def _check_room_size(self, room: RoomState, adding: int) -> None:
        if len(room.members) + adding > self.limits.members_per_room:
            raise GB6Error(
                QUOTA_EXCEEDED, f"a room has at most {self.limits.members_per_room} members"
            )

    @asynccontextmanager
    async def _room_lock(self, room_id: str) -> AsyncIterator[None]:
        """Membership checks and the write they allow, one at a time per room: two
        concurrent adds must not both fit under the room's size limit."""
        lock = self._room_locks.get(room_id)
        if lock is None:
            lock = self._room_locks[room_id] = trio.Lock()
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._room_locks.pop(room_id, None)

    async def remove_members(self, who: Principal, room_id: str, users: Iterable[str]) -> RoomState:
        room = self.state.manageable(who, room_id)
        gone = [u for u in self.state.same_instance_users(who, users) if u in room.members]
        if gone:
            await self._remove(room, gone)
        return room

    async def _add(self, room: RoomState, users: list[str]) -> None:
        with trio.CancelScope(shield=True):  # once queued it commits: memory must follow
            await self.store.add_members(room.record.id, users)
        users = self.state.active(users)  # as the store added them
        if users:
            self.state.add_members(room.record.id, users)
            self._members_changed(MembershipChange(room.record.id, tuple(users), ()))

    async def _remove(self, room: RoomState, users: list[str]) -> None:
        with trio.CancelScope(shield=True):  # once queued it commits: memory must follow
            await self.store.remove_members(room.record.id, users)
        self.state.remove_members(room.record.id, users)
        self._members_changed(MembershipChange(room.record.id, (), tuple(users)))

    def _members_changed(self, change: MembershipChange) -> None:
        for listener in self.member_listeners:
            listener(change)

    async def set_read(self, who: Principal, room_id: str, seq: int) -> None:
        room = self.room_for_member(who, room_id)
        if seq > room.head:
            raise invalid(f"read {seq} is beyond the room's head {room.head}")
        if seq <= room.members[who.id]:
            return
        with trio.CancelScope(shield=True):  # once queued it commits: memory must follow
            await self.store.set_read(room_id, who.id, seq)
        self.state.set_read(room_id, who.id, seq)
        for listener in self.read_listeners:
            listener(room_id, who.id, seq)

    # --- the message path ----------------------------------------------------------------

    async def append(
        self,
        who: Principal,
        room_id: str,
        type_: str,
        cid: str,
        reply: AppendReply,
        *,
        body: dict[str, Any] | None = None,
        thread: int | None = None,
        target: int | None = None,
        emoji: str | None = None,
    ) -> None:
        """Authorize and queue one seq-taking op. `reply` is called once it is durable (or
        refused); the call itself returns as soon as the op is queued."""
        room = self.room_for_member(who, room_id)
        may_moderate = who.moderator or room.record.creator == who.id
        item = AppendItem(
            room=room_id,
            sender=who.id,
            type=type_,
            cid=cid,
            body=body,
            thread=thread,
            target=target,
            emoji=emoji,
            may_moderate=may_moderate,
            reply=reply,
        )
        if type_ == "message":  # a `send`
            # Held until the store answers: `_publish` keeps it for a new message and gives it
            # back for a repeat or a failure. A dict lookup and an addition: no await.
            try:
                self.quotas.take(who.instance.id, "messages")
            except GB6Error as refused:
                self._look_for_repeat(item, refused)
                return
            key = (room_id, who.id, cid)
            self._sending[key] = self._sending.get(key, 0) + 1
            try:
                await self.store.submit_append(item)
            except BaseException:
                self._answered(key)
                self.quotas.settle(who.instance.id, "messages", 1, keep=False)
                raise
            return
        await self.store.submit_append(item)

    def _look_for_repeat(self, item: AppendItem, refused: GB6Error) -> None:
        """At the daily limit, a repeat of a send acknowledged or under way still gets its
        original seq (as the store's dedup would answer it): looked up, in a task of its own,
        and answered through `item.reply`; anything else gets `refused`. The caller must not
        wait for the store (an edge's link reader appends for every tenant on that edge, in
        order): at most `_REPEAT_LOOKUPS` at once, the ones past it are `unavailable` (retry)."""
        if self._repeat_lookups >= _REPEAT_LOOKUPS:
            item.reply(GB6Error(UNAVAILABLE, "too many sends over the quota at once; retry"))
            return
        self._repeat_lookups += 1
        if self._repeat_lookups == 1:
            self._repeats_done = trio.Event()
        self._tasks.start_soon(self._repeat_over_quota, item, refused)

    def _answered(self, key: tuple[str, str, str]) -> None:
        """A send taken by `append` is answered (or was never queued)."""
        n = self._sending.pop(key, 1) - 1
        if n:
            self._sending[key] = n
        if self._send_waiters:
            answered, self._sends_answered = self._sends_answered, trio.Event()
            answered.set()

    async def _repeat_over_quota(self, item: AppendItem, refused: GB6Error) -> None:
        key = (item.room, item.sender, item.cid)
        try:
            if key in self._sending:  # the original is under way: its answer first
                self._send_waiters += 1
                try:
                    while key in self._sending:
                        await self._sends_answered.wait()
                finally:
                    self._send_waiters -= 1
            prior = await self.store.event_by_cid(item.room, item.sender, item.cid)
        except GB6Error as exc:
            item.reply(exc)
            return
        except Exception as exc:  # a bug: answered and logged, not the end of the shard
            log("repeat_lookup_failed", room=item.room, error=repr(exc))
            item.reply(GB6Error(INTERNAL, "internal error"))
            return
        finally:
            self._repeat_lookups -= 1
            if not self._repeat_lookups:
                self._repeats_done.set()
        if prior is None:
            item.reply(refused)
            return
        self.counts.repeats += 1
        item.reply(Appended(prior, duplicate=True))

    def _on_appended(self, results: list[tuple[AppendItem, AppendResult]]) -> None:
        try:
            with self.publish_context():
                self._publish(results)
        except Exception as exc:
            # The events are durable and their ops answered: a listener's failure must not
            # stop the store's writer (an edge that missed a push finds the gap in its hub).
            log("publish_failed", shard=self.config.shard, error=repr(exc))

    def _on_recovered(self, events: list[Event]) -> None:
        """Events of a batch whose ops were answered `unavailable` (the log's outcome was
        unknown) that the store's recovery found committed: they are the rooms' next events,
        so they go out as any (a resend of one gets it as a repeat), and its messages count
        against the day's quota."""
        self.counts.appended += len(events)
        with self.publish_context():
            self._publish_events(events)
        for ev in events:
            room = self.rooms.get(ev.room)
            if ev.type == "message" and room is not None:
                self.quotas.count(room.record.instance, "messages")

    def _publish(self, results: list[tuple[AppendItem, AppendResult]]) -> None:
        fresh: list[Event] = []
        counts = self.counts
        for _item, result in results:
            if not isinstance(result, Appended):
                counts.refused += 1
            elif result.duplicate:
                counts.repeats += 1
            else:
                counts.appended += 1
                fresh.append(result.event)
        try:
            self._publish_events(fresh)
        finally:  # whatever a listener does, every op is answered
            for item, result in results:
                if item.type == "message":  # the `take` in `append`
                    self._answered((item.room, item.sender, item.cid))
                    room = self.rooms.get(item.room)
                    if room is not None:
                        kept = isinstance(result, Appended) and not result.duplicate
                        self.quotas.settle(room.record.instance, "messages", 1, keep=kept)
                item.reply(result)

    def _publish_events(self, events: list[Event]) -> None:
        """Hand new events (each room's in seq order) to the listeners; heads move on."""
        by_room: dict[str, list[Event]] = {}
        for ev in events:
            by_room.setdefault(ev.room, []).append(ev)
        for room_id, evs in by_room.items():
            state = self.rooms.get(room_id)
            if state is not None:
                state.head = evs[-1].seq
            for listener in self.event_listeners:
                listener(room_id, evs)

    async def events_after(self, room_id: str, after: int, limit: int) -> list[Event]:
        return await self.store.events_after(room_id, after, limit)

    async def history(
        self, who: Principal, room_id: str, before: int | None, limit: int
    ) -> list[Event]:
        self.room_for_member(who, room_id)
        return await self.store.history(room_id, before, limit)

    async def search(self, who: Principal, query: str, room_id: str | None) -> list[Event]:
        if room_id is not None:
            self.room_for_member(who, room_id)
            rooms = [room_id]
        else:
            rooms = sorted(self.user_rooms.get(who.id, ()))
        return await self.store.search(rooms, query, self.limits.search_hits)

    # --- files ---------------------------------------------------------------------------

    async def put_file(
        self, who: Principal, room_id: str, content_type: str, data: bytes
    ) -> FileRecord:
        self.room_for_member(who, room_id)
        if len(data) > self.limits.file_bytes:
            raise GB6Error("too_large", f"files are limited to {self.limits.file_bytes} bytes")
        if not data:
            raise invalid("the file is empty")
        ctype = content_type.split(";")[0].strip().lower() or "application/octet-stream"
        if ctype in self.limits.file_types_denied or "/" not in ctype or len(ctype) > 100:
            raise GB6Error(INVALID, f"files of type {ctype!r} are not accepted")
        rec = FileRecord(new_id("file"), room_id, who.id, len(data), ctype, now_ms())
        with self.quotas.reserve(who.instance.id, "stored_bytes", len(data)):
            await self.blobs.put(rec.id, data)
            await self.store.create_file(rec)
        await self._bill(who.instance.id, "stored_bytes", len(data), rec.id)
        return rec

    async def get_file(self, who: Principal, file_id: str) -> tuple[FileRecord, Path]:
        rec = await self.store.file(file_id)
        if rec is None:
            raise not_found(f"file {file_id} not found")
        room = self.rooms.get(rec.room)
        if room is None or room.record.instance != who.instance.id or who.id not in room.members:
            raise not_found(f"file {file_id} not found")
        return rec, self.blobs.path(rec.id)

    # --- quotas (origin/quotas.py) -------------------------------------------------------

    def _plan_of(self, instance: str) -> str | None:
        inst = self.instances.get(instance)
        return inst.plan if inst is not None else None

    def _quota_limits_changed(self, record: Instance | User) -> None:
        if isinstance(record, Instance):  # its plan may have changed
            self.quotas.refresh(record.id)

    async def _load_quotas(self) -> None:
        """Counters as they stand: users, bots and rooms from memory, today's sends and the
        stored bytes from the store, the operators' overrides from the store's meta."""
        raw = await self.store.meta(_QUOTA_OVERRIDES)
        if raw:
            overrides = orjson.loads(raw)
            self.quotas.overrides = {i: dict(o) for i, o in overrides.items() if o}
        held: dict[tuple[str, str], int] = {}
        for user in self.users.values():
            if getattr(user, "status", "active") == "deleted":
                continue
            key = (user.instance, "bots" if user.role == "bot" else "users")
            held[key] = held.get(key, 0) + 1
        for room in self.rooms.values():
            key = (room.record.instance, "rooms")
            held[key] = held.get(key, 0) + 1
        for instance, size in (await self.store.stored_bytes()).items():
            held[(instance, "stored_bytes")] = size
        for (instance, resource), n in held.items():
            self.quotas.set_used(instance, resource, n)
        now = now_ms()
        for instance, n in (await self.store.messages_since(day_start_ms(now))).items():
            self.quotas.set_used(instance, "messages", n, period_ms=now)
        # Recording minutes and webhook calls are usage records of the billing store; only
        # instances whose plan limits them need them now.
        for resource in ("recording_minutes", "webhook_calls"):
            for instance in self.instances:
                if self.quotas.limit(instance, resource) is None:
                    continue
                period = self.quotas.usage_of(instance, resource).period
                assert period is not None
                used = (await self.billing.usage(instance, period)).get(resource, 0)
                self.quotas.set_used(instance, resource, used, period_ms=now)

    async def charge_usage(self, instance: str, resource: str, n: int, key: str) -> None:
        """Count `n` of a periodic resource that was used (`recording_minutes`: the recorder,
        per minute or part of one; `webhook_calls`: the webhook sender, per call) against the
        instance's quota, and record it for billing once per `key` (a repeat of a key counts
        nothing). Raises quota_exceeded (nothing counted or recorded) past the limit: the
        caller stops the recording or drops the call. Charge before the use (a minute as it
        starts, a call before it is made); a repeat of a key once the limit is reached is
        refused too (the quota is checked before the key)."""
        with self.quotas.reserve(instance, resource, n) as held:
            if not await self._bill(instance, resource, n, key):
                held.cancel()  # this key was counted before

    async def _bill(self, instance: str, metric: str, quantity: int, key: str) -> bool:
        """A usage record for billing (origin/invoicing.py), once per key; True if new. A
        failure is logged, not raised: what it was for has happened already."""
        added = True
        try:
            with trio.CancelScope(shield=True):
                added = await self.billing.record_usage(instance, metric, quantity, key)
        except GB6Error as exc:
            log("usage_record_failed", instance=instance, metric=metric, error=exc.message)
        return added

    async def acquire_slot(self, instance: str, resource: str) -> Callable[[], None]:
        """Take one of the instance's concurrent `resource` (`connections`,
        `media_participants`; quota_exceeded past its limit); returns the release, to call once
        when the session ends (more calls do nothing). The same call as
        `RemoteOrigin.acquire_slot`, whose slots this shard counts for every edge."""
        if KINDS.get(resource) != "concurrent":
            raise invalid(f"{resource!r} is not a concurrent resource")
        self.quotas.acquire(instance, resource)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.quotas.release(instance, resource)

        return release

    def quota_usage(self, instance: str) -> dict[str, Any]:
        """An instance's plan, and per resource its usage now and its limit (None: unlimited),
        with the period it is counted in: the admin API's answer."""
        if instance not in self.instances:
            raise not_found(f"instance {instance} not found")
        return {
            "instance": instance,
            "plan": self.quotas.plan(instance).name,
            "usage": [u.to_json() for u in self.quotas.usage(instance)],
            "overrides": dict(self.quotas.overrides.get(instance, {})),
        }

    async def set_quota_override(self, instance: str, resource: str, value: object) -> None:
        """Give one instance its own limit for `resource` (an int >= 0, or None: unlimited),
        whatever its plan says; durable on return. `clear_quota_override` goes back to the
        plan's limit."""
        if instance not in self.instances:
            raise not_found(f"instance {instance} not found")
        limit = self.quotas.check_override(resource, value)
        async with self._overrides_lock:
            mine = {**self.quotas.overrides.get(instance, {}), resource: limit}
            await self._store_overrides(instance, mine)
            self.quotas.set_override(instance, resource, limit)

    async def clear_quota_override(self, instance: str, resource: str) -> None:
        if instance not in self.instances:
            raise not_found(f"instance {instance} not found")
        self.quotas.check_override(resource, None)
        async with self._overrides_lock:
            mine = {
                k: v for k, v in self.quotas.overrides.get(instance, {}).items() if k != resource
            }
            await self._store_overrides(instance, mine)
            self.quotas.clear_override(instance, resource)

    async def _store_overrides(self, instance: str, mine: dict[str, int | None]) -> None:
        """Store every override with `instance`'s replaced by `mine`; hold `_overrides_lock`."""
        every = {**self.quotas.overrides, instance: mine}
        with trio.CancelScope(shield=True):  # once queued it commits: memory must follow
            await self.store.set_meta(_QUOTA_OVERRIDES, orjson.dumps(every).decode())
