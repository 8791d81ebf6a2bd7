"""Data: shard writing, the synthetic benchmark, transforms and the streaming DataModule (imported lazily)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RegionDataModule": "fineregion_pl.data.datamodule",
    "RegionSample": "fineregion_pl.model.transforms",
    "collate_regions": "fineregion_pl.model.transforms",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fineregion_pl.data' has no attribute {name!r}")
