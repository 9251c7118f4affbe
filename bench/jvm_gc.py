"""The pauses of a JVM (the Kafka broker) from its unified GC log, to line a run's slow seconds up
with them. `scripts/services` starts the broker with `-Xlog:gc:file=…:time,uptime`, whose
pause lines read

    [2026-11-27T08:16:20.623+0000][83.264s] GC(42) Pause Young (Normal) (…) 350M->167M(402M) 32.3ms
"""

from __future__ import annotations

import contextlib
import datetime
import re
from pathlib import Path
from typing import Any

_PAUSE = re.compile(r"^\[([^\]]+)\]\[[^\]]*\] GC\(\d+\) (Pause(?: [A-Z][a-z]+)+)\b.*?([\d.]+)ms$")


def log_path(cmdline: list[str]) -> Path | None:
    """The GC log file named by a JVM's command line (`-Xlog:gc…:file=PATH[:…]`), if any."""
    for arg in cmdline:
        if arg.startswith("-Xlog:gc") and ":file=" in arg:
            return Path(arg.split(":file=", 1)[1].split(":", 1)[0])
    return None


def pauses(path: Path, start: float, end: float) -> list[tuple[float, str, float]]:
    """(unix time, kind, ms) of each pause logged between two unix times."""
    out: list[tuple[float, str, float]] = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            m = _PAUSE.match(line)
            if m is None:
                continue
            with contextlib.suppress(ValueError):
                at = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
                if start <= at <= end:
                    out.append((at, m.group(2), float(m.group(3))))
    return out


def summary(found: list[tuple[float, str, float]], t0: float) -> dict[str, Any]:
    """For the JSON: how many, how long, and at which second of the run (from `t0`) each was."""
    return {
        "count": len(found),
        "total_ms": round(sum(ms for _, _, ms in found), 1),
        "max_ms": max((ms for _, _, ms in found), default=0.0),
        "at": [[int(at - t0), kind, ms] for at, kind, ms in found],
    }
