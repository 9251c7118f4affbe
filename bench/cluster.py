"""Cluster mode: N `gb6 origin` and M `gb6 edge` as subprocesses on this machine.

Rules: one generated config per process kind in a temporary directory, with a random link
secret (never a fixed one); origins on SQLite (their own data directory) or on PostgreSQL (the
DSN from GB6_PG_DSN, a fresh schema per origin, dropped in `stop`); edges list every origin's
link address. Processes stop edges first (their clients go away before the origins they
forward to), each with SIGTERM and a bounded wait. Tenancy is created on an origin's admin
API, so `http` and `admin_token` are origin 0's; clients connect to the edges (`ws_urls`).
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

from bench.server import Server

MAX_PROCESSES = 8  # origins + edges: this harness runs them all on one machine


class Cluster:
    def __init__(
        self, origins: list[Server], edges: list[Server], store: str, schemas: list[str]
    ) -> None:
        self.origins = origins
        self.edges = edges
        self.store = store
        self.schemas = schemas
        self.pg_dsn = os.environ.get("GB6_PG_DSN", "")
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
        children). Shared with whoever else uses it: its CPU is shown, not added to ours."""
        if self.store != "postgres":
            return []
        for p in psutil.process_iter(["name", "ppid"]):
            try:
                if p.info["name"] == "postgres" and psutil.Process(p.info["ppid"]).name() != (
                    "postgres"
                ):
                    return [("postgres (all backends, shared)", p.pid)]
            except psutil.Error:
                continue
        return []

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
        every process."""
        if origins < 1 or edges < 1 or origins + edges > MAX_PROCESSES:
            raise ValueError(
                f"--origins {origins} --edges {edges}: need at least 1 of each and at most "
                f"{MAX_PROCESSES} processes in all"
            )
        if store not in ("sqlite", "postgres"):
            raise ValueError(f"--store must be sqlite or postgres, not {store!r}")
        dsn = os.environ.get("GB6_PG_DSN", "")
        if store == "postgres" and not dsn:
            raise ValueError(
                '--store postgres needs GB6_PG_DSN (e.g. eval "$(scripts/services up)")'
            )
        if '"' in dsn or "\\" in dsn:
            raise ValueError("GB6_PG_DSN must not contain quotes or backslashes (TOML string)")
        base = Path(tempfile.mkdtemp(prefix="gb6-bench-cluster-"))
        secret = secrets.token_hex(24)
        suffix = secrets.token_hex(5)
        schemas = (
            [f"bench_{suffix}_s{i + 1}" for i in range(origins)] if store == "postgres" else []
        )
        c = cls([], [], store, schemas)
        c._tmp = base
        c.keep = bool(extra.get("keep_data"))
        try:
            for i in range(origins):
                conf = base / f"s{i + 1}.toml"
                text = f'[cluster]\nlink_secret = "{secret}"\n'
                if store == "postgres":
                    text += (
                        f'[store]\nbackend = "postgres"\npg_dsn = "{dsn}"\n'
                        f'pg_schema = "{schemas[i]}"\n'
                    )
                conf.write_text(text)
                args = ["--data", str(base / f"s{i + 1}"), "--link-port", "0", "--http-port", "0"]
                args += ["--shard", f"s{i + 1}", "--config", str(conf)]
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
        """SIGTERM every process (edges first), then drop the PostgreSQL schemas."""
        codes: dict[str, int | None] = {}
        for name, s in reversed(self.named):
            codes[name] = s.stop()
        if self.schemas:
            asyncio.run(_drop_schemas(self.pg_dsn, self.schemas))
        if self._tmp is not None and not self.keep:
            shutil.rmtree(self._tmp, ignore_errors=True)
        elif self._tmp is not None:
            print(f"cluster data kept in {self._tmp}", flush=True)
        return codes


_SCHEMA = re.compile(r"^bench_[0-9a-f]{10}_s[0-9]+$")


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
