"""One evaluation plan: settings, trials (a RegDB model on its own trial), split options and
the test transform, decided once from the config and the dataset for every tool."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from dist_reid.builders import build_dataset, evaluation_plan
from dist_reid.config import load_config
from dist_reid.evaluation.protocols import all_test_records

REPO = Path(__file__).resolve().parents[2]


def _cfg(synthetic_trees, name: str, *extra: str):
    root, _ = synthetic_trees[name]
    return load_config(str(REPO / f"configs/datasets/{name}.yaml"), [f"data.root={root}", *extra])


@pytest.mark.parametrize("name", ["sysu", "llcm"])
def test_one_training_set_is_scored_on_every_trial(synthetic_trees, name):
    cfg = _cfg(synthetic_trees, name)
    dataset = build_dataset(cfg)
    plan = evaluation_plan(cfg, dataset)
    assert plan.trials == dataset.trials == tuple(range(10))
    assert plan.settings == dataset.settings
    assert evaluation_plan(cfg, dataset, every_trial=True).trials == plan.trials


def test_a_regdb_model_is_scored_on_its_own_trial_only(synthetic_trees):
    cfg = _cfg(synthetic_trees, "regdb", "data.trial=4")
    dataset = build_dataset(cfg)
    assert evaluation_plan(cfg, dataset).trials == (4,)
    assert evaluation_plan(cfg, dataset, every_trial=True).trials == tuple(range(1, 11))
    chosen = _cfg(synthetic_trees, "regdb", "data.trial=4", "eval.trials=[2,3]")
    assert evaluation_plan(chosen, build_dataset(chosen)).trials == (2, 3)  # asked for


def test_records_options_and_transform_follow_the_config(synthetic_trees):
    cfg = _cfg(
        synthetic_trees,
        "sysu",
        "eval.multi_shot=true",
        "eval.settings=[indoor]",
        "eval.trials=[0,3]",
        "data.height=32",
        "data.width=16",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.25,0.5,1.0]",
    )
    dataset = build_dataset(cfg)
    plan = evaluation_plan(cfg, dataset)
    assert (plan.settings, plan.trials, plan.multi_shot) == (("indoor",), (0, 3), True)
    want = all_test_records(dataset, ["indoor"], [0, 3], multi_shot=True, transposed_v2i=False)
    assert plan.records(dataset) == want
    single = all_test_records(dataset, ["indoor"], [0, 3], multi_shot=False, transposed_v2i=False)
    assert len(want) > len(single)  # the option reached the split
    tensor = plan.transform()(Image.new("RGB", (40, 80), (128, 255, 0)))
    assert tensor.shape == (3, 32, 16)
    expected = (torch.tensor([128, 255, 0]) / 255.0 - 0.5) / torch.tensor([0.25, 0.5, 1.0])
    torch.testing.assert_close(tensor[:, 5, 5], expected, atol=2e-2, rtol=0)
