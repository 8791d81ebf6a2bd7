"""fineregion-pl: region-level vision-language models (FineRegion-LM) with PyTorch Lightning.

The top-level names are imported lazily, so light modules (the data converters, the shard
helpers) do not pay for importing Lightning, timm and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from fineregion_pl import _moved

__version__ = "0.1.0"

_LAZY = {
    "RegionDataModule": "fineregion_pl.data.datamodule",
    "Stage1Module": "fineregion_pl.train.stage1",
    "Stage2Module": "fineregion_pl.train.stage2",
    "RegionCaptioner": "fineregion_pl.model.captioner",
    "RegionThroughputMonitor": "fineregion_pl.train.callbacks",
}
__all__ = list(_LAZY)

_moved.install()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fineregion_pl' has no attribute {name!r}")
