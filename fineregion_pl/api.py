"""A small Python API for notebooks and scripts: captions for boxes on PIL images.

    from fineregion_pl.api import RegionCaptioner
    captioner = RegionCaptioner.from_checkpoint("runs/quickstart/stage2/checkpoints/last.ckpt")
    # or RegionCaptioner.from_export("exports/quickstart")  (a `fineregion-pl export` folder)
    for region in captioner.describe(image, [[10, 20, 80, 90], [40, 40, 120, 100]]):
        print(region["region_id"], region["caption"], region["category"], region["score"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from .data.image_folder import check_box
from .data.transforms import collate_regions, to_region_sample


class RegionCaptioner:
    """Describes regions of images with a trained stage-2 module.

    Args:
        module: a ``Stage2Module`` (put in eval mode here).
        image_size: side of the model input (default: the encoder's input size).
        device: where to run.
    """

    def __init__(self, module: Any, image_size: Optional[int] = None, device: str = "cpu"):
        self.module = module.eval().to(device)
        self.device = torch.device(device)
        self.image_size = image_size or module.vision.encoder.input_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, image_size: Optional[int] = None, device: str = "cpu") -> "RegionCaptioner":
        """Load a stage-2 Lightning checkpoint (its base LM must be reachable at the saved path or hub name)."""
        from .stage2 import Stage2Module

        module = Stage2Module.load_from_checkpoint(str(path), map_location="cpu", weights_only=True, init_from=None)
        return cls(module, image_size, device)

    @classmethod
    def from_export(cls, folder: str | Path, image_size: Optional[int] = None, device: str = "cpu") -> "RegionCaptioner":
        """Load a ``fineregion-pl export`` folder: the merged LM and the vision weights."""
        from .export import EXPORT_CONFIG, load_vision_weights
        from .language import LanguageModelConfig, LoraSettings
        from .stage2 import Stage2Module

        folder = Path(folder)
        config = json.loads((folder / EXPORT_CONFIG).read_text())
        lm = dict(config["language_model"], name_or_path=str(folder / "merged"), lora=LoraSettings(enabled=False))
        keys = ("encoder", "num_classes", "categories", "head_hidden", "attn_dim", "prompt_mode", "prompt_tokens", "prompt_hidden", "masking", "max_new_tokens", "num_beams")
        module = Stage2Module(language_model=LanguageModelConfig(**{k: v for k, v in lm.items() if k != "lora"}, lora=lm["lora"]), **{k: config[k] for k in keys})
        load_vision_weights(module, folder)
        return cls(module, image_size, device)

    @torch.no_grad()
    def describe_many(self, images: Sequence[Image.Image], boxes: Sequence[Sequence[Sequence[float]]], ids: Optional[Sequence[Sequence[Any]]] = None) -> list[list[dict]]:
        """Captions for the boxes of several images, all regions in one batch.

        Args:
            images: PIL images.
            boxes: per image, its boxes ``[x0, y0, x1, y1]`` in that image's pixels.
            ids: per image, its region ids (default 0, 1, ...).

        Returns:
            Per image, one dict per region: ``region_id``, ``box``, ``caption``, ``category``,
            ``category_id``, ``score``.
        """
        if len(images) != len(boxes):
            raise ValueError(f"got {len(images)} images but {len(boxes)} box lists")
        samples = []
        for index, (image, image_boxes) in enumerate(zip(images, boxes)):
            region_ids = list(ids[index]) if ids is not None else list(range(len(image_boxes)))
            checked = [check_box(b, f"image {index} region {rid}") for b, rid in zip(image_boxes, region_ids)]
            record = {"image_id": index, "width": image.width, "height": image.height, "regions": [{"id": rid, "box": b} for rid, b in zip(region_ids, checked)]}
            samples.append(to_region_sample(image.convert("RGB"), record, self.image_size, max_regions=len(checked) or 1, train=False))
        batch = collate_regions(samples)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        rows = self.module.describe(batch)
        out: list[list[dict]] = [[] for _ in images]
        for row in rows:
            out[row.pop("image_id")].append(row)
        return out

    def describe(self, image: Image.Image, boxes: Sequence[Sequence[float]], ids: Optional[Sequence[Any]] = None) -> list[dict]:
        """Captions for the boxes of one image (see :meth:`describe_many`)."""
        return self.describe_many([image], [boxes], None if ids is None else [ids])[0]
