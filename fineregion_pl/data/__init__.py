"""Data: shard writing, the synthetic benchmark, transforms and the streaming DataModule."""

from .datamodule import RegionDataModule
from .transforms import RegionSample, collate_regions

__all__ = ["RegionDataModule", "RegionSample", "collate_regions"]
