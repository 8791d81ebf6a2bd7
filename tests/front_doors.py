"""Shared helpers of the demo and server tests: PNG bytes, a recording stand-in captioner, a verb
started as a real process on loopback, and what the browser tests need."""

from __future__ import annotations

import io
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
INSTALL = "bash .ci/install-demo.sh installs it"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class StubCaptioner:
    """Stands in for RegionCaptioner where the model's words do not matter: records each describe
    call and answers one row per box."""

    def __init__(self, error: Exception | None = None):
        self.calls: list[tuple[tuple[int, int], list]] = []
        self.error = error

    def describe(self, image, boxes, ids=None, masks=None):
        self.calls.append((image.size, [list(b) for b in boxes]))
        if self.error is not None:
            raise self.error
        return [{"region_id": i, "box": list(b), "caption": f"region {i}", "category": "circle", "category_id": 0, "score": 0.5 + i / 100}
                for i, b in enumerate(boxes)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VerbProcess:
    """``python -m fineregion_pl VERB ...`` as a child process (its own process group), its stdout
    lines in a queue and its stderr in a log file; :meth:`wait_for` a line, :meth:`stop` it."""

    def __init__(self, args: list[str], log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen([sys.executable, "-m", "fineregion_pl", *args], stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env=env, cwd=log_path.parent, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout], daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        """The first stdout line matching ``pattern``; fails the test with the log if the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found
        self.log.flush()
        pytest.fail(f"no line matching {pattern!r} (exit code {self.process.poll()}):\n{''.join(self.seen)[-2000:]}\n{self.log_path.read_text()[-4000:]}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the process group (the server's workers too), SIGKILL after 20 s."""
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def browser_stack_missing(*modules: str) -> str | None:
    """Why the browser tests cannot run here (chromium, playwright or a module missing), or None."""
    import importlib.util

    if not Path(CHROMIUM).exists():
        return f"chromium is not installed ({INSTALL})"
    for module in (*modules, "playwright"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({INSTALL})"
    return None


def draw_box(page, box, zoom: int, image_side: int) -> None:
    """Drag a box (image pixels) on the annotator's canvas, where the image is shown ``zoom`` times larger, centred."""
    canvas = page.locator("#annotator canvas").bounding_box()
    side = image_side * zoom
    left = canvas["x"] + (canvas["width"] - side) / 2
    top = canvas["y"] + (canvas["height"] - side) / 2
    x0, y0, x1, y1 = (v * zoom for v in box)
    page.mouse.move(left + x0, top + y0)
    page.mouse.down()
    page.mouse.move(left + (x0 + x1) / 2, top + (y0 + y1) / 2, steps=4)
    page.mouse.move(left + x1, top + y1, steps=4)
    page.mouse.up()
