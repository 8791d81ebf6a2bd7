"""The Python API for notebooks and scripts: captions for boxes on PIL images.

    from fineregion_pl.api import RegionCaptioner
    captioner = RegionCaptioner.from_checkpoint("runs/quickstart/stage2/checkpoints/last.ckpt")
    # or RegionCaptioner.from_export("exports/quickstart")  (a `fineregion-pl export` folder)
    for region in captioner.describe(image, [[10, 20, 80, 90], [40, 40, 120, 100]]):
        print(region["region_id"], region["caption"], region["category"], region["score"])

``RegionCaptioner`` is the model library's module (:mod:`fineregion_pl.model.captioner`); this
module only names it where users look for it. Nothing here imports Lightning.
"""

from __future__ import annotations

from fineregion_pl.model.captioner import RegionCaptioner

__all__ = ["RegionCaptioner"]
