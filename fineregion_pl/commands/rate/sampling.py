"""Which regions a study rates: prediction files read and joined by region, then a seeded (stratified) sample.

A prediction file is ``predictions.jsonl`` as ``fineregion-pl test`` or ``predict`` writes it: one
JSON line per region with ``image_id``, ``region_id``, ``box`` and ``caption`` (other fields are
kept but not needed). Every file must describe the same regions with the same boxes; a region
missing from some file is left out and counted.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from fineregion_pl.model.boxes import check_box
from fineregion_pl.model.errors import BadInputError

STRATA = ("source", "category")
BOX_TOLERANCE = 0.5  # pixels: the files' boxes are rounded to 2 decimals, so equal boxes agree far better than this

RegionKey = tuple[str, str]  # (image_id, region_id) as JSON text, so 3 and "3" stay apart


def region_key(image_id, region_id) -> RegionKey:
    """The join key of a region across files."""
    return json.dumps(image_id), json.dumps(region_id)


def read_predictions(path: str | Path) -> dict[RegionKey, dict]:
    """The rows of one prediction file by region, each checked (one line naming file, line and field)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"prediction file not found: {path}")
    rows: dict[RegionKey, dict] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise BadInputError(f"{where} is not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise BadInputError(f"{where} is not a JSON object")
            for field in ("image_id", "region_id", "box", "caption"):
                if field not in row:
                    raise BadInputError(f"{where} has no {field!r} field (is this a predictions.jsonl of `fineregion-pl test` or `predict`?)")
            if not isinstance(row["caption"], str):
                raise BadInputError(f"{where}: 'caption' is not text: {row['caption']!r}")
            row["box"] = check_box(row["box"], f"{where}: region {row['region_id']!r}")
            key = region_key(row["image_id"], row["region_id"])
            if key in rows:
                raise BadInputError(f"{where}: region {row['region_id']!r} of image {row['image_id']!r} appears twice")
            rows[key] = row
    if not rows:
        raise BadInputError(f"{path} has no predictions")
    return rows


def join_regions(files: Sequence[str | Path], tables: Sequence[dict[RegionKey, dict]]) -> tuple[list[RegionKey], int]:
    """The regions present in every file (in the first file's order) and how many were left out.

    The same region must have the same box in every file (within :data:`BOX_TOLERANCE` pixels):
    anything else means the files are predictions on different data, which is an error.
    """
    common = [key for key in tables[0] if all(key in table for table in tables[1:])]
    union = set().union(*(table.keys() for table in tables))
    for key in common:
        first = tables[0][key]["box"]
        for path, table in zip(files[1:], tables[1:]):
            other = table[key]["box"]
            if max(abs(a - b) for a, b in zip(first, other)) > BOX_TOLERANCE:
                image_id, region_id = (json.loads(k) for k in key)
                raise BadInputError(
                    f"region {region_id!r} of image {image_id!r} has box {first} in {files[0]} but {other} in {path}: "
                    "the files must be predictions on the same regions"
                )
    if not common:
        raise BadInputError(f"no region is in every prediction file ({', '.join(map(str, files))}): they must be predictions on the same images and boxes")
    return common, len(union) - len(common)


def allocate(sizes: dict[str, int], total: int) -> dict[str, int]:
    """How many regions to draw from each stratum: one from each (largest strata first, while
    ``total`` allows), the rest proportional to what each stratum has left (largest remainders)."""
    total = min(total, sum(sizes.values()))
    names = sorted(sizes, key=lambda s: (-sizes[s], s))
    share = {s: int(n < total) for n, s in enumerate(names)}
    rest = total - sum(share.values())
    room = {s: sizes[s] - share[s] for s in names}
    if rest == 0:
        return share
    # quota <= room, so floor(quota) + 1 <= room whenever the quota is not whole: nothing overflows
    quota = {s: rest * room[s] / sum(room.values()) for s in names}
    extra = {s: math.floor(quota[s]) for s in names}
    for s in sorted(names, key=lambda s: (-(quota[s] - extra[s]), s))[: rest - sum(extra.values())]:
        extra[s] += 1
    return {s: share[s] + extra[s] for s in names}


def sample_regions(keys: Sequence[RegionKey], strata: dict[RegionKey, str], size: int, seed: int) -> list[RegionKey]:
    """A seeded sample of ``size`` regions, proportional per stratum, in a random study order."""
    rng = random.Random(seed)
    groups: dict[str, list[RegionKey]] = defaultdict(list)
    for key in keys:
        groups[strata[key]].append(key)
    counts = allocate({s: len(g) for s, g in groups.items()}, size)
    chosen = [key for s in sorted(groups) for key in rng.sample(groups[s], counts[s])]
    rng.shuffle(chosen)
    return chosen


def stratum_of(key: RegionKey, stratify: Optional[str], source: Optional[str], category: Optional[str]) -> str:
    """The stratum name of a region (``"all"`` without stratification)."""
    if stratify is None:
        return "all"
    if stratify not in STRATA:
        raise BadInputError(f"--stratify must be one of {', '.join(STRATA)} (or left out), got {stratify!r}")
    value = source if stratify == "source" else category
    return str(value) if value is not None else "unknown"
