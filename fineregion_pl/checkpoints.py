"""Reading Lightning checkpoints safely and moving stage-1 weights into stage 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BadInputError

STAGE1_PREFIX = "model."


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint on the CPU with ``weights_only=True``.

    Our checkpoints hold only tensors and plain Python values, so they never need pickle's
    arbitrary code execution; a file that does is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError for bad files
        raise BadInputError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None


def load_stage1_weights(vision: nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Load a stage-1 checkpoint's ``model.*`` weights into ``vision`` (a ``RegionVisionModel``).

    Raises a ``ValueError`` naming the missing, unexpected and mismatched keys when it does not fit.
    """
    state = checkpoint.get("state_dict", {})
    weights = {k[len(STAGE1_PREFIX):]: v for k, v in state.items() if k.startswith(STAGE1_PREFIX)}
    if not weights:
        kinds = sorted({k.split(".")[0] for k in state})
        raise BadInputError(f"{path} is not a stage-1 checkpoint: no '{STAGE1_PREFIX}*' weights (top-level keys: {kinds})")
    own = vision.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    mismatched = sorted(f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(weights) if weights[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        raise BadInputError(
            f"stage-1 checkpoint {path} does not fit the stage-2 vision model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatch {mismatched[:5]}{'...' if len(mismatched) > 5 else ''}"
        )
    vision.load_state_dict(weights)
