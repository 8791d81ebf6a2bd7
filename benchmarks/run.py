"""Run every benchmark and write the table: ``python benchmarks/run.py [--only NAME ...] [--quick]``.

Each ``benchmarks/bench_<name>.py`` exposes ``run(quick: bool) -> list[dict]`` (rows with the keys
of :data:`benchmarks.ROW_KEYS`); this script finds them by file name, runs them in name order,
prints one table of figures with their targets, and writes it to ``benchmarks/results.md`` with
the date, the machine and the command. Adding a benchmark is adding a ``bench_<name>.py``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import math
import shlex
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from benchmarks import ROW_KEYS, machine, row  # noqa: E402

BUSY_MARGIN = 0.5
"""Load average above the CPU count that says another job shared the machine: the run's own torch
threads alone keep the 1-minute load at about the CPU count (2.0-2.05 on a quiet 2-core machine)."""


def discover() -> dict[str, Path]:
    """``{name: path}`` of every ``benchmarks/bench_<name>.py``, sorted by name."""
    return {p.stem[len("bench_"):]: p for p in sorted(HERE.glob("bench_*.py"))}


def run_module(name: str, quick: bool) -> list[dict]:
    """Rows of one benchmark module; a module that fails gives one unmet row saying why."""
    try:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        rows = list(module.run(quick=quick))
        for r in rows:
            missing = [k for k in ROW_KEYS if k not in r]
            if missing:
                raise ValueError(f"bench_{name}.run() returned a row without {missing}: {r}")
        return rows
    except Exception as err:  # noqa: BLE001 - one broken benchmark must not hide the others
        traceback.print_exc()
        return [row(name, "benchmark failed", math.nan, "runs", False, f"{type(err).__name__}: {err}")]


def format_value(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def table(rows: list[dict]) -> str:
    lines = ["| benchmark | figure | value | target | met | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        note = str(r["note"]).replace("|", "/")
        lines.append(f"| {r['name']} | {r['figure']} | {format_value(r['value'])} | {r['target']} | {'yes' if r['met'] else 'NO'} | {note} |")
    return "\n".join(lines)


def report(rows: list[dict], command: str, seconds: float) -> str:
    m = machine()
    load = ", ".join(f"{x:.1f}" for x in m["load"]) if m["load"] else "unknown"
    met = sum(r["met"] for r in rows)
    return "\n".join([
        "# Benchmark results",
        "",
        f"- date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {m['nproc']} CPUs (nproc), {m['cpu']}; torch {m['torch']} with {m['threads']} threads; "
        f"load average at the end (1/5/15 min): {load}",
        f"- command: `{command}` ({seconds:.0f} s)",
        f"- targets met: {met} of {len(rows)}",
        *([f"- **warning**: load average {m['load'][0]:.1f} exceeds the {m['nproc']} CPUs while {m['threads']} torch threads ran: "
           "other jobs held the cores, and ops with several threads wait for a descheduled thread at every parallel "
           "region, so multi-threaded figures are distorted (see benchmarks/README.md); rerun on a quiet machine"]
          if m["load"] and m["threads"] > 1 and m["load"][0] > m["nproc"] + BUSY_MARGIN else []),
        "",
        "Every value is a ratio of two things measured in the same run (interleaved rounds, median of the",
        "per-round ratios), so it says more than the raw times on a shared machine. See benchmarks/README.md.",
        "",
        table(rows),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    available = discover()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=sorted(available), help="run only these (bench_NAME.py)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds: checks the benchmarks run, figures mean nothing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default, as the targets assume)")
    parser.add_argument("--out", type=Path, default=HERE / "results.md", help="where to write the table (default: %(default)s)")
    args = parser.parse_args(argv)
    names = args.only or list(available)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/run.py" + ("" if argv is None and len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:] if argv is None else argv))
    start = time.perf_counter()
    rows: list[dict] = []
    for name in names:
        print(f"running bench_{name} ...", file=sys.stderr, flush=True)
        rows += run_module(name, args.quick)
    text = report(rows, command, time.perf_counter() - start)
    print(text)
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(r["figure"] == "benchmark failed" for r in rows) else 0  # unmet targets are findings, not errors


if __name__ == "__main__":
    sys.exit(main())
