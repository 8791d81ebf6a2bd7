"""Which dtype the language model is loaded in, given the precision it will run under.

``language_model.dtype: auto`` (the default) follows the trainer's precision: ``bf16-mixed`` and
``bf16-true`` load the LM in bfloat16, ``16-mixed`` and ``16-true`` in float16, ``32-true`` in
float32; outside a trainer (the API, export, the demo) ``auto`` is float32, which on a CPU is the
exact reference. An explicit dtype is kept when it can run under the precision: float32 weights
under any autocast, a half dtype under ``32-true`` (a frozen base LM kept small). A half dtype
under the *other* half precision is refused up front: autocast cannot mix bfloat16 and float16
tensors (``torch.cat`` fails with "Unexpected floating ScalarType in at::autocast::prioritize").
"""

from __future__ import annotations

from typing import Optional

import torch

from fineregion_pl.model.errors import BadInputError

HALF = (torch.bfloat16, torch.float16)

# the dtype each Lightning precision computes in (its autocast dtype, or the dtype it casts weights to)
PRECISION_DTYPE = {
    "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "bf16": torch.bfloat16,
    "16-mixed": torch.float16, "16-true": torch.float16, "16": torch.float16,
    "32-true": torch.float32, "32": torch.float32, "64-true": torch.float64, "64": torch.float64,
    "transformer-engine": torch.bfloat16, "transformer-engine-float16": torch.float16,
}


def named_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``None``/``"auto"`` -> ``None``; anything else is a one-line error."""
    if name in (None, "auto"):
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BadInputError(f"language_model.dtype {name!r} is not a dtype: use auto, bfloat16, float16 or float32")
    return dtype


def language_model_dtype(requested: Optional[str], precision: Optional[str]) -> torch.dtype:
    """The dtype to load the LM in for ``language_model.dtype = requested`` under ``trainer.precision``.

    Args:
        requested: ``auto``/``None`` or a dtype name.
        precision: the trainer's precision string (``bf16-mixed``...), ``None`` outside a trainer.
    """
    dtype = named_dtype(requested)
    runs_in = PRECISION_DTYPE.get(str(precision)) if precision is not None else torch.float32
    if precision is not None and runs_in is None:
        raise BadInputError(f"unknown trainer.precision {precision!r}: use one of {sorted(PRECISION_DTYPE)}")
    if dtype is None:
        return runs_in
    if dtype in HALF and runs_in in HALF and dtype != runs_in:
        other = "bf16-mixed" if dtype == torch.bfloat16 else "16-mixed"
        raise BadInputError(
            f"language_model.dtype {requested} cannot run under trainer.precision {precision} (autocast does not mix "
            f"bfloat16 and float16): set language_model.dtype auto (or {str(runs_in).removeprefix('torch.')}), or trainer.precision {other}"
        )
    return dtype
