"""The audit log: tampering with the real storage is detected, an intact log verifies, the log
survives restarts, and the shard's security events reach it.

Tampering runs on each backend's real storage (SQLite's audit.db; PostgreSQL's audit_log in a
schema of the test's own), after switching off the storage's own refusal the way someone with
database access would (drop the triggers; disable them and grant the privileges back). Each
attack is checked twice: by the in-process verifier, then by the real `gb6 audit verify` as a
subprocess (exit 1 naming the seq and the kind of problem; exit 0 for an intact log).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_asyncio
from conftest import GB6, Node, connect
from services import require
from test_audit_store_contract import _pg_sql, _sqlite_sql

from node.config import Config
from node.errors import GB6Error
from origin.audit import (
    GENESIS,
    Anchor,
    AuditRecord,
    Problem,
    RefusalCounter,
    canonical,
    chain_hash,
    entry,
    seal,
)
from origin.audit_log import AuditLog, KvAnchor, open_audit, verify_store
from origin.audit_store import AuditQuery
from origin.rbac import OPERATOR
from origin.shard import OriginShard

RECORDS = 8


@attrs.frozen
class Site:
    """One backend's audit storage: the node config that reaches it, its TOML, raw SQL."""

    name: str
    config: Config
    toml: Path
    table: str
    raw: Callable[[str], Any]  # async: raw SQL on the storage (inside a trio-asyncio loop)
    unlock: str  # the SQL that switches the storage's own refusal off

    def hexbytes(self, b: bytes) -> str:
        return f"X'{b.hex()}'" if self.name == "sqlite" else f"'\\x{b.hex()}'::bytea"


@pytest.fixture(params=["sqlite", "postgres"])
def sites(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Site]]:
    """Makes sites on one backend, each on storage of its own (dropped afterwards)."""
    made: list[str] = []
    dsn = require("postgres") if request.param == "postgres" else ""

    def make() -> Site:
        base = tmp_path / f"site{len(made)}"
        data = base / "data"
        data.mkdir(parents=True)
        toml = base / "gb6.toml"
        schema = f"gb6_audit_{uuid.uuid4().hex[:12]}"
        made.append(schema)
        if request.param == "sqlite":
            toml.write_text("")

            async def raw_sqlite(sql: str) -> Any:
                return await trio.to_thread.run_sync(_sqlite_sql, data / "audit.db", sql)

            unlock = "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;"
            return Site("sqlite", Config(data_dir=data), toml, "audit", raw_sqlite, unlock)
        toml.write_text(
            f'[store]\nbackend = "postgres"\npg_dsn = "{dsn}"\npg_schema = "{schema}"\n'
        )
        config = Config(data_dir=data, store_backend="postgres", pg_dsn=dsn, pg_schema=schema)

        async def raw_pg(sql: str) -> Any:
            return await _pg_sql(dsn, schema, sql)

        unlock = (
            "ALTER TABLE audit_log DISABLE TRIGGER USER;"
            " GRANT UPDATE, DELETE, TRUNCATE ON audit_log TO CURRENT_USER;"
        )
        return Site("postgres", config, toml, "audit_log", raw_pg, unlock)

    try:
        yield make
    finally:
        if dsn:

            async def drop() -> None:
                async with trio_asyncio.open_loop():
                    for schema in made:
                        await _pg_sql(dsn, "public", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

            trio.run(drop)


@pytest.fixture
def site(sites: Callable[[], Site]) -> Site:
    return sites()


@asynccontextmanager
async def running_log(config: Config) -> AsyncIterator[AuditLog]:
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        audit = open_audit(config)
        with trio.fail_after(20):
            await nursery.start(audit.run)
        try:
            yield audit
        finally:
            nursery.cancel_scope.cancel()


async def _fill(site: Site) -> list[AuditRecord]:
    async with running_log(site.config) as audit:
        return [
            await audit.record(
                actor=f"usr_{i}",
                action="token.issue",
                org="org_a",
                instance="ins_a",
                target=f"tok_{i}",
                details={"n": i},
            )
            for i in range(1, RECORDS + 1)
        ]


@attrs.frozen
class Verified:
    returncode: int
    stdout: str


async def gb6_verify(
    data: Path, toml: Path | None = None, env: dict[str, str] | None = None
) -> Verified:
    """The real `gb6 audit verify`, as a subprocess (with `env` added to this one's)."""
    args = [str(GB6), "audit", "verify", "--data", str(data)]
    if toml is not None:
        args += ["--config", str(toml)]
    with trio.fail_after(60):
        done = await trio.run_process(
            args,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, **(env or {})},
        )
    return Verified(done.returncode, (done.stdout).decode())


async def _verify_in_process(site: Site) -> Any:
    async with running_log(site.config) as audit:
        return await audit.verify()


def _rehash_from(records: list[AuditRecord], seq: int, **changes: Any) -> list[AuditRecord]:
    """The records from `seq` on as a forger rewrites them: `changes` to record `seq`, every
    hash from there recomputed (the chain stays internally consistent)."""
    out: list[AuditRecord] = []
    prev = records[seq - 2].hash if seq > 1 else bytes(32)
    for r in records[seq - 1 :]:
        r = attrs.evolve(r, **changes) if r.seq == seq else r
        r = attrs.evolve(r, prev=prev, hash=chain_hash(prev, r, r.seq, r.ts))
        out.append(r)
        prev = r.hash
    return out


def _attacks(site: Site, records: list[AuditRecord]) -> dict[str, tuple[str, Problem, int]]:
    """attack → (SQL, the problem verify must name, at which seq)."""
    t, h = site.table, site.hexbytes
    forged = _rehash_from(records, 3, actor="mallory")[0]
    rewritten = _rehash_from(records, 3, actor="mallory")
    inserted = attrs.evolve(records[3], actor="mallory", details='{"n":0}')
    inserted = attrs.evolve(inserted, hash=chain_hash(records[2].hash, inserted, 4, inserted.ts))
    return {
        "edit": (f"UPDATE {t} SET actor = 'mallory' WHERE seq = 3", Problem.EDITED, 3),
        "edit_details": (
            f"""UPDATE {t} SET details = '{{"n":99}}' WHERE seq = 6""",
            Problem.EDITED,
            6,
        ),
        "edit_rehashed": (
            f"UPDATE {t} SET actor = 'mallory', hash = {h(forged.hash)} WHERE seq = 3",
            Problem.EDITED,
            3,
        ),
        "rewrite_to_the_end": (
            ";".join(
                f"UPDATE {t} SET actor = '{r.actor}', prev = {h(r.prev)}, hash = {h(r.hash)}"
                f" WHERE seq = {r.seq}"
                for r in rewritten
            ),
            Problem.REWRITTEN,
            RECORDS,
        ),
        "delete": (f"DELETE FROM {t} WHERE seq = 4", Problem.DELETED, 4),
        "delete_renumbered": (
            f"DELETE FROM {t} WHERE seq = 4; UPDATE {t} SET seq = -seq WHERE seq > 4;"
            f" UPDATE {t} SET seq = -seq - 1 WHERE seq < 0",
            Problem.DELETED,
            4,
        ),
        "insert_renumbered": (
            f"UPDATE {t} SET seq = -seq - 1 WHERE seq >= 4; UPDATE {t} SET seq = -seq WHERE"
            f" seq < 0; INSERT INTO {t} SELECT 4, ts, 'mallory', action, org, instance, target,"
            f""" outcome, '{{"n":0}}', prev, {h(inserted.hash)} FROM {t} WHERE seq = 5""",
            Problem.INSERTED,
            4,
        ),
        "reorder": (
            f"UPDATE {t} SET seq = -1 WHERE seq = 5; UPDATE {t} SET seq = 5 WHERE seq = 6;"
            f" UPDATE {t} SET seq = 6 WHERE seq = -1",
            Problem.REORDERED,
            5,
        ),
        "truncate_newest": (f"DELETE FROM {t} WHERE seq > 6", Problem.TRUNCATED, 7),
        "truncate_all": (f"DELETE FROM {t}", Problem.TRUNCATED, 1),
    }


ATTACKS = [
    "edit",
    "edit_details",
    "edit_rehashed",
    "rewrite_to_the_end",
    "delete",
    "delete_renumbered",
    "insert_renumbered",
    "reorder",
    "truncate_newest",
    "truncate_all",
]


async def _tamper(site: Site, sql: str) -> None:
    async with trio_asyncio.open_loop():
        await site.raw(site.unlock)
        await site.raw(sql)


async def test_an_intact_log_verifies(site: Site) -> None:
    await _fill(site)
    report = await _verify_in_process(site)
    assert report.ok, report.summary()
    assert (report.records, report.head) == (RECORDS, RECORDS)


@pytest.mark.parametrize("attack", ATTACKS)
async def test_tampering_is_detected(site: Site, attack: str) -> None:
    records = await _fill(site)
    sql, problem, seq = _attacks(site, records)[attack]
    await _tamper(site, sql)
    report = await _verify_in_process_readonly(site)
    assert report.finding is not None, report.summary()
    assert (report.finding.problem, report.finding.seq) == (problem, seq), report.summary()


async def test_gb6_audit_verify_names_the_first_problem(
    sites: Callable[[], Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command, as a subprocess, on one log per case (run concurrently): exit 0 with a
    summary for an intact log, exit 1 naming the seq and the problem for every attack, a
    removed anchor and an anchor checked with another key."""
    cases: list[tuple[str, Site, dict[str, str], int, str]] = []
    intact = sites()
    await _fill(intact)
    cases.append(("intact", intact, {}, 0, f"audit log OK: {RECORDS} record(s), seq 1..{RECORDS}"))
    for attack in ATTACKS:
        site = sites()
        sql, problem, seq = _attacks(site, await _fill(site))[attack]
        await _tamper(site, sql)
        cases.append((attack, site, {}, 1, f"audit log BAD at seq {seq}: {problem.value}: "))
    unanchored = sites()
    await _fill(unanchored)
    (unanchored.config.data_dir / "audit.anchor").unlink()
    cases.append(
        ("no anchor", unanchored, {}, 1, f"BAD at seq {RECORDS}: anchor: the anchor is missing")
    )
    keyed = sites()
    with monkeypatch.context() as patched:
        patched.setenv("GB6_AUDIT_KEY", "k" * 32)
        await _fill(keyed)
    good, bad = {"GB6_AUDIT_KEY": "k" * 32}, {"GB6_AUDIT_KEY": "x" * 32}
    cases.append(("right key", keyed, good, 0, "audit log OK: 8 record(s), seq 1..8, anchored at"))
    cases.append(("wrong key", keyed, bad, 1, "anchor: the anchor's MAC does not match"))

    results: dict[str, Verified] = {}

    async def run(name: str, site: Site, env: dict[str, str]) -> None:
        results[name] = await gb6_verify(site.config.data_dir, site.toml, env)

    async with trio.open_nursery() as nursery:
        for name, site, env, _, _ in cases:
            nursery.start_soon(run, name, site, env)
    for name, _, _, code, text in cases:
        assert (results[name].returncode, text in results[name].stdout) == (code, True), (
            name,
            results[name].stdout,
        )
    assert results["right key"].stdout.rstrip().endswith("; MAC checked")


async def _verify_in_process_readonly(site: Site) -> Any:
    """Verify without starting the log (which would refuse to start on a tampered tail)."""
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        audit = open_audit(site.config, readonly=True)
        await nursery.start(audit.store.run)
        await nursery.start(audit.anchors.run)
        report = await verify_store(audit.store, await audit.anchors.load(), None)
        nursery.cancel_scope.cancel()
    return report


async def test_the_log_refuses_to_start_on_a_truncated_tail(site: Site) -> None:
    """Writing on would re-anchor over the evidence: the component stops with `unavailable`."""
    await _fill(site)
    await _tamper(site, f"DELETE FROM {site.table} WHERE seq > 6")
    async with trio_asyncio.open_loop():
        with pytest.raises(GB6Error, match="does not match its anchor") as refused:
            await open_audit(site.config).run()
    assert refused.value.code == "unavailable"
    assert (await _verify_in_process_readonly(site)).head == 6  # nothing was written


async def test_the_chain_continues_across_restarts(site: Site) -> None:
    first = await _fill(site)
    async with running_log(site.config) as audit:
        r = await audit.record(actor="admin", action="org.create", org="org_b")
        assert (r.seq, r.prev) == (RECORDS + 1, first[-1].hash)
        page, nxt = await audit.page(AuditQuery(limit=3))
        assert [x.seq for x in page] == [9, 8, 7] and nxt == "7"
        scoped = AuditQuery(limit=50, orgs=frozenset({"org_b"}))
        assert [x.seq for x in (await audit.page(scoped))[0]] == [9]
    assert (await _verify_in_process(site)).ok


@pytest.mark.parametrize("sites", ["postgres"], indirect=True)  # embedded: always a file
async def test_the_anchor_in_the_cluster_kv(sites: Callable[[], Site]) -> None:
    """PostgreSQL audit with `[cluster] kv`: the anchor is a kv key (not a file), it only moves
    forward, and the command finds it there to name a truncation."""
    site = sites()
    kv_path = site.toml.parent / "kv.db"
    site.toml.write_text(site.toml.read_text() + f'[cluster]\nkv = "sqlite:{kv_path}"\n')
    kv_site = attrs.evolve(site, config=attrs.evolve(site.config, kv=f"sqlite:{kv_path}"))
    records = await _fill(kv_site)
    assert not (site.config.data_dir / "audit.anchor").exists()
    async with running_log(kv_site.config) as audit:
        assert isinstance(audit.anchors, KvAnchor)
        assert await audit.anchors.load() == Anchor(RECORDS, records[-1].hash)
        await audit.anchors.save(Anchor(3, records[2].hash))  # an older head: ignored
        assert (await audit.anchors.load() or Anchor(0, b"")).seq == RECORDS
    assert (await gb6_verify(site.config.data_dir, site.toml)).returncode == 0
    await _tamper(site, f"DELETE FROM {site.table} WHERE seq > 6")
    done = await gb6_verify(site.config.data_dir, site.toml)
    assert done.returncode == 1 and "BAD at seq 7: truncated" in done.stdout, done.stdout


def test_the_canonical_encoding_is_frozen() -> None:
    """Old logs must verify forever: these bytes and this hash never change (a new encoding
    would be VERSION 2, next to this one)."""
    e = entry(
        actor="admin", action="org.create", org="org_a", details={"b": 1, "a": [True, None, "é"]}
    )
    assert (
        canonical(e, 1, 1_700_000_000_000)
        == (
            '[1,1,1700000000000,"admin","org.create","org_a",null,null,"ok",'
            '{"a":[true,null,"é"],"b":1}]'
        ).encode()
    )
    assert seal(e, 1, 1_700_000_000_000, GENESIS).hash.hex() == (
        "a23632c05debced5e89a4d1946271b7ce095d6100ce0972dc9fac7eb316171d7"
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"details": {"x": 1.5}},  # no floats: encoders disagree on them
        {"details": {"x": 2**53 + 1}},
        {"details": {"a": {"b": {"c": {"d": {"e": 1}}}}}},  # too deep
        {"details": {"x": "y" * 5000}},  # too large
        {"details": {1: "x"}},
        {"action": "Org.Create"},
        {"action": "org..create"},
        {"outcome": "maybe"},
        {"actor": ""},
        {"org": "o" * 201},
    ],
)
def test_bad_entries_are_invalid(bad: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"actor": "admin", "action": "org.create", **bad}
    with pytest.raises(GB6Error) as err:
        entry(**fields)
    assert err.value.code == "invalid"


def test_refusals_are_aggregated_per_window() -> None:
    counter = RefusalCounter(window_ms=1000, kinds=2)
    firsts = [counter.note("unknown token", None, 10 + i)[1] for i in range(100)]
    assert firsts == [True] + [False] * 99
    assert counter.note("token revoked", "ins_a", 20) == (("token revoked", "ins_a"), True)
    assert counter.note("token expired", "ins_b", 21) == (("other", None), True)  # past `kinds`
    assert counter.note("x", "y", 22) == (("other", None), False)
    assert counter.due(500) == []  # the window is still open
    assert sorted(counter.due(1010)) == [
        (("other", None), 1, 10, 1010),
        (("unknown token", None), 99, 10, 1010),
    ]
    assert counter.due(5000) == []


# --- the shard's security events -------------------------------------------------------------


async def _records(shard: OriginShard, **filters: Any) -> list[AuditRecord]:
    await shard.audit.wait_idle()
    page, _ = await shard.audit.page(AuditQuery(limit=200, **filters))
    return page[::-1]


async def test_shard_security_events_reach_the_log(tmp_path: Path) -> None:
    """Tokens issued and revoked, hellos refused (a flood aggregated), an instance suspended and
    resumed, quota usage at 80 % and 100 %: each is in the log, with its org and instance."""
    shard = OriginShard(Config(data_dir=tmp_path / "data"))
    # A short refusal window, so the test sees the flood's count without waiting a minute.
    shard.audit.limits = attrs.evolve(shard.audit.limits, refusal_window_s=0.2)
    shard.audit._refusals = RefusalCounter(200, shard.audit.limits.refusal_kinds)
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        org = await shard.create_org("acme", None)
        inst = await shard.create_instance(org.id, "i", None, "free")
        user = await shard.create_user(inst.id, "u", "member")
        secret, token = await shard.issue_token(inst.id, user.id, None)
        await shard.revoke_token(inst.id, user.id, token.id)
        issued = await _records(shard, action="token.issue")
        assert [(r.org, r.instance, r.target) for r in issued] == [(org.id, inst.id, token.id)]
        assert [r.target for r in await _records(shard, action="token.revoke")] == [token.id]

        for _ in range(50):  # a flood of bad tokens
            with pytest.raises(Exception, match="unknown token"):
                await shard.authenticate("gb6u_nope.forged")
        with pytest.raises(Exception, match="token revoked"):
            await shard.authenticate(secret)
        refused = await _records(shard, action="auth.token_refused")
        assert [(r.instance, r.outcome) for r in refused] == [(None, "denied"), (inst.id, "denied")]
        with trio.fail_after(5):  # the window closes: one record counts the other 49
            while len(refused) < 3:
                await trio.sleep(0.05)
                refused = await _records(shard, action="auth.token_refused")
        assert '"count":49' in refused[2].details and '"aggregated":true' in refused[2].details

        await shard.tenancy.suspend_instance(OPERATOR, inst.id)
        await shard.tenancy.resume_instance(OPERATOR, inst.id)
        status = await _records(shard, action="instance.status")
        assert [r.details for r in status] == [
            '{"from":"active","to":"suspended"}',
            '{"from":"suspended","to":"active"}',
        ]
        assert {r.org for r in status} == {org.id}

        await shard.set_quota_override(inst.id, "users", 5)
        for i in range(4):
            await shard.create_user(inst.id, f"v{i}", "member")
        levels = [r.details for r in await _records(shard, action="quota.reached")]
        assert len(levels) == 2 and '"level":80' in levels[0] and '"level":100' in levels[1]

        # The instance's scope sees its records; another tenant's scope sees none of them.
        mine = await _records(shard, instances=frozenset({inst.id}))
        assert len(mine) >= 6
        assert await _records(shard, orgs=frozenset({"org_other"})) == []
        report = await shard.audit.verify()
        assert report.ok, report.summary()
        nursery.cancel_scope.cancel()


async def test_the_node_audits_and_verifies_across_restarts(tmp_path: Path) -> None:
    """`gb6 run`: token calls over the admin API and refused hellos over the WebSocket are in
    audit.db; after SIGTERM and again after kill -9 and a restart, `gb6 audit verify` exits 0
    and the chain goes on from where it was."""
    node = Node(tmp_path / "data")
    node.start()
    try:
        tenant = node.create_tenant()
        user = tenant.user()  # one token issued
        for _ in range(5):
            async with asynccontextmanager(connect)(node) as peer:
                reply = await peer.request("hello", token="gb6u_x.forged")
                assert reply.get("code") == "unauthorized"
        assert node.terminate() == 0
        done = await gb6_verify(node.data_dir)
        assert done.returncode == 0, done.stdout
        rows = _sqlite_sql(node.data_dir / "audit.db", "SELECT seq, action FROM audit ORDER BY seq")
        actions = [a for _, a in rows]
        assert actions.count("token.issue") == 1
        assert actions.count("auth.token_refused") == 1  # 5 refusals, one record (so far)
        node.start()
        tenant.user("second")
        node.kill()  # kill -9: the records it acknowledged are durable and anchored
        done = await gb6_verify(node.data_dir)
        assert done.returncode == 0, done.stdout
        rows = _sqlite_sql(node.data_dir / "audit.db", "SELECT seq, action FROM audit ORDER BY seq")
        assert [s for s, _ in rows] == list(range(1, len(rows) + 1))
        assert [a for _, a in rows].count("token.issue") == 2
        assert user.id
    finally:
        node.kill()
