"""Files over HTTP: upload into a room by a member, download by members of that room only."""

from __future__ import annotations

from typing import Any

import trio
from quart import Blueprint, Response, request

from node.auth_failures import UserAuth
from origin.admin_api import bearer
from origin.shard import OriginShard


def files_blueprint(shard: OriginShard, authenticate: UserAuth) -> Blueprint:
    """`authenticate`: a user token and the client's address to the user (counted per address,
    node/auth_failures.py)."""
    bp = Blueprint("files", __name__)

    @bp.post("/v1/rooms/<room>/files")
    async def upload(room: str) -> tuple[dict[str, Any], int]:
        who = await authenticate(bearer(), request.remote_addr or "unknown")
        data = await request.get_data(cache=False, as_text=False)
        assert isinstance(data, bytes)
        rec = await shard.put_file(who, room, request.headers.get("Content-Type", ""), data)
        return rec.to_json(), 201

    @bp.get("/v1/files/<file_id>")
    async def download(file_id: str) -> Response:
        who = await authenticate(bearer(), request.remote_addr or "unknown")
        rec, path = await shard.get_file(who, file_id)
        data = await trio.Path(path).read_bytes()
        resp = Response(data, status=200, content_type=rec.type)
        # Never rendered as a page of ours: no sniffing, download by default.
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Content-Disposition"] = f'attachment; filename="{rec.id}"'
        resp.headers["Cache-Control"] = "private, max-age=0"
        return resp

    return bp
