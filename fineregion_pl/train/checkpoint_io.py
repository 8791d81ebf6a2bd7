"""Checkpoint files that are either the old one or the complete new one, never half of either.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives
in the system temp folder; committing it is ``shutil.move``, which across file systems copies
straight onto the final name, so a full checkpoint disk leaves ``last.ckpt`` truncated (the
previous good one is already gone). :class:`AtomicCheckpointIO` writes a temporary file next to
the target, fsyncs it and renames it over the target (``os.replace``, atomic on POSIX); on any
error the temporary file is removed and the old checkpoint stays.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fineregion_pl.model.errors import BadInputError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with same-folder temporary files and an atomic rename (local paths; others as Lightning does)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomic(checkpoint, Path(str(path).removeprefix("file://")))

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Lightning's load, with a truncated or foreign file reported as one line naming it (resume with ``--ckpt_path``)."""
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise BadInputError(f"checkpoint not found: {path}") from None
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadInputError(f"cannot read checkpoint {path} (truncated or not a checkpoint?): {first[:200]}") from None


def save_atomic(checkpoint: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` through ``.<name>.tmp-<pid>`` in the same folder, fsync and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


def use_atomic_checkpoints(trainer: Any) -> None:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` when it uses Lightning's plain
    ``TorchCheckpointIO`` (DeepSpeed and FSDP write folders through their own engines)."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
