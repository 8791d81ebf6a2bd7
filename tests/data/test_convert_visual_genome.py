"""``data_prep/visual_genome.py`` on the real Visual Genome records of the fixtures (placeholder images)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import runpy
import sys
from collections import Counter
from pathlib import Path

import pytest
from convert_helpers import (
    REPO,
    VG,
    load_converter,
    manifests,
    need_fixtures,
    read_json,
    read_samples,
    shard_bytes,
    v12_as_v10,
    vg_layout,
    vg_region_data,
)
from PIL import Image

from fineregion_pl.data.convert import hash_split

SOURCE_REGIONS = 1278  # regions of region_descriptions_v1.2.json
SPLITS = {"train": [1, 2, 3], "test": [4]}  # image 5 is left out on purpose


@pytest.fixture(scope="module")
def vg():
    need_fixtures()
    return load_converter("visual_genome")


def run(vg, root: Path, out: Path, *flags: str) -> int:
    """The converter's exit code on a layout (in-process, as ``python data_prep/visual_genome.py`` would run)."""
    return vg.main(["--vg-root", str(root), "--out", str(out), "--no-progress", *flags])


def regions_by_id(out: Path) -> dict:
    """Every written region by id, with its sample's image id and size."""
    return {r["id"]: {**r, "image_id": rec["image_id"]} for split in manifests(out) for _, _, rec in read_samples(out / split) for r in rec["regions"]}


def xyxy(region: dict) -> list[float]:
    """The source region's box as xyxy floats."""
    return [float(region["x"]), float(region["y"]), float(region["x"] + region["width"]), float(region["y"] + region["height"])]


def iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.fixture(scope="module")
def split_out(vg, tmp_path_factory):
    """The fixture converted with objects, relationships and a split file that leaves image 5 out."""
    tmp = tmp_path_factory.mktemp("vg_split")
    root = vg_layout(tmp / "vg")
    (tmp / "splits.json").write_text(json.dumps(SPLITS))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run(vg, root, tmp / "out", "--split-file", str(tmp / "splits.json")) == 0
    (tmp / "out" / "summary.txt").write_text(printed.getvalue())
    return tmp / "out"


def test_v10_and_v12_layouts_give_the_same_regions(vg, tmp_path):
    v12, v10 = vg_region_data("v1.2"), vg_region_data("v1.0")
    outs = {}
    for name, data in {"v12": v12, "v10": v10, "v12_in_v10_keys": v12_as_v10(v12)}.items():
        assert run(vg, vg_layout(tmp_path / name, data, objects=False, relationships=False), tmp_path / f"out_{name}") == 0
        outs[name] = tmp_path / f"out_{name}"
    got12, got10 = regions_by_id(outs["v12"]), regions_by_id(outs["v10"])
    source12 = {r["region_id"]: r for e in v12 for r in e["regions"]}
    source10 = {r["id"]: r for e in v10 for r in e["regions"]}
    assert set(got12) == set(source12) and set(got10) == set(source10)
    common = set(got12) & set(got10)
    assert len(common) > 1200  # the two releases differ by a few regions; the shared ones must come out the same
    assert all(got12[i] == got10[i] for i in common)
    assert all(got10[i]["box"] == xyxy(source10[i]) and got10[i]["captions_raw"] == [source10[i]["phrase"]] for i in common)
    # the same records in either key layout give byte-identical shards
    assert shard_bytes(outs["v12"]) == shard_bytes(outs["v12_in_v10_keys"])
    # without a split file: a hash split of the image ids, its ratios in every manifest
    found = manifests(outs["v12"])
    assert set(found) == {"train", "val", "test"} and all(m["split_ratios"] == {"train": 0.9, "val": 0.05, "test": 0.05} for m in found.values())
    assert all(hash_split(rec["image_id"], found[split]["split_ratios"]) == split for split in found for _, _, rec in read_samples(outs["v12"] / split))


def test_every_source_region_is_written_once_or_counted(split_out):
    source = {r["region_id"]: r for e in vg_region_data("v1.2") for r in e["regions"]}
    found = manifests(split_out)
    assert set(found) == {"train", "test"}
    written = [(r, rec) for split in found for _, _, rec in read_samples(split_out / split) for r in rec["regions"]]
    ids = [r["id"] for r, _ in written]
    assert len(ids) == len(set(ids))
    skipped = sum(n for m in found.values() for n in m["skipped"].values())
    left_out = found["train"]["not_in_split_file"]
    assert left_out == {"images": 1, "regions": len([r for r in source.values() if r["image_id"] == 5])}
    assert sum(m["num_regions"] for m in found.values()) == len(ids)
    assert len(ids) + skipped + left_out["regions"] == SOURCE_REGIONS
    assert set(ids) == {i for i, r in source.items() if r["image_id"] != 5}
    for region, record in written:
        raw = source[region["id"]]
        assert record["image_id"] == raw["image_id"] and region["box"] == xyxy(raw)
        assert region["captions_raw"] == [raw["phrase"]] and region["captions"] == [" ".join(raw["phrase"].split())]
        assert 0 <= region["box"][0] < region["box"][2] <= record["width"] and 0 <= region["box"][1] < region["box"][3] <= record["height"]
    assert found["test"]["split_file"].endswith("splits.json")
    assert "; not in any split: 1 images/248 regions" in (split_out / "summary.txt").read_text()


def test_categories_and_questions_come_from_objects_and_relationships(split_out):
    objects = {e["image_id"]: e["objects"] for e in read_json(VG / "objects_v1.2.json")}
    relationships = {e["image_id"]: e["relationships"] for e in read_json(VG / "relationships_v1.2.json")}
    manifest = manifests(split_out)["train"]
    counts = Counter(o["names"][0].strip().lower() for objs in objects.values() for o in objs)
    assert manifest["categories"] == sorted(counts, key=lambda n: (-counts[n], n))
    categorised = questions = 0
    for _, _, record in read_samples(split_out / "train") + read_samples(split_out / "test"):
        boxes = [[o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]] for o in objects[record["image_id"]]]
        for region in record["regions"]:
            overlaps = [iou(region["box"], b) for b in boxes]
            best = max(range(len(boxes)), key=overlaps.__getitem__)
            expected = objects[record["image_id"]][best]["names"][0].strip().lower() if overlaps[best] >= 0.5 else None
            assert region["category"] == expected
            assert region["category_id"] == (manifest["categories"].index(expected) if expected else None)
            categorised += expected is not None
        ids = {r["id"] for r in record["regions"]}
        predicates = {r["predicate"].strip().lower() for r in relationships[record["image_id"]]}
        for q in record["questions"]:
            assert set(q["regions"]) <= ids and q["regions"][0] != q["regions"][1]
            assert q["answer"] in predicates and q["question"].startswith("what is the relation of the ")
        questions += len(record["questions"])
    assert categorised > 50 and questions > 20
    total = sum(len(r) for i, r in relationships.items() if i != 5)
    assert sum(m["num_questions"] + sum(m["skipped_questions"].values()) for m in manifests(split_out).values()) == total


def bad_layout(root: Path) -> tuple[Path, dict]:
    """The fixture with one bad record of each kind; returns the layout and the region id of each bad box."""
    data = vg_region_data("v1.2")
    first = data[0]["regions"]  # image 1 is 800 x 600
    first[0]["width"] = 0
    first[1]["x"] = float("nan")
    first[2]["x"] = 900
    first[3]["phrase"] = "  \n "
    first[4]["height"] = -3
    first[5]["y"], first[5]["height"] = 590, 12  # 2 px below the image: within tolerance, clamped
    first[6]["x"] = None
    root = vg_layout(root, data)
    (root / "VG_100K" / "2.jpg").unlink()
    (root / "VG_100K" / "3.jpg").write_bytes(b"not a jpeg at all")
    truncated = (root / "VG_100K" / "4.jpg").read_bytes()
    (root / "VG_100K" / "4.jpg").write_bytes(truncated[: len(truncated) // 2])
    return root, {"width0": first[0]["region_id"], "clamped": first[5]["region_id"]}


def test_bad_records_are_skipped_and_counted_by_reason(vg, tmp_path, capsys):
    root, ids = bad_layout(tmp_path / "vg")
    assert run(vg, root, tmp_path / "out", "--split-ratios", "1", "0", "0") == 0
    manifest = manifests(tmp_path / "out")["train"]
    per_image = {e["id"]: len(e["regions"]) for e in vg_region_data("v1.2")}
    assert manifest["skipped"] == {
        "box_empty": 2, "box_malformed": 1, "box_not_finite": 1, "box_outside_image": 1, "empty_text": 1,
        "missing_image": per_image[2], "unreadable_image": per_image[3] + per_image[4],
    }
    assert manifest["skipped_images"] == {"missing_image": 1, "unreadable_image": 2}
    assert manifest["num_images"] == 2 and manifest["num_regions"] + sum(manifest["skipped"].values()) == SOURCE_REGIONS
    regions = regions_by_id(tmp_path / "out")
    assert ids["width0"] not in regions and regions[ids["clamped"]]["box"][3] == 600.0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "missing_image" in line and "box_not_finite 1" in line and "unreadable_image 2" in line


def test_strict_stops_at_the_first_bad_record(vg, tmp_path, capsys):
    root, ids = bad_layout(tmp_path / "vg")
    assert run(vg, root, tmp_path / "out", "--strict", "--split-ratios", "1", "0", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: region_descriptions.json: image 1 region {ids['width0']} has width 0"]
    assert not (tmp_path / "out" / "train" / "manifest.json").exists() and not list((tmp_path / "out").glob("*/*.tar"))


def test_strict_exit_code_of_the_script(vg, tmp_path, monkeypatch, capsys):
    """Run as a script (``__main__``), it exits with code 2 and one line naming the record."""
    root = vg_layout(tmp_path / "vg", objects=False, relationships=False)
    (root / "VG_100K" / "3.jpg").write_bytes(b"\xff\xd8 broken")
    script = REPO / "data_prep" / "visual_genome.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--vg-root", str(root), "--out", str(tmp_path / "out"), "--strict", "--no-progress"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {root / 'VG_100K' / '3.jpg'}: image 3 cannot be decoded (")


def test_rerun_is_byte_identical_and_an_interrupted_run_resumes(vg, tmp_path):
    root = vg_layout(tmp_path / "vg", objects=False, relationships=False)
    flags = ["--split-ratios", "1", "0", "0", "--max-count", "1"]
    assert run(vg, root, tmp_path / "a", *flags, "--workers", "2") == 0
    assert run(vg, root, tmp_path / "b", *flags) == 0
    reference = shard_bytes(tmp_path / "b")
    assert len(reference) == 5 and shard_bytes(tmp_path / "a") == reference
    train = tmp_path / "a" / "train"
    stamps = {p.name: p.stat().st_mtime_ns for p in train.glob("*.tar")}
    assert run(vg, root, tmp_path / "a", *flags) == 0  # nothing to do: no shard is rewritten
    assert {p.name: p.stat().st_mtime_ns for p in train.glob("*.tar")} == stamps
    # interrupt: one finished shard lost, one chunk killed before its rename (a .tmp and no record)
    (train / "train-000001-000.tar").unlink()
    (train / "train-000003-000.tar").rename(train / "train-000003-000.tar.tmp")
    (train / "chunks" / "000003.json").unlink()
    assert run(vg, root, tmp_path / "a", *flags) == 0
    assert shard_bytes(tmp_path / "a") == reference and not list(train.glob("*.tmp"))
    kept = {n: t for n, t in stamps.items() if n not in ("train-000001-000.tar", "train-000003-000.tar")}
    assert {n: (train / n).stat().st_mtime_ns for n in kept} == kept
    assert read_json(train / "manifest.json") == read_json(tmp_path / "b" / "train" / "manifest.json")


def test_max_side_reencodes_images_and_scales_boxes(vg, tmp_path):
    root = vg_layout(tmp_path / "vg", objects=False, relationships=False)
    assert run(vg, root, tmp_path / "out", "--max-side", "400", "--split-ratios", "1", "0", "0") == 0
    source = {r["region_id"]: r for e in vg_region_data("v1.2") for r in e["regions"]}
    sizes = {e["image_id"]: (e["width"], e["height"]) for e in read_json(VG / "image_data.json")}
    for _, jpg, record in read_samples(tmp_path / "out" / "train"):
        assert Image.open(io.BytesIO(jpg)).size == (record["width"], record["height"]) == (400, 300)
        sx, sy = 400 / sizes[record["image_id"]][0], 300 / sizes[record["image_id"]][1]
        for region in record["regions"]:
            expected = [v * s for v, s in zip(xyxy(source[region["id"]]), (sx, sy, sx, sy))]
            assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(region["box"], expected))
    assert manifests(tmp_path / "out")["train"]["settings"]["max_side"] == 400


def test_datamodule_reads_the_shards(split_out):
    from fineregion_pl.data import RegionDataModule

    dm = RegionDataModule(data_dirs=[str(split_out)], image_size=64, batch_size=2, num_workers=0, max_regions=8)
    batch = next(iter(dm.test_dataloader()))
    (_, _, record), = read_samples(split_out / "test")
    scale = 64 / max(record["width"], record["height"])
    assert batch["images"].shape == (1, 3, 64, 64) and batch["region_valid"].sum() == 8
    assert batch["boxes"][0].flatten().tolist() == pytest.approx([v * scale for r in record["regions"][:8] for v in r["box"]], abs=1e-3)
    assert batch["captions"][0] == [r["captions"][0] for r in record["regions"][:8]] and batch["image_ids"] == [4]
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 3, 64, 64) and bool(batch["region_valid"].all())
    assert all(c in refs for caps, rs in zip(batch["captions"], batch["references"]) for c, refs in zip(caps, rs))
    assert float(batch["boxes"].max()) <= 64 and float(batch["boxes"].min()) >= 0


def test_help_documents_every_flag(vg, capsys):
    parser = vg.build_parser()
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 17 and all(a.help and a.option_strings[0] in text for a in flags)
