"""The browser client over HTTP: the web app at `/app/`, the JavaScript SDK at `/sdk/*.js`, and
`GET /v1/config`, which tells the page where the client WebSocket is.

Rules:
- Only the files found under `edge/web/app` and `edge/web/sdk` when the blueprint is built are
  served: a request path is looked up in that table (never joined onto a directory), so `..`,
  encoded slashes, symlinks out of the tree and unknown names are all `404 not_found`. Files
  are read once at start (they are small; the whole tree is bounded by `MAX_TREE_BYTES`).
- Only known extensions are served, with their type (`text/javascript` for modules) and
  `X-Content-Type-Options: nosniff`. Caching: `Cache-Control: no-cache` with a strong `ETag`
  (module URLs carry no version, so the browser revalidates and gets `304` when unchanged);
  `/v1/config` is `no-store`.
- The WebSocket is on its own port. `/v1/config` answers `{"ws": URL, "files": bool}` where URL
  is `ws://<the host the page was loaded from>:<the gateway's port>/v1/ws` (`wss` behind https),
  so a page loaded as `localhost` talks to `localhost`; `files` says whether this HTTP listener
  serves the files API (`gb6 run`: yes; `gb6 edge`: no, files live on the instance's origin).
- Every page gets a Content-Security-Policy that allows its own scripts and styles, `blob:`
  images and media, and connections to itself and to that one WebSocket URL; nothing inline,
  no frames, no plugins.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Final

import attrs
import orjson
from quart import Blueprint, Response, redirect, request
from werkzeug.wrappers.response import Response as WerkzeugResponse

from node.errors import invalid, not_found

WEB_ROOT: Final = Path(__file__).resolve().parent / "web"
MAX_TREE_BYTES: Final = 8 << 20  # everything served; a larger tree is a packaging mistake
TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}
# A Host header's host part: a DNS name or IPv4 address, or a bracketed IPv6 address.
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253})(?::[0-9]{1,5})?$")


@attrs.frozen
class _File:
    body: bytes
    type: str
    etag: str


def load_tree(root: Path) -> dict[str, _File]:
    """Relative path (with `/`) → file, for every servable file under `root`."""
    files: dict[str, _File] = {}
    total = 0
    if not root.is_dir():
        return files
    base = root.resolve()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix not in TYPES or path.name.startswith("."):
            continue
        real = path.resolve()
        if not real.is_relative_to(base):
            continue  # a symlink out of the tree
        body = real.read_bytes()
        total += len(body)
        if total > MAX_TREE_BYTES:
            raise invalid(f"{root}: more than {MAX_TREE_BYTES} bytes to serve")
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        files[path.relative_to(root).as_posix()] = _File(body, TYPES[path.suffix], etag)
    return files


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
    trees = {"app": load_tree(root / "app"), "sdk": load_tree(root / "sdk")}

    def ws_url() -> str:
        return ws_url_for(request.host, ws_port, request.scheme == "https")

    def serve(tree: str, name: str) -> Response:
        f = trees[tree].get(name)
        if f is None:
            raise not_found("no such file")
        if f.etag in (t.strip() for t in request.headers.get("If-None-Match", "").split(",")):
            resp = Response(b"", status=304)
        else:
            resp = Response(f.body, status=200, content_type=f.type)
        resp.headers["ETag"] = f.etag
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Content-Security-Policy"] = content_security_policy(ws_url())
        return resp

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
