"""The node's HTTP listener: one Quart-trio app under Hypercorn's trio worker.

Edge and origin contribute blueprints; this module only assembles them, maps `GB6Error` to the
protocol's JSON errors, and serves on a socket it binds itself (so port 0 works and the ready line
can name the real port).
"""

from __future__ import annotations

import socket
from typing import Any

import orjson
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve
from quart import Blueprint, Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from node.errors import GB6Error, invalid
from node.json_depth import MAX_JSON_DEPTH, deeper_than
from node.log import log


def error_response(err: GB6Error) -> Response:
    resp = Response(
        orjson.dumps(err.to_json()),
        status=err.http_status,
        content_type="application/json",
    )
    if err.retry_after_ms is not None:
        resp.headers["Retry-After"] = str(max(1, (err.retry_after_ms + 999) // 1000))
    return resp


async def json_body() -> dict[str, Any]:
    """The request's JSON object body; `invalid` for anything else. An empty body is `{}`."""
    raw = await request.get_data(cache=False)
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except ValueError:
        raise invalid("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("body must be a JSON object")
    if deeper_than(body):
        raise invalid(f"body nests objects and arrays deeper than {MAX_JSON_DEPTH} levels")
    return body


def build_app(blueprints: list[Blueprint], max_body: int) -> QuartTrio:
    app = QuartTrio("gb6")
    app.config["MAX_CONTENT_LENGTH"] = max_body
    app.config["BODY_TIMEOUT"] = 60
    for bp in blueprints:
        app.register_blueprint(bp)

    @app.before_request
    async def _read_body() -> None:
        # Every body is read to its end before any answer (bounded by MAX_CONTENT_LENGTH):
        # Hypercorn's h11 protocol reuses a keep-alive connection only if the request was
        # read completely when the response ended; an answer given before (401, 404, 405, a
        # bad query) left the client's next request on that connection unanswered.
        await request.get_data(cache=True)

    @app.errorhandler(GB6Error)
    async def _gb6(err: GB6Error) -> Response:
        return error_response(err)

    @app.errorhandler(HTTPException)
    async def _http(err: HTTPException) -> Response:
        code = {
            404: "not_found",
            405: "invalid",
            413: "too_large",
            400: "invalid",
            401: "unauthorized",
            403: "forbidden",
        }.get(err.code or 500, "internal")
        resp = error_response(GB6Error(code, err.description or err.name))
        resp.status_code = err.code or 500
        if isinstance(err, MethodNotAllowed) and err.valid_methods:
            resp.headers["Allow"] = ", ".join(err.valid_methods)  # RFC 9110: 405 lists them
        return resp

    @app.errorhandler(Exception)
    async def _bug(err: Exception) -> Response:
        log("http_request_failed", error=repr(err))
        return error_response(GB6Error("internal", "internal error"))

    return app


async def serve_http(
    app: QuartTrio,
    sock: socket.socket,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    cfg = HyperConfig()
    cfg.bind = [f"fd://{sock.fileno()}"]
    cfg.accesslog = None
    cfg.errorlog = None
    cfg.graceful_timeout = 3.0
    cfg.keep_alive_timeout = 30.0
    await serve(app, cfg, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]
