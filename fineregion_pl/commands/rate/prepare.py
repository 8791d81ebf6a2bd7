"""``fineregion-pl rate prepare``: a blinded rating study from two or more prediction files."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal, Optional

from fineregion_pl.commands.rate.images import find_images, region_facts
from fineregion_pl.commands.rate.sampling import join_regions, read_predictions, sample_regions, stratum_of
from fineregion_pl.commands.rate.store import Study, create_study
from fineregion_pl.data.annotations import file_sha256
from fineregion_pl.model.errors import BadInputError


def model_names(files: list[str], names: Optional[list[str]]) -> list[str]:
    """The names the report uses: ``names`` as given, else each file's folder name (made unique)."""
    if names is not None:
        if len(names) != len(files):
            raise BadInputError(f"--names gives {len(names)} names for {len(files)} prediction files")
        if len(set(names)) != len(names) or not all(str(n).strip() for n in names):
            raise BadInputError(f"--names must be distinct and not empty, got {names}")
        return [str(n).strip() for n in names]
    made: list[str] = []
    for path in files:
        base = Path(path).resolve().parent.name or Path(path).stem
        name, n = base, 2
        while name in made:
            name, n = f"{base}-{n}", n + 1
        made.append(name)
    return made


def prepare(
    predictions: list[str],
    images: str,
    study: str = "study.sqlite",
    names: Optional[list[str]] = None,
    regions: int = 60,
    seed: int = 0,
    stratify: Optional[Literal["source", "category"]] = None,
    raters: Optional[list[str]] = None,
) -> dict:
    """Make a blinded rating study: a seeded sample of regions with every model's caption of each.

    Each region's captions are put in a random order (seeded) and shown to raters without model
    names. The study (regions, captions, images, raters, ratings) is one SQLite file.

    Args:
        predictions: two or more ``predictions.jsonl`` files of ``fineregion-pl test``/``predict``, one
            per model, as a list: ``'[runs/a/predictions.jsonl, runs/b/predictions.jsonl]'``.
        images: the images the predictions were made on: a shard set (e.g. ``runs/quickstart/data``)
            or a folder of image files (the ``--data.predict_images`` folder).
        study: the study file to write (it must not exist).
        names: a name per prediction file for the report (default: each file's folder name).
        regions: how many regions to sample (all of them when there are fewer).
        seed: seed of the sample and of the caption order.
        stratify: ``source`` or ``category``: sample proportionally within each (the true category
            with a shard set; with an image folder, the category the first file's model predicted).
        raters: rater names to make tokens for now (more can be added by ``rate serve --raters``).
    """
    if not isinstance(predictions, list) or len(predictions) < 2:
        raise BadInputError("give two or more prediction files, as a list: '[a/predictions.jsonl, b/predictions.jsonl]'")
    if regions < 1:
        raise BadInputError(f"--regions must be at least 1, got {regions}")
    stratum_of(("", ""), stratify, None, None)  # an unknown --stratify fails before any file is read
    files = [str(p) for p in predictions]
    labels = model_names(files, names)
    tables = [read_predictions(p) for p in files]
    common, left_out = join_regions(files, tables)
    first = tables[0]
    image_ids = {str(first[k]["image_id"]) for k in common}
    found, records, kind = find_images(images, image_ids)

    facts = {}
    for key in common:
        row = first[key]
        source, category = region_facts(records.get(str(row["image_id"])), row["region_id"])
        if kind == "folder":
            category = row.get("category")
        facts[key] = (source, category, stratum_of(key, stratify, source, category))
    chosen = sample_regions(common, {k: f[2] for k, f in facts.items()}, regions, seed)

    order = random.Random(f"{seed}/captions")
    items = []
    for key in chosen:
        captions = [(m, tables[m][key]["caption"]) for m in range(len(files))]
        order.shuffle(captions)
        source, category, stratum = facts[key]
        items.append({"image_id": str(first[key]["image_id"]), "region_id": first[key]["region_id"], "box": first[key]["box"],
                      "source": source, "category": category, "stratum": stratum, "captions": captions})
    used = sorted({item["image_id"] for item in items})
    settings = {
        "seed": seed, "regions_asked": regions, "stratify": stratify, "images": str(images), "image_source": kind,
        "regions_in_every_file": len(common), "regions_left_out": left_out,
    }
    models = [{"name": n, "file": f, "sha256": file_sha256(f)} for n, f in zip(labels, files)]
    path = create_study(study, settings, models, [found[i] for i in used], items)
    opened = Study(path)
    tokens = opened.add_raters(raters or [])
    strata = sorted({item["stratum"] for item in items})
    print(f"study {path}: {len(items)} regions x {len(files)} models = {len(items) * len(files)} captions to rate per rater, from {len(used)} images")
    print(f"  models (hidden from raters): {', '.join(f'{n} ({f})' for n, f in zip(labels, files))}")
    if stratify:
        print(f"  stratified by {stratify}: {len(strata)} strata ({', '.join(strata[:10])}{', ...' if len(strata) > 10 else ''})")
    if left_out:
        print(f"  {left_out} region(s) are not in every prediction file and were left out")
    for name, token in tokens.items():
        print(f"  rater {name}: token {token}   (printed once; `rate serve --raters '[{name}]' --reissue true` makes a new one)")
    print(f"next: fineregion-pl rate serve {path}" + ("" if tokens else " --raters '[alice, bob]'"))
    return {"study": str(path), "items": len(items), "models": labels, "tokens": tokens, "settings": json.loads(json.dumps(settings))}
