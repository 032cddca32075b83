"""Open a local page in a real headless Chromium over the DevTools protocol, and report what
it saw: console messages, uncaught exceptions, log errors, network requests, a measure of its
charts, and a screenshot.

Debian's ``chromium`` (``apt-get install -y chromium``). Started with a fresh profile and no
background networking; ``--remote-debugging-port=0`` lets it pick a free port, which it
writes to ``DevToolsActivePort`` in the profile directory.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
    "--window-size=1200,1600",
)
_START_TIMEOUT_S = 120.0  # a cold start on a loaded 2-core machine took over 30 s
_LOAD_TIMEOUT_S = 30.0

# Measured in the page: every chart's SVG box and how many of its marks have a visible box.
MEASURE_CHARTS = """
JSON.stringify([...document.querySelectorAll('figure.chart')].map(figure => {
  const svg = figure.querySelector('svg');
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  const marks = svg ? [...svg.querySelectorAll('circle.estimate, rect.bar')] : [];
  const visible = marks.filter(mark => {
    const b = mark.getBoundingClientRect();
    return b.width > 0 && b.height > 0;
  });
  return {name: figure.dataset.chart, width: box.width, height: box.height,
          marks: marks.length, visible: visible.length};
}))
"""


def chromium_or_skip() -> str:
    """The chromium binary; skip without it, but fail in CI, saying exactly what is missing."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        message = (
            "the page test needs Debian's chromium on PATH (apt-get install -y chromium); "
            "none was found"
        )
        if os.environ.get("CI"):
            pytest.fail(f"required in CI: {message}")
        pytest.skip(message)
    return binary


@dataclass
class PageVisit:
    console: list[dict[str, Any]] = field(default_factory=list)  # Runtime.consoleAPICalled
    exceptions: list[dict[str, Any]] = field(default_factory=list)  # Runtime.exceptionThrown
    log_errors: list[dict[str, Any]] = field(default_factory=list)  # Log.entryAdded, error
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    charts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def console_errors(self) -> list[str]:
        return [
            " ".join(str(arg.get("value", arg.get("description", ""))) for arg in entry["args"])
            for entry in self.console
            if entry.get("type") in ("error", "assert")
        ]


class _Session:
    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        wanted = self._next_id
        self._socket.send(json.dumps({"id": wanted, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=_LOAD_TIMEOUT_S))
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self.events.append(message)

    def wait_for(self, method: str) -> None:
        deadline = time.monotonic() + _LOAD_TIMEOUT_S
        if any(event.get("method") == method for event in self.events):
            return
        while time.monotonic() < deadline:
            message = json.loads(self._socket.recv(timeout=_LOAD_TIMEOUT_S))
            self.events.append(message)
            if message.get("method") == method:
                return
        raise TimeoutError(f"no {method} within {_LOAD_TIMEOUT_S:g}s")


def visit(page: Path, *, screenshot: Path | None = None) -> PageVisit:
    """Load ``page`` in headless Chromium; return what it logged, requested and rendered."""
    binary = chromium_or_skip()
    with (
        # Chromium's helpers (crashpad, utility processes) may still be writing into the
        # profile for a moment after the browser exits: a leftover scratch file must not
        # fail the test.
        tempfile.TemporaryDirectory(
            prefix="upsell-chromium-", ignore_cleanup_errors=True
        ) as scratch,
        (Path(scratch) / "stderr.log").open("wb") as stderr,
    ):
        # A file, not a pipe: nobody reads chromium's chatter, and a full pipe would stall it.
        profile = Path(scratch) / "profile"
        process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # its own process group: its helpers go with it
        )
        try:
            port = _debugging_port(profile, process, Path(scratch) / "stderr.log")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                targets = json.loads(answer.read())
            target = next(t for t in targets if t.get("type") == "page")
            with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
                session = _Session(ws)
                for domain in ("Runtime", "Log", "Page", "Network"):
                    session.call(f"{domain}.enable")
                session.call("Page.navigate", url=page.resolve().as_uri())
                session.wait_for("Page.loadEventFired")
                measured = session.call(
                    "Runtime.evaluate", expression=MEASURE_CHARTS, returnByValue=True
                )
                if screenshot is not None:
                    shot = session.call(
                        "Page.captureScreenshot", format="png", captureBeyondViewport=True
                    )
                    screenshot.parent.mkdir(parents=True, exist_ok=True)
                    screenshot.write_bytes(base64.b64decode(shot["data"]))
                session.call("Runtime.evaluate", expression="0")  # drain late events
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    result = PageVisit(charts=json.loads(measured["result"]["value"]))
    for event in session.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            result.console.append(params)
        elif method == "Runtime.exceptionThrown":
            result.exceptions.append(params)
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            result.log_errors.append(params["entry"])
        elif method == "Network.requestWillBeSent":
            result.requests.append(params["request"]["url"])
    return result


def _debugging_port(profile: Path, process: subprocess.Popen[bytes], log: Path) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if marker.exists():
            first = marker.read_text().splitlines()[:1]
            if first and first[0].isdigit():
                return int(first[0])
        if process.poll() is not None:
            stderr = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"chromium exited with {process.returncode}: {stderr}")
        time.sleep(0.1)
    raise TimeoutError(f"chromium wrote no DevToolsActivePort within {_START_TIMEOUT_S:g}s")
