"""The sbatch scripts on a real one-machine SLURM cluster (slurmctld, slurmd, munge from Debian's
packages, CPU only), started and stopped by the fixture below; and their command lines, dry-run.

Install the daemons with ``.ci/install-slurm.sh``; without them the cluster tests are skipped.
"""

from __future__ import annotations

import getpass
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from tiny_runs import stage1_overlay, stage2_overlay, write_yaml

from fineregion_pl.model.checkpoint_files import read_checkpoint

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, logs: list[Path] = ()) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-2000:]}" for p in logs if p.is_file())
    raise TimeoutError(f"{what} (after {timeout:.0f} s)\n{tails}")


class Cluster:
    """A one-node SLURM cluster in a private folder: its own munge key and socket, ports, state and logs."""

    def __init__(self, base: Path, cpus: int = 4):
        self.base, self.cpus = base, cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = base / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons: list[tuple[str, subprocess.Popen]] = []
        self.logs = [base / "log" / name for name in ("munged.out", "slurmctld.out", "slurmd.out")]

    def start(self) -> None:
        (self.base / "log").mkdir()
        munge = self.base / "munge"
        munge.mkdir(mode=0o755)  # munged wants its socket folder reachable by everyone
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        socket_path = munge / "munge.socket"
        self._spawn("munged", ["munged", "-F", f"--key-file={key}", f"--socket={socket_path}", f"--pid-file={munge / 'munged.pid'}",
                               f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"], self.logs[0], self.env)
        wait_for(socket_path.exists, 15, "munged did not create its socket", self.logs)
        user = getpass.getuser()
        for name in ("state", "spool"):
            (self.base / name).mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=fineregiontest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={socket_path}",
            f"StateSaveLocation={self.base / 'state'}",
            f"SlurmdSpoolDir={self.base / 'spool'}",
            f"SlurmctldPidFile={self.base / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.base / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.base / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.base / 'log' / 'slurmd.log'}",
            f"FirstJobId={random.randint(1000, 8000)}",  # Lightning's default port follows the job id
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=600",  # keep finished jobs visible to scontrol
            "SlurmdParameters=config_overrides",  # the node may advertise more CPUs than it has
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"], self.logs[1], self.env)
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.host], self.logs[2], self.env)

        def idle() -> bool:
            self._check_daemons()
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True, timeout=30)
            return out.returncode == 0 and out.stdout.strip() == "idle"

        wait_for(idle, 60, "the SLURM node did not come up idle", self.logs + [self.base / "log" / "slurmctld.log", self.base / "log" / "slurmd.log"])

    def _spawn(self, name: str, argv: list[str], log: Path, env: dict) -> None:
        with open(log, "w") as out:
            self.daemons.append((name, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)))

    def _check_daemons(self) -> None:
        for name, proc in self.daemons:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {self.logs[[d for d, _ in self.daemons].index(name)].read_text()[-2000:]}")

    def stop(self) -> None:
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self.daemons):
            subprocess.run(["scancel", "--user", getpass.getuser()], env=self.env, capture_output=True, timeout=30)
        for _, proc in reversed(self.daemons):  # slurmd, slurmctld, munged: by the PIDs we started
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)

    def sbatch(self, script: str, *options: str, env: dict[str, str]) -> str:
        done = subprocess.run(["sbatch", "--parsable", *options, script], cwd=ROOT, env=dict(self.env, **env), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def states(self, job: str) -> dict[str, str]:
        """``JobId -> JobState`` of a job (every task of an array job)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job], env=self.env, capture_output=True, text=True, timeout=30)
        states = {}
        for line in out.stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            task = fields.get("ArrayTaskId")
            states[f"{fields['ArrayJobId']}_{task}" if task and fields.get("ArrayJobId") else fields["JobId"]] = fields["JobState"]
        return states

    def wait(self, job: str, timeout: float, logs: list[Path] = (), tasks: int = 1) -> dict[str, str]:
        """Wait (bounded) until every task of ``job`` is finished; a job cancelled while pending also ends the wait."""
        def finished() -> bool:
            self._check_daemons()
            states = self.states(job)
            return len(states) >= tasks and all(s in FINAL_STATES for s in states.values())

        try:
            wait_for(finished, timeout, f"job {job} did not finish: {self.states(job)}", list(logs))
        except TimeoutError:
            subprocess.run(["scancel", job], env=self.env, capture_output=True, timeout=30)
            raise
        return self.states(job)


@pytest.fixture(scope="module")
def cluster():
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}): run .ci/install-slurm.sh")
    base = Path(tempfile.mkdtemp(prefix="fineregion-slurm-", dir="/tmp"))
    base.chmod(0o755)
    cluster = Cluster(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def job_env(**values: str) -> dict[str, str]:
    """What the scripts read, for a CPU test cluster; the job inherits it from sbatch."""
    return dict(
        FINEREGION_CPU="1", PYTHON=sys.executable, FINEREGION_ROOT=str(ROOT), MASTER_ADDR="127.0.0.1",
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(SCRIPTS), os.environ.get("PYTHONPATH", "")) if p), **values,
    )


CPU_OPTIONS = ("--gres=none", "--cpus-per-task=1", "--time=10")


def log_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.out"))


@pytest.mark.slow
def test_stage1_then_stage2_sbatch_on_two_cpu_tasks(cluster, synthetic_data, tiny_lm, tmp_path):
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    dump = {"class_path": "rank_state_dump.RankStateDump", "init_args": {"out_dir": str(tmp_path / "dumps")}}
    overlay1 = write_yaml(tmp_path / "stage1.yaml", stage1_overlay(s1, synthetic_data, max_steps=2))
    overlay2 = write_yaml(tmp_path / "stage2.yaml", stage2_overlay(s2, synthetic_data, tiny_lm, s1 / "checkpoints" / "step2.ckpt", max_steps=2, extra_callbacks=[dump]))
    logs = tmp_path / "logs"
    logs.mkdir()
    first = cluster.sbatch("slurm/stage1.sbatch", *CPU_OPTIONS, "--ntasks-per-node=2", f"--output={logs}/stage1-%j.out",
                           env=job_env(CONFIG=f"configs/quickstart/stage1.yaml {overlay1}"))
    second = cluster.sbatch("slurm/stage2.sbatch", *CPU_OPTIONS, "--ntasks-per-node=2", f"--dependency=afterok:{first}", f"--output={logs}/stage2-%j.out",
                            env=job_env(CONFIG=f"configs/quickstart/stage2.yaml {overlay2}"))
    assert cluster.wait(first, 400, log_of(logs)) == {first: "COMPLETED"}, log_of(logs)
    assert cluster.wait(second, 400, log_of(logs)) == {second: "COMPLETED"}, [p.read_text()[-3000:] for p in log_of(logs)]

    stage1_log = (logs / f"stage1-{first}.out").read_text()
    assert "1 node(s) x 2 task(s)" in stage1_log and "--trainer.accelerator cpu --trainer.devices 2 --trainer.num_nodes 1" in stage1_log
    assert "configs/strategies/ddp.yaml" in (logs / f"stage2-{second}.out").read_text()  # no DeepSpeed on CPU
    assert read_checkpoint(s1 / "checkpoints" / "step2.ckpt")["global_step"] == 2
    assert read_checkpoint(s2 / "checkpoints" / "step2.ckpt")["global_step"] == 2
    # srun started two ranks and Lightning's SLURMEnvironment made them one gloo DDP job
    for rank in (0, 1):
        info = json.loads((tmp_path / "dumps" / f"rank{rank}.json").read_text())
        assert info == {"cluster_environment": "SLURMEnvironment", "auto_requeue": True, "world_size": 2, "num_nodes": 1, "backend": "gloo"}


@pytest.mark.slow
def test_ablation_array_runs_one_row_per_task(cluster, synthetic_data, tmp_path):
    rows = []
    for name, masking in (("dynamic", "dynamic"), ("global", "none")):
        overlay = stage1_overlay(tmp_path / name, synthetic_data, max_steps=2)
        overlay["model"]["init_args"]["masking"] = masking
        rows.append(f"configs/quickstart/stage1.yaml+{write_yaml(tmp_path / f'{name}.yaml', overlay)}")
    logs = tmp_path / "logs"
    logs.mkdir()
    job = cluster.sbatch("slurm/ablations.sbatch", *CPU_OPTIONS, "--array=0-1", f"--output={logs}/ablation-%A_%a.out",
                         env=job_env(ROWS=" ".join(rows)))
    states = cluster.wait(job, 400, log_of(logs), tasks=2)
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED"}, [p.read_text()[-3000:] for p in log_of(logs)]
    for task, (name, masking) in enumerate((("dynamic", "dynamic"), ("global", "none"))):
        checkpoint = read_checkpoint(tmp_path / name / "checkpoints" / "step2.ckpt")
        assert checkpoint["hyper_parameters"]["masking"] == masking
        assert f"task {task}: configs configs/quickstart/stage1.yaml" in (logs / f"ablation-{job}_{task}.out").read_text()


def deterministic_stage1(run: Path, data: Path, extra_callbacks: list = ()) -> dict:
    """A 12-step stage-1 run without randomness beyond the seeded data stream (as ``test_resume.py``),
    checkpointing every 4 steps, written under ``run``."""
    from conftest import TINY_BACKBONE_KWARGS

    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(run / "checkpoints"), "filename": "step{step}", "auto_insert_metric_name": False,
                                "every_n_train_steps": 4, "save_top_k": -1, "save_last": True}}
    return {
        "seed_everything": 0,
        "trainer": {"max_steps": 12, "logger": False, "enable_progress_bar": False, "check_val_every_n_epoch": None, "val_check_interval": 12,
                    "limit_val_batches": 1, "num_sanity_val_steps": 0, "default_root_dir": str(run), "callbacks": [checkpoint, *extra_callbacks]},
        "model": {"class_path": "fineregion_pl.Stage1Module", "init_args": {
            "encoder": {"feature_levels": [1, 2], "pretrained": False, "backbone_kwargs": dict(TINY_BACKBONE_KWARGS, drop_path_rate=0.0)},
            "masking": "hard", "lr": 0.003, "warmup_steps": 2}},
        "data": {"data_dirs": [str(data)], "image_size": 64, "batch_size": 4, "num_workers": 0},
    }


@pytest.mark.slow
def test_a_requeued_job_resumes_and_ends_like_an_uninterrupted_one(cluster, synthetic_data, tmp_path):
    """SIGUSR1 (what ``--signal=SIGUSR1@90`` sends before the time limit) mid-run: Lightning's SLURM
    handler saves ``hpc_ckpt_1.ckpt`` and runs ``scontrol requeue``; the job starts again, resumes
    from that checkpoint and ends with the weights of a job that was never interrupted."""
    import torch

    logs = tmp_path / "logs"
    logs.mkdir()
    progress = tmp_path / "progress.txt"
    slow = {"class_path": "step_progress.StepProgress", "init_args": {"path": str(progress), "seconds": 1.0}}
    straight = write_yaml(tmp_path / "straight.yaml", deterministic_stage1(tmp_path / "straight", synthetic_data))
    requeued = write_yaml(tmp_path / "requeued.yaml", deterministic_stage1(tmp_path / "requeued", synthetic_data, [slow]))
    options = (*CPU_OPTIONS, "--ntasks-per-node=1")
    # the uninterrupted job and the one to requeue run side by side (one CPU each)
    first = cluster.sbatch("slurm/stage1.sbatch", *options, f"--output={logs}/straight-%j.out", env=job_env(CONFIG=str(straight), STRATEGY="none"))
    job = cluster.sbatch("slurm/stage1.sbatch", *options, f"--output={logs}/requeued-%j.out", env=job_env(CONFIG=str(requeued), STRATEGY="none"))
    wait_for(lambda: progress.is_file() and progress.read_text().strip() not in ("", "0", "1", "2", "3", "4", "5"), 300,
             "the job did not reach step 6", log_of(logs))
    signalled = subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env, capture_output=True, text=True, timeout=30)
    assert signalled.returncode == 0, signalled.stderr
    assert cluster.wait(job, 600, log_of(logs)) == {job: "COMPLETED"}, [p.read_text()[-3000:] for p in log_of(logs)]
    assert cluster.wait(first, 400, log_of(logs)) == {first: "COMPLETED"}, [p.read_text()[-3000:] for p in log_of(logs)]

    shown = subprocess.run(["scontrol", "-o", "show", "job", job], env=cluster.env, capture_output=True, text=True, timeout=30).stdout
    assert "Restarts=1" in shown, shown
    log = (logs / f"requeued-{job}.out").read_text()
    assert "Handling auto-requeue signal" in log and "Restoring states from the checkpoint path" in log, log[-3000:]
    hpc = torch.load(tmp_path / "requeued" / "hpc_ckpt_1.ckpt", weights_only=True)
    assert 6 <= hpc["global_step"] < 12
    done = torch.load(tmp_path / "requeued" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    expected = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in expected.items():
        torch.testing.assert_close(done[key], value, rtol=1e-4, atol=1e-5, msg=key)


def dry_run(script: str, **env: str) -> subprocess.CompletedProcess:
    """The command a script would start, without SLURM (DRY_RUN=1, allocation variables given)."""
    ours = ("FINEREGION_CPU", "CONFIG", "STRATEGY", "EXTRA_ARGS", "INIT_FROM", "ROWS", "SEEDS", "WORKDIR", "PYTHON")
    values = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ours}
    values.update(DRY_RUN="1", FINEREGION_ROOT=str(ROOT), **env)
    return subprocess.run(["bash", f"slurm/{script}"], cwd=ROOT, env=values, capture_output=True, text=True, timeout=60)


def test_scripts_follow_the_allocation_and_the_variables():
    gpu = dry_run("stage2.sbatch", SLURM_NTASKS_PER_NODE="8", SLURM_JOB_NUM_NODES="4")
    assert gpu.returncode == 0, gpu.stderr
    assert ("-m fineregion_pl fit --config configs/stage2.yaml --config configs/strategies/deepspeed_zero2.yaml "
            "--trainer.accelerator gpu --trainer.devices 8 --trainer.num_nodes 4") in gpu.stdout
    cpu = dry_run("stage2.sbatch", FINEREGION_CPU="1", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NUM_NODES="1", INIT_FROM="s1.ckpt",
                  EXTRA_ARGS="--trainer.max_steps 5")
    assert ("--config configs/strategies/ddp.yaml --trainer.accelerator cpu --trainer.devices 2 --trainer.num_nodes 1 "
            "--trainer.max_steps 5 --model.init_args.init_from s1.ckpt") in cpu.stdout
    stage1 = dry_run("stage1.sbatch", SLURM_TASKS_PER_NODE="4(x2)", SLURM_NNODES="2", STRATEGY="fsdp", CONFIG="a.yaml b.yaml")
    assert "fit --config a.yaml --config b.yaml --config configs/strategies/fsdp.yaml --trainer.accelerator gpu --trainer.devices 4 --trainer.num_nodes 2" in stage1.stdout
    for script in ("stage1.sbatch", "stage2.sbatch", "ablations.sbatch"):
        header = (ROOT / "slurm" / script).read_text()
        assert "#SBATCH --gres=gpu:" in header and "#SBATCH --nodes=" in header and "#SBATCH --ntasks-per-node=" in header
        assert all(f"#   {name}" in header for name in ("FINEREGION_CPU", "EXTRA_ARGS", "PYTHON", "DRY_RUN"))
    for script in ("stage1.sbatch", "stage2.sbatch"):
        assert "#SBATCH --signal=SIGUSR1@90" in (ROOT / "slurm" / script).read_text()


def test_ablation_tasks_map_to_rows_and_seeds():
    rows = {p.stem for p in (ROOT / "configs" / "ablations" / "rows").glob("*.yaml")}
    if rows:
        table = dry_run("ablations.sbatch", SLURM_ARRAY_TASK_ID="1", SEEDS="0 1")
        assert table.returncode == 0, table.stderr
        first = sorted(rows)[0]
        assert f"ablations --rows [{first}] --seeds [1] --workdir runs/ablations/tasks/{first}-seed1 --out null" in table.stdout
    stacks = "configs/quickstart/stage1.yaml+x.yaml configs/quickstart/stage2.yaml+y.yaml"
    config = dry_run("ablations.sbatch", ROWS=stacks, SLURM_ARRAY_TASK_ID="1", FINEREGION_CPU="1")
    assert "fit --config configs/quickstart/stage2.yaml --config y.yaml --trainer.accelerator cpu --trainer.devices 1 --trainer.num_nodes 1 --seed_everything 0" in config.stdout
    beyond = dry_run("ablations.sbatch", ROWS=stacks, SLURM_ARRAY_TASK_ID="2")
    assert beyond.returncode == 1 and "submit with --array=0-1" in beyond.stderr
