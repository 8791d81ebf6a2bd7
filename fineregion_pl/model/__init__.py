"""The model library: everything needed to describe regions, and nothing of training.

It imports torch, timm, transformers and peft only (never Lightning), like open_clip's
``src/open_clip``: the API, export, the demo and any server use :class:`RegionCaptioner` from
here, and the LightningModules in :mod:`fineregion_pl.train` hold one. The data flow, one file
each: :mod:`.boxes` -> :mod:`.region_masks` (masks and pooling) -> :mod:`.dynamic_masking`
(training-time perturbations) -> :mod:`.encoder` (timm Swin + pooling) -> :mod:`.vision_model`
(encoder + category head + region attention) -> :mod:`.region_prompt` -> :mod:`.language_model`
(LoRA LM and task templates) -> :mod:`.captioner`; :mod:`.losses` and :mod:`.transforms` (image
to model input) beside them.

Names are imported lazily, so light users (the data converters) do not pay for timm and
transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RegionCaptioner": "fineregion_pl.model.captioner",
    "CaptionerConfig": "fineregion_pl.model.captioner",
    "EncodedBatch": "fineregion_pl.model.captioner",
    "EncoderConfig": "fineregion_pl.model.encoder",
    "RegionEncoder": "fineregion_pl.model.encoder",
    "RegionVisionModel": "fineregion_pl.model.vision_model",
    "RegionPrompt": "fineregion_pl.model.region_prompt",
    "RegionLanguageModel": "fineregion_pl.model.language_model",
    "LanguageModelConfig": "fineregion_pl.model.language_model",
    "LoraSettings": "fineregion_pl.model.language_model",
    "DynamicMasking": "fineregion_pl.model.dynamic_masking",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fineregion_pl.model' has no attribute {name!r}")
