"""Running many ``fineregion-pl`` runs on one machine, in order or side by side.

A :class:`Run` is a list of ``fineregion-pl`` command lines (``fit`` then ``test``...), the run it
must wait for, and a marker file that says it finished. :func:`run_all` runs them one after the
other in this process (``jobs=1``) or as up to ``jobs`` child processes at once, each with
``cores // jobs`` torch threads. On a small machine two single-threaded runs side by side get more
done than one run on two threads: the small matmuls of a tiny model do not scale across threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fineregion_pl.model.errors import FineRegionError


@dataclass
class Run:
    """One unit of work.

    Attributes:
        name: shown in progress lines and errors.
        commands: ``fineregion-pl`` argument lists, run in order.
        done: a file that exists once the run has finished (the run is skipped when it exists).
        log: where a child process's output goes.
        after: name of the run that must finish first.
        mark_done: write ``done`` (with the run's seconds) after the commands; ``False`` when the
            last command writes it itself (``test`` writes ``results.json``).
    """

    name: str
    commands: list[list[str]]
    done: Path
    log: Path
    after: Optional[str] = None
    mark_done: bool = True
    seconds: float = field(default=0.0, init=False)


def _finish(run: Run, started: float) -> None:
    run.seconds = time.time() - started
    if run.mark_done:
        run.done.parent.mkdir(parents=True, exist_ok=True)
        tmp = run.done.with_suffix(".tmp")
        tmp.write_text(f"{run.seconds:.1f}\n")
        tmp.replace(run.done)


def _threads_env(jobs: int, threads: Optional[int] = None) -> dict[str, str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # a SLURM allocation, not the node
    threads = str(threads or max(1, cores // jobs))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def run_all(runs: list[Run], jobs: int = 1, threads: Optional[int] = None) -> list[Run]:
    """Run every unfinished run, respecting ``after``; return the runs in the order they finished.

    ``threads``: torch threads of each child process (default: ``cores // jobs``).

    A failing run stops the whole queue (runs in flight are stopped) with a one-line error naming
    the run, its command and its log.
    """
    if jobs < 1:
        raise FineRegionError(f"--jobs must be at least 1, got {jobs}")
    finished = {run.name for run in runs if run.done.is_file()}
    todo = [run for run in runs if run.name not in finished]
    names = {run.name for run in runs}
    missing = [run.after for run in todo if run.after and run.after not in names]
    if missing:
        raise FineRegionError(f"run(s) wait for unknown run(s): {sorted(set(missing))}")
    total, completed = len(todo), []

    def report(run: Run) -> None:
        completed.append(run)
        print(f"[{len(completed)}/{total}] {run.name} finished in {run.seconds:.0f} s", flush=True)

    if jobs == 1:
        from fineregion_pl.train.cli import run_lightning

        for run in todo:  # listed so that every run comes after the one it waits for
            started = time.time()
            print(f"[{len(completed) + 1}/{total}] {run.name} ...", flush=True)
            for command in run.commands:
                if command[:2] == ["sequence", "--commands"]:
                    import json

                    sequence(json.loads(command[2]))
                else:
                    run_lightning(command)
            _finish(run, started)
            report(run)
        return completed

    # fewer runs than jobs to start with (one row, one seed): fewer, wider processes
    jobs = min(jobs, max(1, sum(1 for run in todo if not run.after or run.after in finished)))
    env = _threads_env(jobs, threads)
    running: dict[str, tuple[Run, subprocess.Popen, float, list[list[str]]]] = {}
    try:
        while todo or running:
            ready = [run for run in todo if not run.after or run.after in finished]
            while ready and len(running) < jobs:
                run = ready.pop(0)
                todo.remove(run)
                run.log.parent.mkdir(parents=True, exist_ok=True)
                print(f"start {run.name} (log: {run.log})", flush=True)
                running[run.name] = (run, None, time.time(), list(run.commands))  # type: ignore[assignment]
            for name, (run, process, started, left) in list(running.items()):
                if process is not None and process.poll() is None:
                    continue
                if process is not None and process.returncode != 0:
                    raise FineRegionError(
                        f"run {run.name} failed (exit {process.returncode}) in `fineregion-pl {' '.join(process.args[3:])}`; log: {run.log}"
                    )
                if left:
                    command = left.pop(0)
                    with open(run.log, "a") as log:
                        log.write(f"\n$ fineregion-pl {' '.join(command)}\n")
                        log.flush()
                        child = subprocess.Popen([sys.executable, "-m", "fineregion_pl", *command], stdout=log, stderr=subprocess.STDOUT, env=env)
                    running[name] = (run, child, started, left)
                    continue
                del running[name]
                _finish(run, started)
                finished.add(name)
                report(run)
            time.sleep(0.5)
    finally:
        for _, process, _, _ in running.values():
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait()
    return completed


def sequence(commands: Optional[list[str]] = None) -> None:
    """Run ``fineregion-pl`` Lightning command lines one after the other in this process.

    Args:
        commands: each a shell-quoted command line without the program name
            (``"predict --config a.yaml --ckpt_path last.ckpt"``).
    """
    import shlex

    from fineregion_pl.train.cli import run_lightning

    for line in commands or []:
        print(f"\n$ fineregion-pl {line}", flush=True)
        run_lightning(shlex.split(line))
