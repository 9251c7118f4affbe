"""Sample the server with py-spy during the measured window and summarize where its time went.

py-spy is not in the lock file: `.venv/bin/pip install py-spy` for local use. The raw output
(collapsed stacks, one `frame;frame;… count` line per stack) stays in bench/out/ next to the
results; `summarize` prints the hottest functions by self and by inclusive samples, per thread.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r" \((?P<file>[^():]+?)(?::\d+)?\)$")


def py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def start(
    pid: int,
    seconds: float,
    out: Path,
    rate: int = 200,
    *,
    gil: bool = False,
    native: bool = False,
) -> subprocess.Popen[bytes] | None:
    """`gil`: sample only the thread holding the GIL. `native`: include C frames (sqlite,
    `take_gil`, syscalls); py-spy then pauses the process for each sample, which costs more."""
    exe = py_spy()
    if exe is None:
        print("profile: py-spy not found (.venv/bin/pip install py-spy)", flush=True)
        return None
    cmd = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--threads",
        "--output",
        str(out),
    ]
    cmd.append("--native" if native else "--nonblocking")
    if gil:
        cmd.append("--gil")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes] | None, timeout: float = 60.0) -> None:
    if proc is None:
        return
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if proc.returncode:
        print(f"profile: py-spy exited {proc.returncode}: {err.decode()[-500:]}", flush=True)


def _short(frame: str) -> str:
    """`fn (path/to/mod.py:123)` → `fn (to/mod.py)`: group lines of one function together."""
    m = _LINE.search(frame)
    if not m:
        return frame
    path = m.group("file")
    parts = path.split("/")
    return f"{frame[: m.start()]} ({'/'.join(parts[-2:])})"


def summarize(raw: Path, seconds: float, rate: int = 200, top: int = 25) -> dict[str, Any]:
    threads: Counter[str] = Counter()
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0]
        frames = frames[1:]
        if thread.startswith(("process ", "Process ")) and frames:
            thread, frames = frames[0], frames[1:]
        thread_name = re.sub(r"\s*\(?0x[0-9a-f]+\)?|\s*\(\d+\)", "", thread).strip() or thread
        threads[thread_name] += n
        total += n
        if not frames:
            continue
        self_t[f"[{thread_name}] {_short(frames[-1])}"] += n
        for f in {_short(f) for f in frames}:
            incl[f] += n
    possible = max(1.0, seconds * rate)
    return {
        "raw": str(raw),
        "samples": total,
        "seconds": seconds,
        "rate_hz": rate,
        "threads_pct_of_core": {t: round(100 * n / possible, 1) for t, n in threads.most_common()},
        "self_pct_of_samples": [
            [f, round(100 * n / max(1, total), 1)] for f, n in self_t.most_common(top)
        ],
        "inclusive_pct_of_samples": [
            [f, round(100 * n / max(1, total), 1)] for f, n in incl.most_common(top)
        ],
    }


def print_summary(s: dict[str, Any], top: int = 20) -> None:
    print(f"\nprofile ({s['samples']} active samples, {s['raw']}):", flush=True)
    print("  busy share of one core, per thread (samples / possible samples):")
    for t, pct in s["threads_pct_of_core"].items():
        print(f"    {pct:5.1f}%  {t}")
    print("  self time (leaf frame), % of active samples:")
    for f, pct in s["self_pct_of_samples"][:top]:
        print(f"    {pct:5.1f}%  {f}")
    print("  inclusive time, % of active samples:")
    for f, pct in s["inclusive_pct_of_samples"][:top]:
        print(f"    {pct:5.1f}%  {f}")
    sys.stdout.flush()
