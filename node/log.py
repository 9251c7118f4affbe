"""Structured logs: one JSON object per line on stderr (stdout carries the process contract)."""

from __future__ import annotations

import sys
import time
from typing import Any

import orjson


def log(event: str, **fields: Any) -> None:
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    sys.stderr.buffer.write(orjson.dumps(record, default=str) + b"\n")
    sys.stderr.flush()


def without_password(url: str) -> str:
    """`url` fit for a log or an error: a password in it (`scheme://user:secret@host`) becomes
    `***`. Anything else is kept as it is."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, host = rest.partition("@")
    if not at or ":" not in userinfo.split("/")[0]:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
