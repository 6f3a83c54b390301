"""Training throughput benchmark: phases add up, modes are compared in one run, scaling."""

from __future__ import annotations

import json

import pytest

from dist_reid.bench.train import PHASES, run_scaling_benchmark, run_train_benchmark

CONFIG = "configs/experiments/demo_sysu_agw.yaml"


def _tiny(root):
    return [
        f"data.root={root}",
        "data.synthetic.enabled=false",
        "data.height=64",
        "data.width=32",
        "data.num_workers=0",
        "train.ids_per_batch=4",
        "train.instances_per_modality=2",
    ]


@pytest.mark.slow
def test_train_benchmark_phases_add_up_and_baseline_is_the_reference_way(synthetic_trees):
    root, _ = synthetic_trees["sysu"]
    payload = run_train_benchmark(CONFIG, ["baseline", "optimized"], _tiny(root), steps=2, warmup=1)
    rows = {r["mode"]: r for r in payload["rows"]}
    assert rows["baseline"]["speedup_vs_baseline"] == 1.0
    for row in rows.values():
        step_seconds = sum(row[f"{p}_ms"] for p in PHASES) / 1000
        assert row["images_per_step"] == 16
        assert row["images_per_s"] == pytest.approx(row["images_per_step"] / step_seconds, rel=1e-6)
        assert row["pipeline"] == "torch"  # no GPU: auto keeps the DataLoader
    assert rows["optimized"]["speedup_vs_baseline"] == pytest.approx(
        rows["optimized"]["images_per_s"] / rows["baseline"]["images_per_s"]
    )
    assert "python" in json.dumps(payload["machine"]).lower()


@pytest.mark.slow
def test_scaling_benchmark_runs_one_and_two_processes(synthetic_trees):
    root, _ = synthetic_trees["sysu"]
    payload = run_scaling_benchmark(CONFIG, 2, _tiny(root), steps=2, warmup=1, mode="baseline")
    rows = payload["rows"]
    assert [r["processes"] for r in rows] == [1, 2] and rows[0]["efficiency"] == 1.0
    assert rows[1]["images_per_s_per_process"] == pytest.approx(rows[1]["images_per_s_total"] / 2)
    assert rows[1]["efficiency"] > 0  # its value is a measurement, not a test property
