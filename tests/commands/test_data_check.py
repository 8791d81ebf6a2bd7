"""``fineregion-pl data check``: five planted problems are all reported (exit 1); a clean set passes."""

from __future__ import annotations

import json
import shutil

import pytest

from fineregion_pl.commands.cli import main
from fineregion_pl.commands.data_check import _samples
from fineregion_pl.data.shards import encode_sample, shard_writer


@pytest.fixture
def planted(synthetic_data, tmp_path):
    """A copy of the synthetic shards with five problems planted in the test split."""
    root = tmp_path / "planted"
    shutil.copytree(synthetic_data, root)
    split = root / "test"
    manifest = json.loads((split / "manifest.json").read_text())
    shard = split / manifest["shards"][0]
    samples = list(_samples(shard))
    rewritten = []
    for index, (key, parts) in enumerate(samples):
        record = json.loads(parts["json"])
        image = parts["jpg"] if "jpg" in parts else parts["png"]
        if index == 0:
            image = image[: len(image) // 3]  # 1: a truncated image
        elif index == 1:
            record["regions"][0]["box"] = [10, 10, 500, 500]  # 2: a box outside the 64x64 image
        elif index == 2:
            record["regions"][0]["category_id"] = 99  # 3: a category beyond the manifest's
        elif index == 3:
            record["regions"][0]["box"] = "5599"  # 4: a box that is a string
        rewritten.append(encode_sample(key, image, record, "jpg" if "jpg" in parts else "png"))
    shard.unlink()
    with shard_writer(str(shard).replace("000000", "%06d"), maxcount=10_000) as writer:
        for sample in rewritten:
            writer.write(sample)
    manifest["num_images"] += 1  # 5: the manifest counts an image the shards do not hold
    (split / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_data_check_reports_all_five_planted_problems_and_exits_non_zero(planted, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", str(planted)])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    for kind in ("undecodable_image 1", "box_outside_image 1", "category_out_of_range 1", "bad_record 1", "count_mismatch 1"):
        assert kind in err, kind
    assert "regions.0.category_id 99 but the manifest has 5 categories" in out
    assert "field regions.0.box: Input should be a valid list (got '5599')" in out
    assert "num_images is 17 but the shards hold 16" in out and "num_regions" not in out  # the bad record is still held
    assert err.count("\n") == 1 and err.startswith("fineregion-pl: error: data check: 5 problem(s)")


def test_data_check_passes_a_clean_shard_set(synthetic_data, capsys):
    main(["data", "check", str(synthetic_data)])
    out = capsys.readouterr().out
    assert "is clean (128 images in 3 splits)" in out and "problems" in out.splitlines()[0]
