"""LightningCLI for ``fit``/``validate``/``test``/``predict``, and :func:`run_lightning`, the one way
code in the package runs a Lightning verb (the quickstart and the ablation runner call it; the
verb table in :mod:`fineregion_pl.commands.cli` dispatches the command line to it)."""

from __future__ import annotations

import sys
from typing import Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

LIGHTNING_VERBS = {
    "fit": "train a stage (LightningCLI: --config configs/stage1.yaml ...)",
    "validate": "run the validation loop on a checkpoint",
    "test": "evaluate a checkpoint on the test split; writes results.json and results.md",
    "predict": "captions for every region of the prediction data",
}


class QuietParser(LightningArgumentParser):
    """Reports a bad command line or config as one line (no usage wall): the option at fault."""

    def error(self, message: str, ex: Optional[Exception] = None):  # noqa: D102 - argparse API
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        culprit = next((line for line in lines if "not accepted" in line or "does not exist" in line), None)
        where = next((line for line in lines if line.startswith("- Problem with given class_path")), "")
        text = f"{culprit} ({where[2:].split(':')[0].strip()})" if culprit and where else (culprit or (lines[0] if lines else "bad arguments"))
        if text.endswith(":") and len(lines) > 1:  # 'Parser key "lr":' then the reason on the next line
            text = f"{text} {lines[lines.index(text) + 1] if text in lines else lines[1]}"
        sys.stderr.write(f"fineregion-pl: error: {text}; see --help\n")
        raise SystemExit(2)


class FineRegionCLI(LightningCLI):
    """LightningCLI with our defaults: any LightningModule by ``class_path``, the region DataModule."""

    def __init__(self, args: Optional[list[str]] = None, run: bool = True):
        from fineregion_pl.data import RegionDataModule

        super().__init__(
            model_class=None,
            datamodule_class=RegionDataModule,
            subclass_mode_model=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_class=QuietParser,
            args=args,
            run=run,
        )

    def instantiate_trainer(self, **kwargs):
        """Lightning's trainer, saving checkpoints atomically (:mod:`fineregion_pl.train.checkpoint_io`)."""
        from fineregion_pl.train.checkpoint_io import use_atomic_checkpoints

        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer

    def add_arguments_to_parser(self, parser) -> None:
        from fineregion_pl.train.prediction_writer import RegionPredictionWriter

        # `predict` writes JSONL (and pictures with --writer.draw true) through this callback
        parser.add_lightning_class_args(RegionPredictionWriter, "writer")
        # the category head follows the data: its size and names come from the shard manifests
        parser.link_arguments("data", "model.init_args.num_classes", compute_fn=_num_categories, apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.categories", compute_fn=_category_names, apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Take the model's hyper-parameters from ``--ckpt_path`` only when no model config is given.

        Lightning would let the checkpoint's hyper-parameters override the config, so evaluation
        knobs (``num_beams``, ``results_dir``, ``ignore_regions``...) given with ``--config`` or on
        the command line would be silently ignored. Here a given model config wins and the
        checkpoint supplies the weights; with no model config, the checkpoint's is used.
        """
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("model") is not None:
            return
        super()._parse_ckpt_path()


def _num_categories(data) -> Optional[int]:
    """The data's category count; None (the checkpoint's then) when no shards exist, as for ``predict`` on images."""
    return len(data.categories) if data.has_manifests() else None


def _category_names(data) -> Optional[list[str]]:
    return list(data.categories) if data.has_manifests() else None


def run_lightning(args: Optional[list[str]] = None) -> FineRegionCLI:
    """Run a LightningCLI verb in this process: ``args`` is its command line
    (``["fit", "--config", "configs/stage1.yaml", "--seed_everything", "0"]``; default: ``sys.argv``).

    The configs the package writes (:mod:`fineregion_pl.commands.run_configs`) are complete, so
    the command lines built from them stay two or three options long; a user can re-run the same
    line by hand.
    """
    return FineRegionCLI(args=args)
