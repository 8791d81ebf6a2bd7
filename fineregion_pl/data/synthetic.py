"""The built-in synthetic benchmark: procedural scenes of coloured shapes, written as webdataset shards.

Every image holds 3-6 shapes (5 kinds, 6 colours, 3 sizes), some overlapping. Every shape's box
is a square, whatever the shape, so box geometry alone does not tell the category, and several
shapes share an image, so whole-image features cannot tell which one is asked about. Each region
has a category (the shape), a caption (``"a medium blue circle"``), a referring expression unique
in its image, and the image has spatial questions between region pairs.

Generation is deterministic: image ``i`` of a split depends only on ``(seed, split, i)``.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw
from tqdm import tqdm

from fineregion_pl.data.shards import MANIFEST, encode_sample, shard_writer, write_json_atomic

SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
COLOURS = {
    "red": (215, 45, 40),
    "green": (45, 170, 70),
    "blue": (45, 85, 215),
    "yellow": (230, 205, 45),
    "purple": (140, 60, 185),
    "cyan": (50, 195, 205),
}
SIZES = {"small": (14, 20), "medium": (26, 34), "large": (40, 50)}
RELATIONS = ["left", "right", "above", "below"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the synthetic benchmark (the quickstart's defaults fit a 2-core CPU)."""

    image_size: int = 128
    min_shapes: int = 3
    max_shapes: int = 6
    max_overlap_iou: float = 0.25
    jpeg_quality: int = 92


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif shape == "cross":
        t = w / 6
        draw.rectangle((cx - t, y0, cx + t, y1), fill=colour)
        draw.rectangle((x0, cy - t, x1, cy + t), fill=colour)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def _iou(a, b) -> float:
    """IoU of two xyxy boxes (torchvision's ``box_iou`` in float64, as exact as plain Python floats)."""
    import torch
    from torchvision.ops import box_iou

    return float(box_iou(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))[0, 0])


def relation(a: dict, b: dict) -> str:
    """Where region ``a`` is relative to region ``b``: the dominant axis of their centres' offset."""
    ax, ay = (a["box"][0] + a["box"][2]) / 2, (a["box"][1] + a["box"][3]) / 2
    bx, by = (b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _referring_expressions(regions: list[dict]) -> None:
    """Give every region the shortest description that no other region of the image shares."""
    def candidates(r):
        a = r["attributes"]
        yield f"the {r['category']}"
        yield f"the {a['colour']} {r['category']}"
        yield f"the {a['size']} {r['category']}"
        yield f"the {a['size']} {a['colour']} {r['category']}"

    for r in regions:
        others = [set(candidates(o)) for o in regions if o is not r]
        chosen = next((c for c in candidates(r) if not any(c in o for o in others)), None)
        if chosen is None:  # identical twins: tell them apart by position
            twins = [o for o in regions if list(candidates(o))[-1] == list(candidates(r))[-1]]
            twins.sort(key=lambda o: o["box"][0])
            chosen = list(candidates(r))[-1] + (" on the left" if twins[0] is r else " on the right")
        r["referring"] = [chosen]


def make_scene(seed: int, split: str, index: int, config: SyntheticConfig = SyntheticConfig()) -> tuple[Image.Image, dict]:
    """One synthetic scene: the image and its record in the shard schema (see DESIGN.md)."""
    rng = random.Random(f"{seed}/{split}/{index}")
    size = config.image_size
    background = tuple(rng.randint(20, 70) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    regions: list[dict] = []
    wanted = rng.randint(config.min_shapes, config.max_shapes)
    for _ in range(200):
        if len(regions) == wanted:
            break
        size_name = rng.choice(list(SIZES))
        side = rng.randint(*SIZES[size_name])
        x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
        box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
        if any(_iou(box, r["box"]) > config.max_overlap_iou for r in regions):
            continue
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        _draw_shape(draw, shape, box, COLOURS[colour])
        regions.append({
            "id": len(regions),
            "box": list(box),
            "category": shape,
            "category_id": SHAPES.index(shape),
            "captions": [f"a {size_name} {colour} {shape}"],
            "attributes": {"colour": colour, "size": size_name},
        })
    _referring_expressions(regions)
    questions = []
    pairs = [(i, j) for i in range(len(regions)) for j in range(len(regions)) if i != j]
    for i, j in rng.sample(pairs, k=min(2, len(pairs))):
        a, b = regions[i], regions[j]
        questions.append({
            "regions": [a["id"], b["id"]],
            "question": f"where is {a['referring'][0]} relative to {b['referring'][0]}?",
            "answer": relation(a, b),
        })
    record = {
        "image_id": f"{split}-{index:06d}",
        "source": "synthetic",
        "split": split,
        "file_name": f"{split}-{index:06d}.jpg",
        "width": size,
        "height": size,
        "regions": regions,
        "questions": questions,
    }
    return image, record


def iter_scenes(seed: int, split: str, count: int, config: SyntheticConfig = SyntheticConfig()) -> Iterator[tuple[Image.Image, dict]]:
    """The first ``count`` scenes of a split."""
    for index in range(count):
        yield make_scene(seed, split, index, config)


REGION_FACTS = "regions.jsonl"
FACT_KEYS = ("box_iou", "visible_fraction", "foreign_share", "kind", "expression_kind", "proposal_of", "category", "intersects")


def region_facts(record: dict, region: dict) -> dict:
    """One line of a hard split's ``regions.jsonl``: what the breakdowns group a region's results by."""
    facts = {"image_id": record["image_id"], "region_id": region["id"], **{k: region[k] for k in FACT_KEYS if k in region}}
    facts.update(region.get("attributes", {}))
    return facts


def write_synthetic(
    out: Path,
    sizes: Optional[dict[str, int]] = None,
    seed: int = 0,
    shard_size: int = 500,
    config: SyntheticConfig = SyntheticConfig(),
    progress: bool = True,
    scenes: Optional[Callable[[int, str, int], Iterator[tuple[Image.Image, dict]]]] = None,
    source: str = "synthetic",
) -> dict[str, dict]:
    """Write train/val/test shards and a manifest per split; returns the manifests.

    Args:
        out: output folder (``out/<split>/<split>-NNNNNN.tar`` and ``manifest.json``).
        sizes: images per split, default ``{"train": 2000, "val": 200, "test": 300}``.
        seed: benchmark seed; the same seed gives byte-identical shards.
        shard_size: images per shard.
        scenes: ``(seed, split, count)`` to the split's ``(image, record)`` pairs; default this
            module's scenes (the quickstart's). Given (the hard variant,
            :func:`fineregion_pl.data.synthetic_hard.write_hard_synthetic`), each split also gets a
            ``regions.jsonl`` of :func:`region_facts` for the breakdowns.
        source: the manifests' ``source``.
    """
    sizes = sizes or {"train": 2000, "val": 200, "test": 300}
    manifests = {}
    for split, count in sizes.items():
        split_dir = Path(out) / split
        split_dir.mkdir(parents=True, exist_ok=True)
        pattern = str(split_dir / f"{split}-%06d.tar")
        regions = sentences = 0
        breakdown = []  # the hard variant's per-region facts for the breakdowns (regions.jsonl)
        with shard_writer(pattern, maxcount=shard_size) as writer:
            pairs = iter_scenes(seed, split, count, config) if scenes is None else scenes(seed, split, count)
            for image, record in tqdm(pairs, total=count, desc=f"synthetic {split}", disable=not progress):
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=config.jpeg_quality)
                writer.write(encode_sample(record["image_id"], buf.getvalue(), record))
                regions += len(record["regions"])
                sentences += sum(len(r["captions"]) for r in record["regions"])
                if scenes is not None:
                    breakdown += [region_facts(record, r) for r in record["regions"]]
        shards = sorted(p.name for p in split_dir.glob(f"{split}-*.tar"))
        manifest = {
            "split": split,
            "source": source,
            "seed": seed,
            "num_images": count,
            "num_regions": regions,
            "num_sentences": sentences,
            "categories": SHAPES,
            "shards": shards,
            "skipped": {},
        }
        if scenes is not None:
            (split_dir / REGION_FACTS).write_text("".join(json.dumps(row) + "\n" for row in breakdown))
        write_json_atomic(split_dir / MANIFEST, manifest)
        manifests[split] = manifest
    return manifests

