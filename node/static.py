"""Static files for the node's web pages (the web client, the admin console), served from a
table read once at start.

Rules:
- Only the files found under a root when its table is built are served: a request path is
  looked up in that table (never joined onto a directory), so `..`, encoded slashes, symlinks
  out of the tree and unknown names are all `404 not_found`. The whole tree is bounded by
  `MAX_TREE_BYTES` (a larger one is a packaging mistake).
- Only known extensions are served, with their type and `X-Content-Type-Options: nosniff`.
  Caching: `Cache-Control: no-cache` with a strong `ETag` (URLs carry no version, so the
  browser revalidates and gets `304` when unchanged). Every answer carries the page's
  Content-Security-Policy and `Referrer-Policy: no-referrer`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs
from quart import Response, request

from node.errors import invalid, not_found

MAX_TREE_BYTES: Final = 8 << 20
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


@attrs.frozen
class StaticFile:
    body: bytes
    type: str
    etag: str


def load_tree(root: Path) -> dict[str, StaticFile]:
    """Relative path (with `/`) → file, for every servable file under `root`."""
    files: dict[str, StaticFile] = {}
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
        files[path.relative_to(root).as_posix()] = StaticFile(body, TYPES[path.suffix], etag)
    return files


def serve_file(
    files: Mapping[str, StaticFile], name: str, csp: str, *, frame_deny: bool = False
) -> Response:
    """The answer for `name` from `files` (304 when the browser's ETag matches)."""
    f = files.get(name)
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
    if frame_deny:
        resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Content-Security-Policy"] = csp
    return resp
