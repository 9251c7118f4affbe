"""Configuration: defaults, the TOML file, then command-line flags, in that order of precedence.

Every size, rate and count the node enforces lives here, so an operator can see and change them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs

from node.errors import invalid
from origin.audit import AuditLimits
from origin.log_port import MAX_PARTITIONS
from origin.plans import Plan, builtin_plans, parse_plans


def _number(key: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise invalid(f"config {key} must be a number, not {value!r}")
    return float(value)


def _commit_timeout(value: Any) -> float:
    return _number("[store] kafka_commit_timeout_s", value)


def _sweep_interval(value: Any) -> float:
    return _number("[cluster] presence_sweep_s", value)


_MAX_INT = 1 << 48
_MAX_FLOAT = 1e9


def check_fields(section: str, obj: Any, may_be_zero: frozenset[str] = frozenset()) -> None:
    """Each field of an attrs instance `obj` of a config section against its declared type:
    an int (not a bool) within 1..2**48, a float (or int) within (0, 1e9], a bool, a tuple of
    strings; 0 also for the fields named in `may_be_zero`. Raises `invalid` naming the key."""
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        where = f"config [{section}] {field.name}"
        floor = 0 if field.name in may_be_zero else 1
        if field.type in ("int", int):
            if not isinstance(value, int) or isinstance(value, bool):
                raise invalid(f"{where} must be an integer, not {value!r}")
            if not floor <= value <= _MAX_INT:
                raise invalid(f"{where} must be between {floor} and {_MAX_INT}, not {value}")
        elif field.type in ("float", float):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise invalid(f"{where} must be a number, not {value!r}")
            if not (value >= 0 if floor == 0 else value > 0) or not value <= _MAX_FLOAT:
                bound = ">= 0" if floor == 0 else "> 0"
                raise invalid(f"{where} must be {bound} and at most {_MAX_FLOAT:g}, not {value}")
        elif field.type in ("bool", bool) and not isinstance(value, bool):
            raise invalid(f"{where} must be true or false, not {value!r}")
        elif field.type == "tuple[str, ...]" and not (
            isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        ):
            raise invalid(f"{where} must be a list of strings, not {value!r}")


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
    per_ip_loopback: bool = False  # do the per-address limits apply to loopback clients too
    # Hellos refused `unauthorized` per client address: past this budget the address's hellos
    # are refused `rate_limited` (close 1013) until its wait is over, without a token check.
    ws_auth_failures_rate: float = 1.0  # per second, sustained
    ws_auth_failures_burst: int = 20
    # User tokens of one client address being checked at once (hellos, files, WHIP/WHEP); 4
    # once it failed in the last minute; past it `rate_limited`. Loopback excepted as above.
    auth_pending_per_ip: int = 64
    max_inflight_appends: int = 20_000  # per origin shard, across clients
    writer_batch: int = 2_000  # appends per group commit
    writer_linger_s: float = 0.002  # under load, how long a commit waits for its batch to fill
    # Kafka store: a shard starts at most one log transaction per interval unless a whole batch
    # waits (each costs the broker and the origin a fixed CPU; Kafka Streams commits per 100 ms).
    log_transaction_interval_s: float = 0.010
    # Kafka store: memory of the rooms' resend filters together (~1.3 bytes per key); when it
    # is full, idle rooms' filters make way, else a room asks PostgreSQL about every key
    # (origin/key_filter.py).
    key_filter_bytes: int = 64 << 20
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
    # Recording (edge/recording): a track's file is held in memory until the track ends.
    recording_max_duration_s: float = 3 * 3600.0  # a recording stops itself after this
    recording_track_bytes: int = 512 << 20  # per track file; past it the track is truncated
    recording_tracks: int = 64  # per recording, removed tracks included
    recording_queue_packets: int = 8_192  # waiting for the recorder; past it packets are dropped
    recording_reorder_packets: int = 128  # held while an earlier packet is missing
    recording_packet_bytes: int = 16 << 10  # one RTP packet
    recording_frame_bytes: int = 8 << 20  # one assembled video frame
    recording_finish_s: float = 60.0  # how long stopping may take to write the files
    # Tenancy (origin/tenancy.py).
    org_depth: int = 8  # levels of nested organizations, the root included
    org_children: int = 1_000  # child organizations per organization
    org_members: int = 1_000  # members (owners, admins, members) per organization
    org_api_keys: int = 100  # API keys per organization, revoked ones included
    page_limit: int = 200  # items per page of an admin listing (50 unless asked)
    # Admin HTTP API rate limits (origin/admin_limits.py): GCRA per credential (the operator,
    # an org member, an API key), and per client address for failed authentication (429 and
    # Retry-After past them); the per-address limit skips loopback unless admin_auth_loopback.
    admin_rate: float = 50.0  # requests per second per credential, sustained
    admin_burst: int = 500  # at once
    admin_auth_failures_rate: float = 1.0  # failed authentications per second per address
    admin_auth_failures_burst: int = 20
    admin_auth_loopback: bool = False
    # Media signaling (edge/media_signaling.py), WHIP/WHEP (edge/media_http.py).
    media_rooms_per_connection: int = 4  # rooms whose media one WebSocket joins at once
    media_tracks_per_request: int = 100  # track ids in one media.subscribe / unsubscribe
    media_http_sessions: int = 1_000  # WHIP and WHEP sessions per edge
    media_cohosts: int = 16  # co-hosts per live room
    media_viewer_interval_s: float = 1.0  # a live room's viewer count is sent at most this often

    def __attrs_post_init__(self) -> None:
        check_fields("limits", self, _LIMITS_MAY_BE_ZERO)


# Limits where 0 means something: no idle room cache; no waiting for a batch to fill; no
# resend filter (every key asked of PostgreSQL).
_LIMITS_MAY_BE_ZERO = frozenset(
    {"idle_room_cache_rooms", "writer_linger_s", "log_transaction_interval_s", "key_filter_bytes"}
)


@attrs.frozen
class IceServer:
    """One STUN or TURN server (`stun:host:port`, `turn:host:port?transport=udp`)."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


@attrs.frozen
class MediaConfig:
    """`[media]`: where the SFU binds its UDP sockets and what it allows.

    ICE host candidates are pinned to `host` (aioice would leave 127.0.0.1 out and enumerate every
    interface), bound inside `udp_port_min..udp_port_max`, and announced as `announced_address`
    when set (behind NAT). `ice_servers` is passed to every transport as given: empty means no
    STUN/TURN at all (aiortc would otherwise fall back to a public STUN server).
    """

    host: str = "127.0.0.1"
    announced_address: str = ""
    udp_port_min: int = 40_000
    udp_port_max: int = 49_999
    ice_servers: tuple[IceServer, ...] = ()
    tracks_per_participant: int = 8  # published tracks (audio, camera, screen, ...)
    participants_per_room: int = 1_000  # live rooms: viewers are participants
    subscribers_per_track: int = 1_000
    subscriptions_per_participant: int = 200
    video_bitrate_cap_bps: int = 20_000_000  # REMB sent to a publisher never exceeds this
    audio_bitrate_cap_bps: int = 256_000
    nack_history_packets: int = 1_024  # per subscription, a power of two
    keyframe_request_interval_s: float = 1.0  # PLI/FIR to a publisher, per track, at most
    remb_interval_s: float = 1.0
    speakers_top_n: int = 3
    speaker_interval_s: float = 0.3
    quality_interval_s: float = 2.0
    sdp_bytes: int = 64 << 10
    ice_candidate_chars: int = 512
    remote_candidates: int = 32  # per peer
    connect_timeout_s: float = 20.0  # ICE + DTLS, or the peer is closed

    def __attrs_post_init__(self) -> None:
        check_fields("media", self)


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
    # Plans (origin/plans.py): quotas per instance, the rate limit per user, pricing.
    plans: dict[str, Plan] = attrs.field(factory=builtin_plans)
    typing_interval_ms: int = 1_000  # typing signals per user and room are dropped above this
    # Cluster (`gb6 origin`, `gb6 edge`): this origin's shard name and link port; the origin
    # shards an edge connects to; the secret both ends of a link must share.
    shard: str = "s1"
    link_port: int = 8702
    origins: tuple[str, ...] = ()
    link_secret: str = ""
    redis_url: str = ""  # edges share typing, presence and sessions through it ("": edge-local)
    # How often an edge repairs what lost signals failed to say (presence) and unfollows the
    # Redis channels its clients no longer need (edge/shared_signals.py): each sweep costs a
    # few Redis calls per followed instance. At most 30 s: the change feed a sweep reads keeps
    # 60 s, and an edge that missed more asks every user's presence again.
    presence_sweep_s: float = attrs.field(
        default=10.0,
        converter=_sweep_interval,
        validator=[attrs.validators.ge(0.5), attrs.validators.le(30.0)],
    )
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
    # Partitions of a topic the shard creates (an existing topic keeps its own). One is the
    # default: the shard is the topic's only writer and its consumers read every partition, so
    # more only add produce requests and transaction markers per batch (bench/RESULTS.md).
    kafka_partitions: int = attrs.field(
        default=1,
        validator=[
            attrs.validators.instance_of(int),
            attrs.validators.in_(range(1, MAX_PARTITIONS + 1)),
        ],
    )
    # How long the shard's producer waits for the broker to commit (or abort) a batch. Past it
    # the batch's outcome is unknown: its ops are `unavailable` and the shard recovers in place
    # (origin/kafka_store.py), refusing appends meanwhile.
    kafka_commit_timeout_s: float = attrs.field(
        default=30.0,
        converter=_commit_timeout,
        validator=[attrs.validators.ge(1.0), attrs.validators.le(300.0)],
    )
    # `[regions]`: region → the origin shards that serve it (an instance's data lives only on
    # shards of its region). Empty: the node's region is served by its own shard alone.
    regions: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    # `[media]`: the SFU's UDP address, port range, ICE servers and media limits.
    media: MediaConfig = MediaConfig()
    # `[audit]`: the audit log's sizes, batch, queue, page and refusal aggregation
    # (origin/audit.py `AuditLimits`; each has a floor).
    audit: AuditLimits = attrs.field(factory=AuditLimits)

    def __attrs_post_init__(self) -> None:
        for name in ("ws_port", "http_port", "link_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65_535:
                raise invalid(f"config {name} must be a port number 0..65535, not {port!r}")
        interval = self.typing_interval_ms
        if not isinstance(interval, int) or isinstance(interval, bool) or not interval >= 0:
            raise invalid(f"config typing_interval_ms must be an integer >= 0, not {interval!r}")
        for name in _TEXT:
            if not isinstance(getattr(self, name), str):
                raise invalid(f"config {name} must be a string, not {getattr(self, name)!r}")

    def region_shards(self, region: str) -> tuple[str, ...] | None:
        """The shards of `region`; None if no such region is configured."""
        regions = self.regions or {self.region: (self.shard,)}
        return regions.get(region)

    @property
    def rate_plans(self) -> dict[str, RatePlan]:
        """Requests per user on the client socket, per plan; a plan without a rate (such as
        `unlimited`) has no entry: no limit. Derived from `plans`, where the rate lives."""
        return {
            name: RatePlan(rate=p.rate, burst=p.burst)
            for name, p in self.plans.items()
            if p.rate is not None and p.burst is not None
        }


_TEXT: tuple[str, ...] = ("host", "region", "shard", "link_secret", "redis_url", "kv")
_TEXT += ("pg_dsn", "pg_schema", "kafka_bootstrap", "kafka_topic")


def load(path: Path | None, overrides: dict[str, Any]) -> Config:
    """Read a TOML file (optional) and apply `overrides` (flags that were given)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise invalid(f"config {path}: {exc}") from exc
    unknown = sorted(set(raw) - _KNOWN_SECTIONS)
    if unknown:
        known = ", ".join(sorted(_KNOWN_SECTIONS))
        raise invalid(f"config: unknown section [{unknown[0]}] (the sections are {known})")
    kwargs: dict[str, Any] = {}
    for section, keys in _KEYS.items():
        table = _table(raw, section)
        strays = sorted(set(table) - set(keys))
        if strays:
            raise invalid(f"config [{section}]: unknown key {strays[0]!r}")
        for key, name in keys.items():
            if key in table:
                kwargs[name] = table[key]
    node, cluster = _table(raw, "node"), _table(raw, "cluster")
    if "regions" in raw:
        regions = raw["regions"]
        if not isinstance(regions, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in regions.values()
        ):
            raise invalid("config [regions]: each region maps to a list of shard names")
        kwargs["regions"] = {str(k): tuple(v) for k, v in regions.items()}
    if "origins" in cluster:
        if not isinstance(cluster["origins"], list):
            raise invalid("config [cluster] origins must be a list of host:port")
        kwargs["origins"] = tuple(str(o) for o in cluster["origins"])
    if "data_dir" in node:
        kwargs["data_dir"] = Path(str(node["data_dir"]))
    if "limits" in raw:
        try:
            limits = _table(raw, "limits")
            kwargs["limits"] = Limits(**{k: _tuple(v) for k, v in limits.items()})
        except TypeError as exc:
            raise invalid(f"config [limits]: {exc}") from exc
    if "media" in raw:
        kwargs["media"] = _media(dict(_table(raw, "media")))
    if "audit" in raw:
        try:
            kwargs["audit"] = AuditLimits(**_table(raw, "audit"))
        except TypeError as exc:
            raise invalid(f"config [audit]: {exc}") from exc
    if "plans" in raw or "rate_plans" in raw:
        kwargs["plans"] = parse_plans(raw.get("plans", {}), raw.get("rate_plans", {}))
    for key, value in overrides.items():
        if value is not None:
            kwargs[key] = Path(value) if key == "data_dir" else value
    host = kwargs.get("host")
    if host not in (None, "0.0.0.0", "::") and "host" not in _table(raw, "media"):
        # The process contract: media binds to the node's host and announces it, unless
        # `[media] host` (or `announced_address`) says otherwise. Not a wildcard, which no
        # peer could reach as an ICE candidate: media keeps its own host then.
        kwargs["media"] = attrs.evolve(kwargs.get("media", MediaConfig()), host=host)
    try:
        return Config(**kwargs)
    except (TypeError, ValueError) as exc:
        # attrs' validators put the message first, then the attribute and the value.
        why = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
        raise invalid(f"config: {why}") from exc


# Each section's keys → the `Config` attribute each sets ([limits], [media], [audit], [plans],
# [rate_plans] and [regions] are read whole, below).
_KEYS: dict[str, dict[str, str]] = {
    "node": {k: k for k in ("host", "ws_port", "http_port", "region", "typing_interval_ms")}
    | {"data_dir": "data_dir"},
    "cluster": {
        k: k for k in ("shard", "link_port", "link_secret", "redis_url", "kv", "presence_sweep_s")
    }
    | {"origins": "origins"},
    "store": {
        "backend": "store_backend",
        "pg_dsn": "pg_dsn",
        "pg_schema": "pg_schema",
        "kafka_bootstrap": "kafka_bootstrap",
        "kafka_topic": "kafka_topic",
        "kafka_partitions": "kafka_partitions",
        "kafka_commit_timeout_s": "kafka_commit_timeout_s",
    },
}
_KNOWN_SECTIONS = frozenset(_KEYS) | {"regions", "limits", "media", "audit", "plans", "rate_plans"}


def _table(raw: dict[str, Any], section: str) -> dict[str, Any]:
    value = raw.get(section, {})
    if not isinstance(value, dict):
        raise invalid(f"config [{section}] must be a table, not {value!r}")
    return value


def _media(section: dict[str, Any]) -> MediaConfig:
    try:
        servers = tuple(
            IceServer(
                urls=(s["urls"],) if isinstance(s["urls"], str) else tuple(s["urls"]),
                username=s.get("username"),
                credential=s.get("credential"),
            )
            for s in section.pop("ice_servers", [])
        )
        media = MediaConfig(ice_servers=servers, **section)
    except (TypeError, KeyError) as exc:
        raise invalid(f"config [media]: {exc}") from exc
    if not 0 < media.udp_port_min <= media.udp_port_max < 65_536:
        raise invalid("config [media]: udp_port_min..udp_port_max must be a range within 1..65535")
    n = media.nack_history_packets
    if n <= 0 or n & (n - 1):
        raise invalid("config [media]: nack_history_packets must be a power of two")
    return media


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
