"""Real-dimension smoke run: the real recipes at Swin-B 384 and a Qwen2.5-0.5B-shaped LM, on this CPU.

    python benchmarks/smoke_real_dims.py --workdir runs/smoke-real              # fp32 and bf16
    python benchmarks/smoke_real_dims.py --workdir runs/smoke-real --precisions 32-true
    python benchmarks/smoke_real_dims.py --workdir runs/smoke-real --report     # the table of what ran

Random weights, built and saved locally (the hub is not reachable here): timm's
``swin_base_patch4_window12_384`` state dict as the stage-1 ``encoder.pretrained`` file, and a
``Qwen2ForCausalLM`` of Qwen2.5-0.5B's config (hidden 896, 24 layers, vocabulary 151,936, tied
embeddings; :func:`benchmarks.plan.llm_config`) saved with ``save_pretrained``. Data: synthetic
shards at 384 px, two sets (the recipes mix two), so ``data.weights`` stays as written.

Each phase is its own ``fineregion-pl`` process, with only machine-specific overrides of
``configs/stage1.yaml`` / ``configs/stage2.yaml`` (CPU, one device, local paths, shards, loader
workers, two steps, one evaluation batch, and ``--batch_size`` images per batch since the
recipes' per-GPU batch does not fit this CPU's time): stage-1 fit, stage-2 fit, stage-2 fit
through the DeepSpeed ZeRO-2 engine (the test-only CPU subclass of our strategy; bf16 only), test,
predict, export. Peak memory is each process's maximum resident set (``os.wait4``), written with
the plan's prediction for the same shapes and batch (``benchmarks/plan.py: predicted_cpu_rss``) to
``WORKDIR/smoke.json``. Phases already done are skipped (resumable); ``--force`` reruns them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SWIN = "swin_base_patch4_window12_384"
LLM = "Qwen/Qwen2.5-0.5B-Instruct"
SETS = ("set_a", "set_b")


def build_assets(assets: Path) -> dict[str, Path]:
    """Random Swin-B 384 weights, the 0.5B-shaped LM with a word tokenizer, and two synthetic shard sets."""
    import timm
    import torch
    import transformers

    from benchmarks.plan import llm_config
    from fineregion_pl.data.synthetic import SyntheticConfig, write_synthetic
    from fineregion_pl.train.tiny_lm import synthetic_pretraining_texts, train_word_tokenizer

    assets.mkdir(parents=True, exist_ok=True)
    swin = assets / "swin_base_384.pth"
    if not swin.exists():
        torch.manual_seed(0)
        torch.save(timm.create_model(SWIN, pretrained=False).state_dict(), swin)
    lm = assets / "qwen2.5-0.5b-shape"
    if not (lm / "config.json").exists():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(llm_config(LLM), dtype=torch.float32)
        model.save_pretrained(lm)
        tokenizer = train_word_tokenizer(synthetic_pretraining_texts(0, 200))
        tokenizer.bos_token = None  # Qwen has no BOS
        tokenizer.save_pretrained(lm)
    shards = {}
    for index, name in enumerate(SETS):
        shards[name] = assets / "shards" / name
        if not (shards[name] / "test" / "manifest.json").exists():
            write_synthetic(shards[name], sizes={"train": 64, "val": 8, "test": 8}, seed=index, shard_size=32,
                            config=SyntheticConfig(image_size=384), progress=False)
    return {"swin": swin, "lm": lm, **shards}


def synthetic_plan_inputs() -> tuple[list, dict[str, int]]:
    """The smoke data as :mod:`benchmarks.plan` describes a shard set (from the records the shards
    were written from), and the padded target length of each text call (the longest target)."""
    import re

    from benchmarks.plan import Dataset
    from fineregion_pl.data.synthetic import SyntheticConfig, iter_scenes

    def tokens(text: str) -> int:
        return len(re.findall(r"\w+|[^\w\s]", text)) + 1  # word tokenizer: a token a word or mark, then EOS

    datasets, longest = [], {"caption": 0, "referring": 0, "question": 0}
    for index, name in enumerate(SETS):
        records = [record for _, record in iter_scenes(index, "train", 64, SyntheticConfig(image_size=384))]
        regions = [r for record in records for r in record["regions"]]
        longest["caption"] = max(longest["caption"], *(tokens(r["captions"][0]) for r in regions))
        longest["referring"] = max(longest["referring"], *(tokens(r["referring"][0]) for r in regions))
        longest["question"] = max(longest["question"], *(tokens(q["answer"]) for record in records for q in record["questions"]))
        datasets.append(Dataset(name, len(records), len(regions) / len(records), sum(tokens(r["captions"][0]) for r in regions) / len(regions),
                                True, sum(len(record["questions"]) for record in records) / len(records), "synthetic, 384 px"))
    return datasets, longest


def plan_prediction(batch_size: int, lightning_checkpoint_io: bool = False) -> dict[str, float]:
    """``benchmarks/plan.py``'s one-process fp32 peak (bytes by part) for the stage-2 recipe at the smoke's batch."""
    from benchmarks.plan import one_process_prediction, read_config

    s1, s2 = read_config(ROOT / "configs/stage1.yaml"), read_config(ROOT / "configs/stage2.yaml")
    s2["data"]["batch_size"] = batch_size
    datasets, longest = synthetic_plan_inputs()
    return one_process_prediction(s1, s2, datasets, [1.0, 1.0], 5, LLM, longest, lightning_checkpoint_io)


def run_measured(argv: list[str], log: Path, cwd: Path, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``argv``, its output to ``log``; its exit code, wall time and peak resident set (GB).

    Lightning runs also write their memory at each hook to ``log`` with ``.marks.jsonl``
    (:class:`benchmarks.memory_marks.MemoryMarks`)."""
    marks = log.with_suffix(".marks.jsonl")
    marks.unlink(missing_ok=True)
    env = dict(os.environ, **(extra_env or {}), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", FINEREGION_MEMORY_MARKS=str(marks),
               PYTHONPATH=os.pathsep.join(p for p in (str(SCRIPTS), str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"returncode": code, "seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
            "log": str(log)}


# glibc's malloc keeps freed heap memory in the process; with these it maps every allocation over
# 128 KB on its own and returns it when freed, so the resident set follows the live memory
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def phases(work: Path, assets: dict[str, Path], precision: str, batch_size: int) -> dict[str, tuple[Path, list[str], dict[str, str]]]:
    """Every phase at ``precision``: the folder it runs in (the recipes' relative ``runs/...`` paths
    land there), its ``fineregion-pl`` command line and extra environment."""
    cli = [sys.executable, "-m", "fineregion_pl"]
    run = work / precision.replace("-", "_")
    stage1, stage2 = str(ROOT / "configs/stage1.yaml"), str(ROOT / "configs/stage2.yaml")
    data = ["--data.data_dirs", f"[{assets['set_a']},{assets['set_b']}]", "--data.num_workers", "0",
            "--data.batch_size", str(batch_size), "--data.eval_batch_size", str(batch_size)]
    device = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", precision,
              "--trainer.callbacks+=benchmarks.memory_marks.MemoryMarks"]
    train = [*device, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", *data]
    lm = ["--model.init_args.language_model.name_or_path", str(assets["lm"])]
    last = "runs/stage2/checkpoints/last.ckpt"
    evaluate = ["--config", stage2, *device, "--trainer.limit_test_batches", "1", "--trainer.limit_predict_batches", "1", *data, *lm, "--ckpt_path", last]
    stage1_ckpt = ["--model.init_args.init_from", str(run / "runs/stage1/checkpoints/last.ckpt")]
    out = {
        "stage1_fit": (run, [*cli, "fit", "--config", stage1, *train, "--model.init_args.encoder.pretrained", str(assets["swin"])], {}),
        "stage2_fit": (run, [*cli, "fit", "--config", stage2, *train, *lm], {}),
        # the same run with glibc returning freed memory: its peak is the live memory the plan predicts
        "stage2_fit_live_memory": (run / "live_memory", [*cli, "fit", "--config", stage2, *train, *lm, *stage1_ckpt], LIVE_MEMORY_ENV),
        "stage2_test": (run, [*cli, "test", *evaluate], {}),
        "stage2_predict": (run, [*cli, "predict", *evaluate, "--trainer.default_root_dir", "runs/predict"], {}),
        "export": (run, [*cli, "export", "--ckpt_path", last, "--out", "exports/stage2"], {}),
    }
    if precision == "bf16-mixed":  # the GPU recipe: ZeRO-2 in bf16-mixed, through DeepSpeed's engine on the CPU (its own folder)
        out["stage2_fit_deepspeed_zero2"] = (run / "zero2", [
            *cli, "fit", "--config", stage2, "--config", str(work / "deepspeed_zero2_cpu.yaml"), *train, *lm, *stage1_ckpt], {})
    return out


def write_cpu_deepspeed_config(work: Path) -> None:
    """``configs/strategies/deepspeed_zero2.yaml`` with the test-only CPU subclass of its strategy (gloo)."""
    import yaml

    config = yaml.safe_load((ROOT / "configs/strategies/deepspeed_zero2.yaml").read_text())
    config["trainer"]["strategy"]["class_path"] = "cpu_deepspeed.CPUDeepSpeedStrategy"
    config["trainer"]["strategy"]["init_args"]["process_group_backend"] = "gloo"
    (work / "deepspeed_zero2_cpu.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "smoke-real")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--batch_size", type=int, default=2, help="images per batch (the recipes say 32 / 8 per GPU)")
    parser.add_argument("--only", nargs="*", default=None, help="phase names to run (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun phases that already succeeded")
    parser.add_argument("--report", action="store_true", help="only print the table of smoke.json")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "smoke.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if not args.report:
        assets = build_assets(work / "assets")
        write_cpu_deepspeed_config(work)
        for precision in args.precisions:
            for name, (cwd, command, extra_env) in phases(work, assets, precision, args.batch_size).items():
                cwd.mkdir(parents=True, exist_ok=True)
                key = f"{precision}/{name}"
                if args.only and name not in args.only:
                    continue
                if results.get(key, {}).get("returncode") == 0 and not args.force:
                    continue
                (work / "logs").mkdir(exist_ok=True)
                print(f"[smoke] {key} ...", flush=True)
                results[key] = {**run_measured(command, work / "logs" / f"{key.replace('/', '_')}.log", cwd, extra_env), "batch_size": args.batch_size}
                print(f"[smoke] {key}: exit {results[key]['returncode']}, {results[key]['seconds']} s, peak RSS {results[key]['peak_rss_gb']} GB", flush=True)
                results_file.write_text(json.dumps(results, indent=1))
                if results[key]["returncode"] != 0 and name in ("stage1_fit", "stage2_fit"):
                    print(f"[smoke] {key} failed: the later phases at {precision} need it; see {results[key]['log']}", flush=True)
                    break
    for key, value in results.items():
        print(f"{key:45s} exit {value['returncode']:3d}  {value['seconds']:8.1f} s  peak RSS {value['peak_rss_gb']:6.2f} GB")
    print_plan_comparison(results, args.batch_size)
    return 0 if all(v["returncode"] == 0 for v in results.values()) else 1


def print_plan_comparison(results: dict[str, Any], batch_size: int) -> None:
    """The plan's one-process fp32 prediction next to the measured stage-2 fit peaks."""
    measured = {k: results[k]["peak_rss_gb"] for k in ("32-true/stage2_fit_live_memory", "32-true/stage2_fit") if results.get(k, {}).get("returncode") == 0}
    if not measured:
        return
    parts = plan_prediction(batch_size)
    total = sum(parts.values()) / 1e9
    print(f"\nbenchmarks/plan.py, one fp32 process, stage 2 at this batch ({batch_size} images), checkpoints written by the CLI's AtomicCheckpointIO:")
    for name, value in parts.items():
        print(f"  {name:45s} {value / 1e9:6.2f} GB")
    print(f"  {'total':45s} {total:6.2f} GB")
    for key, value in measured.items():
        print(f"  measured {key:36s} {value:6.2f} GB ({(value - total) / total:+.0%} vs the plan)")


if __name__ == "__main__":
    sys.exit(main())
