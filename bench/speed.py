"""The host's speed during a run: a fixed piece of Python timed once per second.

On a shared VM the same work takes a different CPU time from one second to the next: on this
project's 2-vCPU machine, with nothing else running in the guest, one fixed Python loop took
83 to 165 ms of CPU from one second to the next within a minute (bench/RESULTS.md, 2026-11-26
evening), and this probe reads ~0.45 ms when the host is fast, ~0.65 when it is slow. A run's
figures mean little without the speed the host gave it, so the bench records this probe beside
them.

`python -m bench.speed FILE` appends one line per second to FILE: the monotonic time and the
CPU milliseconds (the least of three tries, so that a preemption inside one try does not count)
of `work()`. `SpeedProbe` runs it for the length of a bench run and summarizes it. CPU time, not
wall time: a busy machine makes the probe wait for a core, not do its work slower, so what moves
the figure is the host (other VMs on the same cores), not the run's own load.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

_TRIES = 3


def work() -> int:
    """A dict- and int-heavy loop, like the servers' Python: ~1 ms on this machine when fast."""
    d: dict[int, int] = {}
    for i in range(4_000):
        k = i % 97
        d[k] = d.get(k, 0) + i
    return len(d)


def probe_ms() -> float:
    best = float("inf")
    for _ in range(_TRIES):
        t = time.process_time()
        work()
        best = min(best, time.process_time() - t)
    return 1000 * best


class SpeedProbe:
    """The probe as a child process for the length of a run (`with SpeedProbe(path) as p`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SpeedProbe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.speed", str(self.path)])

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None

    def latest(self) -> float | None:
        """The newest sample's ms, if any."""
        samples = self.samples()
        return samples[-1][1] if samples else None

    def samples(self) -> list[tuple[float, float]]:
        """(monotonic s, probe ms) so far."""
        out: list[tuple[float, float]] = []
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                out.append((float(parts[0]), float(parts[1])))
        return out

    def between(self, start: float, end: float) -> list[float]:
        """The probe's ms in [start, end) of `time.monotonic()`."""
        return [ms for t, ms in self.samples() if start <= t < end]


def stolen_s(t: Any) -> float:
    """CPU seconds the host gave to other guests while ours wanted it (`psutil.cpu_times().steal`;
    0 where the kernel does not count it). Neither busy nor idle: counted as busy, it would
    look like load from other processes of ours."""
    return float(getattr(t, "steal", 0.0))


def steal_share(before: Any, after: Any) -> float:
    """Percent of all cores' time the host stole between two `psutil.cpu_times()`."""
    total = sum(after) - sum(before)
    return round(100 * (stolen_s(after) - stolen_s(before)) / total, 1) if total > 0 else 0.0


def summarize(values: list[float]) -> dict[str, Any]:
    """p10/p50/p90 of the probe's ms (lower is faster)."""
    if not values:
        return {"n": 0}
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {"n": len(values), "p10": round(p10, 3), "p50": round(p50, 3), "p90": round(p90, 3)}


def fmt(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "host speed: no probe samples"
    return (
        f"host speed: probe {s['p50']:.2f} ms CPU per try (p10 {s['p10']:.2f}, p90 {s['p90']:.2f};"
        " lower is faster; see bench/README.md)"
    )


def main(path: str) -> None:
    with open(path, "a") as out:
        while True:
            out.write(f"{time.monotonic():.3f} {probe_ms():.4f}\n")
            out.flush()
            time.sleep(1.0)


if __name__ == "__main__":
    main(sys.argv[1])
