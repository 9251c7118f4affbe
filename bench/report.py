"""Figures: the machine, latency percentiles, JSON results and PNG plots."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import psutil

PCTS = (50, 90, 99, 99.9)


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _git("rev-parse", "--short", "HEAD").strip()
    # The code under test is the working tree: name what differs from the commit.
    dirty = [
        line[3:]
        for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()
        if not line[3:].startswith("bench/")
    ]
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": model,
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "git_commit": commit,
        "git_modified": dirty,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent,
        ).stdout
    except OSError:
        return ""


def machine_line(m: dict[str, Any]) -> str:
    modified = m.get("git_modified") or []
    return (
        f"{m['date']}  {m['cpu_model']}  {m['cores_logical']} cores  {m['ram_gib']} GiB  "
        f"Python {m['python']}  Linux {m['kernel']}  commit {m['git_commit'] or '?'}"
        + (f" + uncommitted changes in {len(modified)} files" if modified else "")
    )


def summarize_us(values: np.ndarray[Any, Any]) -> dict[str, float | int]:
    """Percentiles in milliseconds of a µs array."""
    if values.size == 0:
        return {"n": 0}
    out: dict[str, float | int] = {"n": int(values.size)}
    for p in PCTS:
        out[f"p{p:g}"] = round(float(np.percentile(values, p)) / 1000, 3)
    out["max"] = round(float(values.max()) / 1000, 3)
    out["mean"] = round(float(values.mean()) / 1000, 3)
    return out


def fmt_lat(name: str, s: dict[str, float | int]) -> str:
    if not s.get("n"):
        return f"{name:<16} (no samples)"
    return (
        f"{name:<16} p50 {s['p50']:8.2f}  p90 {s['p90']:8.2f}  p99 {s['p99']:8.2f}  "
        f"p99.9 {s['p99.9']:8.2f}  max {s['max']:8.2f} ms   (n={s['n']:,})"
    )


def per_second(at_ms: np.ndarray[Any, Any], lat_us: np.ndarray[Any, Any]) -> list[list[float]]:
    """[second, p50 ms, p99 ms, max ms] per second of send time."""
    if at_ms.size == 0:
        return []
    sec = at_ms // 1000
    order = np.argsort(sec, kind="stable")
    sec, lat = sec[order], lat_us[order]
    out: list[list[float]] = []
    bounds = np.flatnonzero(np.diff(sec)) + 1
    for chunk_s, chunk_l in zip(np.split(sec, bounds), np.split(lat, bounds), strict=True):
        p50, p99 = np.percentile(chunk_l, [50, 99]) / 1000
        out.append([int(chunk_s[0]), round(p50, 3), round(p99, 3), round(chunk_l.max() / 1000, 3)])
    return out


def fmt_seconds(
    per_sec: list[list[float]],
    window: tuple[int, int],
    steal: list[list[float]] | None = None,
    worst: int = 3,
) -> str:
    """The p99 of the window's median second and of its worst seconds (from `per_second`):
    whether a run's p99 comes from every second or from a few; with `steal` ([second, % of
    all cores]), how much of each worst second the host took."""
    inside = [row for row in per_sec if window[0] <= row[0] < window[1]]
    if not inside:
        return "no seconds in the window"
    stolen = {int(sec): pct for sec, pct in steal or []}
    p99s = sorted(row[2] for row in inside)
    tops = sorted(inside, key=lambda row: row[2], reverse=True)[:worst]

    def one(row: list[float]) -> str:
        pct = stolen.get(int(row[0]))
        return f"second {int(row[0])} {row[2]:.1f} ms" + (
            f" ({pct:g}% stolen)" if pct is not None else ""
        )

    return f"median second {p99s[len(p99s) // 2]:.1f} ms; worst " + ", ".join(map(one, tops))


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON: {type(obj)}")


def plot_latency(
    path: Path,
    title: str,
    dl: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
    ack: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
    deliveries_per_sec: list[int],
    sends_per_sec: list[int],
    warmup_s: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 11))
    fig.suptitle(title, fontsize=9)
    for name, (at, lat), color in (("send→deliver", dl, "C0"), ("send→ack", ack, "C1")):
        rows = per_second(at, lat)
        if rows:
            xs = [r[0] for r in rows]
            ax1.plot(xs, [r[1] for r in rows], color=color, label=f"{name} p50")
            ax1.plot(xs, [r[2] for r in rows], color=color, ls="--", label=f"{name} p99")
            ax1.plot(xs, [r[3] for r in rows], color=color, ls=":", lw=0.8, label=f"{name} max")
    ax1.axvline(warmup_s, color="grey", lw=0.8)
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(plain)
    ax1.set_xlabel("send time (s since start; grey: end of warm-up)")
    ax1.set_ylabel("latency (ms)")
    ax1.legend(fontsize=7, ncol=3)
    ax1.grid(alpha=0.3)

    ax2.plot(range(len(deliveries_per_sec)), deliveries_per_sec, label="deliveries/s")
    ax2b = ax2.twinx()
    ax2b.plot(range(len(sends_per_sec)), sends_per_sec, color="C2", ls="--", label="sends/s")
    ax2.set_ylim(bottom=0)
    ax2b.set_ylim(bottom=0, top=max(sends_per_sec, default=1) * 1.3)
    ax2.set_xlabel("s since start")
    ax2.set_ylabel("deliveries/s")
    ax2b.set_ylabel("sends/s")
    ax2.legend(loc="upper left", fontsize=7)
    ax2b.legend(loc="upper right", fontsize=7)
    ax2.grid(alpha=0.3)

    for name, (at, lat), color in (("send→deliver", dl, "C0"), ("send→ack", ack, "C1")):
        sel = lat[at >= warmup_s * 1000]
        if sel.size:
            srt = np.sort(sel) / 1000
            ys = 1 - np.arange(srt.size) / srt.size
            ax3.plot(srt, ys, color=color, label=name)
    ax3.set_xscale("log")
    ax3.set_yscale("log")
    ax3.xaxis.set_major_formatter(plain)
    ax3.set_xlabel("latency (ms)")
    ax3.set_ylabel("fraction slower (CCDF)")
    ax3.legend(fontsize=7)
    ax3.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_idle(path: Path, title: str, points: list[tuple[int, int]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    fig.suptitle(title, fontsize=9)
    if points:
        xs = [p[0] for p in points]
        ys = [p[1] / 2**20 for p in points]
        ax.plot(xs, ys, marker=".", lw=0.8)
    ax.set_xlabel("open connections (hello done)")
    ax.set_ylabel("server RSS (MiB)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
