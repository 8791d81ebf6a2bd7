"""Test-box variants over the same hard-benchmark images: how a model does when its boxes are not the truth.

Each variant is a split folder next to the benchmark's own (``test_gt``, ``test_det01``, ...), with
the same images and records, every region's ``box`` replaced and annotated for the breakdowns:
``true_box``, ``box_iou`` (IoU of the test box with the truth), ``foreign_share`` (share of the
test box's pixels that show another shape), ``visible_fraction`` and the size name.

- ``gt``: the ground-truth boxes;
- ``det01`` / ``det02``: detector-like boxes: each edge moved by ``N(0, sigma * side)`` (sigma 0.1 /
  0.2), the box scaled about its centre by ``U(0.8, 1.4)``, drawn again until its IoU with the
  truth is in ``[0.5, 0.95]``;
- ``loose``: the truth scaled about its centre by ``U(1.3, 1.6)`` (clamped to the image);
- ``ground``: the truth plus, for every region with a referring expression, ``proposals`` boxes of
  IoU ``[0.3, 0.7]`` with it (no caption, no category, no expression): gt-ranking then has to pick
  the truth among near misses.

Boxes are drawn from ``random.Random(f"{variant}/{seed}/{split}/{index}")``: deterministic.
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np

Box = tuple[float, float, float, float]
VARIANTS = ("gt", "det01", "det02", "loose", "ground")


def box_iou(a, b) -> float:
    """IoU of two xyxy boxes (plain floats)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _clamp(box, size: int) -> Box:
    x0, y0, x1, y1 = (min(max(v, 0.0), float(size)) for v in box)
    return (round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2))


def _scaled(box, scale: float) -> Box:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) / 2 * scale, (box[3] - box[1]) / 2 * scale
    return (cx - hw, cy - hh, cx + hw, cy + hh)


def detector_box(box, sigma: float, rng: random.Random, size: int, iou_range=(0.5, 0.95), scale_range=(0.8, 1.4), tries: int = 200) -> Box:
    """A detector-like box around ``box``: per-edge Gaussian noise of ``sigma`` times the side,
    a random scale, clamped to the image, redrawn until its IoU with ``box`` is in ``iou_range``
    (after ``tries`` draws, the draw closest to the range)."""
    w, h = box[2] - box[0], box[3] - box[1]
    best, best_gap = None, float("inf")
    for _ in range(tries):
        moved = (box[0] + rng.gauss(0, sigma * w), box[1] + rng.gauss(0, sigma * h), box[2] + rng.gauss(0, sigma * w), box[3] + rng.gauss(0, sigma * h))
        if moved[2] - moved[0] < 1 or moved[3] - moved[1] < 1:
            continue
        out = _clamp(_scaled(moved, rng.uniform(*scale_range)), size)
        iou = box_iou(out, box)
        gap = max(iou_range[0] - iou, iou - iou_range[1], 0.0)
        if gap == 0.0:
            return out
        if gap < best_gap:
            best, best_gap = out, gap
    return best if best is not None else tuple(box)


def loose_box(box, rng: random.Random, size: int, scale_range=(1.3, 1.6)) -> Box:
    """``box`` scaled about its centre by ``U(1.3, 1.6)``, clamped to the image."""
    return _clamp(_scaled(box, rng.uniform(*scale_range)), size)


def proposal_box(box, rng: random.Random, size: int, iou_range=(0.3, 0.7), tries: int = 500) -> Optional[Box]:
    """A grounding candidate: a box of IoU in ``iou_range`` with ``box`` (shifted and rescaled), or
    ``None`` when ``tries`` draws found none."""
    w, h = box[2] - box[0], box[3] - box[1]
    for _ in range(tries):
        dx, dy = rng.uniform(-0.6, 0.6) * w, rng.uniform(-0.6, 0.6) * h
        moved = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
        out = _clamp(_scaled(moved, rng.uniform(0.6, 1.6)), size)
        if out[2] - out[0] >= 2 and out[3] - out[1] >= 2 and iou_range[0] <= box_iou(out, box) <= iou_range[1]:
            return out
    return None


def foreign_share(owner: np.ndarray, box, own: int) -> float:
    """Fraction of the pixels of ``box`` (xyxy, rounded inwards to whole pixels) owned by a shape other than ``own``."""
    size = owner.shape[0]
    x0, y0 = (max(0, min(size, int(np.ceil(v)))) for v in box[:2])
    x1, y1 = (max(0, min(size, int(np.floor(v)))) for v in box[2:])
    in_box = owner[y0:max(y0, y1), x0:max(x0, x1)]
    return float(((in_box >= 0) & (in_box != own)).sum()) / max(1, in_box.size)


def variant_record(record: dict, owner, variant: str, seed: int, proposals: int = 2) -> dict:
    """``record`` with its regions' boxes replaced for ``variant`` (see the module docstring) and
    annotated with ``true_box``, ``box_iou``, ``foreign_share`` (in the test box)."""
    if variant not in VARIANTS:
        raise ValueError(f"test-box variant must be one of {list(VARIANTS)}, got {variant!r}")
    rng = random.Random(f"{variant}/{seed}/{record['split']}/{record['image_id']}")
    size = int(record["width"])
    regions, extra = [], []
    for region in record["regions"]:
        truth = tuple(region["box"])
        if variant == "det01":
            box = detector_box(truth, 0.1, rng, size)
        elif variant == "det02":
            box = detector_box(truth, 0.2, rng, size)
        elif variant == "loose":
            box = loose_box(truth, rng, size)
        else:
            box = truth
        own = region.get("shape_index", -2)
        regions.append({**region, "box": list(box), "true_box": list(truth), "box_iou": round(box_iou(box, truth), 4),
                        "foreign_share": round(foreign_share(owner, box, own), 4)})
        if variant == "ground" and region.get("referring"):
            for _ in range(proposals):
                candidate = proposal_box(truth, rng, size)
                if candidate is not None:
                    extra.append({"box": list(candidate), "true_box": list(truth), "box_iou": round(box_iou(candidate, truth), 4),
                                  "proposal_of": region["id"], "captions": [], "category_id": -1, "category": None})
    base = len(regions)
    regions += [{"id": base + k, **r} for k, r in enumerate(extra)]
    return {**record, "regions": regions, "test_boxes": variant}
