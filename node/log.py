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
