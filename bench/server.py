"""The server under test: start `gb6 run` (or attach to a running one) and watch its CPU and RSS."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

# The harness creates its users through the admin API (two requests per user): at the default
# per-credential limit (50/s after a burst of 500) 1,000 users took 31 s. A server the harness
# starts itself gets this instead; messaging limits stay the defaults.
BOOTSTRAP_LIMITS = "[limits]\nadmin_rate = 100000.0\nadmin_burst = 100000\n"


@dataclass
class Server:
    ws: str
    http: str
    admin_token: str
    pid: int | None
    proc: subprocess.Popen[bytes] | None = None
    link: str = ""  # an origin's link address (`gb6 origin`)
    data_dir: Path | None = None
    log_path: Path | None = None
    command: list[str] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @classmethod
    def start(
        cls,
        out_dir: Path,
        extra_args: list[str],
        timeout_s: float = 60.0,
        keep_data: bool = False,
        switch_interval_ms: float = 0.0,
        gc_log: bool = False,
        prelude: str = "",
        command: str = "run",
        args: list[str] | None = None,
        need_token: bool = True,
        log_name: str = "server",
    ) -> Server:
        """`command` (`run`, `origin`, `edge`) with `args` (default: a `run` on a fresh data
        directory, ports picked by the OS); `need_token`: an edge prints no admin token.
        Both options run the same `gb6` entry point under `python -c`; the server code is
        unchanged. `switch_interval_ms`: `sys.setswitchinterval` first (GIL hand-off).
        `gc_log`: a `gc.callbacks` hook prints every collection of 2 ms or more to stderr as
        `{"event": "bench_gc", "gen": g, "ms": d, "at": unix_s, "collected": n}`.
        `prelude`: Python run first (experiments such as `import gc; gc.set_threshold(...)`)."""
        tmp = tempfile.TemporaryDirectory(prefix="gb6-bench-")
        data = Path(tmp.name) / "data"
        gb6 = shutil.which("gb6", path=str(Path(sys.executable).parent)) or "gb6"
        head = [gb6]
        if switch_interval_ms > 0 or gc_log or prelude:
            code = "import sys\n"
            if prelude:
                code += prelude + "\n"
            if switch_interval_ms > 0:
                code += f"sys.setswitchinterval({switch_interval_ms / 1000!r})\n"
            if gc_log:
                code += _GC_HOOK
            code += "from node.cli import main\nsys.exit(main(sys.argv[1:]))\n"
            head = [sys.executable, "-c", code]
        own_data = args is None
        if args is None:
            args = ["--data", str(data), "--ws-port", "0", "--http-port", "0"]
            if "--config" not in extra_args and not any(
                a.startswith("--config=") for a in extra_args
            ):
                conf = Path(tmp.name) / "bench.toml"
                conf.write_text(BOOTSTRAP_LIMITS)
                args += ["--config", str(conf)]
        cmd = [*head, command, *args, *extra_args]
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / f"{log_name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log = log_path.open("wb")
        # Children inherit RLIMIT_NOFILE: the caller raised it before starting us.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        token = os.environ.get("GB6_ADMIN_TOKEN", "")
        ready: dict[str, str] | None = None
        lines: list[str] = []
        deadline = time.monotonic() + timeout_s
        reader = _LineReader(proc.stdout, log)
        while ready is None:
            line = reader.get(max(0.0, deadline - time.monotonic()))
            if line is None:
                proc.kill()
                log.close()
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"gb6 {command} did not become ready (exit={proc.poll()}); stdout={lines!r}\n"
                    f"stderr tail:\n{tail}"
                )
            text = line.decode(errors="replace").strip()
            lines.append(text)
            try:
                obj = json.loads(text)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            if obj.get("event") == "admin_token":
                token = str(obj["token"])
            elif obj.get("event") == "ready":
                ready = obj
        reader.detach()  # from now on stdout goes to the log only
        if not token and need_token:
            proc.kill()
            raise RuntimeError("no admin token: neither printed nor in GB6_ADMIN_TOKEN")
        server = cls(
            ws=str(ready.get("ws", "")),
            http=ready["http"].rstrip("/"),
            link=str(ready.get("link", "")),
            admin_token=token,
            pid=proc.pid,
            proc=proc,
            data_dir=data if own_data else None,
            log_path=log_path,
            command=cmd,
            _tmp=None if keep_data else tmp,
        )
        return server

    @classmethod
    def attach(cls, ws: str, http: str, token: str, pid: int | None) -> Server:
        if pid is None:
            pid = _pid_listening_on(ws)
        return cls(ws=ws, http=http.rstrip("/"), admin_token=token, pid=pid)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
        return rc

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


_GC_HOOK = """
import gc, time, json
_gc_t = [0.0]
def _gc_cb(phase, info):
    if phase == "start":
        _gc_t[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _gc_t[0]) * 1000
    if ms >= 2.0:
        sys.stderr.write(json.dumps({"event": "bench_gc", "gen": info["generation"],
            "ms": round(ms, 2), "at": time.time(), "collected": info["collected"]}) + "\\n")
gc.callbacks.append(_gc_cb)
"""


def gc_pauses(log_path: Path, start: float, end: float) -> list[dict[str, float]]:
    """The `bench_gc` lines of a server log between two unix times."""
    out: list[dict[str, float]] = []
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if '"bench_gc"' not in line:
                continue
            with contextlib.suppress(ValueError):
                obj = json.loads(line[line.index("{") :])
                if start <= obj["at"] <= end:
                    out.append(obj)
    return out


class _LineReader:
    """Reads the child's stdout in a thread: lines until detached, then copies into the log."""

    def __init__(self, stream: IO[bytes], log: IO[bytes]) -> None:
        self.stream = stream
        self.log = log
        self.lines: list[bytes] = []
        self.cond = threading.Condition()
        self.detached = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for line in self.stream:
            with self.cond:
                if self.detached:
                    with contextlib.suppress(ValueError):
                        self.log.write(b"[stdout] " + line)
                        self.log.flush()
                else:
                    self.lines.append(line)
                    self.cond.notify_all()
        with self.cond:
            self.lines.append(b"")
            self.cond.notify_all()

    def get(self, timeout: float) -> bytes | None:
        with self.cond:
            self.cond.wait_for(lambda: bool(self.lines), timeout)
            if not self.lines or self.lines[0] == b"":
                return None
            return self.lines.pop(0)

    def detach(self) -> None:
        with self.cond:
            self.detached = True


def _pid_listening_on(ws_url: str) -> int | None:
    from urllib.parse import urlsplit

    port = urlsplit(ws_url).port
    with contextlib.suppress(psutil.Error, PermissionError):
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return int(conn.pid) if conn.pid else None
    return None


class ProcWatch:
    """CPU seconds and memory of a set of processes (and their children)."""

    def __init__(self, pids: list[int], *, children: bool = True) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.children = children

    def _all(self) -> list[psutil.Process]:
        if not self.children:
            return self.procs
        out: list[psutil.Process] = []
        for p in self.procs:
            out.append(p)
            with contextlib.suppress(psutil.Error):
                out.extend(p.children(recursive=True))
        return out

    def cpu_s(self) -> float:
        total = 0.0
        for p in self._all():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds per thread of the first process: `main` (tid = pid) and the others by
        tid and kernel name (Python thread names are not visible from outside); then each
        child process (if watched) by pid and the last word of its command line."""
        out: dict[str, float] = {}
        p = self.procs[0]
        with contextlib.suppress(psutil.Error):
            for t in p.threads():
                if t.id == p.pid:
                    key = "main"
                else:
                    comm = ""
                    with contextlib.suppress(OSError):
                        comm = Path(f"/proc/{p.pid}/task/{t.id}/comm").read_text().strip()
                    key = f"tid {t.id} ({comm})"
                out[key] = t.user_time + t.system_time
            # A child (the Kafka store's persister) as one entry: its own core, its own row.
            for child in p.children(recursive=True) if self.children else ():
                with contextlib.suppress(psutil.Error):
                    t = child.cpu_times()
                    out[f"child {child.pid} ({child.cmdline()[-1]})"] = t.user + t.system
        return out

    def rss(self) -> int:
        total = 0
        for p in self._all():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def uss(self) -> int:
        total = 0
        for p in self._all():
            with contextlib.suppress(psutil.Error):
                total += p.memory_full_info().uss
        return total

    def threads(self) -> int:
        total = 0
        for p in self._all():
            with contextlib.suppress(psutil.Error):
                total += p.num_threads()
        return total

    def fds(self) -> int:
        total = 0
        for p in self._all():
            with contextlib.suppress(psutil.Error):
                total += p.num_fds()
        return total


class CpuMeter:
    """CPU% (100 = one core) of a ProcWatch between marks."""

    def __init__(self, watch: ProcWatch) -> None:
        self.watch = watch
        self.t = time.monotonic()
        self.cpu = watch.cpu_s()

    def mark(self) -> float:
        t, cpu = time.monotonic(), self.watch.cpu_s()
        pct = 100.0 * (cpu - self.cpu) / max(1e-9, t - self.t)
        self.t, self.cpu = t, cpu
        return pct
