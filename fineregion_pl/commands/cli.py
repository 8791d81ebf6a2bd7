"""The ``fineregion-pl`` command: a verb table. Nothing in the package imports this module.

``fit``/``validate``/``test``/``predict`` go to LightningCLI (:mod:`fineregion_pl.train.cli`); each
other verb is a typed function whose signature and docstring become its command line (through
jsonargparse), as in litgpt's ``__main__``; a dict of functions is a verb with sub-verbs (``rate prepare``).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Optional

from fineregion_pl.model.errors import FineRegionError
from fineregion_pl.train.cli import LIGHTNING_VERBS, run_lightning


def _plain_verbs() -> dict[str, tuple[Callable, str]]:
    from fineregion_pl.commands.ablations import ablations
    from fineregion_pl.commands.convert_zero import convert_zero
    from fineregion_pl.commands.data_check import data_verbs
    from fineregion_pl.commands.demo import demo
    from fineregion_pl.commands.detect import detect
    from fineregion_pl.commands.evaluate import evaluate
    from fineregion_pl.commands.export import export
    from fineregion_pl.commands.quickstart import quickstart
    from fineregion_pl.commands.rate.prepare import prepare
    from fineregion_pl.commands.rate.report import report
    from fineregion_pl.commands.rate.serve import serve as rate_serve
    from fineregion_pl.commands.run_queue import sequence
    from fineregion_pl.commands.serve import serve

    return {
        "quickstart": (quickstart, "the whole pipeline on the built-in synthetic benchmark, on the CPU"),
        "export": (export, "a stage-2 checkpoint as a LoRA adapter, a merged HF model and the vision weights"),
        "convert-zero": (convert_zero, "a DeepSpeed ZeRO checkpoint folder as one Lightning checkpoint file (for test, predict, export, init_from)"),
        "demo": (demo, "a local web page (Gradio): open an image, draw or type boxes, read each region's caption"),
        "serve": (serve, "an HTTP inference server (LitServe): an image with boxes or detections in, a caption per region out, batched across clients"),
        "detect": (detect, "boxes for every object of a folder of images from a torchvision detector, as a COCO results file for predict"),
        "evaluate": (evaluate, "score a predictions file (ours, GLaMM's, Osprey's, Groma's, GRiT's) against a published annotation file, by a named protocol"),
        "data": (data_verbs(), "data check DIR: validate a shard set (decodes, boxes, categories, manifest counts) before training"),
        "ablations": (ablations, "Table 1 (methods) and Table 2 (ablations) on the synthetic benchmark, over seeds (--suite hard: the hard suite)"),
        "sequence": (sequence, "several fit/validate/test/predict command lines in one process (the suites' runs: imports paid once)"),
        "rate": ({"prepare": prepare, "serve": rate_serve, "report": report}, "human evaluation (Table 3): prepare a blinded study, serve its rating page, report means, CIs, agreement"),
    }


# what a collective says when another rank died or stopped answering (gloo's TCP transport, NCCL)
_LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted", "NCCL watchdog")


def lost_peer(error: BaseException) -> bool:
    """Whether an error is a collective failing because another rank died or timed out.

    True for torch's own distributed errors (``DistError``: ``DistBackendError``,
    ``DistNetworkError``, ``DistStoreError``) and for the RuntimeErrors gloo and NCCL raise when a
    peer's connection goes away or a collective times out on gloo; any other RuntimeError is not.
    """
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return any(sign in text for sign in _LOST_PEER_SIGNS) or ("gloo" in text.lower() and "Timed out" in text)


def wrapped_error(error: BaseException) -> FineRegionError | None:
    """The package's own error among the causes of ``error`` (``__cause__``/``__context__``), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, FineRegionError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _usage(plain: dict[str, tuple[Callable, str]]) -> str:
    lines = ["usage: fineregion-pl VERB [options]   (fineregion-pl VERB --help for a verb's options)", "", "verbs:"]
    for verb, text in list(LIGHTNING_VERBS.items()) + [(v, t) for v, (_, t) in plain.items()]:
        lines.append(f"  {verb:<13} {text}")
    return "\n".join(lines)


def error_line(text: str) -> None:
    """``fineregion-pl: error: <text>`` on stderr in one write: ranks of a distributed run that fail
    together share the stream, and with ``print`` (text, then the newline, unbuffered under
    ``PYTHONUNBUFFERED``) their lines could run into each other."""
    sys.stderr.write(f"fineregion-pl: error: {text}\n")
    sys.stderr.flush()


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
            run_lightning(None if from_command_line else argv)
    except FineRegionError as err:
        error_line(str(err))
        raise SystemExit(1) from None
    except Exception as err:  # noqa: BLE001 - ours inside a library's wrapper (jsonargparse instantiating a class_path) is still one line
        ours = wrapped_error(err)
        if ours is not None:
            error_line(str(ours))
            raise SystemExit(1) from None
        if not isinstance(err, RuntimeError) or not lost_peer(err):
            raise
        traceback.print_exc()  # the whole story in the log; the summary is the last line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        error_line(f"a training process was lost ({first[:200]}); fix the cause, then resume with --ckpt_path last")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
