"""Hung peers (issue case 8): a rank frozen by SIGSTOP must not block the others for torch's
30-minute default. Collectives time out after ``train.dist_timeout_s`` (set-up gets the longer
``train.dist_init_timeout_s``), and a preemption signal that cannot reach its step-boundary
checkpoint ends the rank after ``train.preempt_grace_s``. Two CPU ranks over gloo, started as
plain processes (RANK/WORLD_SIZE/MASTER_* set, as ``srun`` per rank would), so each pid is known.
"""

from __future__ import annotations

import contextlib
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

from dist_reid.engine.preemption import PREEMPT_DEADLINE_EXIT_CODE, PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/experiments/demo_sysu_agw.yaml")


def _rank_env(rank: int, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """Never leave a stopped process behind: SIGKILL works on a stopped process, SIGCONT
    afterwards lets the kernel reap it at once."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["accelerate", "deepspeed"])
def test_set_up_gets_the_init_timeout_and_later_collectives_the_short_one(
    backend, tmp_path, free_port
):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests/distributed/timeout_probe.py"),
                backend,
                str(tmp_path / f"rank{rank}.json"),
            ],
            env=_rank_env(rank, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        logs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        _stop_all(procs)
    assert all(proc.returncode == 0 for proc in procs), "\n".join(log[-2000:] for log in logs)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["world"] == one["world"] == 2
    # The first collective waited out rank 1's 5 s delay: more than the 2 s timeout.
    assert zero["first"]["ok"] and zero["first"]["waited"] > 4.0, zero
    # Rank 0 working alone (an evaluation's scoring) also gets the long timeout...
    assert one["rank0_works"]["ok"] and one["rank0_works"]["waited"] > 4.0, one
    # ...and afterwards collectives time out after 2 s again, well before rank 1 arrives (6 s).
    later = zero["later"]
    assert not later["ok"] and 1.5 < later["waited"] < 5.0, later
    assert later["line"].startswith(
        "rank 0: a collective timed out after train.dist_timeout_s=2 s"
    ), later


def _start_training(root: Path, out: Path, port: int, *extra: str) -> list[subprocess.Popen]:
    args = [
        "-c",
        CONFIG,
        *tiny_run_overrides(
            root,
            out,
            "hang",
            "train.max_steps=400",
            "train.checkpoint_every_steps=2",
            *extra,
            eval_subset=False,
        ),
    ]
    procs = []
    for rank in (0, 1):  # stderr to files: a full pipe would block the rank by itself
        with open(out / f"rank{rank}.err", "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(REPO / "launch/train.py"), *args],
                    env=_rank_env(rank, port),
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            )
    return procs


def _wait_for_first_checkpoint(procs: list[subprocess.Popen], last: Path) -> None:
    """Until the first mid-epoch checkpoint exists (training is under way); every rank must
    still be running meanwhile."""
    deadline = time.monotonic() + 300
    while not last.exists():
        assert all(p.poll() is None for p in procs), _stderr(last.parent.parent, 0)[-3000:]
        assert time.monotonic() < deadline, "training did not reach its first checkpoint"
        time.sleep(0.2)


def _freeze_rank_one_mid_training(procs: list[subprocess.Popen], last: Path) -> None:
    """Wait for the first mid-epoch checkpoint, then SIGSTOP rank 1."""
    _wait_for_first_checkpoint(procs, last)
    os.kill(procs[1].pid, signal.SIGSTOP)


def _stderr(out: Path, rank: int) -> str:
    return (out / f"rank{rank}.err").read_text()


def _wait(proc: subprocess.Popen, bound: float) -> tuple[int | None, float]:
    start = time.monotonic()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=bound)
    return proc.poll(), time.monotonic() - start


def _step(path: Path) -> int:
    return torch.load(path, weights_only=True)["progress"]["global_step"]


@pytest.mark.slow
def test_rank_zero_leaves_within_the_collective_timeout_when_a_peer_is_frozen(
    synthetic_trees, tmp_path, free_port
):
    root, _ = synthetic_trees["sysu"]
    last = tmp_path / "hang" / "last.pt"
    procs = _start_training(
        root, tmp_path, free_port(), "train.dist_timeout_s=10", "train.dist_init_timeout_s=300"
    )
    try:
        _freeze_rank_one_mid_training(procs, last)
        # Torch's default would block for 30 min, the set-up timeout for 300 s: the bound is
        # the 10 s timeout plus the time to finish the step in flight and leave.
        code, waited = _wait(procs[0], bound=60)
        assert code is not None, "rank 0 still blocked 60 s after rank 1 froze"
    finally:
        _stop_all(procs)
    err = _stderr(tmp_path, 0)
    assert code == 1, err[-3000:]
    lines = [line for line in err.splitlines() if "a collective timed out" in line]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("rank 0: a collective timed out after train.dist_timeout_s=10 s")
    match = re.search(r"the last checkpoint is (\S+) \(global step (\d+)\)$", lines[0])
    assert match and Path(match[1]) == last and int(match[2]) == _step(last), lines[0]
    assert "Traceback" not in err, err[-3000:]
    assert 8 < waited < 60, waited


@pytest.mark.slow
def test_preemption_with_a_frozen_peer_exits_after_the_grace_period_without_a_checkpoint(
    synthetic_trees, tmp_path, free_port
):
    root, _ = synthetic_trees["sysu"]
    last = tmp_path / "hang" / "last.pt"
    # The collective timeout (120 s) is far beyond the grace period: only the deadline can end
    # rank 0 in time, while its main thread waits inside a gloo collective.
    procs = _start_training(
        root, tmp_path, free_port(), "train.dist_timeout_s=120", "train.preempt_grace_s=5"
    )
    try:
        _freeze_rank_one_mid_training(procs, last)
        time.sleep(3)  # rank 0 reaches the next collective and blocks in it
        before = last.stat().st_mtime_ns
        os.kill(procs[0].pid, signal.SIGTERM)
        code, waited = _wait(procs[0], bound=45)
        assert code is not None, "rank 0 still running 45 s after SIGTERM"
    finally:
        _stop_all(procs)
    err = _stderr(tmp_path, 0)
    assert code == PREEMPT_DEADLINE_EXIT_CODE and code not in (0, PREEMPTED_EXIT_CODE), err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("preemption:")]
    assert lines == [
        "preemption: SIGTERM received, but the step-boundary checkpoint was not written within "
        "train.preempt_grace_s=5 s (a peer is likely hung in a collective): exiting without a "
        f"checkpoint; the last checkpoint is {last} (global step {_step(last)})"
    ], err[-3000:]
    assert last.stat().st_mtime_ns == before  # no checkpoint written after the signal
    assert 4 < waited < 30, waited


@pytest.mark.slow
def test_a_healthy_preemption_still_checkpoints_and_exits_75_with_the_deadline_armed(
    synthetic_trees, tmp_path, free_port
):
    root, _ = synthetic_trees["sysu"]
    last = tmp_path / "hang" / "last.pt"
    procs = _start_training(root, tmp_path, free_port(), "train.preempt_grace_s=20")
    try:
        _wait_for_first_checkpoint(procs, last)
        os.kill(procs[0].pid, signal.SIGTERM)  # rank 0 only: the per-step all-reduce tells rank 1
        codes = [_wait(proc, bound=120)[0] for proc in procs]
    finally:
        _stop_all(procs)
    assert codes == [PREEMPTED_EXIT_CODE] * 2, [_stderr(tmp_path, r)[-2000:] for r in (0, 1)]
    err = _stderr(tmp_path, 0)
    assert "preemption:" not in err
    step = int(re.search(r"preempted: checkpointed at step (\d+)", err)[1])
    assert _step(last) == step > 0


# A process whose main thread gets SIGTERM and then writes its checkpoint (uninstall) after
# CHECKPOINT_AFTER seconds, or never; the deadline is 1 s.
_HANDLER_SCRIPT = """
import os, signal, sys, time
from dist_reid.engine.preemption import PreemptionHandler
after = float(sys.argv[1])
handler = PreemptionHandler(grace_s=1.0, describe_last=lambda: "the last checkpoint is x.pt")
handler.install()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(after)
handler.uninstall()  # the preemption checkpoint is written
time.sleep(2.0)  # past the deadline: it must not fire any more
print("survived", handler.received == signal.SIGTERM)
"""


@pytest.mark.parametrize(("checkpoint_after", "exits"), [(0.2, False), (30.0, True)])
def test_preemption_deadline_fires_only_without_a_checkpoint(checkpoint_after, exits):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _HANDLER_SCRIPT, str(checkpoint_after)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if exits:
        assert proc.returncode == PREEMPT_DEADLINE_EXIT_CODE, proc.stderr
        assert proc.stderr.strip() == (
            "preemption: SIGTERM received, but the step-boundary checkpoint was not written "
            "within train.preempt_grace_s=1 s (a peer is likely hung in a collective): exiting "
            "without a checkpoint; the last checkpoint is x.pt"
        )
        assert time.monotonic() - start < 20
    else:
        assert proc.returncode == 0 and proc.stdout.strip() == "survived True", proc.stderr


@pytest.mark.parametrize(
    "override",
    [
        "train.dist_timeout_s=0",
        "train.dist_init_timeout_s=100",  # shorter than train.dist_timeout_s (300)
        "train.preempt_grace_s=0",
    ],
)
def test_timeout_keys_are_bounded(override):
    from dist_reid.config import ConfigError, load_config

    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: must be in \["):
        load_config(None, ["data.root=/x", override])


def test_the_default_timeouts_are_well_under_torchs_30_minutes():
    from dist_reid.config import load_config

    train = load_config(str(REPO / "configs/sysu/agw.yaml"), []).train
    assert train.dist_timeout_s == 300 and train.dist_init_timeout_s == 1200
    assert train.dist_timeout_s < train.dist_init_timeout_s < 1800
    assert train.preempt_grace_s == 60  # Slurm's USR1 comes 180 s before the kill


class _Backend:
    rank, timeout_s, init_timeout_s, _in_setup = 1, 10.0, 600.0, False


def test_only_collective_failures_become_the_one_line():
    from dist_reid.engine.distributed import peer_failure

    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/"
    timeout = RuntimeError(f"{gloo}unbound_buffer.cc:78] Timed out waiting 10000ms for recv")
    assert peer_failure(timeout, _Backend()) == (
        "rank 1: a collective timed out after train.dist_timeout_s=10 s: a peer rank is hung, "
        "stopped or dead (Timed out waiting 10000ms for recv)"
    )
    setup = _Backend()
    setup._in_setup = True
    assert "train.dist_init_timeout_s=600 s" in peer_failure(timeout, setup)
    closed = RuntimeError(f"{gloo}pair.cc:561] Connection closed by peer [127.0.0.1]:27560")
    assert peer_failure(closed, _Backend()).startswith("rank 1: a peer rank left the process group")
    # gloo's message for a pair it closed after a timeout carries no source path (seen in CI)
    bare = RuntimeError("Application timeout caused pair closure")
    assert peer_failure(bare, _Backend()).startswith("rank 1: a collective timed out after ")
    # Anything else keeps its own traceback: not mistaken for a hung peer.
    assert peer_failure(RuntimeError("CUDA out of memory. Tried to allocate"), _Backend()) is None
    assert peer_failure(RuntimeError("shape mismatch, timed out"), _Backend()) is None
