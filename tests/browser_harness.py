"""Run a Playwright scenario (a node script in tests/browser/) against a real node, from a test.

The pattern every browser test follows (web client, admin console, meetings):

    from tests.browser_harness import run_scenario, open_scenario, browser_tools

    @pytest.fixture
    def tools():                                     # sync: skips (with the reason) without
        return browser_tools()                       # chromium, node or playwright-core

    async def test_something(node, tools, request):  # tools: a sync fixture calling it
        with trio.fail_after(40):                    # kills node and Chromium when it fires
            out = await run_scenario(tools, "web_chat.mjs", {"http": node.http_url, ...},
                                     request.node.name)
        assert out["shown"] == [...]

A scenario script imports `scenario` from `tests/browser/harness.mjs`:

    import { scenario } from './harness.mjs';
    await scenario(async (h) => {
      const page = await h.newPage('alice');        // one browser context per user
      await page.goto(h.input.http + '/app/');
      await h.shot(page, 'signed-in');              // <artifacts>/<name>.png
      h.emit({ step: 'ready' });                    // Scenario.next_emit() in Python
      const cmd = await h.command();                // Scenario.send({...}) from Python
      return { text: await page.textContent('h1') };  // the result, JSON
    });

`run_scenario` is the one-shot form (input in, result out). `open_scenario` keeps the
conversation open so that the test can act between steps (kill a socket, send from the Python
SDK, start an aiortc viewer) while the browser waits:

    async with open_scenario(tools, "web_resume.mjs", {...}, "test_resume") as sc:
        await sc.next_emit()                        # {"step": ...} from h.emit
        await sc.send({"go": True})
        result = await sc.result()

Rules it keeps: the browser is Debian's chromium launched headless by harness.mjs with the flags
the media tests need (fake devices and capture UI, loopback ICE without mDNS) and no network but
loopback; the test bounds a scenario with `trio.fail_after` around it (and MAX_SCENARIO_S
bounds it anyway): on timeout, failure or cancellation the node process and every process under
it (Chromium's included) are killed. Screenshots and the script's log (`<script>.log`: console
of every page, uncaught page errors, failed requests) land in
`${GB6_ARTIFACTS:-tests/artifacts}/<name>/` (emptied when the scenario starts), gitignored. A
scenario that throws is reported as `ScenarioFailed` with its message and the path of its
artifacts; it screenshots every open page first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import psutil
import trio

from tests.services import require_tool

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "browser"
MAX_SCENARIO_S = 120.0  # a safety net: tests bound their scenarios tighter with trio.fail_after
MAX_LINE = 4 << 20  # one JSON line from the script (results with screenshots' paths, not data)


def artifacts_root() -> Path:
    return Path(os.environ.get("GB6_ARTIFACTS") or ROOT / "tests" / "artifacts")


@attrs.frozen
class BrowserTools:
    chromium: str  # the executable
    playwright_dir: str  # where node_modules/playwright-core is


def browser_tools() -> BrowserTools:
    """Chromium and playwright-core, or skip (fail under GB6_REQUIRE_SERVICES=1). Call it from
    a sync test or fixture: inside trio a skip loses its reason."""
    return BrowserTools(require_tool("chromium"), require_tool("playwright"))


class ScenarioFailed(AssertionError):
    """The script threw, exited without a result, or said something that is not JSON."""


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120] or "scenario"


class _Lines:
    """Lines from a byte stream, each at most MAX_LINE bytes."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def next(self) -> bytes | None:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                return line
            if len(self._buf) > MAX_LINE:
                raise ScenarioFailed(f"a line of the script's output exceeds {MAX_LINE} bytes")
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buf += chunk


@attrs.define
class Scenario:
    """A running scenario script: read what it emits, send it commands, await its result."""

    proc: trio.Process
    artifacts: Path
    _lines: _Lines
    _result: dict[str, Any] | None = None
    _done: bool = False

    async def _next(self) -> dict[str, Any]:
        if self._done:
            raise ScenarioFailed("the scenario has already finished")
        line = await self._lines.next()
        if line is None:
            self._done = True
            raise ScenarioFailed(
                f"the scenario exited without a result; see {self.artifacts}/ for its log"
            )
        try:
            msg = json.loads(line)
        except ValueError:
            raise ScenarioFailed(f"the scenario printed {line[:200]!r}, not JSON") from None
        if not isinstance(msg, dict):
            raise ScenarioFailed(f"the scenario printed {line[:200]!r}, not an object")
        if "error" in msg:
            self._done = True
            err = msg["error"]
            raise ScenarioFailed(
                f"scenario failed: {err.get('message')}\n{err.get('stack', '')}\n"
                f"artifacts (screenshots, page console): {self.artifacts}/"
            )
        if "result" in msg:
            self._done = True
            self._result = {"result": msg["result"]}
        return msg

    async def next_emit(self) -> dict[str, Any]:
        """The next object the script passed to `h.emit`."""
        msg = await self._next()
        if "emit" not in msg:
            raise ScenarioFailed(f"expected an emit, the scenario finished with {msg}")
        emitted: dict[str, Any] = msg["emit"]
        return emitted

    async def send(self, command: dict[str, Any]) -> None:
        """One command line for the script's `await h.command()`."""
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(json.dumps(command).encode() + b"\n")

    async def result(self) -> Any:
        """The script's return value (emits not read yet are skipped)."""
        while self._result is None:
            await self._next()
        return self._result["result"]


def _kill_tree(pid: int) -> None:
    """SIGKILL the process and everything under it. Playwright starts Chromium in a process
    group of its own, so a group kill would miss it: walk the tree instead."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


@asynccontextmanager
async def open_scenario(
    tools: BrowserTools,
    script: str,
    input: dict[str, Any],
    name: str,
) -> AsyncIterator[Scenario]:
    """Start `tests/browser/<script>` with `input`. Bound it with the caller's cancel scope
    (`trio.fail_after`); `MAX_SCENARIO_S` bounds it anyway. On leaving, the script must have
    finished (its result read) or it is killed with its browser; the process tree is always
    reaped, on cancellation too."""
    artifacts = artifacts_root() / _safe_name(name)
    shutil.rmtree(artifacts, ignore_errors=True)  # only this run's screenshots and log
    artifacts.mkdir(parents=True, exist_ok=True)
    setup = {"chromium": tools.chromium, "artifacts": str(artifacts), "input": input}
    log = await trio.to_thread.run_sync(open, artifacts / f"{_safe_name(script)}.log", "wb")
    with log, trio.fail_after(MAX_SCENARIO_S):
        proc = await trio.lowlevel.open_process(
            ["node", str(SCRIPTS / script)],
            cwd=tools.playwright_dir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            await proc.stdin.send_all(json.dumps(setup).encode() + b"\n")
            scenario = Scenario(proc, artifacts, _Lines(proc.stdout))
            yield scenario
            if scenario._result is not None:
                # Finished: give it a moment to close its browser and exit on its own.
                with trio.move_on_after(10):
                    await proc.wait()
        finally:
            _kill_tree(proc.pid)
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await proc.wait()
                for pipe in (proc.stdin, proc.stdout):
                    if pipe is not None:
                        await pipe.aclose()


async def run_scenario(
    tools: BrowserTools,
    script: str,
    input: dict[str, Any],
    name: str,
) -> Any:
    """Run a scenario to its end and return its result (see the module docstring)."""
    async with open_scenario(tools, script, input, name) as sc:
        return await sc.result()
