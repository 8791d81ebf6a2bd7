"""Lightning checkpoint files read without Lightning (``torch.load(weights_only=True)``), and the one
check that a set of weights fits a module (missing, unexpected and mismatched keys)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fineregion_pl.model.errors import BadInputError

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


def check_weights_fit(own: dict[str, Any], given: dict[str, Any], source: str, target: str, may_miss: Iterable[str] = ()) -> None:
    """Raise a :class:`BadInputError` naming the missing, unexpected and shape-mismatched keys
    when the weights ``given`` do not fit a module whose ``state_dict()`` is ``own``.

    Args:
        own: the module's state dict (or any ``{key: tensor}``).
        given: the weights to load.
        source: where they come from (named in the message).
        target: what they should fit (named in the message).
        may_miss: keys of ``own`` that ``given`` may lack (frozen weights filled in from elsewhere).
    """
    allowed = set(may_miss)
    missing = sorted(set(own) - set(given) - allowed)
    unexpected = sorted(set(given) - set(own))
    mismatched = sorted(
        f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(given)
        if hasattr(given[k], "shape") and hasattr(own[k], "shape") and tuple(given[k].shape) != tuple(own[k].shape) and own[k].numel() > 0
    )
    if missing or unexpected or mismatched:
        parts = [f"{what} {len(keys)} key(s) {keys[:5]}{'...' if len(keys) > 5 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch in", mismatched)) if keys]
        raise BadInputError(f"{source} does not fit {target}: {', '.join(parts)}")


def load_stage1_weights(vision: nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Load a stage-1 checkpoint's ``model.*`` weights into ``vision`` (a ``RegionVisionModel``).

    Raises a :class:`BadInputError` naming the missing, unexpected and mismatched keys when it does not fit.
    """
    state = checkpoint.get("state_dict", {})
    weights = {k[len(STAGE1_PREFIX):]: v for k, v in state.items() if k.startswith(STAGE1_PREFIX)}
    if not weights or any(k.startswith(("vision.", "language.", "prompt.")) for k in weights):
        kinds = sorted({k.split(".")[0] for k in state})
        raise BadInputError(f"{path} is not a stage-1 checkpoint: no '{STAGE1_PREFIX}*' weights (top-level keys: {kinds})")
    check_weights_fit(vision.state_dict(), weights, f"stage-1 checkpoint {path}", "the stage-2 vision model")
    vision.load_state_dict(weights)
