"""Optimiser and learning-rate schedule shared by both stages."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: float, min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``.

    With an unknown total (``inf``: a streaming dataset without ``max_steps``) the rate stays
    constant after warm-up.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if not math.isfinite(total_steps) or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw_with_schedule(param_groups: Iterable[dict], weight_decay: float, warmup_steps: int, total_steps: float) -> dict:
    """AdamW over ``param_groups`` (each with its own ``lr``) and a per-step warm-up/cosine schedule,
    in the form ``LightningModule.configure_optimizers`` returns."""
    groups = [g for g in param_groups if any(p.requires_grad for p in g["params"])]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    scheduler = warmup_cosine(optimizer, warmup_steps, total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
