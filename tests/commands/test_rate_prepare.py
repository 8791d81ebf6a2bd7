"""``fineregion-pl rate prepare``: the sample, the blinding, the SQLite file, and every bad input as one line."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter

import pytest
from rating_helpers import folder_predictions

from fineregion_pl.commands.rate.prepare import prepare
from fineregion_pl.commands.rate.sampling import allocate
from fineregion_pl.commands.rate.store import Study
from fineregion_pl.model.errors import BadInputError


@pytest.fixture
def made(tmp_path):
    return folder_predictions(tmp_path, images=8)


def _items(path):
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT i.position, m.image_id, i.region_id, i.stratum, GROUP_CONCAT(o.name || '=' || c.text, '|') FROM items i "
            "JOIN images m ON i.image = m.id JOIN captions c ON c.item = i.id JOIN models o ON c.model = o.id "
            "GROUP BY i.id ORDER BY i.position, c.slot"
        ).fetchall()


def test_a_study_is_a_seeded_blinded_sample_in_one_sqlite_file(made, tmp_path, capsys):
    folder, files, records = made
    result = prepare([str(f) for f in files], str(folder), study=str(tmp_path / "s.sqlite"), regions=10, seed=3, raters=["ann", "ben"])
    assert result["items"] == 10 and result["models"] == ["truth", "vague"]
    out = capsys.readouterr().out
    assert "10 regions x 2 models = 20 captions" in out and "rater ann: token " in out
    study = Study(tmp_path / "s.sqlite")
    assert study.models() == ["truth", "vague"] and study.raters() == ["ann", "ben"]
    assert study.check_rater("ann", result["tokens"]["ann"]) and not study.check_rater("ann", result["tokens"]["ben"])
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # the image bytes are the files' bytes: the study needs nothing else
        for image_id, data in conn.execute("SELECT image_id, data FROM images"):
            assert data == (folder / image_id).read_bytes()
        # tokens are stored as hashes only
        assert result["tokens"]["ann"] not in str(conn.execute("SELECT * FROM raters").fetchall())
        slots = conn.execute("SELECT c.slot, m.name FROM captions c JOIN models m ON c.model = m.id").fetchall()
    # every region has each model's caption once, and both orders occur (seeded shuffle per item)
    items = _items(tmp_path / "s.sqlite")
    assert [item[0] for item in items] == list(range(1, 11))
    for _, image_id, region_id, _, captions in items:
        region = next(r for r in records[image_id]["regions"] if r["id"] == json.loads(region_id))
        assert {c.split("=")[0] for c in captions.split("|")} == {"truth", "vague"}
        assert f"truth={region['captions'][0]}" in captions.split("|") and "vague=a thing" in captions.split("|")
    assert {name for slot, name in slots if slot == 1} == {"truth", "vague"}
    # what a rater is shown carries no model name
    task = study.next_task("ann")
    assert task.position == 1 and task.slot == 1 and task.captions_in_item == 2
    assert set(vars(task)) == {"caption_id", "item_id", "position", "slot", "captions_in_item", "text", "box", "image"}
    # the same seed gives the same study, another seed another sample or order
    prepare([str(f) for f in files], str(folder), study=str(tmp_path / "same.sqlite"), regions=10, seed=3)
    prepare([str(f) for f in files], str(folder), study=str(tmp_path / "other.sqlite"), regions=10, seed=4)
    assert _items(tmp_path / "same.sqlite") == items
    assert _items(tmp_path / "other.sqlite") != items


def test_stratified_sample_is_proportional_per_category(made, tmp_path):
    folder, files, records = made
    regions = [r for record in records.values() for r in record["regions"]]
    sizes = Counter(r["category"] for r in regions)
    prepare([str(f) for f in files], str(folder), study=str(tmp_path / "s.sqlite"), regions=12, stratify="category")
    drawn = Counter(stratum for _, _, _, stratum, _ in _items(tmp_path / "s.sqlite"))
    assert drawn == Counter(allocate(dict(sizes), 12)) and sum(drawn.values()) == 12
    assert set(drawn) == set(sizes)  # every category is represented


def test_allocation_is_proportional_and_exact():
    assert allocate({"a": 10, "b": 5, "c": 1}, 100) == {"a": 10, "b": 5, "c": 1}
    assert allocate({"a": 30, "b": 10}, 8) == {"a": 6, "b": 2}
    assert allocate({"a": 10, "b": 5, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}
    for total in range(0, 20):
        shares = allocate({"a": 7, "b": 4, "c": 2, "d": 1}, total)
        assert sum(shares.values()) == min(total, 14)
        assert all(0 <= shares[s] <= size for s, size in {"a": 7, "b": 4, "c": 2, "d": 1}.items())


def test_shard_images_give_source_and_true_category(synthetic_data, tmp_path):
    """Predictions on the synthetic test shards (what `fineregion-pl test` writes): images read from the tars."""
    import webdataset as wds

    from fineregion_pl.data.shards import split_shards

    records = [json.loads(s["json"]) for s in wds.DataPipeline(wds.SimpleShardList(split_shards(synthetic_data, "test")), wds.tarfile_to_samples())]
    files = []
    for name, caption in (("model", lambda r: r["captions"][0]), ("no_region_control", lambda r: "a large red circle")):
        rows = [{"image_id": rec["image_id"], "region_id": r["id"], "box": r["box"], "caption": caption(r), "category": "circle", "score": 0.5}
                for rec in records for r in rec["regions"]]
        path = tmp_path / name / "predictions.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files.append(str(path))
    prepare(files, str(synthetic_data), study=str(tmp_path / "s.sqlite"), regions=6, stratify="category")
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        rows = conn.execute("SELECT m.image_id, i.region_id, i.source, i.category, i.stratum, m.width FROM items i JOIN images m ON i.image = m.id").fetchall()
    truth = {(rec["image_id"], r["id"]): r["category"] for rec in records for r in rec["regions"]}
    assert len(rows) == 6
    for image_id, region_id, source, category, stratum, width in rows:
        assert source == "synthetic" and width == 64
        assert category == stratum == truth[(image_id, json.loads(region_id))]  # the shard's category, not the prediction's "circle"


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_bad_inputs_are_one_line_errors_naming_file_line_and_field(made, tmp_path):
    folder, files, records = made
    good = [str(f) for f in files]
    row = json.loads(files[0].read_text().splitlines()[0])
    cases = [
        ([good[0]], "give two or more prediction files"),
        ([good[0], str(tmp_path / "nowhere.jsonl")], f"prediction file not found: {tmp_path / 'nowhere.jsonl'}"),
        ([good[0], _write(tmp_path / "x" / "a.jsonl", ["{not json"])], f"{tmp_path / 'x' / 'a.jsonl'}: line 1 is not JSON"),
        ([good[0], _write(tmp_path / "x" / "b.jsonl", [row, {k: v for k, v in row.items() if k != "caption"}])], f"{tmp_path / 'x' / 'b.jsonl'}: line 2 has no 'caption' field"),
        ([good[0], _write(tmp_path / "x" / "c.jsonl", [{**row, "box": [5, 5, 1, 9]}])], f"{tmp_path / 'x' / 'c.jsonl'}: line 1: region {row['region_id']} has x1 <= x0"),
        ([good[0], _write(tmp_path / "x" / "d.jsonl", [row, row])], "appears twice"),
        ([good[0], _write(tmp_path / "x" / "e.jsonl", [{**row, "box": [v + 3 for v in row["box"]]}])], "the files must be predictions on the same regions"),
        ([good[0], _write(tmp_path / "x" / "f.jsonl", [{**row, "image_id": "other.png"}])], "no region is in every prediction file"),
    ]
    for n, (given, message) in enumerate(cases):
        with pytest.raises(BadInputError) as caught:
            prepare(given, str(folder), study=str(tmp_path / f"bad{n}.sqlite"))
        assert message in str(caught.value) and "\n" not in str(caught.value), (message, str(caught.value))
        assert not (tmp_path / f"bad{n}.sqlite").exists()
    with pytest.raises(BadInputError, match="--names gives 1 names for 2 prediction files"):
        prepare(good, str(folder), study=str(tmp_path / "n.sqlite"), names=["one"])
    (folder / next(iter(records))).unlink()
    with pytest.raises(BadInputError, match=r"1 image\(s\) of the predictions are not in the folder"):
        prepare(good, str(folder), study=str(tmp_path / "m.sqlite"), regions=1000)


def test_regions_missing_from_a_file_are_left_out_and_counted(made, tmp_path, capsys):
    folder, files, _ = made
    lines = files[1].read_text().splitlines()
    files[1].write_text("\n".join(lines[2:]) + "\n")
    result = prepare([str(f) for f in files], str(folder), study=str(tmp_path / "s.sqlite"), regions=1000)
    assert result["settings"]["regions_left_out"] == 2 and result["items"] == len(lines) - 2
    assert "2 region(s) are not in every prediction file and were left out" in capsys.readouterr().out


def test_an_existing_study_is_never_overwritten(made, tmp_path):
    folder, files, _ = made
    path = tmp_path / "s.sqlite"
    prepare([str(f) for f in files], str(folder), study=str(path), regions=3, raters=["ann"])
    before = path.read_bytes()
    with pytest.raises(BadInputError, match="already exists: a study is never overwritten"):
        prepare([str(f) for f in files], str(folder), study=str(path), regions=3)
    assert path.read_bytes() == before
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(BadInputError, match="is not a rating study"):
        Study(tmp_path / "junk.sqlite")
