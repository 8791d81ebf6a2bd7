"""The ``fineregion-pl`` command: LightningCLI for fit/validate/test/predict, plain functions for the rest.

As in litgpt's ``__main__``, each extra verb is a typed function whose signature and docstring
become its command line (through jsonargparse).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .errors import FineRegionError

LIGHTNING_VERBS = {
    "fit": "train a stage (LightningCLI: --config configs/stage1.yaml ...)",
    "validate": "run the validation loop on a checkpoint",
    "test": "evaluate a checkpoint on the test split; writes results.json and results.md",
    "predict": "captions for every region of the prediction data",
}


def _plain_verbs() -> dict[str, tuple[Callable, str]]:
    from .ablations import ablations
    from .demo import demo
    from .export import export
    from .quickstart import quickstart
    from .zero_checkpoint import convert_zero

    return {
        "quickstart": (quickstart, "the whole pipeline on the built-in synthetic benchmark, on the CPU"),
        "export": (export, "a stage-2 checkpoint as a LoRA adapter, a merged HF model and the vision weights"),
        "convert-zero": (convert_zero, "a DeepSpeed ZeRO checkpoint folder as one Lightning checkpoint file (for test, predict, export, init_from)"),
        "demo": (demo, "a local web page: open an image, draw or type boxes, read each region's caption"),
        "ablations": (ablations, "Table 1 (methods) and Table 2 (ablations) on the synthetic benchmark, over seeds"),
    }


class QuietParser(LightningArgumentParser):
    """Reports a bad command line or config as one line (no usage wall): the option at fault."""

    def error(self, message: str, ex: Optional[Exception] = None):  # noqa: D102 - argparse API
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        culprit = next((line for line in lines if "not accepted" in line or "does not exist" in line), None)
        where = next((line for line in lines if line.startswith("- Problem with given class_path")), "")
        text = f"{culprit} ({where[2:].split(':')[0].strip()})" if culprit and where else (culprit or (lines[0] if lines else "bad arguments"))
        sys.stderr.write(f"fineregion-pl: error: {text}; see --help\n")
        raise SystemExit(2)


class FineRegionCLI(LightningCLI):
    """LightningCLI with our defaults: any LightningModule by ``class_path``, the region DataModule."""

    def __init__(self, args: Optional[list[str]] = None, run: bool = True):
        from .data import RegionDataModule

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


    def add_arguments_to_parser(self, parser) -> None:
        from .prediction_writer import RegionPredictionWriter

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


def cli_main(args: Optional[list[str]] = None) -> FineRegionCLI:
    """Run a LightningCLI verb with ``args`` (``["fit", "--config", ...]``; default: the command line) in this process."""
    return FineRegionCLI(args=args)


def lost_peer(error: BaseException) -> bool:
    """Whether an error is a collective failing because another rank died or timed out."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "NCCL", "Gloo", "gloo"))


def _usage(plain: dict[str, tuple[Callable, str]]) -> str:
    lines = ["usage: fineregion-pl VERB [options]   (fineregion-pl VERB --help for a verb's options)", "", "verbs:"]
    for verb, text in list(LIGHTNING_VERBS.items()) + [(v, t) for v, (_, t) in plain.items()]:
        lines.append(f"  {verb:<13} {text}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``fineregion-pl`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    plain = _plain_verbs()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(plain))
        return
    verb = argv[0]
    if verb not in plain and verb not in LIGHTNING_VERBS:
        print(f"fineregion-pl: unknown verb {verb!r}\n\n{_usage(plain)}", file=sys.stderr)
        raise SystemExit(2)
    try:
        if verb in plain:
            from jsonargparse import auto_cli

            auto_cli(plain[verb][0], args=argv[1:])
        else:
            cli_main(None if from_command_line else argv)
    except FineRegionError as err:
        print(f"fineregion-pl: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except RuntimeError as err:
        if not lost_peer(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"fineregion-pl: error: a training process was lost ({first[:200]}); fix the cause, then resume with --ckpt_path last", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
