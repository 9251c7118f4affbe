"""The pauses of a JVM (the Kafka broker) from its unified GC log, to line a run's slow seconds up
with them; and the CPU its JIT compiler threads used (a broker started minutes ago still
compiles its hot paths: 16% of a core in a `load` run at 2,000 sends/s, and twice the p99).
`scripts/services` starts the broker with `-Xlog:gc:file=…:time,uptime`, whose pause lines read

    [2026-11-27T08:16:20.623+0000][83.264s] GC(42) Pause Young (Normal) (…) 350M->167M(402M) 32.3ms
"""

from __future__ import annotations

import contextlib
import datetime
import os
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


def jit_cpu_s(pid: int) -> float:
    """CPU seconds used so far by the JIT compiler threads of JVM `pid` (HotSpot names them
    "C1 CompilerThre…" and "C2 CompilerThre…"); 0 if it is gone. HotSpot adds and ends compiler
    threads as its queue needs: the CPU of one that ended is no longer counted, so a difference
    of two readings is a lower bound (callers clamp it at 0)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if (task / "comm").read_text().startswith(("C1 Compiler", "C2 Compiler")):
                    # Fields 14 and 15 (utime, stime) follow the ")" closing the name.
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cold_warning(jit_pct: float | None) -> str | None:
    """What a run says when the broker's JIT compiled for more than 2% of a core in its
    window: its figures are of a cold broker, not of one that has run for a while."""
    if jit_pct is None or jit_pct <= 2.0:
        return None
    return (
        f"WARNING: the Kafka broker's JIT compiler used {jit_pct:.1f}% of a core in the window"
        " (a broker started recently): these figures are of a cold broker; run again"
    )


def summary(found: list[tuple[float, str, float]], t0: float) -> dict[str, Any]:
    """For the JSON: how many, how long, and at which second of the run (from `t0`) each was."""
    return {
        "count": len(found),
        "total_ms": round(sum(ms for _, _, ms in found), 1),
        "max_ms": max((ms for _, _, ms in found), default=0.0),
        "at": [[int(at - t0), kind, ms] for at, kind, ms in found],
    }
