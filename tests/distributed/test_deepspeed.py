"""DeepSpeed ZeRO-2 bf16 on CPU: 2 processes over gloo train in sync and resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/experiments/demo_sysu_agw.yaml")


def tiny(root: Path, out: Path, *extra: str) -> list[str]:
    # ds_probe.py names each of its runs (run.name after these overrides wins)
    return tiny_run_overrides(root, out, "ds", *extra, eval_subset=False)


@pytest.mark.deepspeed
@pytest.mark.slow
def test_two_process_zero2_bf16_trains_in_sync_and_resumes_exactly(
    synthetic_trees, tmp_path, free_port
):
    pytest.importorskip("deepspeed")
    root, _ = synthetic_trees["sysu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests/distributed/ds_probe.py"),
        CONFIG,
        str(tmp_path),
        "8",  # loop steps
        "3",  # resume after 3 of 6 steps
        *tiny(
            root,
            tmp_path,
            "train.lr=0.002",
            "train.backend=deepspeed",
            f"train.deepspeed_config={REPO / 'configs/deepspeed/zero2_bf16.json'}",
            "optim.grad_clip=5.0",
        ),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for r in ranks:
        assert r["backend"] == "deepspeed" and r["world"] == 2
        assert r["dtypes"] == ["torch.bfloat16"]  # the engine holds bf16 weights
        early, late = sum(r["losses"][:3]) / 3, sum(r["losses"][-3:]) / 3
        assert late < early, r["losses"]
    # ZeRO-2 partitions the optimizer state, yet every rank ends with the same full weights.
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank saw its own identities
    # Resume restored the fp32 masters and Adam moments from the gathered partitions: the
    # split run ends bit-identical to the straight one (and moved after the resume).
    for r in ranks:
        assert r["resumed_step"] == 6
        torch.testing.assert_close(r["resumed"], r["straight"], rtol=0, atol=0)
        assert not torch.equal(r["resumed"], r["after_first"])
    saved = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    parts = saved["optimizer"]["deepspeed_zero_partitions"]
    # tensors and plain containers (no pickled byte blobs): each rank's fp32 master slices
    assert len(parts) == 2 and all(isinstance(p, dict) for p in parts)
    masters = [t for p in parts for t in p["single_partition_of_fp32_groups"]]
    assert masters and all(t.dtype == torch.float32 for t in masters)
    assert saved["world_size"] == 2 and saved["progress"]["global_step"] == 6


def test_auto_values_are_filled_and_conflicts_are_one_clear_error(tmp_path):
    from dist_reid.engine.deepspeed_backend import load_deepspeed_config

    cfg = load_deepspeed_config(
        REPO / "configs/deepspeed/zero2_bf16.json", grad_accum=3, grad_clip=2.5
    )
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 2.5
    assert cfg["bf16"]["enabled"] is True and cfg["zero_optimization"]["stage"] == 2
    fp16 = load_deepspeed_config(REPO / "configs/deepspeed/zero2_fp16.json")
    assert fp16["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    with pytest.raises(ValueError, match=r"train.mixed_precision='fp16' but .*zero2_bf16.json"):
        load_deepspeed_config(REPO / "configs/deepspeed/zero2_bf16.json", mixed_precision="fp16")
    three = tmp_path / "zero3.json"
    three.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match=r"zero3.json: zero_optimization.stage=3"):
        load_deepspeed_config(three)
    with pytest.raises(FileNotFoundError, match=r"train.deepspeed_config: .*missing.json"):
        load_deepspeed_config(tmp_path / "missing.json")
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    with pytest.raises(ValueError, match=r"train.grad_accum=1"):
        load_deepspeed_config(fixed)


def test_backend_deepspeed_needs_a_config():
    from dist_reid.config import ConfigError
    from dist_reid.config.schema import TrainConfig

    with pytest.raises(ConfigError, match=r"train.deepspeed_config"):
        TrainConfig(backend="deepspeed")
    with pytest.raises(ConfigError, match=r"train.backend"):
        TrainConfig(backend="horovod")


@pytest.mark.gpu
@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_gpu_zero2_fp16_dynamic_loss_scale_trains_and_resumes_exactly(
    synthetic_trees, tmp_path, free_port
):
    pytest.importorskip("deepspeed")
    root, _ = synthetic_trees["sysu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        str(free_port()),
        str(REPO / "tests/distributed/ds_probe.py"),
        CONFIG,
        str(tmp_path),
        "8",
        "3",
        *tiny(
            root,
            tmp_path,
            "train.lr=0.002",
            "train.backend=deepspeed",
            f"train.deepspeed_config={REPO / 'configs/deepspeed/zero2_fp16.json'}",
        ),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = torch.load(tmp_path / "rank0.pt")
    assert r["dtypes"] == ["torch.float16"] and r["world"] == 1
    assert sum(r["losses"][-3:]) < sum(r["losses"][:3]), r["losses"]
    # the loss scale and fp32 masters come back with the partitions: bit-identical resume
    torch.testing.assert_close(r["resumed"], r["straight"], rtol=0, atol=0)
