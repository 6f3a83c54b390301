"""Elastic restart: torchrun --max_restarts 1, rank 1 SIGKILLed mid-epoch by the fault hook; the
restarted group resumes from the last checkpoint and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides

from dist_reid.engine.preemption import FAULT_RANK_ENV, FAULT_STEP_ENV

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/experiments/demo_sysu_agw.yaml")


def _torchrun(
    root: Path, out: Path, name: str, port: int, **env_extra: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env_extra}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--max_restarts",
        "1",
        "--monitor_interval",
        "0.5",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(REPO / "launch/train.py"),
        "-c",
        CONFIG,
        *tiny_run_overrides(
            root,
            out,
            name,
            "train.max_steps=6",
            "train.checkpoint_every_steps=2",
            eval_subset=False,
        ),
        "--resume",  # the restarted workers pick up <run dir>/last.pt
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_and_matches_uninterrupted_run(
    synthetic_trees, tmp_path, free_port
):
    root, _ = synthetic_trees["sysu"]
    straight = _torchrun(root, tmp_path, "straight", free_port())
    assert straight.returncode == 0, straight.stderr[-3000:]
    # torchrun's restart of a gloo group on CPU occasionally fails to re-form the group under
    # load (seen about once in four loaded runs: the new rank 0 dies during DDP set-up). One
    # fresh attempt is allowed for that; the checks on the attempt that ran stay exact.
    failures = []
    for attempt in range(2):
        name = f"faulted{attempt}"
        faulted = _torchrun(
            root, tmp_path, name, free_port(), **{FAULT_STEP_ENV: "3", FAULT_RANK_ENV: "1"}
        )
        resumed = "resumed from" in faulted.stderr and "at epoch 0 step 2" in faulted.stderr
        if faulted.returncode == 0 and resumed:
            break
        failures.append(f"attempt {attempt}: rc={faulted.returncode}\n{faulted.stderr[-1500:]}")
    else:
        pytest.fail("elastic restart failed twice:\n" + "\n".join(failures))
    # The fault really happened: rank 1 died by SIGKILL and the group was restarted once...
    assert "failed (exitcode: -9) local_rank: 1" in faulted.stderr, faulted.stderr[-3000:]
    # ...and the run ended exactly where the uninterrupted one did.
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / name / "last.pt", weights_only=True)
    assert a["progress"] == b["progress"] and b["progress"]["global_step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)


def test_fault_hook_is_inert_without_its_variable(monkeypatch):
    from dist_reid.engine.preemption import inject_fault

    monkeypatch.delenv(FAULT_STEP_ENV, raising=False)
    inject_fault(3, 1)  # would SIGKILL this pytest process if it fired
    monkeypatch.setenv(FAULT_STEP_ENV, "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    inject_fault(3, 1)  # restarted incarnation: no second kill
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    inject_fault(3, 0)  # other rank
    inject_fault(2, 1)  # other step
