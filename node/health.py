"""`/healthz` (the process serves), `/readyz` (it accepts clients) and `/metrics`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Blueprint, Response

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
        if gateway is not None and gateway.draining:
            return Response('{"status": "draining"}', status=503, content_type="application/json")
        return {"status": "ready"}

    @bp.get("/metrics")
    async def metrics() -> Response:
        lines = []
        if gateway is not None:
            lines += [
                "# TYPE gb6_connections gauge",
                f"gb6_connections {len(gateway.conns)}",
                "# TYPE gb6_room_hubs gauge",
                f"gb6_room_hubs {len(gateway.hubs.hubs)}",
            ]
        if shard is not None:
            lines += [
                "# TYPE gb6_commits_total counter",
                f"gb6_commits_total {shard.store.commits}",
                "# TYPE gb6_rooms gauge",
                f"gb6_rooms {len(shard.rooms)}",
            ]
            persister = getattr(shard.store, "persister", None)  # the Kafka store's child
            if persister is not None:
                lines += [
                    "# TYPE gb6_persister_restarts_total counter",
                    f"gb6_persister_restarts_total {persister.restarts}",
                ]
        return Response("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4")

    return bp
