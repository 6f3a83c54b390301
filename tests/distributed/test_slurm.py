"""slurm/train.sbatch on a real Slurm: two slurmd "nodes" on this host (tests/distributed/slurm_cluster.sh).

The module starts the cluster and stops it (by pid files) at the end; it is skipped where Slurm
is not installed or we are not root (slurmd must run jobs as their user).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tests/distributed/slurm_cluster.sh"
CONFIG = "configs/experiments/demo_sysu_agw.yaml"

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0 or not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch")):
        pytest.skip("needs root and Slurm (tests/distributed/slurm_cluster.sh install)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CI_DIR": str(state)}
    subprocess.run([str(CLUSTER), "start"], env=env, check=True, timeout=120)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=env, timeout=60)


def _overrides(root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        f"run.output_dir={out}",
        f"run.name={name}",
        "data.height=64",
        "data.width=32",
        "data.num_workers=0",
        "train.ids_per_batch=4",
        "train.instances_per_modality=2",
        "train.tensorboard=false",
        "train.kernels=torch",
        "eval.trials=[0]",
        "eval.settings=[all]",
        *extra,
    ]


def _sbatch(
    env: dict[str, str], log: Path, *args: str, wait: bool, launcher: str = "torchrun"
) -> subprocess.CompletedProcess:
    cmd = [
        "sbatch",
        "--parsable",
        *(["--wait"] if wait else []),
        "--nodes=2",
        f"--chdir={REPO}",
        f"--output={log}",
        "slurm/train.sbatch",
        *args,
    ]
    job_env = {**env, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "1", "LAUNCHER": launcher}
    return subprocess.run(
        cmd, env=job_env, capture_output=True, text=True, timeout=400 if wait else 10
    )


def _job(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["timeout", "5", "scontrol", "show", "job", job_id],
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def test_two_nodes_form_one_process_group_and_write_metrics(slurm, synthetic_trees, tmp_path):
    root, _ = synthetic_trees["sysu"]
    log = tmp_path / "job.out"
    args = ["-c", CONFIG, *_overrides(root, tmp_path, "two", "train.epochs=1")]
    proc = _sbatch(slurm, log, *args, wait=True, launcher="accelerate")  # torchrun: next test
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stderr + text[-4000:]
    assert "launcher accelerate" in text
    # One launcher per node, each with its own node rank...
    assert re.search(r"srun task: node n1 node_rank 0 of 2", text), text[-3000:]
    assert re.search(r"srun task: node n2 node_rank 1 of 2", text), text[-3000:]
    # ...joined into one group of two (the checkpoint records the world size it was made by).
    state = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["progress"]["epoch"] == 1
    final = json.loads((tmp_path / "two" / "final_metrics.json").read_text())
    assert 0 <= final["last_epoch"]["metrics"]["all"]["mAP"] <= 100
    assert final["global_step"] == state["progress"]["global_step"] > 0


def test_usr1_checkpoints_requeues_and_finishes_from_the_checkpoint(
    slurm, synthetic_trees, tmp_path
):
    root, _ = synthetic_trees["sysu"]
    log = tmp_path / "job.out"
    run = tmp_path / "pre"
    args = [
        "-c",
        CONFIG,
        *_overrides(root, tmp_path, "pre", "train.epochs=2", "train.checkpoint_every_steps=2"),
    ]
    proc = _sbatch(slurm, log, *args, wait=False)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists():  # training is under way (step 2 checkpointed)
        assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else ""
        time.sleep(0.5)
    # What Slurm does at --signal=B:USR1@T: USR1 to the batch shell.
    subprocess.run(
        ["timeout", "5", "scancel", "--signal=USR1", "--batch", job_id], env=slurm, check=True
    )
    while True:
        info = _job(slurm, job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        assert time.monotonic() < deadline, (info, log.read_text()[-3000:])
        time.sleep(1)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-3000:])
    assert info["Restarts"] == "1", info
    preempted = re.findall(r"preempted: checkpointed at step (\d+)", text)
    assert len(preempted) == 2, text[-3000:]  # both ranks stopped at the same step
    assert preempted[0] == preempted[1]
    assert "requeueing after the preemption checkpoint" in text
    resumed = re.search(r"resumed from \S+ at epoch (\d+) step (\d+)", text)
    assert resumed, text[-3000:]
    final = json.loads((run / "final_metrics.json").read_text())
    state = torch.load(run / "last.pt", weights_only=True)
    assert final["epochs_done"] == 2 and state["world_size"] == 2
    # The second run continued at the preemption step, not from scratch: the step counter is
    # the full run's, and the resume point is the checkpointed step.
    steps_per_epoch = final["global_step"] // 2
    epoch, cursor = int(resumed.group(1)), int(resumed.group(2))
    assert epoch * steps_per_epoch + cursor == int(preempted[0]) > 0
