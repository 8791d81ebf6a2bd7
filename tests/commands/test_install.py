"""A non-editable install (``pip install .``) finds its recipes: the quickstart runs from another folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pip_install_dot_runs_the_quickstart_from_any_folder(tmp_path):
    venv = tmp_path / "venv"
    # the dependencies come from this interpreter's site-packages; the package itself is installed as a wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)  # pip and setuptools: this interpreter's
    python = venv / "bin" / "python"
    build = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONPATH="")
    where = subprocess.run([str(python), "-c", "import fineregion_pl; print(fineregion_pl.__file__)"], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert str(venv) in where.stdout, where.stdout + where.stderr  # the wheel, not the source tree
    args = ["quickstart", "--workdir", "qs", "--train_images", "24", "--val_images", "4", "--test_images", "4", "--lm_steps", "2",
            "--stage1_steps", "2", "--stage2_steps", "2", "--pictures", "0", "--control", "false"]
    run = subprocess.run([str(venv / "bin" / "fineregion-pl"), *args], cwd=elsewhere, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (elsewhere / "qs" / "stage1" / "checkpoints" / "last.ckpt").is_file()
    assert (elsewhere / "qs" / "results.json").is_file()
    assert (elsewhere / "qs" / "configs" / "stage1.yaml").is_file()
