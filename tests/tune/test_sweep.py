"""A real (tiny) Ray Tune sweep: table, best config, heatmap, crash reporting, restore."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from dist_reid.config import ConfigError, load_config
from dist_reid.tune import format_override, load_sweep, validate_sweep
from dist_reid.tune.trainable import STARTED_MARKER

pytestmark = pytest.mark.tune
REPO = Path(__file__).resolve().parents[2]
TINY = [
    "data.height=64",
    "data.width=32",
    "data.num_workers=0",
    "train.ids_per_batch=4",
    "train.instances_per_modality=2",
    "train.epochs=2",
    "train.kernels=torch",
    "eval.trials=[0]",
    "eval.settings=[all]",
    "optim.warmup_epochs=1",
]


def _sweep_file(tmp_path: Path, root: Path, space: dict, **extra) -> Path:
    spec = {
        "name": "tiny",
        "base_config": str(REPO / "configs/experiments/demo_sysu_agw.yaml"),
        "overrides": [*TINY, f"data.root={root}", "data.synthetic.enabled=false"],
        "search_space": space,
        "metric": "all/mAP",
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1, "gpu": 0},
        "max_failures": 1,
        "storage": str(tmp_path / "tune"),
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_unknown_or_mistyped_keys_fail_before_any_trial(synthetic_trees, tmp_path):
    root, _ = synthetic_trees["sysu"]
    with pytest.raises(ConfigError, match=r"search_space\.train\.lrr: .*Did you mean: 'lr'"):
        validate_sweep(load_sweep(_sweep_file(tmp_path, root, {"train.lrr": {"grid": [0.1]}})))
    with pytest.raises(
        ConfigError, match=r"search_space\.loss\.options\.lambda_x: .*takes no such option"
    ):
        validate_sweep(
            load_sweep(_sweep_file(tmp_path, root, {"loss.options.lambda_x": {"grid": [0.1]}}))
        )
    with pytest.raises(ConfigError, match=r"search_space\.train\.epochs: .*'ten'"):
        validate_sweep(
            load_sweep(_sweep_file(tmp_path, root, {"train.epochs": {"choice": ["ten"]}}))
        )
    with pytest.raises(
        ConfigError, match=r"grace_period: 0 epochs is shorter than the recipe's warm-up"
    ):
        validate_sweep(
            load_sweep(
                _sweep_file(
                    tmp_path, root, {"train.lr": {"grid": [0.1]}}, scheduler={"grace_period": 0}
                )
            )
        )
    with pytest.raises(ConfigError, match=r"search_space\.train\.lr: expected one of"):
        load_sweep(_sweep_file(tmp_path, root, {"train.lr": {"normal": [0, 1]}}))


def test_overrides_round_trip_through_the_config_loader():
    cfg = load_config(
        None,
        [
            "data.root=/x",
            format_override("eval.trials", [0, 2]),
            format_override("train.lr", 0.25),
            format_override("optim.name", "adamw"),
            format_override("model.pretrained", None),
        ],
    )
    assert (
        cfg.eval.trials == (0, 2)
        and cfg.train.lr == 0.25
        and cfg.optim.name == "adamw"
        and cfg.model.pretrained is None
    )


@pytest.mark.slow
def test_four_trial_sweep_writes_results_and_restore_reruns_nothing(synthetic_trees, tmp_path):
    ray = pytest.importorskip("ray")
    from dist_reid.tune.run import run_sweep

    root, _ = synthetic_trees["sysu"]
    # 2 x 2 grid; lr = -1 makes those trials crash at config validation inside the trial.
    space = {
        "train.lr": {"grid": [0.001, -1.0]},
        "loss.options.triplet_weight": {"grid": [0.5, 1.0]},
    }
    spec = load_sweep(_sweep_file(tmp_path, root, space))
    try:
        out = run_sweep(spec, num_cpus=2)
        rows = list(csv.DictReader(out.table_csv.read_text().splitlines()))
        assert len(rows) == 4
        good = [r for r in rows if float(r["train.lr"]) > 0]
        bad = [r for r in rows if float(r["train.lr"]) < 0]
        assert len(good) == 2 and all(r["error"] == "" and r["mAP"] != "" for r in good)
        assert all(int(r["epochs_run"]) >= 1 and 0 <= float(r["mAP"]) <= 100 for r in good)
        assert len(bad) == 2 and all(
            "train.lr" in r["error"] for r in bad
        )  # crash reported with its error
        best = yaml.safe_load(out.best_config.read_text())
        assert best["train"]["lr"] == 0.001 and best["loss"]["options"]["triplet_weight"] in (
            0.5,
            1.0,
        )
        assert out.heatmap is not None and out.heatmap.stat().st_size > 1000
        assert "| trial |" in out.table_md.read_text()
        trial_dirs = [
            p
            for p in (tmp_path / "tune" / "tiny").iterdir()
            if p.is_dir() and (p / STARTED_MARKER).exists()
        ]
        good_dirs = [d for d in trial_dirs if (d / "run" / "last.pt").exists()]
        assert len(good_dirs) == 2
        before = {d: (d / STARTED_MARKER).read_text().count("start") for d in good_dirs}
        assert set(before.values()) == {1}
        again = run_sweep(spec, resume=True, num_cpus=2)
        after = {d: (d / STARTED_MARKER).read_text().count("start") for d in good_dirs}
        assert after == before  # finished trials were not run again
        assert len(list(csv.DictReader(again.table_csv.read_text().splitlines()))) == 4
    finally:
        ray.shutdown()


@pytest.mark.parametrize("name", ["icre_lambda_rho", "demo_icre_lambda_rho", "agw_lr_weight"])
def test_shipped_sweeps_validate_and_route_overrides(name, synthetic_trees):
    root, _ = synthetic_trees["sysu"]
    spec = load_sweep(
        REPO / "configs/tune" / f"{name}.yaml", (f"data.root={root}", "num_samples=3")
    )
    assert spec.num_samples == 3 and spec.overrides[-1] == f"data.root={root}"
    assert Path(spec.base_config).is_file()
    cfg = validate_sweep(spec)
    assert cfg.data.root == str(root)
    assert len(spec.grid_keys()) == 2
