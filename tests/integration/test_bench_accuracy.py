"""``dist-reid bench accuracy`` plumbing on a tiny budget: the real 2-process launch, one row per
evaluated setting, the chance column equal to the evaluator's chance on the same galleries.

How well each method learns is the benchmark's record (README "Every method learns"); CI runs
the minimal version of it: AGW's CPU preset at 64x32 for 4 epochs, rank-1 above 2x chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dist_reid.bench.accuracy import (
    METHODS,
    backbone_label,
    main,
    preset_path,
    run_accuracy_benchmark,
)
from dist_reid.config import load_config
from dist_reid.data.datasets import open_dataset
from dist_reid.evaluation.protocols import run_protocol

REPO = Path(__file__).resolve().parents[2]


def test_every_method_and_dataset_has_a_cpu_preset_at_one_budget():
    """Equal budget: the same data, augmentation, epochs, batch and optimiser for every method of
    a dataset; CPU size: 128x64, random init; the method's own loss stays its paper preset's."""
    for dataset in ("sysu", "regdb"):
        budgets = set()
        for method in METHODS:
            cfg = load_config(preset_path(method, dataset))
            paper = load_config(preset_path(method, dataset, full=True))
            assert (cfg.data.height, cfg.data.width) == (128, 64)
            assert cfg.model.pretrained is None and cfg.data.synthetic.enabled
            assert cfg.model.name == paper.model.name == method
            assert cfg.loss == paper.loss  # losses and their options untouched
            aug = cfg.data.augment
            assert aug.random_erasing == 0
            budgets.add(
                (
                    cfg.data.root,
                    cfg.data.synthetic,
                    cfg.train.epochs,
                    cfg.train.ids_per_batch,
                    cfg.train.instances_per_modality,
                    cfg.train.lr,
                    cfg.optim.name,
                    cfg.optim.warmup_epochs,
                    cfg.optim.milestones,
                    # erasing's area, fill and mode are moot at probability 0
                    (aug.pad, aug.flip, aug.random_erasing, aug.grayscale, aug.channel_aug),
                )
            )
        assert len(budgets) == 1, budgets


def test_the_backbone_column_names_the_model_as_built():
    """MIP's CPU preset keeps ViT-B/16's name but cuts it to 6 blocks of width 192; the table
    must not report a ViT-B."""
    mip = load_config(preset_path("mip", "sysu"))
    assert backbone_label(mip) == f"{mip.model.backbone} (depth 6, embed_dim 192)"
    assert backbone_label(load_config(preset_path("agw", "sysu"))) == "resnet18"


def test_unknown_method_or_dataset_is_refused_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'resnet'"):
        run_accuracy_benchmark(["agw", "resnet"], ["sysu"], out=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'market'"):
        run_accuracy_benchmark(["agw"], ["market"], out=tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_tiny_run_writes_rows_and_the_evaluators_chance(synthetic_trees, tmp_path, capsys):
    root, _ = synthetic_trees["sysu"]
    overrides = [
        f"data.root={root}",
        "data.synthetic.enabled=false",
        "data.height=64",
        "data.width=32",
        "data.num_workers=0",
        "train.epochs=1",
        "train.max_steps=3",  # stop mid-epoch: the benchmark scores last.pt all the same
        "train.ids_per_batch=4",
        "train.instances_per_modality=2",
        "eval.trials=[0,1]",
    ]
    assert main(["--methods", "agw", "--datasets", "sysu", "--out", str(tmp_path), *overrides]) == 0
    printed = capsys.readouterr().out
    payload = json.loads((tmp_path / "accuracy.json").read_text())
    rows = payload["rows"]
    assert [(r["method"], r["dataset"], r["setting"]) for r in rows] == [
        ("agw", "sysu", "all"),
        ("agw", "sysu", "indoor"),
    ]
    for row in rows:
        assert row["trials"] == 2 and row["input"] == "64x32" and row["epochs"] == 1
        assert row["steps"] == 3 and 0 < row["train_s"] <= row["total_s"]
        assert row["R1_x_chance"] == pytest.approx(row["R1"] / row["R1_chance"])
        for name in ("R1", "mAP", "mINP"):
            assert 0 <= row[name] <= 100 and 0 < row[f"{name}_chance"] <= 100
    assert payload["machine"]["torch"] and payload["budget"]["processes"] == 2
    # The trained figures are the evaluator's report of the run (its eval/accuracy folder).
    run = payload["runs"]["sysu_agw"]
    metrics = json.loads(
        (tmp_path / "accuracy_runs/sysu_agw/eval/accuracy/metrics.json").read_text()
    )
    assert run["report"] == metrics
    assert rows[0]["R1"] == metrics["settings"]["all"]["mean"]["R1"]

    # Chance: random distances on the same queries and galleries, computed here independently
    # of any feature (run_protocol draws them from the seed alone).
    cfg = load_config(preset_path("agw", "sysu"), overrides)
    dataset = open_dataset("sysu", root)
    rng = np.random.default_rng(1)
    chance = run_protocol(
        dataset,
        lambda records, trial: rng.normal(size=(len(records), 8)),
        settings=("all", "indoor"),
        trials=(0, 1),
        chance_draws=cfg.eval.chance_draws,
        seed=cfg.run.seed,
    )
    for row, setting in zip(rows, chance.settings, strict=True):
        for name in ("R1", "mAP", "mINP"):
            assert row[f"{name}_chance"] == pytest.approx(setting.chance_mean()[name], abs=1e-9)

    markdown = (tmp_path / "accuracy.md").read_text()
    assert "| agw | sysu | all |" in markdown and "R1_chance" in markdown
    assert "R1_chance" in printed and "wrote" in printed


@pytest.mark.slow
def test_agw_cpu_preset_learns_to_over_twice_chance_in_a_short_run(tmp_path):
    """The benchmark's minimal version, through the same 2-process launch: AGW's CPU preset on
    its own 200-identity synthetic tree (generated here), cut to 64x32 and 4 epochs (228 steps).
    Measured on the 2-core VM: rank-1 8.10 against chance 2.30 (3.5x), mAP 15.11, about 4 min
    alone; at 2 epochs 2.1x, too close to the bound to assert. Untrained weights sit at 1x."""
    overrides = [
        f"data.root={tmp_path / 'SYSU-MM01'}",
        "data.height=64",
        "data.width=32",
        "data.augment.pad=2",
        "train.epochs=4",
        "optim.milestones=[3]",
    ]
    out = tmp_path / "bench"
    assert main(["--methods", "agw", "--datasets", "sysu", "--out", str(out), *overrides]) == 0
    rows = json.loads((out / "accuracy.json").read_text())["rows"]
    all_search = next(row for row in rows if row["setting"] == "all")
    assert all_search["steps"] == 228 and all_search["input"] == "64x32"
    assert all_search["R1"] > 2 * all_search["R1_chance"], all_search
