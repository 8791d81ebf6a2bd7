"""Benchmarks of fineregion-pl: ``python benchmarks/run.py`` runs every ``benchmarks/bench_*.py``.

A benchmark module exposes ``run(quick: bool) -> list[dict]``; each dict is one figure (see
:func:`row`). This package also holds the measuring tools the modules share. The machine is shared
and noisy, so every figure is a ratio of two things measured in the same run: time the candidates
in interleaved rounds (:func:`time_interleaved`) and take the median of the per-round ratios
(:func:`median_ratio`).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

ROW_KEYS = ("name", "figure", "value", "target", "met", "note")


def row(name: str, figure: str, value: float, target: str, met: bool, note: str = "") -> dict:
    """One benchmark figure: what was measured (``figure``), its ``value``, the ``target`` it is
    held to (text, e.g. ``">= 20x"``), whether it is ``met``, and a ``note`` (sizes, method, and for
    an unmet target the gap and what limits it)."""
    return dict(name=name, figure=figure, value=float(value), target=target, met=bool(met), note=note)


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall time (s) of each function in ``rounds`` interleaved rounds.

    Every round runs each function once, in an order rotated from round to round, so slow phases of
    a shared machine hit all candidates alike. Returns per-function lists of ``rounds`` times, index
    ``r`` of every list measured in the same round.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def measure_interleaved(fns: dict[str, Callable[[], float]], rounds: int, warmup: int = 0) -> dict[str, list[float]]:
    """Like :func:`time_interleaved`, for candidates that measure themselves.

    Each function runs once per round (order rotated from round to round) and returns its own
    figure for that run: a steady-state step time, a rate... (what the wall time of the whole call
    would blur, e.g. a Trainer's set-up or a DataLoader's worker start). Returns per-function
    lists of ``rounds`` values, index ``r`` of every list measured in the same round.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    values: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            values[name].append(float(fns[name]()))
    return values


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of ``numerator[r] / denominator[r]``."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_memory_bytes(fn: Callable[[], Any]) -> tuple[int, int, Any]:
    """Peak and retained bytes the CPU allocator hands out while ``fn`` runs.

    Measured with ``torch.profiler.profile(profile_memory=True)``: every allocation and free of
    torch's CPU allocator is an event (``[memory]``, signed byte count); their running sum in time
    order is the live memory above what existed before ``fn``. Sees every tensor torch allocates,
    kernel temporaries included; not memory a BLAS library mallocs on its own (packing buffers).

    Returns:
        ``(peak, retained, result)``: the highest running sum, the sum at the end (what ``fn``'s
        result keeps alive), and ``fn``'s result.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live, result


def matmul(n: int) -> tuple[Callable[[], Any], float]:
    """A square float32 ``torch.mm`` of side ``n`` (inputs made once) and its FLOPs, ``2 n^3``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return (lambda: torch.mm(a, b)), 2.0 * n**3


def tensor_copy(nbytes: int) -> tuple[Callable[[], Any], float]:
    """A float32 ``dst.copy_(src)`` of ``nbytes`` and the memory traffic it moves (read + write)."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2.0 * src.numel() * 4


def machine() -> dict:
    """What the figures were measured on."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    load: Optional[tuple[float, float, float]] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return dict(nproc=nproc, cpu=model, torch=torch.__version__, threads=torch.get_num_threads(), load=load)


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
