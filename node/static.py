"""Static files for the node's web pages (the web client, the admin console), served from a
table read once at start.

Rules:
- Only the files found under a root when its table is built are served: a request path is
  looked up in that table (never joined onto a directory), so `..`, encoded slashes, symlinks
  out of the tree and unknown names are all `404 not_found`. The whole tree is bounded by
  `MAX_TREE_BYTES` (a larger one is a packaging mistake). The modules the pages share
  (`node/web/`: `elements.js`) are served beside each page's own files, from one copy.
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
SHARED_ROOT: Final = Path(__file__).resolve().parent / "web"  # served beside each page's files
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


def load_tree(root: Path, *, shared: Path | None = SHARED_ROOT) -> dict[str, StaticFile]:
    """Relative path (with `/`) → file, for every servable file under `root`, and beside them
    the files under `shared` (the pages' common modules; a name in both is a packaging
    mistake)."""
    files = _load_one(root, MAX_TREE_BYTES)
    if shared is not None and files:
        common = _load_one(shared, MAX_TREE_BYTES - sum(len(f.body) for f in files.values()))
        if clash := sorted(common.keys() & files.keys()):
            raise invalid(f"{root}: {', '.join(clash)} also in {shared}")
        files.update(common)
    return files


def _load_one(root: Path, limit: int) -> dict[str, StaticFile]:
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
        if total > limit:
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
