"""`/healthz` (the process serves), `/readyz` (it accepts clients) and `/metrics`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from quart import Blueprint, Response

from node.metrics import Metric, render
from replication.edge_link import RemoteOrigin

if TYPE_CHECKING:
    from edge.gateway import Gateway
    from origin.shard import OriginShard


def health_blueprint(shard: OriginShard | None, gateway: Gateway | None) -> Blueprint:
    """Either part may be absent: `gb6 edge` has no shard, `gb6 origin` no gateway."""
    bp = Blueprint("health", __name__)

    @bp.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @bp.get("/readyz")
    async def readyz() -> Response | dict[str, Any]:
        if (gateway is not None and gateway.draining) or (shard is not None and shard.draining):
            return _not_ready({"status": "draining"})
        if gateway is not None and not gateway.origin.reachable:
            return _not_ready({"status": "unreachable", "reason": "no origin shard answers"})
        stopped = shard.store.stopped if shard is not None else None
        if stopped is not None:  # appends are refused: fenced, or recovering
            return _not_ready({"status": "stopped", "reason": stopped.message})
        return {"status": "ready"}

    @bp.get("/metrics")
    async def metrics() -> Response:
        samples: list[Metric] = []
        if gateway is not None:
            samples += [
                Metric("gb6_connections", "gauge", "client connections", len(gateway.conns)),
                Metric("gb6_room_hubs", "gauge", "rooms with a local hub", len(gateway.hubs.hubs)),
                Metric(
                    "gb6_hub_gaps_total",
                    "counter",
                    "times a room's events reached the fan-out with seqs skipped (its live"
                    " subscribers read them from the store)",
                    gateway.hubs.gaps,
                ),
            ]
            if isinstance(gateway.origin, RemoteOrigin):
                links = gateway.origin.links
                samples += [
                    Metric(
                        "gb6_origin_links", "gauge", "origin shards this edge links to", len(links)
                    ),
                    Metric(
                        "gb6_origin_links_up",
                        "gauge",
                        "links to origin shards that are up (the others reconnect)",
                        sum(1 for shard_link in links if shard_link.connected),
                    ),
                ]
        if shard is not None:
            counts = shard.counts
            samples += [
                Metric(
                    "gb6_commits_total",
                    "counter",
                    "transactions the store committed (with Kafka: the log's only)",
                    shard.store.commits,
                ),
                Metric("gb6_appends_total", "counter", "new events committed", counts.appended),
                Metric(
                    "gb6_append_repeats_total",
                    "counter",
                    "resends answered with their original event",
                    counts.repeats,
                ),
                Metric(
                    "gb6_append_refusals_total",
                    "counter",
                    "appends the store answered with an error (its checks, or a failure)",
                    counts.refused,
                ),
                Metric("gb6_rooms", "gauge", "rooms of this shard", len(shard.rooms)),
                Metric(
                    "gb6_store_stopped",
                    "gauge",
                    "1 while the store refuses appends: fenced, or recovering (see /readyz)",
                    int(shard.store.stopped is not None),
                ),
            ]
            store_metrics = getattr(shard.store, "metrics", None)  # the Kafka store's own
            if store_metrics is not None:
                samples += store_metrics()
        return Response(render(samples), content_type="text/plain; version=0.0.4")

    return bp


def _not_ready(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), status=503, content_type="application/json")
