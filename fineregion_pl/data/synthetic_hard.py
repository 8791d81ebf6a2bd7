"""The ``hard`` variant of the synthetic benchmark: scenes on which pooling, masks and prompts can matter.

Differences from the easy benchmark (:mod:`fineregion_pl.data.synthetic`, the quickstart's default,
left unchanged):

- 6-10 shapes per 128 px image, drawn in order, so later shapes really occlude earlier ones; each
  region stores its *visible* segmentation (COCO RLE) and ``visible_fraction``; regions under
  ``min_visible`` (35%) visible are dropped as regions (they stay in the picture as clutter);
- four sizes, ``tiny`` (8-12 px) to ``large`` (40-56 px);
- same-class distractors in other colours (a second shape of an existing region's class), and
  near-miss distractors: a tiny shape drawn inside a large target's box;
- a low-contrast textured background (stripes plus pixel noise) instead of a flat colour;
- captions say ``"partly hidden"`` when under ``hidden_below`` (80%) of a shape is visible;
- relational referring expressions (``"the circle left of the red square"``) where one tells the
  region apart from the others of its class, else the shortest unique attribute expression;
- two kinds of questions: the easy benchmark's two-region ``questions`` (answered from geometry),
  and ``vision_questions`` about one anchor region (``"what is left of the red square?"``, answer
  a shape name), which need the model to look outside the anchor's box.

Every region also records ``foreign_share``: the fraction of its box's pixels that belong to other
shapes (the part of a box mask that pools someone else). Generation is deterministic: image ``i``
of a split depends only on ``(seed, split, i)``, and the same seed gives byte-identical shards.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fineregion_pl.data.synthetic import COLOURS, SHAPES, _draw_shape, relation, write_synthetic
from fineregion_pl.data.test_boxes import box_iou, foreign_share, variant_record

HARD_SIZES = {"tiny": (8, 12), "small": (14, 20), "medium": (26, 34), "large": (40, 56)}
RELATIONS_ORDER = ["left", "right", "above", "below"]
RELATION_PHRASES = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


@dataclass(frozen=True)
class HardConfig:
    """Sizes and thresholds of the hard benchmark."""

    image_size: int = 128
    min_shapes: int = 6
    max_shapes: int = 10
    max_box_iou: float = 0.6
    min_visible: float = 0.35
    hidden_below: float = 0.8
    distractor_prob: float = 0.5
    near_miss_prob: float = 0.5
    background_contrast: int = 18


def _background(rng: random.Random, config: HardConfig) -> np.ndarray:
    """A low-contrast textured background: a dark base colour, diagonal stripes and pixel noise."""
    size = config.image_size
    noise = np.random.default_rng(rng.getrandbits(32))
    base = np.array([rng.randint(30, 70) for _ in range(3)], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period, angle = rng.uniform(6.0, 14.0), rng.uniform(0.0, np.pi)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    amplitude = config.background_contrast / 2
    pixels = base + amplitude * stripes[..., None] + noise.normal(0.0, amplitude / 2, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The full (unoccluded) pixel mask of one shape, as PIL draws it."""
    canvas = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, box, 255)
    return np.asarray(canvas) > 0


def _rle(mask: np.ndarray) -> dict:
    """A binary mask as COCO RLE with string counts (JSON-able)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _place(rng: random.Random, boxes: list, size: int, config: HardConfig, size_name: str, inside=None):
    """A square box of ``size_name`` not overlapping any of ``boxes`` by more than ``max_box_iou``
    (inside the box ``inside`` for a near-miss distractor); ``None`` after 50 tries."""
    from fineregion_pl.data.synthetic import _iou

    for _ in range(50):
        side = rng.randint(*HARD_SIZES[size_name])
        if inside is None:
            x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
        else:
            ix0, iy0, ix1, iy1 = (int(v) for v in inside)
            if ix1 - ix0 <= side or iy1 - iy0 <= side:
                return None
            x0, y0 = rng.randint(ix0, ix1 - side), rng.randint(iy0, iy1 - side)
        box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
        if inside is not None or all(_iou(box, b) <= config.max_box_iou for b in boxes):
            return box
    return None


def _draw_list(rng: random.Random, config: HardConfig) -> list[dict]:
    """The shapes of a scene in drawing order: random shapes, same-class distractors, near misses."""
    size = config.image_size
    shapes: list[dict] = []
    wanted = rng.randint(config.min_shapes, config.max_shapes)
    for _ in range(100):
        if len(shapes) >= wanted:
            break
        kind = "shape"
        if shapes and rng.random() < config.distractor_prob / 3:
            source = rng.choice(shapes)
            shape = source["category"]
            colour = rng.choice([c for c in COLOURS if c != source["colour"]])
            kind = "same_class_distractor"
        else:
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        size_name = rng.choice(list(HARD_SIZES))
        box = _place(rng, [s["box"] for s in shapes], size, config, size_name)
        if box is None:
            continue
        shapes.append({"category": shape, "colour": colour, "size": size_name, "box": box, "kind": kind})
        if size_name == "large" and rng.random() < config.near_miss_prob and len(shapes) < wanted:
            inner = _place(rng, [], size, config, "tiny", inside=box)
            if inner is not None:
                shapes.append({"category": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "size": "tiny", "box": inner, "kind": "near_miss"})
    return shapes


def _attribute_expressions(r: dict) -> list[str]:
    a = r["attributes"]
    return [f"the {r['category']}", f"the {a['colour']} {r['category']}", f"the {a['size']} {r['category']}", f"the {a['size']} {a['colour']} {r['category']}"]


def _referring(regions: list[dict]) -> None:
    """Each region's expressions: relational where it tells the region from the others of its
    class (``"the circle left of the red square"``), else the shortest unique attribute one."""
    unique: dict[int, str] = {}
    for r in regions:
        others = [set(_attribute_expressions(o)) for o in regions if o is not r]
        chosen = next((c for c in _attribute_expressions(r) if not any(c in o for o in others)), None)
        if chosen is not None:
            unique[r["id"]] = chosen
    for r in regions:
        same_class = [o for o in regions if o is not r and o["category"] == r["category"]]
        relational = None
        if same_class:
            for anchor in sorted(regions, key=lambda o: o["id"]):
                if anchor is r or anchor["id"] not in unique or anchor["category"] == r["category"]:
                    continue
                rel = relation(r, anchor)
                if all(relation(o, anchor) != rel for o in same_class):
                    relational = f"the {r['category']} {RELATION_PHRASES[rel]} {unique[anchor['id']]}"
                    r["relational_anchor"] = anchor["id"]
                    break
        fallback = unique.get(r["id"]) or _attribute_expressions(r)[-1]
        r["referring"] = [relational] if relational else [fallback]
        r["expression_kind"] = "relational" if relational else "attribute"


def _vision_questions(rng: random.Random, regions: list[dict]) -> list[dict]:
    """Up to two one-anchor questions ``"what is left of the red square?"`` whose answer (a shape)
    is the only region in that relation to the anchor, so only vision can answer it."""
    questions = []
    anchors = [r for r in regions if r["expression_kind"] == "attribute"]
    rng.shuffle(anchors)
    for anchor in anchors:
        for rel in RELATIONS_ORDER:
            targets = [o for o in regions if o is not anchor and relation(o, anchor) == rel]
            if len(targets) == 1:
                questions.append({
                    "regions": [anchor["id"]],
                    "question": f"what is {RELATION_PHRASES[rel]} {anchor['referring'][0]}?",
                    "answer": targets[0]["category"],
                    "target": targets[0]["id"],
                })
                break
        if len(questions) == 2:
            break
    return questions



def make_hard_scene(seed: int, split: str, index: int, config: HardConfig = HardConfig()) -> tuple[Image.Image, dict]:
    """One hard scene: the image and its record in the shard schema (regions carry ``segmentation``,
    ``visible_fraction``, ``foreign_share`` and ``kind``; the record has ``vision_questions``)."""
    image, record, _ = render_hard_scene(seed, split, index, config)
    return image, record


def render_hard_scene(seed: int, split: str, index: int, config: HardConfig = HardConfig()) -> tuple[Image.Image, dict, np.ndarray]:
    """:func:`make_hard_scene` plus the owner map: ``(H, W)`` int, the drawing index of the shape
    each pixel shows (-1: background); each region's ``shape_index`` is its index there."""
    rng = random.Random(f"hard/{seed}/{split}/{index}")
    size = config.image_size
    image = Image.fromarray(_background(rng, config))
    draw = ImageDraw.Draw(image)
    shapes = _draw_list(rng, config)
    owner = np.full((size, size), -1, dtype=np.int16)
    full_masks = []
    for k, s in enumerate(shapes):
        _draw_shape(draw, s["category"], s["box"], COLOURS[s["colour"]])
        mask = _shape_mask(s["category"], s["box"], size)
        owner[mask] = k
        full_masks.append(mask)
    regions: list[dict] = []
    for k, s in enumerate(shapes):
        visible = owner == k
        area = int(full_masks[k].sum())
        fraction = float(visible.sum()) / max(1, area)
        if fraction < config.min_visible:
            continue
        foreign = foreign_share(owner, s["box"], k)
        caption = f"a {s['size']} {s['colour']} {s['category']}" + (" partly hidden" if fraction < config.hidden_below else "")
        regions.append({
            "id": len(regions),
            "box": list(s["box"]),
            "category": s["category"],
            "category_id": SHAPES.index(s["category"]),
            "captions": [caption],
            "attributes": {"colour": s["colour"], "size": s["size"]},
            "segmentation": _rle(visible),
            "visible_fraction": round(fraction, 4),
            "foreign_share": round(foreign, 4),
            "kind": s["kind"],
            "shape_index": k,
        })
    for r in regions:  # the pairs eq. 9 pulls together (P3 scores caption exactness on these)
        r["intersects"] = any(o is not r and box_iou(o["box"], r["box"]) > 0 for o in regions)
    _referring(regions)
    questions = []
    pairs = [(i, j) for i in range(len(regions)) for j in range(len(regions)) if i != j]
    for i, j in rng.sample(pairs, k=min(2, len(pairs))):
        a, b = regions[i], regions[j]
        questions.append({"regions": [a["id"], b["id"]], "question": f"where is {a['referring'][0]} relative to {b['referring'][0]}?", "answer": relation(a, b)})
    record = {
        "image_id": f"{split}-{index:06d}",
        "source": "synthetic-hard",
        "split": split,
        "file_name": f"{split}-{index:06d}.jpg",
        "width": size,
        "height": size,
        "regions": regions,
        "questions": questions,
        "vision_questions": _vision_questions(rng, regions),
    }
    return image, record, owner


def iter_hard_scenes(seed: int, split: str, count: int) -> Iterator[tuple[Image.Image, dict]]:
    """The first ``count`` scenes of a split of the ``hard`` variant; a split named
    ``<split>_<boxes>`` (``test_det02``) is ``<split>``'s images with the test-box variant
    ``<boxes>`` of :mod:`fineregion_pl.data.test_boxes`."""
    base, _, boxes = split.partition("_")
    for index in range(count):
        image, record, owner = render_hard_scene(seed, base, index)
        yield image, (variant_record(record, owner, boxes, seed) if boxes else record)


def write_hard_synthetic(out: Path, sizes: dict[str, int], seed: int = 0, shard_size: int = 500, progress: bool = True) -> dict[str, dict]:
    """Write the hard benchmark's splits (``<split>_<boxes>`` names a test-box variant of
    ``<split>``'s images, e.g. ``test_det02``), each with ``manifest.json`` and ``regions.jsonl``."""
    return write_synthetic(out, sizes, seed=seed, shard_size=shard_size, progress=progress, scenes=iter_hard_scenes, source="synthetic-hard")
