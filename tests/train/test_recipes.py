"""The real-scale recipes parse and build on this CPU with local stand-ins for hub weights and datasets.

Every YAML under ``configs/`` is also checked against the code's signatures, so recipes cannot rot.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml
from learning import first_batch

from fineregion_pl.train.cli import FineRegionCLI

ROOT = Path(__file__).resolve().parents[2]
ALL_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml") if not {"strategies", "rows"} & set(p.parts))


def build(config: str, *overrides: str) -> FineRegionCLI:
    """Instantiate trainer, model and data from a recipe without running anything."""
    return FineRegionCLI(args=["--config", str(ROOT / config), *overrides], run=False)


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_recipe_parses_against_the_code(config, capsys):
    from fineregion_pl.train.cli import run_lightning

    with pytest.raises(SystemExit) as done:
        run_lightning(["fit", "--config", str(ROOT / config), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("fineregion_pl.")


@pytest.fixture(scope="module")
def two_shard_sets(synthetic_data, tmp_path_factory):
    """Stand-ins for shards/refcocog and shards/vg: two copies of the tiny synthetic shard set."""
    import shutil

    root = tmp_path_factory.mktemp("shards")
    for name in ("refcocog", "vg"):
        shutil.copytree(synthetic_data, root / name)
    return [str(root / "refcocog"), str(root / "vg")]


@pytest.fixture(scope="module")
def swin_b_weights(tmp_path_factory):
    """A local weights file for Swin-B at 384 px (random values: the hub is out of reach here)."""
    path = tmp_path_factory.mktemp("weights") / "swin_base_384.pth"
    torch.save(timm.create_model("swin_base_patch4_window12_384", pretrained=False).state_dict(), path)
    return path


def cpu(*extra: str) -> list[str]:
    return ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true", *extra]


@pytest.mark.slow
def test_stage1_recipe_builds_swin_b_from_a_local_file(swin_b_weights, two_shard_sets, tmp_path):
    cli = build(
        "configs/stage1.yaml",
        *cpu(
            "--model.init_args.encoder.pretrained", str(swin_b_weights), f"--data.data_dirs={two_shard_sets}",
            "--data.num_workers", "0", "--data.batch_size", "1", "--data.image_size", "384", f"--trainer.default_root_dir={tmp_path}",
        ),
    )
    encoder = cli.model.model.encoder
    assert encoder.level_dims == [256, 512, 1024] and encoder.out_dim == 1792
    assert cli.model.hparams.num_classes == 5  # linked from the joint category list of both sets
    loaded = torch.load(swin_b_weights, weights_only=True)
    assert torch.equal(encoder.backbone.patch_embed.proj.weight, loaded["patch_embed.proj.weight"])
    batch = first_batch(cli.datamodule)
    with torch.no_grad():
        out = cli.model.eval()(batch)
    assert out.logits.shape[-1] == 5 and torch.isfinite(out.logits).all()
    assert [tuple(f.shape[1:3]) for f in out.regions.features] == [(48, 48), (24, 24), (12, 12)]


@pytest.mark.slow
def test_stage2_recipe_builds_with_a_local_lm_and_stage1_checkpoint(swin_b_weights, two_shard_sets, tiny_lm, tmp_path):
    stage1 = build(
        "configs/stage1.yaml", *cpu("--model.init_args.encoder.pretrained", str(swin_b_weights), f"--data.data_dirs={two_shard_sets}")
    ).model
    ckpt = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict(), "hyper_parameters": dict(stage1.hparams)}, ckpt)
    cli = build(
        "configs/stage2.yaml",
        *cpu(
            "--model.init_args.init_from", str(ckpt), "--model.init_args.language_model.name_or_path", str(tiny_lm),
            "--model.init_args.language_model.dtype", "float32", "--model.init_args.language_model.attn_implementation", "sdpa",
            f"--data.data_dirs={two_shard_sets}", "--data.num_workers", "0", "--data.batch_size", "1",
        ),
    )
    module = cli.model
    assert module.model.language.model.peft_config["default"].r == 64
    assert module.model.prompt.num_tokens == 8 and module.model.prompt.mode == "adaptive"
    own = module.model.vision.state_dict()
    assert all(torch.equal(own[k[len("model."):]], v) for k, v in stage1.state_dict().items() if k.startswith("model."))
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in module.model.language.model.modules())
    assert module.hparams.lr == 2e-4 and module.hparams.encoder_lr == 1e-5  # separate learning rates per part
