"""The dist-reid command line end to end on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_reid.cli import main
from dist_reid.models.backbones import PooledBackbone

TINY = [
    "model.backbone=resnet18",
    "data.height=64",
    "data.width=32",
    "data.num_workers=0",
    "eval.trials=[0,1]",
    "eval.chance_draws=2",
]


@pytest.fixture(scope="module")
def sysu_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "SYSU-MM01"
    assert (
        main(
            [
                "synth",
                "--layout",
                "sysu",
                "--root",
                str(root),
                "--num-ids",
                "16",
                "--images-per-camera",
                "2",
            ]
        )
        == 0
    )
    return root


def _overrides(root, out, name):
    return [
        f"data.root={root}",
        "data.synthetic.enabled=false",
        f"run.output_dir={out}",
        f"run.name={name}",
        *TINY,
    ]


def test_eval_untrained_writes_config_metrics_and_chance(sysu_root, tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "-c",
                "configs/datasets/sysu.yaml",
                "--untrained",
                "--name",
                "e",
                *_overrides(sysu_root, tmp_path, "u"),
            ]
        )
        == 0
    )
    run = tmp_path / "u" / "eval" / "e"  # an evaluation never writes into the run's own files
    assert "root: " + str(sysu_root) in (run / "config.yaml").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["settings"]) == {"all", "indoor"}
    for entry in metrics["settings"].values():
        assert entry["trials"] == [0, 1] and len(entry["per_trial"]) == 2
        assert 0 <= entry["mean"]["R1"] <= entry["mean"]["R20"] <= 100
        assert 0 < entry["chance"]["mAP"] < 100
    assert "untrained" in capsys.readouterr().out


def test_saved_features_give_the_same_numbers_as_the_checkpoint(sysu_root, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(PooledBackbone("resnet18").state_dict(), weights)
    common = ["-c", "configs/datasets/sysu.yaml"]
    assert (
        main(
            [
                "eval",
                *common,
                "--checkpoint",
                str(weights),
                "--name",
                "e",
                *_overrides(sysu_root, tmp_path, "ckpt"),
            ]
        )
        == 0
    )
    feats = tmp_path / "f.npz"
    assert (
        main(
            [
                "extract",
                *common,
                "--checkpoint",
                str(weights),
                "--out",
                str(feats),
                *_overrides(sysu_root, tmp_path, "x"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                *common,
                "--features",
                str(feats),
                "--name",
                "e",
                *_overrides(sysu_root, tmp_path, "feat"),
            ]
        )
        == 0
    )
    a = json.loads((tmp_path / "ckpt/eval/e/metrics.json").read_text())["settings"]
    b = json.loads((tmp_path / "feat/eval/e/metrics.json").read_text())["settings"]
    for setting in a:
        for row_a, row_b in zip(a[setting]["per_trial"], b[setting]["per_trial"], strict=True):
            assert row_a == pytest.approx(row_b, abs=1e-6)


def test_user_errors_are_one_line_with_exit_code_2(sysu_root, tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "-c",
                "configs/datasets/sysu.yaml",
                "--untrained",
                *_overrides(sysu_root, tmp_path, "e"),
                "train.lrr=1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.lrr" in err and "'lr'" in err
    assert (
        main(
            [
                "eval",
                "-c",
                "configs/datasets/sysu.yaml",
                "--untrained",
                "data.root=" + str(tmp_path / "absent"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "absent" in err and "does not exist" in err
    assert (
        main(
            [
                "eval",
                "-c",
                "configs/datasets/sysu.yaml",
                "--checkpoint",
                str(tmp_path / "nope.pt"),
                *_overrides(sysu_root, tmp_path, "e2"),
            ]
        )
        == 2
    )
    assert "nope.pt" in capsys.readouterr().err


def test_eval_needs_a_feature_source(sysu_root):
    with pytest.raises(SystemExit) as excinfo:
        main(["eval", "-c", "configs/datasets/sysu.yaml", f"data.root={sysu_root}"])
    assert excinfo.value.code == 2


def test_synth_refuses_to_overwrite(sysu_root, capsys):
    assert main(["synth", "--layout", "sysu", "--root", str(sysu_root), "--num-ids", "4"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_rerank_and_query_expansion_are_reported_apart(sysu_root, tmp_path):
    overrides = [
        *_overrides(sysu_root, tmp_path, "rr"),
        "eval.rerank=true",
        "eval.query_expansion=2",
        "eval.rerank_k1=5",
    ]
    command = ["eval", "-c", "configs/datasets/sysu.yaml", "--untrained", "--name", "e"]
    assert main([*command, *overrides]) == 0
    metrics = json.loads((tmp_path / "rr/eval/e/metrics.json").read_text())
    assert set(metrics["settings"]) == {"all", "indoor"}  # plain numbers untouched
    post = metrics["post_processed"]["settings"]
    assert set(post) == {"all+qe+rerank", "indoor+qe+rerank"}
    assert post["all+qe+rerank"]["per_trial"] != metrics["settings"]["all"]["per_trial"]


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _lr_schedule(capsys, config: Path, *overrides: str) -> list[float]:
    assert main(["config", "-c", str(config), "--lr-schedule", *overrides]) == 0
    return json.loads(capsys.readouterr().out)


def test_config_lr_schedule_prints_the_per_epoch_lr(capsys):
    # MIP: the released cosine-refine scheduler for train.sh (BASE_LR 0.01, 80 epochs,
    # COSINE_EPOCHS 30, MIN_INDEX 1e-5), stepped at the start of released epochs 1..80 (these are
    # our 0-based epochs 0, 4, 28, 29, 79) and summed over the 80 epochs.
    mip = _lr_schedule(capsys, CONFIGS / "sysu/mip.yaml")
    assert len(mip) == 80
    released = {0: 0.00208, 4: 0.009330133717652005, 28: 2.749024925340141e-05, 29: 0.001}
    released[79] = 2.5000750000000013e-05
    for epoch, lr in released.items():
        assert mip[epoch] == pytest.approx(lr, rel=1e-12), epoch
    assert sum(mip) == pytest.approx(0.1429908544848035, rel=1e-12)
    # AGW's released adjust_learning_rate: lr (e+1)/10 for e < 10, lr to 20, 0.1 lr to 50, then 0.01
    agw = _lr_schedule(capsys, CONFIGS / "sysu/agw.yaml")
    formula = [
        0.1 * ((e + 1) / 10 if e < 10 else 1 if e < 20 else 0.1 if e < 50 else 0.01)
        for e in range(81)
    ]
    assert agw == pytest.approx(formula, rel=1e-12)
    # every paper config prints one value per epoch; overrides apply
    for path in sorted(CONFIGS.glob("*/*.yaml")):
        if path.parent.name in ("sysu", "regdb", "llcm", "experiments"):
            lrs = _lr_schedule(capsys, path, "train.epochs=7")
            assert len(lrs) == 7 and all(lr > 0 for lr in lrs), path
