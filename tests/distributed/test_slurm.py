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
CONFIG = str(REPO / "configs/experiments/demo_sysu_agw.yaml")
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0 or not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch")):
        pytest.skip("needs root and Slurm (tests/distributed/slurm_cluster.sh install)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CI_DIR": str(state)}
    subprocess.run([str(CLUSTER), "start"], env=env, check=True, timeout=120)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    env.pop("DIST_REID_ROOT", None)  # the script must find the repository by itself
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=env, timeout=60)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A SYSU-MM01 tree smaller than the session's: 11 steps an epoch (CI time)."""
    from dist_reid.data.synthetic.layouts import generate

    root = tmp_path_factory.mktemp("sysu16") / "sysu"
    generate("sysu", root, 16, seed=7, images_per_camera=3)
    return root


def _overrides(root: Path, out: Path, name: str) -> list[str]:
    # No data.num_workers: the script derives it from --cpus-per-task (2 per node task here).
    return [
        f"data.root={root}",
        "data.synthetic.enabled=false",
        f"run.output_dir={out}",
        f"run.name={name}",
        "data.height=64",
        "data.width=32",
        "data.pipeline=torch",
        "train.ids_per_batch=4",
        "train.instances_per_modality=2",
        "train.trackers=[]",
        "train.kernels=torch",
        "train.epochs=1",
        "train.checkpoint_every_steps=2",
        "eval.trials=[0]",
        "eval.settings=[all]",
    ]


def _sbatch(
    env: dict[str, str], folder: Path, log: Path, *args: str, wait: bool, launcher: str = "torchrun"
) -> subprocess.CompletedProcess:
    """Submit from ``folder`` (not the repository), naming the script by a relative path."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        "sbatch",
        "--parsable",
        *(["--wait"] if wait else []),
        "--nodes=2",
        "--cpus-per-task=2",
        f"--output={log}",
        os.path.relpath(REPO / "slurm/train.sbatch", folder),
        *args,
    ]
    job_env = {**env, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "1", "LAUNCHER": launcher}
    return subprocess.run(
        cmd, env=job_env, cwd=folder, capture_output=True, text=True, timeout=400 if wait else 10
    )


def _job(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["timeout", "5", "scontrol", "show", "job", job_id],
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


@pytest.fixture(scope="module")
def straight(slurm, tree, tmp_path_factory):
    """One uninterrupted epoch on two nodes through `accelerate launch` (the reference the
    preempted torchrun runs must match exactly)."""
    root = tree
    out = tmp_path_factory.mktemp("straight")
    log = out / "job.out"
    args = ["-c", CONFIG, *_overrides(root, out, "two")]
    proc = _sbatch(slurm, out / "submit", log, *args, wait=True, launcher="accelerate")
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stderr + text[-4000:]
    return text, out / "two"


def test_two_nodes_form_one_process_group_and_write_metrics(straight):
    text, run = straight
    assert "launcher accelerate" in text and f"repository {REPO}" in text, text[-3000:]
    # One launcher per node...
    assert re.search(r"srun task 0 of 2 on node n1", text), text[-3000:]
    assert re.search(r"srun task 1 of 2 on node n2", text), text[-3000:]
    # ...with the loader workers derived from --cpus-per-task=2 (one process per node)...
    assert "2 CPU(s) per proc (OMP_NUM_THREADS=1, 2 loader workers)" in text, text[-3000:]
    # INFO from rank 0 only (issue 15): the other node logs warnings and errors
    assert text.count("data pipeline: torch DataLoader (2 workers)") == 1, text[-3000:]
    assert "[rank 1] INFO" not in text, text[-3000:]
    # ...joined into one group of two (the checkpoint records the world size it was made by).
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["progress"]["epoch"] == 1
    final = json.loads((run / "final_metrics.json").read_text())
    assert 0 <= final["last_epoch"]["metrics"]["all"]["mAP"] <= 100
    assert final["global_step"] == state["progress"]["global_step"] > 0


@pytest.mark.parametrize("how", ["TERM to the step", "USR1 to the batch shell"])
def test_preemption_checkpoints_requeues_and_continues_exactly(
    slurm, tree, straight, tmp_path, how
):
    root = tree
    log = tmp_path / "job.out"
    run = tmp_path / "pre"
    proc = _sbatch(
        slurm,
        tmp_path / "submit",
        log,
        "-c",
        CONFIG,
        *_overrides(root, tmp_path, "pre"),
        wait=False,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists():  # training is under way (step 2 checkpointed)
        assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else ""
        time.sleep(0.2)
    if how == "TERM to the step":
        # A preemption's SIGTERM: every process of the step, loader workers included.
        signal = ["--signal=TERM", f"{job_id}.0"]
    else:
        # What Slurm does at --signal=B:USR1@T: USR1 to the batch shell, which passes SIGTERM on.
        signal = ["--signal=USR1", "--batch", job_id]
    subprocess.run(["timeout", "5", "scancel", *signal], env=slurm, check=True)
    while (info := _job(slurm, job_id)).get("JobState") not in FINAL:
        assert time.monotonic() < deadline, (info, log.read_text()[-3000:])
        time.sleep(1)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-3000:])
    assert info["Restarts"] == "1", info
    assert "killed by signal" not in text, text[-3000:]
    preempted = re.findall(r"preempted: checkpointed at step (\d+)", text)
    assert len(preempted) == 2, text[-3000:]  # both ranks stopped at the same step
    assert preempted[0] == preempted[1]
    assert "all 1 local workers were preempted" in text, text[-3000:]
    assert "requeueing after the preemption checkpoint (step rc 75)" in text, text[-3000:]
    resumed = re.findall(r"resumed from \S+ at epoch (\d+) step (\d+)", text)
    assert resumed == [("0", preempted[0])], text[-3000:]  # INFO: rank 0 only
    # The requeued job continued at the preemption step and ended exactly where the
    # uninterrupted run did.
    a = torch.load(straight[1] / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert a["progress"] == b["progress"] and b["world_size"] == 2
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
