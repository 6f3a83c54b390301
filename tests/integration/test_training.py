"""The engine end to end: 2-process accelerate launch, exact resume, checkpoint safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides

from dist_reid.config import load_config
from dist_reid.engine.build import build_trainer
from dist_reid.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dist_reid.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/experiments/demo_sysu_agw.yaml")


def tiny(root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return tiny_run_overrides(root, out, name, *extra)


@pytest.mark.slow
def test_two_process_accelerate_launch_trains_in_sync(synthetic_trees, tmp_path, two_process_probe):
    root, _ = synthetic_trees["sysu"]
    ranks = two_process_probe(
        CONFIG, 12, tiny(root, tmp_path, "ddp", "train.lr=0.002")
    )  # in sync, loss falls
    assert [r["batch"] for r in ranks] == [
        8,
        8,
    ]  # P=4 ids over 2 ranks: 2 ids x (2 visible + 2 infrared)
    assert ranks[0]["losses"] != ranks[1]["losses"]  # ...while each rank saw its own identities


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.backend.unwrap(trainer.model).state_dict().items()}


# MIP's sampler and PDM's augmentation keys resume as exactly as the default recipe
FAITHFUL = (
    "data.sampler=identity_modality",
    "data.mean=[0.5,0.5,0.5]",
    "data.std=[0.5,0.5,0.5]",
    "data.augment.grayscale=0.5",
    "data.augment.erasing_area=[0.2,0.8]",
    "data.augment.erasing_fill=[0.485,0.456,0.406]",
)


@pytest.mark.slow
@pytest.mark.parametrize("keys", [(), FAITHFUL], ids=["default", "faithful-keys"])
def test_resume_continues_exactly(synthetic_trees, tmp_path, keys):
    root, _ = synthetic_trees["sysu"]
    straight = build_trainer(
        load_config(
            CONFIG,
            tiny(
                root,
                tmp_path,
                "straight",
                "train.max_steps=8",
                "data.augment.random_erasing=0.5",
                *keys,
            ),
        )
    )
    straight.fit()
    assert type(straight.pipeline.sampler).__name__ == (
        "IdentityModalitySampler" if keys else "ModalityBalancedSampler"
    )
    first = build_trainer(
        load_config(
            CONFIG,
            tiny(
                root,
                tmp_path,
                "split",
                "train.max_steps=4",
                "data.augment.random_erasing=0.5",
                *keys,
            ),
        )
    )
    first.fit()
    assert first.global_step == 4 and first.cursor == 4
    second = build_trainer(
        load_config(
            CONFIG,
            tiny(
                root,
                tmp_path,
                "split",
                "train.max_steps=8",
                "data.augment.random_erasing=0.5",
                *keys,
            ),
        )
    )
    second.fit(resume=tmp_path / "split" / "last.pt")
    assert second.global_step == 8
    a, b = _weights(straight), _weights(second)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_full_run_reports_last_and_best_and_resume_of_a_finished_run_is_a_no_op(
    synthetic_trees, tmp_path
):
    root, _ = synthetic_trees["sysu"]
    cfg = load_config(CONFIG, tiny(root, tmp_path, "full", "train.epochs=1", "train.max_steps=0"))
    result = build_trainer(cfg).fit()
    final = json.loads((tmp_path / "full" / "final_metrics.json").read_text())
    assert (
        final["last_epoch"]["epoch"] == 0 and "best_epoch_selected_on_test_set_optimistic" in final
    )
    assert 0 <= final["last_epoch"]["metrics"]["all"]["mAP"] <= 100
    assert (tmp_path / "full" / "config.yaml").is_file() and (
        tmp_path / "full" / "best.pt"
    ).is_file()
    again = build_trainer(cfg)
    assert again.fit(resume=tmp_path / "full" / "last.pt") == result
    assert again.global_step == result["global_step"]


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    path = save_checkpoint(
        {"model": {"w": torch.ones(3)}, "progress": {"epoch": 1}}, tmp_path / "last.pt"
    )
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pt is unreadable"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a dist-reid training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    good = {"model": {"w": torch.arange(4.0)}, "progress": {"epoch": 1}}
    path = save_checkpoint(good, tmp_path / "last.pt")

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(4)}, "progress": {"epoch": 2}}, path)
    monkeypatch.undo()
    torch.testing.assert_close(load_checkpoint(path)["model"]["w"], good["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
