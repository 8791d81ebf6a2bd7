"""The non-finite-loss stop, agreed by every rank.

``model/errors.py: check_finite_loss`` raises on the rank whose loss is NaN or infinite. Under DDP,
DeepSpeed or FSDP that rank would leave the others waiting in the gradient all-reduce until the
collective timeout (30 minutes by default), so every rank first learns whether any rank's loss is
bad (one boolean all-reduce per step) and all of them stop at the same step, before backward.
"""

from __future__ import annotations

import math
from typing import Any

from fineregion_pl.model.errors import NonFiniteLossError, check_finite_loss


def stop_on_non_finite_loss(module: Any, losses: dict[str, Any]) -> None:
    """Raise :class:`NonFiniteLossError` on every rank when the loss of any rank is not finite.

    ``module`` is the LightningModule of the step (its trainer's strategy does the reduction; a module
    used outside a Trainer checks only its own loss). The rank with the bad loss names the bad terms;
    the others say that another rank stopped the run.
    """
    finite = math.isfinite(float(losses["loss"].detach()))
    trainer = getattr(module, "_trainer", None)
    any_rank_bad = trainer.strategy.reduce_boolean_decision(not finite, all=False) if trainer is not None else not finite
    if not any_rank_bad:
        return
    if not finite:
        check_finite_loss(losses["loss"], module.global_step, losses)
    raise NonFiniteLossError(
        f"training loss is non-finite on another rank at step {module.global_step} (this rank's loss is finite); every rank stopped before "
        "the optimizer step, so the last checkpoint on disk is the last good one: lower the learning rate or check the data"
    )
