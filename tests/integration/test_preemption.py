"""Preemption with loader workers on: the stop signal reaches every process of the job (Slurm
signals the whole step, torchrun each worker's process group), the loader workers survive it,
the main process checkpoints at its step boundary, exits 75 (also through torchrun) and the
resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides

from dist_reid.data.pipeline import dali_available
from dist_reid.engine.preemption import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/experiments/demo_sysu_agw.yaml")
STEPS = 8  # the preemption lands around step 3: the periodic checkpoint at step 2 is the cue


def _overrides(root: Path, out: Path, name: str) -> list[str]:
    return tiny_run_overrides(
        root,
        out,
        name,
        "data.pipeline=torch",
        "data.num_workers=2",  # loader workers, which the stop signals must not kill (last wins)
        f"train.max_steps={STEPS}",
        "train.checkpoint_every_steps=2",
        eval_subset=False,
    )


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def _preempt(cmd: list[str], run_dir: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start ``cmd`` in its own process group, wait for the step-2 checkpoint, send ``sig`` to
    the whole group; (exit code, stderr)."""
    proc = subprocess.Popen(
        cmd,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "last.pt").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def _checked_preemption(rc: int, err: str, run_dir: Path, ranks: int) -> int:
    """Exit 75, no dead loader worker, every rank checkpointed at the same step, and last.pt is
    that step's; returns the step."""
    assert "killed by signal" not in err, err[-3000:]
    assert rc == PREEMPTED_EXIT_CODE, err[-3000:]
    steps = re.findall(r"preempted: checkpointed at step (\d+)", err)
    assert len(steps) == ranks and len(set(steps)) == 1, err[-3000:]
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["progress"]["global_step"] == int(steps[0]) < STEPS
    return int(steps[0])


def _assert_same_weights(a_path: Path, b_path: Path) -> None:
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    assert a["progress"] == b["progress"] and b["progress"]["global_step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "pipeline",
    [
        "torch",
        pytest.param(
            "dali",
            marks=[
                pytest.mark.dali,
                pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI"),
            ],
        ),
    ],
)
def test_loader_workers_survive_the_stop_signals_of_their_process_group(synthetic_trees, pipeline):
    root, _ = synthetic_trees["sysu"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests/integration/signal_probe.py"), str(root), pipeline],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Every batch arrived after the signals, and the main process (only) got each of them,
    # once while training and once while extracting features.
    assert out["batches"] == out["expected"] > 1
    assert out["features"] == [40, 3]
    twice = sorted([signal.SIGTERM, signal.SIGUSR1, signal.SIGINT] * 2)
    assert out["received"] == [int(s) for s in twice]


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_at_the_step_and_resumes_exactly(
    synthetic_trees, tmp_path
):
    root, _ = synthetic_trees["sysu"]
    train = [sys.executable, str(REPO / "launch/train.py"), "-c", CONFIG]
    straight = _run([*train, *_overrides(root, tmp_path, "straight")])
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "pre"
    rc, err = _preempt([*train, *_overrides(root, tmp_path, "pre")], run_dir, signal.SIGTERM)
    step = _checked_preemption(rc, err, run_dir, ranks=1)
    resumed = _run([*train, *_overrides(root, tmp_path, "pre"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch 0 step {step}" in resumed.stderr
    _assert_same_weights(tmp_path / "straight" / "last.pt", run_dir / "last.pt")


@pytest.mark.slow
def test_torchrun_group_preempted_by_sigterm_exits_75_and_resumes_exactly(
    synthetic_trees, tmp_path, free_port
):
    root, _ = synthetic_trees["sysu"]

    def torchrun(name: str, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "dist_reid.engine.torchrun", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(REPO / "launch/train.py"), "-c", CONFIG, *_overrides(root, tmp_path, name), *extra,
        ]  # fmt: skip

    straight = _run(torchrun("straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # two ranks, INFO once: rank 0 alone logs it (a rank's warnings would carry "[rank N]")
    assert straight.stderr.count("INFO dist_reid.engine.hooks: training ") == 1
    assert straight.stderr.count("INFO dist_reid.engine.distributed: mixed precision") == 1
    assert "[rank 1] INFO" not in straight.stderr
    run_dir = tmp_path / "pre"
    # The launcher's group: torchrun's agent gets SIGTERM and forwards it to each worker's own
    # process group, loader workers included.
    rc, err = _preempt(torchrun("pre"), run_dir, signal.SIGTERM)
    step = _checked_preemption(rc, err, run_dir, ranks=2)
    assert "all 2 local workers were preempted" in err
    resumed = _run(torchrun("pre", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch 0 step {step}" in resumed.stderr
    _assert_same_weights(tmp_path / "straight" / "last.pt", run_dir / "last.pt")


@pytest.mark.parametrize(("codes", "expected"), [("75,75", 75), ("0,75", 1), ("75,3", 1)])
def test_torchrun_wrapper_exits_75_only_when_every_worker_did(tmp_path, codes, expected):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, sys\n"
        "sys.exit(int(os.environ['CODES'].split(',')[int(os.environ['LOCAL_RANK'])]))\n"
    )
    cmd = [
        sys.executable, "-m", "dist_reid.engine.torchrun", "--standalone",
        "--nproc_per_node", "2", "--monitor_interval", "0.1", str(worker),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        env={**_env(), "CODES": codes},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == expected, proc.stderr[-3000:]
    assert ("local workers were preempted" in proc.stderr) == (expected == 75)


def test_torchrun_wrapper_forwards_usr1_and_outlasts_a_repeated_signal(tmp_path):
    """USR1 (not in torchrun's default set, so it would kill the agent) reaches the workers; a
    second signal while they checkpoint (srun --kill-on-bad-exit=1 signals the step again when
    another node leaves first) does not make the agent abandon them: exit 75."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, pathlib, signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda *_: got.append(1))\n"
        "pathlib.Path(os.environ['READY'] + os.environ['LOCAL_RANK']).touch()\n"
        "end = time.monotonic() + 60  # never outlive a failed test\n"
        "while not got and time.monotonic() < end:\n"
        "    time.sleep(0.05)\n"
        "time.sleep(2)  # the checkpoint\n"
        "sys.exit(75)\n"
    )
    ready, log = tmp_path / "ready", tmp_path / "launcher.err"
    cmd = [
        sys.executable, "-m", "dist_reid.engine.torchrun", "--standalone",
        "--nproc_per_node", "2", "--monitor_interval", "0.1", str(worker),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        env={**_env(), "READY": str(ready)},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),  # a file: an orphaned worker cannot hold it open
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{ready}{rank}").exists() for rank in (0, 1)):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGUSR1)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = log.read_text()
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "all 2 local workers were preempted" in err
