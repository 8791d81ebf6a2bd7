"""``fineregion-pl data check DIR``: validate a shard set before GPU hours are spent on it.

Every split folder under ``DIR`` (a folder holding ``manifest.json``) is read in full: the
manifest against its schema, every shard it lists, every sample's JSON record
(:class:`~fineregion_pl.data.schemas.ShardRecord`), every image decoded the way training reads it
(:func:`~fineregion_pl.model.images.as_rgb`) and compared with the record's size, every box
inside its image, every ``category_id`` inside the manifest's categories, every question's regions
present, keys unique, and the manifest's counts equal to what the shards hold. A table per split
is printed; any problem exits non-zero, with each problem named (shard, sample, field).
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from fineregion_pl.data.schemas import ShardRecord, read_manifest_file
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.images import as_rgb
from fineregion_pl.model.schemas import validated

IMAGE_EXTS = ("jpg", "jpeg", "png")
COUNTS = ("images", "regions", "sentences", "questions")


def _samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of a webdataset tar in order (the key is the name up to its first dot)."""
    current, parts = None, {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{folder}/{stem}" if folder else stem
            if key != current and current is not None:
                yield current, parts
                parts = {}
            current = key
            parts[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current, parts


class SplitCheck:
    """The findings of one split folder: counts seen and problems by kind (with their messages)."""

    def __init__(self, folder: Path, tolerance: float):
        self.folder, self.tolerance = folder, tolerance
        self.seen: Counter = Counter()
        self.problems: dict[str, list[str]] = {}

    def problem(self, kind: str, message: str) -> None:
        self.problems.setdefault(kind, []).append(message)

    def run(self) -> None:
        try:
            manifest = read_manifest_file(self.folder / "manifest.json")
        except BadInputError as err:
            self.problem("bad_manifest", str(err))
            return
        categories = len(manifest["categories"])
        keys: set[str] = set()
        for name in manifest["shards"]:
            shard = self.folder / name
            if not shard.is_file():
                self.problem("missing_shard", f"{self.folder / 'manifest.json'} lists {name}, which does not exist")
                continue
            try:
                for key, parts in _samples(shard):
                    self.sample(shard, key, parts, categories, keys)
            except (tarfile.TarError, OSError, EOFError) as err:
                self.problem("unreadable_shard", f"{shard}: not a readable tar ({err})")
        wrong = [f"num_{unit} is {manifest[f'num_{unit}']} but the shards hold {self.seen[unit]}"
                 for unit in COUNTS if manifest.get(f"num_{unit}") is not None and manifest[f"num_{unit}"] != self.seen[unit]]
        if wrong:
            self.problem("count_mismatch", f"{self.folder / 'manifest.json'}: {', '.join(wrong)}")

    def _count_raw(self, raw: object) -> None:
        regions = raw.get("regions") if isinstance(raw, dict) else None
        regions = regions if isinstance(regions, list) else []
        questions = raw.get("questions") if isinstance(raw, dict) and isinstance(raw.get("questions"), list) else []
        sentences = sum(len(r["captions"]) for r in regions if isinstance(r, dict) and isinstance(r.get("captions"), list))
        self.seen.update(images=1, regions=len(regions), questions=len(questions), sentences=sentences)

    def sample(self, shard: Path, key: str, parts: dict[str, bytes], categories: int, keys: set[str]) -> None:
        where = f"{shard.name}: sample {key!r}"
        if key in keys:
            self.problem("duplicate_key", f"{where} appears twice in the split")
        keys.add(key)
        try:
            raw = json.loads(parts.get("json", b"null"))
        except ValueError as err:
            self.problem("bad_record", f"{where}: JSON record unreadable ({err})")
            self.seen.update(images=1)
            return
        try:
            record = validated(ShardRecord, raw, where)
        except BadInputError as err:
            self._count_raw(raw)  # a bad record is still held by the shard: the manifest counts it
            self.problem("bad_record", str(err))
            return
        self.seen.update(images=1, regions=len(record.regions), questions=len(record.questions),
                         sentences=sum(len(r.captions) for r in record.regions))
        data = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if data is None:
            self.problem("undecodable_image", f"{where} has no image ({', '.join(IMAGE_EXTS)})")
            return
        try:
            width, height = as_rgb(data, where).size
        except BadInputError as err:
            self.problem("undecodable_image", str(err))
            return
        if (record.width or width, record.height or height) != (width, height):
            self.problem("size_mismatch", f"{where}: the record says {record.width}x{record.height}, the image is {width}x{height}")
        ids = set()
        for index, region in enumerate(record.regions):
            ids.add(region.id)
            x0, y0, x1, y1 = region.box
            tol = self.tolerance
            if not (x1 > x0 and y1 > y0) or x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
                self.problem("box_outside_image", f"{where}: regions.{index}.box {region.box} is empty or outside the {width}x{height} image")
            if region.category_id is not None and region.category_id >= categories:
                self.problem("category_out_of_range", f"{where}: regions.{index}.category_id {region.category_id} but the manifest has {categories} categories")
        for index, question in enumerate(record.questions):
            missing = [r for r in question.regions if r not in ids]
            if missing:
                self.problem("question_without_region", f"{where}: questions.{index} asks about region(s) {missing}, not in the sample")


def _table(checks: list[SplitCheck]) -> str:
    header = f"{'split':<12} {'images':>7} {'regions':>8} {'sentences':>9} {'questions':>9} {'problems':>8}  kinds"
    rows = [header, "-" * len(header)]
    for check in checks:
        kinds = ", ".join(f"{k} {len(v)}" for k, v in sorted(check.problems.items())) or "-"
        total = sum(len(v) for v in check.problems.values())
        rows.append(f"{check.folder.name:<12} {check.seen['images']:>7} {check.seen['regions']:>8} {check.seen['sentences']:>9} "
                    f"{check.seen['questions']:>9} {total:>8}  {kinds}")
    return "\n".join(rows)


def check(data_dir: str, box_tolerance: float = 0.5, show: int = 20) -> dict[str, dict[str, int]]:
    """Validate every split of the shard set ``data_dir``; print a table and each problem; exit non-zero on any.

    Args:
        data_dir: a shard-set root holding ``<split>/manifest.json`` (or one split folder).
        box_tolerance: pixels a box may stick out of its image before it counts as a problem.
        show: problems printed per kind (all are counted).

    Returns:
        Problem counts by split and kind (empty when the set is clean).
    """
    root = Path(data_dir)
    folders = [root] if (root / "manifest.json").is_file() else sorted(p.parent for p in root.glob("*/manifest.json"))
    if not folders:
        raise BadInputError(f"data check: {root} holds no <split>/manifest.json (not a shard set)")
    checks = [SplitCheck(folder, box_tolerance) for folder in folders]
    for one in checks:
        one.run()
    print(_table(checks))
    for one in checks:
        for kind, messages in sorted(one.problems.items()):
            for message in messages[:show]:
                print(f"  {one.folder.name}: {kind}: {message}")
            if len(messages) > show:
                print(f"  {one.folder.name}: {kind}: ... and {len(messages) - show} more")
    found = {one.folder.name: {k: len(v) for k, v in sorted(one.problems.items())} for one in checks if one.problems}
    if found:
        total = sum(sum(v.values()) for v in found.values())
        raise BadInputError(f"data check: {total} problem(s) in {root} ({'; '.join(f'{s}: ' + ', '.join(f'{k} {n}' for k, n in v.items()) for s, v in found.items())})")
    print(f"data check: {root} is clean ({sum(c.seen['images'] for c in checks)} images in {len(checks)} splits)")
    return found


def data_verbs() -> dict[str, object]:
    """The subcommands of ``fineregion-pl data``."""
    return {"check": check}


