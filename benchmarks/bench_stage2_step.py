"""Framework overhead: a stage-2 training step through the Lightning Trainer against a plain loop.

The same ``Stage2Module`` (built once: the quickstart's encoder from an untrained stage-1
checkpoint, a tiny Llama with LoRA, and every other setting from ``configs/quickstart/stage2.yaml``'s
``model.init_args``: adaptive prompt, 4 soft tokens, consistency, referring, spatial and
classification losses on, LoRA ``all-linear`` r 8) trains on the same fixed batch (8 synthetic
images of 128 px, ``max_regions`` 8: half the quickstart's batch, so the framework's fixed
per-step cost weighs more, and the benchmark takes minutes) three ways:

- **plain loop**: ``loss = module.losses(batch)["loss"]; optimizer.zero_grad(); loss.backward();
  optimizer.step(); scheduler.step()`` with the optimizer and schedule ``configure_optimizers``
  builds (``adamw_with_schedule`` over the same three parameter groups and learning rates,
  warm-up + cosine; checked against the Trainer's optimizer after each Trainer run);
- **Trainer, lean**: ``Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
  enable_model_summary=False)``, the batch repeated by a ``DataLoader``; what the step runs is
  the module's ``training_step`` (``losses`` + finite-loss check + ``log_dict`` of the losses);
- **Trainer, defaults**: as a user would run it: progress bar, ``CSVLogger`` (``log_every_n_steps``
  5, so logging happens inside the timed steps), model summary and the default checkpointing
  (written after the last step, outside the timed steps). The progress bar writes to a string
  buffer, not a terminal.

What every step runs is the package's training path: ``Stage2Module.losses`` ->
``RegionCaptioner.losses`` -> ``RegionCaptioner.encode`` (``RegionVisionModel.forward``, then
``RegionPrompt``), ``RegionLanguageModel.text_loss`` for captions, referring expressions and
spatial questions (``RegionCaptioner.question_prompts``: the second region's prompt plus the pair
token), ``consistency_loss``, the category cross-entropy; then ``backward`` and the AdamW step.

Per-step time is steady state: in the Trainer, the interval between consecutive
``on_train_batch_start`` calls (a callback), i.e. the whole step, hooks, logging and fetching the
next batch; in the plain loop, the same interval between consecutive iterations. Each run takes
``warmup`` steps first (not timed), then ``steps`` timed steps; a round runs the three once each,
in a rotated order, and a fresh optimizer each time; the figure is the median over rounds of the
per-round ratio of mean step times.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from benchmarks import measure_interleaved, median, median_ratio, row  # noqa: E402
from benchmarks.bench_vision import quickstart_encoder, quickstart_init_args  # noqa: E402
from fineregion_pl import RegionDataModule, Stage1Module, Stage2Module  # noqa: E402
from fineregion_pl.data.synthetic import SHAPES, SyntheticConfig, write_synthetic  # noqa: E402
from fineregion_pl.model.config import as_config  # noqa: E402
from fineregion_pl.model.language_model import LanguageModelConfig  # noqa: E402
from fineregion_pl.train.optim import adamw_with_schedule  # noqa: E402
from fineregion_pl.train.tiny_lm import build_tiny_lm, synthetic_pretraining_texts  # noqa: E402

try:
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

TARGET = 1.10


class StepTimer(L.Callback):
    """Records the time of every ``on_train_batch_start``."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())


def steady_step_time(starts: list[float], warmup: int, steps: int) -> float:
    """Mean interval over ``steps`` consecutive steps after ``warmup`` steps."""
    if len(starts) < warmup + steps + 1:
        raise RuntimeError(f"expected {warmup + steps + 1} step starts, got {len(starts)}")
    return (starts[warmup + steps] - starts[warmup]) / steps


def optimizer_like_module(module: Stage2Module, total_steps: int):
    """What ``Stage2Module.configure_optimizers`` returns, built without a Trainer."""
    hp = module.hparams
    groups = [
        {"params": list(module.model.prompt.parameters()), "lr": hp.lr},
        {"params": list(module.model.language.parameters()), "lr": hp.lora_lr or hp.lr},
        {"params": list(module.model.vision.parameters()), "lr": hp.encoder_lr},
    ]
    config = adamw_with_schedule(groups, hp.weight_decay, hp.warmup_steps, total_steps)
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def check_same_optimizer(ours: torch.optim.Optimizer, trainers: torch.optim.Optimizer) -> None:
    """The plain loop's optimizer has the parameter groups, learning rates and weight decay of the one
    ``configure_optimizers`` gave the Trainer (so the loop runs the same step)."""
    def groups(optimizer):
        return [(type(optimizer).__name__, [id(p) for p in g["params"]], g.get("initial_lr", g["lr"]), g["weight_decay"])
                for g in optimizer.param_groups]

    if groups(ours) != groups(trainers):
        raise AssertionError("bench_stage2_step: optimizer_like_module no longer matches Stage2Module.configure_optimizers")


def stage2_settings(lm_dir: Path, ckpt: Path) -> dict:
    """``Stage2Module`` arguments: ``configs/quickstart/stage2.yaml``'s, with this run's LM and stage-1 checkpoint."""
    settings = dict(quickstart_init_args("stage2"), init_from=str(ckpt), results_dir=None)
    settings["language_model"] = as_config(LanguageModelConfig, dict(settings["language_model"], name_or_path=str(lm_dir)))
    return settings


def build(tmp: Path, quick: bool) -> tuple[Stage2Module, dict, str]:
    """The module (configured) and one fixed training batch, made in ``tmp``."""
    size = 64 if quick else 128
    if quick:
        encoder = quickstart_encoder(64)
        encoder.backbone_kwargs.update(embed_dim=16, depths=[1, 1, 1], num_heads=[1, 2, 4])
    else:
        encoder = quickstart_encoder(128)
    torch.manual_seed(0)
    stage1 = Stage1Module(encoder=encoder, num_classes=len(SHAPES), categories=list(SHAPES))
    ckpt = tmp / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict(), "hyper_parameters": dict(stage1.hparams)}, ckpt)
    lm_dir = build_tiny_lm(tmp / "tiny-lm", synthetic_pretraining_texts(0, 100), hidden_size=32 if quick else 128,
                           num_layers=1 if quick else 2, num_heads=2 if quick else 4, steps=5, progress=False)
    batch_size = 4 if quick else 8
    config = SyntheticConfig(image_size=size, min_shapes=2, max_shapes=4) if quick else SyntheticConfig()
    write_synthetic(tmp / "data", {"train": 2 * batch_size}, seed=0, shard_size=2 * batch_size, config=config, progress=False)
    data = RegionDataModule([str(tmp / "data")], image_size=size, batch_size=batch_size, num_workers=0, max_regions=8)
    batch = next(iter(data.train_dataloader()))
    module = Stage2Module(**stage2_settings(lm_dir, ckpt))
    module.configure_model()
    regions = int(batch["region_valid"].sum())
    sizes = (f"{batch_size} images of {size} px, {regions} regions, tiny Llama hidden {32 if quick else 128} with LoRA, "
             f"{sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6:.2f} M trainable parameters")
    return module, batch, sizes


def run(quick: bool = False) -> list[dict]:
    warmup, steps = (1, 2) if quick else (2, 5)
    rounds = 2 if quick else 11  # short runs, many rounds: the machine's load changes within seconds
    total = warmup + steps + 1
    with tempfile.TemporaryDirectory(prefix="bench_stage2_step_") as tmp_name:
        tmp = Path(tmp_name)
        module, batch, sizes = build(tmp, quick)
        loader = torch.utils.data.DataLoader([batch] * total, batch_size=None, collate_fn=lambda b: b)

        def plain() -> float:
            module.train()
            optimizer, scheduler = optimizer_like_module(module, total)
            starts = []
            for _ in range(total):
                starts.append(time.perf_counter())
                loss = module.losses(batch)["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            return steady_step_time(starts, warmup, steps)

        def trainer(defaults: bool) -> float:
            timer = StepTimer()
            common = dict(accelerator="cpu", devices=1, max_steps=total, limit_val_batches=0, num_sanity_val_steps=0,
                          default_root_dir=str(tmp / "runs"), callbacks=[timer])
            if defaults:
                kwargs = dict(logger=CSVLogger(str(tmp / "runs")), log_every_n_steps=5)
            else:
                kwargs = dict(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
            quiet = logging.getLogger("lightning.pytorch")
            level = quiet.level
            quiet.setLevel(logging.WARNING)
            try:
                with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    fitted = L.Trainer(**common, **kwargs)
                    fitted.fit(module, train_dataloaders=loader)
            finally:
                quiet.setLevel(level)
            check_same_optimizer(optimizer_like_module(module, total)[0], fitted.optimizers[0])
            return steady_step_time(timer.starts, warmup, steps)

        times = measure_interleaved({"plain": plain, "lean": lambda: trainer(False), "defaults": lambda: trainer(True)}, rounds=rounds)

    common = (f"{sizes}; {steps} timed steps after {warmup} untimed, median of {rounds} interleaved rounds: plain loop "
              f"{median(times['plain']) * 1e3:.0f} ms per step")
    rows = []
    for key, label in [("lean", "lean Trainer (no logger, bar, checkpoints, summary)"), ("defaults", "Trainer defaults (bar, CSV logger every 5 steps)")]:
        ratio = median_ratio(times[key], times["plain"])
        per_round = [t / p for t, p in zip(times[key], times["plain"])]
        extra = median([t - p for t, p in zip(times[key], times["plain"])])
        note = f"{common}, {label} {median(times[key]) * 1e3:.0f} ms; the Trainer adds {extra * 1e3:+.1f} ms per step (median of per-round differences); per-round ratios {min(per_round):.2f}-{max(per_round):.2f}"
        if ratio > TARGET:
            note += (f". Unmet: {extra * 1e3:.1f} ms per step over a {median(times['plain']) * 1e3:.0f} ms step: the Trainer's "
                     f"per-step work (hooks, the loss closure, training_step's finite-loss check and log_dict"
                     f"{', progress bar and logger' if key == 'defaults' else ''}) against a small CPU step")
        rows.append(row("stage2_step", f"step time, {label} / plain loop", ratio, f"<= {TARGET}x", ratio <= TARGET, note))
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r)
