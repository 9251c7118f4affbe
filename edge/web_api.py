"""The browser client over HTTP: the web app at `/app/`, the JavaScript SDK at `/sdk/*.js`, and
`GET /v1/config`, which tells the page where the client WebSocket is.

Rules:
- Only the files found under `edge/web/app` and `edge/web/sdk` when the blueprint is built are
  served, by node/static.py (a table read once: no path is joined onto a directory; types,
  `nosniff`, `no-cache` + `ETag`); `/v1/config` is `no-store`.
- The WebSocket is on its own port. `/v1/config` answers `{"ws": URL, "files": bool}` where URL
  is `ws://<the host the page was loaded from>:<the gateway's port>/v1/ws` (`wss` behind https),
  so a page loaded as `localhost` talks to `localhost`; `files` says whether this HTTP listener
  serves the files API (`gb6 run`: yes; `gb6 edge`: no, files live on the instance's origin).
- Every page gets a Content-Security-Policy that allows its own scripts and styles, `blob:`
  images and media, and connections to itself and to that one WebSocket URL; nothing inline,
  no frames, no plugins.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

import orjson
from quart import Blueprint, Response, redirect, request
from werkzeug.wrappers.response import Response as WerkzeugResponse

from node.errors import invalid
from node.static import load_tree, serve_file

WEB_ROOT: Final = Path(__file__).resolve().parent / "web"
# A Host header's host part: a DNS name or IPv4 address, or a bracketed IPv6 address.
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253})(?::[0-9]{1,5})?$")


def ws_url_for(host_header: str, ws_port: int, secure: bool) -> str:
    """The WebSocket URL for a page loaded from `host_header` (`invalid` if malformed)."""
    if not _HOST.match(host_header):
        raise invalid("bad Host header")
    if host_header.startswith("["):
        host = host_header[: host_header.index("]") + 1]
    else:
        host = host_header.partition(":")[0]
    return f"{'wss' if secure else 'ws'}://{host}:{ws_port}/v1/ws"


def content_security_policy(ws_url: str) -> str:
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' blob: data:",
            "media-src 'self' blob:",
            f"connect-src 'self' {ws_url}",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


def web_blueprint(ws_port: int, *, files: bool, root: Path = WEB_ROOT) -> Blueprint:
    """Serve `root/app` at `/app/` and `root/sdk` at `/sdk/`; `ws_port` is the gateway's
    bound port, `files` whether this HTTP listener serves the files API."""
    bp = Blueprint("web", __name__)
    trees = {"app": load_tree(root / "app"), "sdk": load_tree(root / "sdk", shared=None)}

    def ws_url() -> str:
        return ws_url_for(request.host, ws_port, request.scheme == "https")

    def serve(tree: str, name: str) -> Response:
        return serve_file(trees[tree], name, content_security_policy(ws_url()))

    @bp.get("/app")
    async def app_root() -> WerkzeugResponse:
        return redirect("/app/", code=308)

    @bp.get("/app/")
    async def app_index() -> Response:
        return serve("app", "index.html")

    @bp.get("/app/<path:name>")
    async def app_file(name: str) -> Response:
        return serve("app", name)

    @bp.get("/sdk/<path:name>")
    async def sdk_file(name: str) -> Response:
        return serve("sdk", name)

    @bp.get("/v1/config")
    async def config() -> Response:
        body = orjson.dumps({"ws": ws_url(), "files": files})
        resp = Response(body, status=200, content_type="application/json")
        resp.headers["Cache-Control"] = "no-store"
        return resp

    return bp
