"""fineregion-pl: region-level vision-language models (FineRegion-LM) with PyTorch Lightning."""

from .data import RegionDataModule
from .stage1 import Stage1Module
from .stage2 import Stage2Module

__all__ = ["RegionDataModule", "Stage1Module", "Stage2Module"]
__version__ = "0.1.0"
