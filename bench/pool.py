"""Load-generator worker processes: the Python workers (bench/worker.py) or the Go ones
(bench/gen/), behind one interface: `recv_any`, `send_all`, `wait_ready`, `stop`, `pids`.

Both speak the same messages (worker.py's docstring); the Go worker carries them as JSON lines
on its stdin/stdout. It is the default where `go` is installed: on a 2-core machine the Python
worker takes ~35% of a core at 2,000 sends/s and so competes with the server it measures.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import subprocess
from array import array
from dataclasses import asdict
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from bench.worker import WorkerConfig
from bench.worker import main as worker_main

GEN_DIR = Path(__file__).resolve().parent / "gen"
GEN_BIN = GEN_DIR / ".bin" / "gen"
# Result fields the report reads as int64 buffers (worker.py sends `array("q")`).
_ARRAYS = (
    "ack_lat_us",
    "ack_at_ms",
    "dl_lat_us",
    "dl_rx_lat_us",
    "dl_at_ms",
    "send_lag_us",
    "send_lag_at_ms",
)


class Pool:
    """Python worker processes, each with its own pipe."""

    def __init__(self, cfgs: list[WorkerConfig]) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for cfg in cfgs:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(cfg, child), daemon=True)
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)
        self.pids = [int(p.pid) for p in self.procs]

    def recv_any(self, timeout: float) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        for conn in wait(self.pipes, timeout):
            assert isinstance(conn, Connection)
            i = self.pipes.index(conn)
            try:
                msg = conn.recv()
            except EOFError:
                raise RuntimeError(f"worker {i} died (exit {self.procs[i].exitcode})") from None
            out.append((i, _checked(i, msg)))
        return out

    def send_all(self, msg: tuple[Any, ...]) -> None:
        for p in self.pipes:
            with contextlib.suppress(OSError):
                p.send(msg)

    def wait_ready(self, on_progress: Any) -> list[dict[str, Any]]:
        ready: dict[int, dict[str, Any]] = {}
        counts = [0] * len(self.procs)
        while len(ready) < len(self.procs):
            for i, msg in self.recv_any(1.0):
                if msg[0] == "connecting":
                    counts[i] = msg[1]
                elif msg[0] == "ready":
                    ready[i] = msg[1]
                    counts[i] = msg[1]["ready"]
            on_progress(sum(counts))
        return [ready[i] for i in range(len(self.procs))]

    def stop(self) -> None:
        self.send_all(("stop",))
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)


def _checked(i: int, msg: Any) -> Any:
    if msg[0] == "crash":
        raise RuntimeError(f"worker {i} crashed: {msg[1]}")
    return msg


def go_available() -> bool:
    return shutil.which("go") is not None


def build_go() -> Path:
    """Build the Go worker when its source is newer than the binary (a second or two)."""
    sources = [*GEN_DIR.glob("*.go"), GEN_DIR / "go.mod"]
    if GEN_BIN.exists() and GEN_BIN.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        return GEN_BIN
    GEN_BIN.parent.mkdir(exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
    subprocess.run(["go", "build", "-o", str(GEN_BIN), "."], cwd=GEN_DIR, env=env, check=True)
    return GEN_BIN


class GoPool(Pool):
    """Go worker processes (bench/gen/), JSON lines over their stdin and stdout."""

    def __init__(self, cfgs: list[WorkerConfig]) -> None:
        binary = build_go()
        self.procs = []
        self._bufs: list[bytes] = []
        for cfg in cfgs:
            p = subprocess.Popen(
                [str(binary)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "GOMAXPROCS": os.environ.get("GOMAXPROCS", "1")},
            )
            assert p.stdin is not None
            p.stdin.write(json.dumps(asdict(cfg)).encode() + b"\n")
            p.stdin.flush()
            self.procs.append(p)
            self._bufs.append(b"")
        self.pids = [p.pid for p in self.procs]

    def _fd(self, i: int) -> int:
        out = self.procs[i].stdout
        assert out is not None
        fd: int = out.fileno()
        return fd

    def recv_any(self, timeout: float) -> list[tuple[int, Any]]:
        # Lines already read come first: their pipe may not be readable again.
        if not any(b"\n" in b for b in self._bufs):
            fds = [self._fd(i) for i in range(len(self.procs))]
            for fd in wait(fds, timeout):
                assert isinstance(fd, int)
                i = fds.index(fd)
                chunk = os.read(self._fd(i), 1 << 22)
                if not chunk:
                    raise RuntimeError(f"worker {i} died (exit {self.procs[i].poll()})")
                self._bufs[i] += chunk
        out: list[tuple[int, Any]] = []
        for i, buf in enumerate(self._bufs):
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if msg[0] == "result":
                    for key in _ARRAYS:
                        msg[1][key] = array("q", msg[1][key])
                out.append((i, _checked(i, msg)))
            self._bufs[i] = buf
        return out

    def send_all(self, msg: tuple[Any, ...]) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                assert p.stdin is not None
                p.stdin.write(json.dumps(list(msg)).encode() + b"\n")
                p.stdin.flush()

    def stop(self) -> None:
        self.send_all(("stop",))
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def open_pool(cfgs: list[WorkerConfig], generator: str) -> Pool:
    """`generator`: "go", "python", or "auto" (Go where it is installed)."""
    if generator == "go" or (generator == "auto" and go_available()):
        return GoPool(cfgs)
    return Pool(cfgs)
