"""A callback for tests that run the CLI in other processes: each rank saves its weights.

Given to ``fineregion-pl fit`` in a config's ``trainer.callbacks`` (with this folder on
``PYTHONPATH``): at the start and at the end of training every rank writes
``OUT_DIR/rank{global_rank}-{start,end}.pt`` holding its module's ``state_dict`` (tensors only),
so a test can check that data-parallel ranks hold identical weights and that training changed them,
and ``OUT_DIR/rank{global_rank}.json``: the cluster environment Lightning detected and the world size.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class RankStateDump(L.Callback):
    """Writes every rank's ``state_dict`` at the start and at the end of ``fit``.

    Args:
        out_dir: the folder to write ``rank{R}-start.pt`` and ``rank{R}-end.pt`` into.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def _dump(self, trainer: L.Trainer, module: L.LightningModule, when: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # sharded weights (FSDP2's DTensors) are gathered whole: every rank runs the same gathers
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone() for k, v in module.state_dict().items()}
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}-{when}.pt")

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._dump(trainer, module, "start")
        environment = getattr(trainer.strategy, "cluster_environment", None)
        info = {
            "cluster_environment": type(environment).__name__,
            "auto_requeue": getattr(environment, "auto_requeue", None),
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "backend": getattr(trainer.strategy, "_process_group_backend", None),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._dump(trainer, module, "end")
