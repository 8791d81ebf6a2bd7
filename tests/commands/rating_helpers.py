"""Small real inputs for the rating kit's tests: synthetic images in a folder and prediction files on them."""

from __future__ import annotations

import json
from pathlib import Path

from fineregion_pl.data.synthetic import make_scene


def folder_predictions(root: Path, images: int = 6, models: dict | None = None) -> tuple[Path, list[Path], dict]:
    """Synthetic scenes saved as PNG files in ``root/images`` and one ``predictions.jsonl`` per model.

    ``models`` maps a model's folder name to a function ``(region record) -> caption``; by default a
    model that writes the true caption and one that always says "a thing". Returns the image
    folder, the prediction files and ``{image file name: scene record}``.
    """
    models = models or {"truth": lambda r: r["captions"][0], "vague": lambda r: "a thing"}
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    records = {}
    lines: dict[str, list[str]] = {name: [] for name in models}
    for index in range(images):
        image, record = make_scene(0, "test", index)
        name = f"{record['image_id']}.png"
        image.save(folder / name)
        records[name] = record
        for region in record["regions"]:
            row = {"image_id": name, "region_id": region["id"], "box": region["box"], "category_id": region["category_id"], "category": region["category"], "score": 0.9}
            for model, caption in models.items():
                lines[model].append(json.dumps({**row, "caption": caption(region)}))
    files = []
    for model, rows in lines.items():
        path = root / model / "predictions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n")
        files.append(path)
    return folder, files, records
