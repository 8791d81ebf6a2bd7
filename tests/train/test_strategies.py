"""The strategy configs (``configs/strategies/``) resolve through our CLI and build the strategies they promise."""

from __future__ import annotations

import re
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from fineregion_pl.model.errors import BadInputError
from fineregion_pl.train.cli import FineRegionCLI, run_lightning
from fineregion_pl.train.strategies import (
    RegionDeepSpeedStrategy,
    RegionFSDPStrategy,
    import_classes,
    load_without_frozen,
)

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = ROOT / "configs" / "strategies"
NAMES = ["ddp", "fsdp", "fsdp2", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3"]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from tiny_runs import stage2_overlay, write_yaml


def strategy_init_args(name: str) -> dict:
    return yaml.safe_load((STRATEGIES / f"{name}.yaml").read_text())["trainer"]["strategy"]["init_args"]


def test_the_strategy_configs_exist_and_every_key_is_commented():
    assert set(NAMES) <= {p.stem for p in STRATEGIES.glob("*.yaml")}
    for name in NAMES:
        for number, line in enumerate((STRATEGIES / f"{name}.yaml").read_text().splitlines(), 1):
            if re.match(r"^\s+\w+:\s*\S", line) and not line.strip().startswith("#"):
                assert "#" in line, f"{name}.yaml:{number}: key without a comment: {line.strip()}"


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize("name", NAMES)
def test_real_scale_recipe_with_a_strategy_parses(stage, name, capsys):
    with pytest.raises(SystemExit) as done:
        run_lightning(["fit", "--config", str(ROOT / "configs" / f"{stage}.yaml"), "--config", str(STRATEGIES / f"{name}.yaml"), "--print_config"])
    assert done.value.code == 0
    # DeepSpeed's import logs "[date] [WARNING] ... Setting accelerator to CPU" to stdout on a CPU machine
    out = "\n".join(line for line in capsys.readouterr().out.splitlines() if not line.startswith("[20"))
    printed = yaml.safe_load(out)
    assert printed["trainer"]["strategy"]["class_path"].rsplit(".", 1)[-1] in ("DDPStrategy", "RegionFSDPStrategy", "RegionFSDP2Strategy", "RegionDeepSpeedStrategy")


@pytest.fixture(scope="module")
def tiny_overlay(synthetic_data, tiny_lm, stage1_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("strategy-cli")
    return write_yaml(out / "tiny.yaml", stage2_overlay(out, synthetic_data, tiny_lm, stage1_checkpoint, max_steps=2))


def build_trainer_strategy(name: str, overlay: Path):
    """Lightning builds the strategy from our CLI and the config (on CPU: nothing is launched)."""
    cli = FineRegionCLI(
        args=["--config", str(ROOT / "configs/quickstart/stage2.yaml"), "--config", str(overlay), "--config", str(STRATEGIES / f"{name}.yaml"),
              "--trainer.accelerator", "cpu", "--trainer.devices", "2"],
        run=False,
    )
    return cli.trainer.strategy


def test_ddp_config_sets_a_short_timeout_and_no_unused_parameter_search(tiny_overlay):
    strategy = build_trainer_strategy("ddp", tiny_overlay)
    assert type(strategy) is DDPStrategy
    assert strategy._timeout == timedelta(minutes=10)
    assert strategy._ddp_kwargs["find_unused_parameters"] is False
    assert strategy._ddp_kwargs["gradient_as_bucket_view"] is True
    assert strategy.num_processes == 2


def test_fsdp_config_wraps_swin_and_lm_blocks_of_the_real_model(tiny_overlay):
    from timm.models.swin_transformer import SwinTransformerBlock
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    strategy = build_trainer_strategy("fsdp", tiny_overlay)
    assert isinstance(strategy, RegionFSDPStrategy) and isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert strategy.kwargs["use_orig_params"] is True and strategy._timeout == timedelta(minutes=10)
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    # the policy picks exactly the Swin blocks and the LM's decoder layers of a stage-2 module
    cli = FineRegionCLI(args=["--config", str(ROOT / "configs/quickstart/stage2.yaml"), "--config", str(tiny_overlay), "--trainer.accelerator", "cpu"], run=False)
    module = cli.model
    module.configure_model()
    chosen = policy._run_policy(module, set(), {})
    blocks = [m for m in module.modules() if isinstance(m, (SwinTransformerBlock, LlamaDecoderLayer))]
    assert any(isinstance(m, SwinTransformerBlock) for m in blocks) and any(isinstance(m, LlamaDecoderLayer) for m in blocks)
    assert set(blocks) <= set(chosen)
    assert all(isinstance(m, (SwinTransformerBlock, LlamaDecoderLayer)) or m is module for m in chosen)


def test_fsdp_activation_checkpointing_by_class_name():
    strategy = RegionFSDPStrategy(wrap_blocks=["timm.models.swin_transformer.SwinTransformerBlock"],
                                  checkpoint_blocks=["transformers.models.llama.modeling_llama.LlamaDecoderLayer"])
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert LlamaDecoderLayer in strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes


@pytest.mark.parametrize("name", ["nothing_dotted", "no.such.module.Block", "torch.nn.functional.relu", "timm.models.swin_transformer.NoSuchBlock"])
def test_bad_block_names_are_one_clear_error(name):
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        import_classes([name], "wrap_blocks")


@pytest.mark.parametrize("name,stage,offload", [("deepspeed_zero2", 2, False), ("deepspeed_zero2_offload", 2, True), ("deepspeed_zero3", 3, False)])
def test_deepspeed_configs(tiny_overlay, name, stage, offload):
    strategy = build_trainer_strategy(name, tiny_overlay)
    assert isinstance(strategy, RegionDeepSpeedStrategy) and isinstance(strategy, DeepSpeedStrategy)
    # built directly from the config's init_args too (how a GPU machine's Trainer gets it)
    direct = RegionDeepSpeedStrategy(**strategy_init_args(name))
    for built in (strategy, direct):
        zero = built.config["zero_optimization"]
        assert zero["stage"] == stage
        assert built.exclude_frozen_parameters is True
        assert built.zero_stage_3 is (stage == 3)
        assert built._timeout == timedelta(minutes=10)
        if offload:
            assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_optimizer"]["pin_memory"] is True
            assert built.config["zero_force_ds_cpu_optimizer"] is False  # our torch AdamW may run on the CPU
        else:
            assert "offload_optimizer" not in zero and "zero_force_ds_cpu_optimizer" not in built.config
    if stage == 3:
        assert "offload_param" not in strategy.config["zero_optimization"] and strategy.load_full_weights is False


def test_resuming_without_frozen_weights_accepts_only_frozen_gaps():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    module[0].requires_grad_(False)
    trained = {k: v + 1 for k, v in module.state_dict().items() if k.startswith("1.")}
    load_without_frozen(module, trained, source="ckpt")
    assert torch.equal(module[1].weight, trained["1.weight"])
    with pytest.raises(BadInputError, match=r"missing 1 key\(s\) \['1.bias'\]"):
        load_without_frozen(module, {"1.weight": trained["1.weight"]}, source="ckpt")
    with pytest.raises(BadInputError, match="unexpected 1 key"):
        load_without_frozen(module, dict(trained, extra=torch.zeros(1)), source="ckpt")
    load_without_frozen(module, {"1.weight": trained["1.weight"]}, strict=False)
