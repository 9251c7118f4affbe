"""Cluster mode: N `gb6 origin` and M `gb6 edge` as subprocesses on this machine.

Rules: one generated config per process kind in a temporary directory, with a random link
secret (never a fixed one); origins on SQLite (their own data directory), on PostgreSQL (the
DSN from GB6_PG_DSN, a fresh schema per origin, dropped in `stop`) or on Kafka + PostgreSQL
(`kafka`: log of record on the broker at GB6_KAFKA_BOOTSTRAP, default 127.0.0.1:59092, a
fresh topic per origin, deleted in `stop`, besides the fresh schema). With Kafka each origin's
shard name carries the run's random suffix, because the shard name is the producer's
transactional id: a fixed `s1` would fence (or be fenced by) a test's shard s1 on the same
broker. Edges list every origin's link address. Processes stop edges first (their clients go
away before the origins they forward to), each with SIGTERM and a bounded wait. Tenancy is
created on an origin's admin API, so `http` and `admin_token` are origin 0's; clients connect
to the edges (`ws_urls`).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import psutil

from bench.server import BOOTSTRAP_LIMITS, Server

MAX_PROCESSES = 8  # origins + edges: this harness runs them all on one machine
STORES = ("sqlite", "postgres", "kafka")
DEFAULT_KAFKA = "127.0.0.1:59092"  # scripts/services' broker


class Cluster:
    def __init__(
        self,
        origins: list[Server],
        edges: list[Server],
        store: str,
        schemas: list[str],
        topics: list[str] | None = None,
    ) -> None:
        self.origins = origins
        self.edges = edges
        self.store = store
        self.schemas = schemas
        self.topics = topics or []  # Kafka topics of the origins' logs (store "kafka")
        self.pg_dsn = os.environ.get("GB6_PG_DSN", "")
        self.kafka = os.environ.get("GB6_KAFKA_BOOTSTRAP", DEFAULT_KAFKA)
        self.secret = ""  # the link secret (bench/linkload.py speaks the link itself)
        self._tmp: Path | None = None  # the configs and data directories
        self.keep = False  # --keep-data: leave the data directories (schemas are still dropped)

    # The fields `traffic` and the bootstrap read from a single node.
    @property
    def ws(self) -> str:
        return self.edges[0].ws

    @property
    def ws_urls(self) -> list[str]:
        return [e.ws for e in self.edges]

    @property
    def http(self) -> str:
        return self.origins[0].http

    @property
    def admin_token(self) -> str:
        return self.origins[0].admin_token

    @property
    def pid(self) -> int | None:
        return self.origins[0].pid

    @property
    def data_dir(self) -> Path | None:
        return None  # WAL watching is for the single node (each origin has its own WAL)

    @property
    def log_path(self) -> Path | None:
        return None  # one log per process: see `named`

    @property
    def named(self) -> list[tuple[str, Server]]:
        """("origin s1", server), …, ("edge e1", server), … in a stable order."""
        return [(f"origin s{i + 1}", s) for i, s in enumerate(self.origins)] + [
            (f"edge e{i + 1}", s) for i, s in enumerate(self.edges)
        ]

    @property
    def pids(self) -> list[int]:
        return [s.pid for _, s in self.named if s.pid is not None]

    def service_pids(self) -> list[tuple[str, int]]:
        """The PostgreSQL server the origins store into (its postmaster; backends are its
        children) and, with Kafka, the broker's JVM. Shared with whoever else uses them: their
        CPU is shown, not added to ours."""
        if self.store == "sqlite":
            return []
        found: list[tuple[str, int]] = []
        for p in psutil.process_iter(["name", "ppid", "cmdline"]):
            try:
                if p.info["name"] == "postgres" and psutil.Process(p.info["ppid"]).name() != (
                    "postgres"
                ):
                    found.append(("postgres (all backends, shared)", p.pid))
                elif self.store == "kafka" and "kafka.Kafka" in (p.info["cmdline"] or []):
                    found.append(("kafka broker (shared)", p.pid))
            except psutil.Error:
                continue
        return found

    def events_persisted(self) -> int | None:
        """How many events the first origin's PostgreSQL schema has been given (its `event_ids`
        sequence: cache 1, one value per row inserted; a rolled-back replay's values too).
        None on the embedded store. O(1), unlike counting the rows, so a run can sample it."""
        if not self.schemas:
            return None
        return asyncio.run(_last_event_id(self.pg_dsn, self.schemas[0]))

    def alive(self) -> bool:
        return all(s.alive() for _, s in self.named)

    def dead(self) -> str:
        return ", ".join(
            f"{name} (exit {s.proc and s.proc.returncode}, log {s.log_path})"
            for name, s in self.named
            if not s.alive()
        )

    def info(self) -> dict[str, Any]:
        return {
            "cluster": True,
            "store": self.store,
            "schemas": self.schemas,
            "topics": self.topics,
            "processes": {
                name: {
                    "pid": s.pid,
                    "ws": s.ws or None,
                    "http": s.http,
                    "link": s.link or None,
                    "command": s.command,
                    "log": str(s.log_path) if s.log_path else None,
                }
                for name, s in self.named
            },
        }

    @classmethod
    def start(
        cls,
        out_dir: Path,
        *,
        origins: int,
        edges: int,
        store: str,
        extra: dict[str, Any],
    ) -> Cluster:
        """`extra`: Server.start's experiment options (prelude, gc_log, switch interval), for
        every process. `edges` may be 0 (the `links` mode loads the origin itself)."""
        if origins < 1 or edges < 0 or origins + edges > MAX_PROCESSES:
            raise ValueError(
                f"--origins {origins} --edges {edges}: need at least 1 origin and at most "
                f"{MAX_PROCESSES} processes in all"
            )
        if store not in STORES:
            raise ValueError(f"--store must be one of {', '.join(STORES)}, not {store!r}")
        dsn = os.environ.get("GB6_PG_DSN", "")
        kafka = os.environ.get("GB6_KAFKA_BOOTSTRAP", DEFAULT_KAFKA)
        if store != "sqlite" and not dsn:
            raise ValueError(
                f'--store {store} needs GB6_PG_DSN (e.g. eval "$(scripts/services up)")'
            )
        for name, value in (("GB6_PG_DSN", dsn), ("GB6_KAFKA_BOOTSTRAP", kafka)):
            if '"' in value or "\\" in value:
                raise ValueError(f"{name} must not contain quotes or backslashes (TOML string)")
        base = Path(tempfile.mkdtemp(prefix="gb6-bench-cluster-"))
        secret = secrets.token_hex(24)
        suffix = secrets.token_hex(5)
        schemas = [f"bench_{suffix}_s{i + 1}" for i in range(origins)] if store != "sqlite" else []
        topics = [f"bench-{suffix}-s{i + 1}" for i in range(origins)] if store == "kafka" else []
        c = cls([], [], store, schemas, topics)
        c._tmp = base
        c.secret = secret
        c.keep = bool(extra.get("keep_data"))
        try:
            for i in range(origins):
                conf = base / f"s{i + 1}.toml"
                text = f'{BOOTSTRAP_LIMITS}[cluster]\nlink_secret = "{secret}"\n'
                shard = f"s{i + 1}"
                if store != "sqlite":
                    text += (
                        f'[store]\nbackend = "{store}"\npg_dsn = "{dsn}"\n'
                        f'pg_schema = "{schemas[i]}"\n'
                    )
                if store == "kafka":
                    text += f'kafka_bootstrap = "{kafka}"\nkafka_topic = "{topics[i]}"\n'
                    shard = f"bench-{suffix}-s{i + 1}"  # the transactional id: see the doc
                conf.write_text(text)
                args = ["--data", str(base / f"s{i + 1}"), "--link-port", "0", "--http-port", "0"]
                args += ["--shard", shard, "--config", str(conf)]
                c.origins.append(
                    Server.start(
                        out_dir,
                        [],
                        command="origin",
                        args=args,
                        log_name=f"origin-s{i + 1}",
                        **extra,
                    )
                )
            links = ", ".join(f'"{o.link}"' for o in c.origins)
            conf = base / "edge.toml"
            conf.write_text(f'[cluster]\nlink_secret = "{secret}"\norigins = [{links}]\n')
            for i in range(edges):
                args = ["--ws-port", "0", "--http-port", "0", "--config", str(conf)]
                c.edges.append(
                    Server.start(
                        out_dir,
                        [],
                        command="edge",
                        args=args,
                        need_token=False,
                        log_name=f"edge-e{i + 1}",
                        **extra,
                    )
                )
        except BaseException:
            c.stop()
            raise
        return c

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every process (edges first), then drop the PostgreSQL schemas and delete
        the Kafka topics."""
        codes: dict[str, int | None] = {}
        for name, s in reversed(self.named):
            codes[name] = s.stop()
        if self.schemas:
            asyncio.run(_drop_schemas(self.pg_dsn, self.schemas))
        if self.topics:
            from origin.kafka_records import usage_topic

            _delete_topics(self.kafka, self.topics + [usage_topic(t) for t in self.topics])
        if self._tmp is not None and not self.keep:
            shutil.rmtree(self._tmp, ignore_errors=True)
        elif self._tmp is not None:
            print(f"cluster data kept in {self._tmp}", flush=True)
        return codes


_SCHEMA = re.compile(r"^bench_[0-9a-f]{10}_s[0-9]+$")
_TOPIC = re.compile(r"^bench-[0-9a-f]{10}-s[0-9]+(\.usage)?$")  # a log, its usage topic


def _delete_topics(bootstrap: str, topics: list[str]) -> None:
    from confluent_kafka.admin import AdminClient

    # Only the names this harness made, as for schemas.
    bad = [t for t in topics if not _TOPIC.match(t)]
    if bad:
        raise ValueError(f"refusing to delete topics not made by the bench: {bad}")
    admin = AdminClient({"bootstrap.servers": bootstrap})  # alive until the answers came
    for future in admin.delete_topics(topics, operation_timeout=10).values():
        try:
            future.result(timeout=15)
        except Exception as exc:  # a topic never created (the origin failed first)
            print(f"cluster: deleting a Kafka topic: {exc}", flush=True)


async def _last_event_id(dsn: str, schema: str) -> int:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    if not _SCHEMA.match(schema):
        raise ValueError(f"not a schema made by the bench: {schema}")
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(f"SELECT last_value, is_called FROM {schema}.event_ids")
        return int(row[0]) if row[1] else 0
    finally:
        await conn.close()


async def _drop_schemas(dsn: str, schemas: list[str]) -> None:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    # Only the names this harness made: a DROP built from anything else is refused.
    bad = [s for s in schemas if not _SCHEMA.match(s)]
    if bad:
        raise ValueError(f"refusing to drop schemas not made by the bench: {bad}")
    conn = await asyncpg.connect(dsn)
    try:
        for s in schemas:
            await conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
    finally:
        await conn.close()
