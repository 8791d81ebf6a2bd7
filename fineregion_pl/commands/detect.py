"""``fineregion-pl detect``: boxes for every object of a folder of images, from a torchvision detector,
written as a COCO results file that ``predict``, the API and the server read.

    fineregion-pl detect --images my_images/ --out detections.json          # Faster R-CNN v2, COCO-trained
    fineregion-pl predict ... --data.predict_images my_images/ --data.predict_boxes detections.json \\
        --data.predict_score_threshold 0.5 --data.predict_top_k 20

For users without a detector of their own: torchvision's COCO-trained detectors (``--model``, any
name of ``torchvision.models.detection``; Mask R-CNN models add a mask per box) download their
weights once from download.pytorch.org. Their categories are COCO's 80; the region captioner
then describes each box in its own words.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

from fineregion_pl.commands.inputs import pick_device, read_image
from fineregion_pl.model.errors import BadInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_PIXELS = 100_000_000  # predict's image folder skips larger images too


def load_detector(model: str, weights: str, min_score: float, max_detections: int):
    """A torchvision detection model in eval mode, and its category names (None without weights)."""
    import torchvision
    from torchvision.models import detection

    names = torchvision.models.list_models(module=detection)
    if model not in names:
        raise BadInputError(f"--model {model!r} is not a torchvision detection model (one of: {', '.join(sorted(names))})")
    options = dict(box_score_thresh=min_score, box_detections_per_img=max_detections)
    if weights.lower() == "none":  # random weights: only to check the pipeline, the boxes mean nothing
        return torchvision.models.get_model(model, weights=None, weights_backbone=None, **options).eval(), None
    chosen = torchvision.models.get_model_weights(model)[weights] if weights != "DEFAULT" else torchvision.models.get_model_weights(model).DEFAULT
    return torchvision.models.get_model(model, weights=chosen, **options).eval(), chosen.meta.get("categories")


def detections_of(output: dict, file_name: str, categories: Optional[list[str]]) -> list[dict]:
    """One image's torchvision detections as COCO results objects (masks as RLE when the model gives them)."""
    import numpy as np

    rows = []
    masks = output.get("masks")
    for index, (box, score, label) in enumerate(zip(output["boxes"].tolist(), output["scores"].tolist(), output["labels"].tolist())):
        x0, y0, x1, y1 = box
        row = {"file_name": file_name, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score, "category_id": int(label)}
        if categories:
            row["category_name"] = categories[int(label)]
        if masks is not None:
            from pycocotools import mask as mask_utils

            rle = mask_utils.encode(np.asfortranarray((masks[index, 0] > 0.5).numpy().astype(np.uint8)))
            row["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        rows.append(row)
    return rows


def detect(
    *,
    images: str,
    out: str,
    model: str = "fasterrcnn_resnet50_fpn_v2",
    weights: str = "DEFAULT",
    min_score: float = 0.05,
    max_detections: int = 100,
    device: str = "auto",
) -> None:
    """Detect objects in every image of a folder and write them as a COCO results file.

    Args:
        images: folder of images (``.jpg``, ``.png``, ``.bmp``, ``.gif``, ``.tif``, ``.webp``).
        out: the COCO results JSON to write (one ``{"file_name", "bbox", "score", "category_id"}`` per detection).
        model: a torchvision detection model name (``fasterrcnn_resnet50_fpn_v2``, ``maskrcnn_resnet50_fpn_v2``...).
        weights: its weights enum member (``DEFAULT``, ``COCO_V1``...), or ``none`` for random weights (a pipeline check).
        min_score: detections scoring below this are not written.
        max_detections: at most this many detections per image.
        device: ``auto``, ``cpu``, ``cuda``...
    """
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    folder = Path(images)
    if not folder.is_dir():
        raise BadInputError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    device = pick_device(device)
    detector, categories = load_detector(model, weights, min_score, max_detections)
    detector.to(device)
    results, skipped = [], 0
    for path in files:
        try:
            image = read_image(path.read_bytes(), MAX_PIXELS)  # the front doors' one image reader
        except (OSError, BadInputError) as err:
            warnings.warn(f"skipped image {path}: {err}", stacklevel=2)
            skipped += 1
            continue
        with torch.no_grad():
            output = detector([(pil_to_tensor(image).float() / 255).to(device)])[0]
        results += detections_of({k: v.cpu() for k, v in output.items()}, path.name, categories)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results) + "\n")
    print(f"fineregion-pl detect: {len(results)} detections in {len(files) - skipped} images written to {out}" + (f" ({skipped} unreadable images skipped)" if skipped else ""))
