"""Intra-op threads per process: cores / local processes, or OMP_NUM_THREADS when set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dist_reid.engine.cpu_threads import threads_per_process, usable_cores


@pytest.mark.parametrize(
    "env, cores, want",
    [
        ({}, 8, 8),
        ({"LOCAL_WORLD_SIZE": "2"}, 2, 1),
        ({"LOCAL_WORLD_SIZE": "2"}, 16, 8),
        ({"LOCAL_WORLD_SIZE": "3"}, 16, 5),
        ({"LOCAL_WORLD_SIZE": "8"}, 4, 1),  # never 0
        ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, 16, 3),  # the user's choice wins
        ({"OMP_NUM_THREADS": " "}, 6, 6),  # blank counts as unset
        ({"OMP_NUM_THREADS": "0", "LOCAL_WORLD_SIZE": "2"}, 6, 3),  # accelerate's "not chosen"
    ],
)
def test_threads_per_process(env, cores, want):
    assert threads_per_process(env, cores=cores) == want


@pytest.mark.parametrize(
    "name, value",
    [("OMP_NUM_THREADS", "-1"), ("LOCAL_WORLD_SIZE", "two"), ("LOCAL_WORLD_SIZE", "0")],
)
def test_a_bad_variable_is_named(name, value):
    with pytest.raises(ValueError, match=f"{name}='{value}' is not a "):
        threads_per_process({name: value}, cores=4)


@pytest.mark.slow
def test_accelerate_launch_gives_each_process_its_share(tmp_path, free_port):
    """accelerate launch with ``--num_cpu_threads_per_process 0`` (its "not chosen") exports
    OMP_NUM_THREADS=0, and torch then starts one thread per core in each of the 2 processes."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, torch\n"
        "from dist_reid.engine.cpu_threads import configure_threads\n"
        "configure_threads()\n"
        "print('threads', os.environ['RANK'], torch.get_num_threads(), flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "0", "--main_process_port", str(free_port()), str(script),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("threads"))
    want = max(1, usable_cores() // 2)
    assert lines == [f"threads 0 {want}", f"threads 1 {want}"], proc.stdout
