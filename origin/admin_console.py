"""The admin console: a web page at `/admin/` over the admin HTTP API (origin/admin_api.py).

The page (origin/admin_web/: plain HTML, CSS and ES modules, no build step) signs in with an
admin credential (the operator's token, an org member's `gb6o_…` token or an API key `gb6k_…`)
and calls the same `/v1/…` routes any API client calls, from the same origin. It holds no
privilege of its own: what it shows and may change is what the credential may (rbac decides,
on the server, per request).

Rules:
- Only the files found under `origin/admin_web` when the blueprint is built are served (read
  once, looked up by name in that table: `..`, encoded slashes, symlinks out of the tree and
  unknown names are `404 not_found`; node/static.py serves them, as it does the web client).
- Every answer carries a Content-Security-Policy that allows only the page's own scripts and
  styles and connections to its own origin: nothing inline, no frames (the console cannot be
  framed: clickjacking an admin is the attack), no plugins, no forms posted elsewhere.
  `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`, `Cache-Control: no-cache`
  with a strong `ETag` (`304` when unchanged).
- The credential stays in the tab (`sessionStorage`), is sent only as `Authorization: Bearer`
  to this origin, and never appears in a URL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from quart import Blueprint, Response, redirect
from werkzeug.wrappers.response import Response as WerkzeugResponse

from node.static import load_tree, serve_file

CONSOLE_ROOT: Final = Path(__file__).resolve().parent / "admin_web"
CSP: Final = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)


def console_blueprint(root: Path = CONSOLE_ROOT) -> Blueprint:
    """Serve the console's files from `root` at `/admin/` (index.html at `/admin/`)."""
    bp = Blueprint("admin_console", __name__)
    files = load_tree(root)

    def serve(name: str) -> Response:
        return serve_file(files, name, CSP, frame_deny=True)

    @bp.get("/admin")
    async def console_root() -> WerkzeugResponse:
        return redirect("/admin/", code=308)

    @bp.get("/admin/")
    async def console_index() -> Response:
        return serve("index.html")

    @bp.get("/admin/<path:name>")
    async def console_file(name: str) -> Response:
        return serve(name)

    return bp
