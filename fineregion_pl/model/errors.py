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

    Raising here means the optimizer never applies the bad step. The weights a finite loss's step
    produced can still be poisoned; ``train/callbacks.py: CheckpointGate`` checks them before any
    checkpoint of them is written, so the last checkpoint on disk stays the last good one.
    """
    value = float(loss.detach())
    if math.isfinite(value):
        return
    bad = [name for name, part in parts.items() if not math.isfinite(float(part.detach()))]
    raise NonFiniteLossError(
        f"training loss is {value} at step {step} (non-finite: {', '.join(bad) or 'total'}); stopped before the "
        "optimizer step, so the last checkpoint on disk is the last good one: lower the learning rate or check the data"
    )

