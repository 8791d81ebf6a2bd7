"""The package's one error hierarchy: errors the command line reports as one line (no traceback).

Every layer raises these (the converters' skippable :class:`~fineregion_pl.data.convert.BadRecord`
is a :class:`BadInputError` too); nothing here imports torch, so light tools pay nothing for it."""

from __future__ import annotations

import math
from typing import Any


class FineRegionError(Exception):
    """Base of the errors ``fineregion-pl`` prints as ``fineregion-pl: error: <message>``."""


class BadInputError(FineRegionError, ValueError):
    """An input the user gave is malformed; the message names the file and the record."""


class NonFiniteLossError(FineRegionError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


def check_finite_loss(loss: Any, step: int, parts: dict[str, Any]) -> None:
    """Raise :class:`NonFiniteLossError` before a non-finite loss reaches backward and the weights.

    Raising here means the optimizer never applies the bad step, and the checkpoint callback
    (which runs after the step) never saves it: the last checkpoint on disk stays the last good one.
    """
    value = float(loss.detach())
    if math.isfinite(value):
        return
    bad = [name for name, part in parts.items() if not math.isfinite(float(part.detach()))]
    raise NonFiniteLossError(
        f"training loss is {value} at step {step} (non-finite: {', '.join(bad) or 'total'}); stopped before the "
        "optimizer step, so the last checkpoint on disk is the last good one: lower the learning rate or check the data"
    )


def check_finite_weights(parameters: Any, step: int) -> None:
    """Raise :class:`NonFiniteLossError` when an optimizer step left a trainable weight NaN or infinite.

    A finite loss can still take a step that blows the weights up (too high a learning rate); the
    loss of the *next* step is the first to show it, after a checkpoint of the poisoned weights was
    written. Checked right after the optimizer step, before any checkpoint callback runs.
    """
    import torch

    checks = [torch.isfinite(p).all() for p in parameters if p.requires_grad and p.numel() > 0]
    if checks and not bool(torch.stack(checks).all()):
        raise NonFiniteLossError(
            f"the optimizer step of step {step} made trainable weights non-finite; stopped before any checkpoint of it was "
            "written, so the last checkpoint on disk is the last good one: lower the learning rate or clip gradients"
        )
