"""Configuration: defaults, the TOML file, then command-line flags, in that order of precedence.

Every size, rate and count the node enforces lives here, so an operator can see and change them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs

from node.errors import invalid


@attrs.frozen
class Limits:
    message_bytes: int = 1 << 20  # a client frame above this gets `too_large`
    transport_factor: int = 2  # a frame above factor * message_bytes closes with 1009
    hello_timeout_s: float = 10.0
    heartbeat_ms: int = 30_000
    outbox_bytes: int = 8 << 20  # a client further behind than this is closed with 4008
    close_grace_s: float = 5.0  # how long a closing connection may take to take its close frame
    catchup_chunk: int = 500  # events per storage read while a subscriber catches up
    room_cache_events: int = 512  # recent events kept per room on the edge
    room_cache_bytes: int = 256 << 10  # and at most this many frame bytes
    idle_room_cache_rooms: int = 1_000  # rooms whose cache stays after the last subscriber left
    max_subscriptions: int = 1_000  # per connection
    max_connections: int = 100_000  # per edge
    max_connections_per_ip: int = 20_000  # per edge and client address (load tests need many)
    max_inflight_appends: int = 20_000  # per origin shard, across clients
    writer_batch: int = 2_000  # appends per group commit
    writer_linger_s: float = 0.002  # under load, how long a commit waits for its batch to fill
    room_name_chars: int = 200
    members_per_request: int = 1_000
    members_per_room: int = 100_000
    body_bytes: int = 64 << 10  # encoded `body` of one message
    emoji_chars: int = 64
    search_query_chars: int = 500
    search_hits: int = 50
    file_bytes: int = 25 << 20
    file_types_denied: tuple[str, ...] = (
        "text/html",
        "application/xhtml+xml",
        "image/svg+xml",
        "application/javascript",
        "text/javascript",
    )
    link_buffer_bytes: int = 64 << 20  # an edge further behind than this is cut off the link
    link_inflight_appends: int = 10_000  # per edge and origin shard, awaiting their answer
    token_ttl_s: int = 24 * 3600
    token_ttl_max_s: int = 30 * 24 * 3600


@attrs.frozen
class RatePlan:
    """GCRA: `rate` requests per second sustained, `burst` at once."""

    rate: float
    burst: int


@attrs.frozen
class Config:
    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    ws_port: int = 8700
    http_port: int = 8701
    region: str = "local"
    limits: Limits = Limits()
    # Requests per user on the client socket, per plan. `unlimited` has no entry: no limit.
    rate_plans: dict[str, RatePlan] = attrs.field(
        factory=lambda: {"free": RatePlan(rate=50.0, burst=100)}
    )
    typing_interval_ms: int = 1_000  # typing signals per user and room are dropped above this
    # Cluster (`gb6 origin`, `gb6 edge`): this origin's shard name and link port; the origin
    # shards an edge connects to; the secret both ends of a link must share.
    shard: str = "s1"
    link_port: int = 8702
    origins: tuple[str, ...] = ()
    link_secret: str = ""
    redis_url: str = ""  # edges share typing, presence and sessions through it ("": edge-local)
    kv: str = ""  # the shard map's kv: sqlite:PATH, postgres:DSN, tikv:PD ("": origins list only)
    # The origin's relational store and log: "sqlite" (embedded, in the data directory),
    # "postgres" (`pg_dsn`, tables in schema `pg_schema`, one schema per shard), or "kafka"
    # (log of record on Kafka at `kafka_bootstrap`, topic `kafka_topic`, by default
    # gb6-log-<shard>, one per shard; relational store on PostgreSQL as for "postgres").
    store_backend: str = attrs.field(
        default="sqlite", validator=attrs.validators.in_(("sqlite", "postgres", "kafka"))
    )
    pg_dsn: str = ""
    pg_schema: str = "gb6"
    kafka_bootstrap: str = ""
    kafka_topic: str = ""


_SECTIONS = {"limits": Limits}


def load(path: Path | None, overrides: dict[str, Any]) -> Config:
    """Read a TOML file (optional) and apply `overrides` (flags that were given)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise invalid(f"config {path}: {exc}") from exc
    node = dict(raw.get("node", {}))
    kwargs: dict[str, Any] = {}
    for key in ("host", "ws_port", "http_port", "region", "typing_interval_ms"):
        if key in node:
            kwargs[key] = node[key]
    cluster = dict(raw.get("cluster", {}))
    for key in ("shard", "link_port", "link_secret", "redis_url", "kv"):
        if key in cluster:
            kwargs[key] = cluster[key]
    store = dict(raw.get("store", {}))
    for key, name in (
        ("backend", "store_backend"),
        ("pg_dsn", "pg_dsn"),
        ("pg_schema", "pg_schema"),
        ("kafka_bootstrap", "kafka_bootstrap"),
        ("kafka_topic", "kafka_topic"),
    ):
        if key in store:
            kwargs[name] = store[key]
    if "origins" in cluster:
        kwargs["origins"] = tuple(str(o) for o in cluster["origins"])
    if "data_dir" in node:
        kwargs["data_dir"] = Path(node["data_dir"])
    if "limits" in raw:
        try:
            kwargs["limits"] = Limits(**{k: _tuple(v) for k, v in raw["limits"].items()})
        except TypeError as exc:
            raise invalid(f"config [limits]: {exc}") from exc
    if "rate_plans" in raw:
        kwargs["rate_plans"] = {
            name: RatePlan(rate=float(p["rate"]), burst=int(p["burst"]))
            for name, p in raw["rate_plans"].items()
        }
    for key, value in overrides.items():
        if value is not None:
            kwargs[key] = Path(value) if key == "data_dir" else value
    try:
        return Config(**kwargs)
    except (TypeError, ValueError) as exc:
        raise invalid(f"config: {exc}") from exc


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
