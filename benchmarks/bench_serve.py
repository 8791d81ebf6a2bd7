"""Load test of ``fineregion-pl serve``: dynamic batching against the same server with batching off.

Two real servers run on loopback at once, the same checkpoint (the quickstart's
``runs/quickstart/stage2/checkpoints/last.ckpt``, or ``$FINEREGION_SERVE_CKPT``) on the CPU:
``--max_batch_size 16 --batch_timeout 0.01`` and ``--max_batch_size 1``. The requests are the
first 32 synthetic test images of the benchmark (128 px, 2-6 shapes each) with every shape's box,
as JSON with a base64 PNG, sent by 16 concurrent clients (threads, one HTTP session each).

- warm-up: 50 requests to each server; then the memory of each server's process tree (RSS of the
  LitServe process, its HTTP process and its model worker) is read;
- rounds: each round sends ``per_round`` requests to each server, in an order rotated from round to
  round (4 rounds of 100, so 400 requests per server); throughput is requests answered per second
  of the round; the figure is the median over rounds of the batched / unbatched ratio;
- every answer must be a 200 whose captions equal ``RegionCaptioner.describe`` on the same image
  and boxes (computed in this process before the servers start);
- memory after the rounds is compared with memory after the warm-up (target: within 10%).

``python benchmarks/run.py --only serve`` (or ``python benchmarks/bench_serve.py``) runs it; a full
run also writes its figures into ``docs/serving.md`` between the ``bench_serve`` markers.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import machine, median, median_ratio, row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "runs" / "quickstart" / "stage2" / "checkpoints" / "last.ckpt"
DOC = ROOT / "docs" / "serving.md"
BEGIN, END = "<!-- bench_serve:begin -->", "<!-- bench_serve:end -->"
CLIENTS = 16
TARGET_SPEEDUP = 3.0


def requests_of(count: int) -> list[tuple[dict, list[str]]]:
    """``count`` synthetic test scenes as request bodies, with ``RegionCaptioner.describe``'s captions for them."""
    from fineregion_pl.api import RegionCaptioner
    from fineregion_pl.data.synthetic import make_scene

    captioner = RegionCaptioner.from_checkpoint(checkpoint())
    out = []
    for index in range(count):
        image, record = make_scene(0, "test", index)
        boxes = [r["box"] for r in record["regions"]]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(({"image": base64.b64encode(buffer.getvalue()).decode("ascii"), "boxes": boxes}, [r["caption"] for r in captioner.describe(image, boxes)]))
    return out


def checkpoint() -> Path:
    return Path(os.environ.get("FINEREGION_SERVE_CKPT", CHECKPOINT))


class Server:
    """``python -m fineregion_pl serve`` on a free loopback port, in its own process group."""

    def __init__(self, *options: str):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen([sys.executable, "-m", "fineregion_pl", "serve", "--ckpt_path", str(checkpoint()), "--port", str(self.port),
                                         "--device", "cpu", *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
        self.log: list[bytes] = []
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {b''.join(self.log)[-2000:].decode(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.read() == b"ok":
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server at {self.url} was not ready after {timeout} s")

    def rss_bytes(self) -> int:
        """Resident memory of the server's whole process tree."""
        import psutil

        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def load(server: Server, cases: list[tuple[dict, list[str]]], count: int, start: int) -> dict:
    """``count`` requests (cases ``start``, ``start + 1``... cycled) from ``CLIENTS`` concurrent clients:
    seconds, answers that were not 200, captions that differ from describe's, batch sizes seen."""
    import requests

    local = threading.local()

    def send(index: int) -> tuple[int, bool, int]:
        if not hasattr(local, "session"):  # one HTTP session (kept-alive connection) per client thread
            local.session = requests.Session()
        body, expected = cases[index % len(cases)]
        answer = local.session.post(f"{server.url}/predict", json=body, timeout=300)
        if answer.status_code != 200:
            return answer.status_code, False, 0
        payload = answer.json()
        return 200, [r["caption"] for r in payload["regions"]] == expected, payload["batch_size"]

    began = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(send, range(start, start + count)))
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "errors": sum(s != 200 for s, _, _ in results), "mismatches": sum(s == 200 and not same for s, same, _ in results),
            "batches": [b for s, _, b in results if s == 200], "statuses": [s for s, _, _ in results if s != 200]}


def run(quick: bool) -> list[dict]:
    if not checkpoint().is_file():
        return [row("serve", "throughput with batching / without (16 clients)", float("nan"), f">= {TARGET_SPEEDUP:g}x", False,
                    f"Unmet: no checkpoint at {checkpoint()}: run `fineregion-pl quickstart` first (or set FINEREGION_SERVE_CKPT)")]
    warmup, rounds, per_round = (8, 1, 16) if quick else (50, 4, 100)
    cases = requests_of(8 if quick else 32)
    servers = {"batched": Server("--max_batch_size", "16", "--batch_timeout", "0.01"), "unbatched": Server("--max_batch_size", "1")}
    try:
        for server in servers.values():
            server.wait_ready()
        totals = {name: {"seconds": [], "errors": 0, "mismatches": 0, "batches": [], "requests": 0, "statuses": []} for name in servers}
        for name, server in servers.items():
            first = load(server, cases, warmup, 0)
            totals[name]["errors"] += first["errors"]
            totals[name]["mismatches"] += first["mismatches"]
            totals[name]["statuses"] += first["statuses"]
            totals[name]["requests"] += warmup
        memory_after_warmup = {name: server.rss_bytes() for name, server in servers.items()}
        names = list(servers)
        for r in range(rounds):
            for name in names[r % 2:] + names[: r % 2]:
                result = load(servers[name], cases, per_round, warmup + r * per_round)
                totals[name]["seconds"].append(result["seconds"])
                totals[name]["errors"] += result["errors"]
                totals[name]["mismatches"] += result["mismatches"]
                totals[name]["batches"] += result["batches"]
                totals[name]["statuses"] += result["statuses"]
                totals[name]["requests"] += per_round
        memory_after_load = {name: server.rss_bytes() for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    return rows_of(totals, memory_after_warmup, memory_after_load, per_round, quick)


def rows_of(totals: dict, before: dict, after: dict, per_round: int, quick: bool) -> list[dict]:
    batched, unbatched = totals["batched"], totals["unbatched"]
    rate = {name: [per_round / s for s in t["seconds"]] for name, t in totals.items()}
    speedup = median_ratio(rate["batched"], rate["unbatched"])
    mean_batch = sum(batched["batches"]) / max(1, len(batched["batches"]))
    sent = batched["requests"] + unbatched["requests"]
    errors = batched["errors"] + unbatched["errors"]
    mismatches = batched["mismatches"] + unbatched["mismatches"]
    growth = {name: after[name] / before[name] for name in totals}
    rounds = len(batched["seconds"])
    setup = (f"{CLIENTS} concurrent clients, {rounds} round(s) of {per_round} requests per server after {batched['requests'] - rounds * per_round} warm-up requests; "
             f"{checkpoint().name} of the quickstart on the CPU")
    speed_note = (f"{median(rate['batched']):.1f} vs {median(rate['unbatched']):.1f} requests/s (median of rounds); mean batch {mean_batch:.1f} requests; {setup}")
    if speedup < TARGET_SPEEDUP:
        speed_note = "Unmet: " + speed_note
    rows = [
        row("serve", "throughput with batching / without (16 clients)", speedup, f">= {TARGET_SPEEDUP:g}x", speedup >= TARGET_SPEEDUP, speed_note),
        row("serve", "requests answered 200 (both servers)", (sent - errors) / sent, "1.0 (no errors)", errors == 0,
            f"{sent - errors} of {sent}" + ("" if errors == 0 else f"; Unmet: {errors} answers were not 200 ({failures(totals)})")),
        row("serve", "answers whose captions equal RegionCaptioner.describe", (sent - errors - mismatches) / max(1, sent - errors), "1.0", mismatches == 0,
            f"{sent - errors - mismatches} of {sent - errors}" + ("" if mismatches == 0 else "; Unmet: batched generation changed some captions")),
        row("serve", "memory after the load / after the warm-up (batched server)", growth["batched"], "<= 1.10", growth["batched"] <= 1.10,
            f"RSS of the server's processes: {before['batched'] / 2**20:.0f} -> {after['batched'] / 2**20:.0f} MiB; unbatched server "
            f"{before['unbatched'] / 2**20:.0f} -> {after['unbatched'] / 2**20:.0f} MiB ({growth['unbatched']:.3f}x)" + ("" if growth["batched"] <= 1.10 else "; Unmet: memory grew")),
    ]
    if not quick:
        write_doc(rows)
    return rows


def failures(totals: dict) -> str:
    """Which server gave which non-200 statuses, e.g. ``unbatched: 2x 504``."""
    from collections import Counter

    return "; ".join(f"{name}: " + ", ".join(f"{n}x {status}" for status, n in sorted(Counter(t["statuses"]).items()))
                     for name, t in totals.items() if t["statuses"])


def write_doc(rows: list[dict]) -> None:
    """The figures into ``docs/serving.md`` between the markers (the page keeps the rest)."""
    if not DOC.is_file() or BEGIN not in DOC.read_text():
        return
    m = machine()
    command = "python " + shlex.join(sys.argv) if sys.argv and sys.argv[0].endswith(".py") else "python benchmarks/run.py --only serve"
    lines = [BEGIN, "", f"Measured {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} by `{command}` "
             f"on {m['nproc']} CPUs ({m['cpu']}), load average {', '.join(f'{x:.1f}' for x in m['load'] or ())} at the end:", "",
             "| figure | value | target | met | note |", "|---|---|---|---|---|"]
    lines += [f"| {r['figure']} | {r['value']:.3g} | {r['target']} | {'yes' if r['met'] else 'NO'} | {r['note']} |" for r in rows]
    text = DOC.read_text()
    DOC.write_text(text[: text.index(BEGIN)] + "\n".join(lines + ["", END]) + text[text.index(END) + len(END):])


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r)
