"""``dist-reid bench methods``: FLOP counting, the trainer's calling convention, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_reid.bench.methods import (
    _batch,
    bench_method,
    count_gflops,
    main,
    registered_methods,
    train_throughput,
)
from dist_reid.builders import build_model
from dist_reid.cli import main as cli_main
from dist_reid.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.height=64", "data.width=32", "model.backbone=resnet18", "model.pretrained=null"]


class _Toy(nn.Module):
    """Linear on the flattened image; records the cameras it was given."""

    batch_fields = ("cams",)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 4)
        self.seen_cams: torch.Tensor | None = None

    def forward(self, images, modalities, cams):
        self.seen_cams = cams
        return {"logits": self.fc(images.flatten(1))}


class _ToyLoss(nn.Module):
    def forward(self, outputs, labels, modalities):
        return {"id": nn.functional.cross_entropy(outputs["logits"], labels)}


def test_count_gflops_matches_linear_formula():
    model = _Toy()
    batch = _batch(1, 1, 2, 2, torch.device("cpu"))  # 1 visible + 1 infrared image of 3x2x2
    # 2 rows x 12 inputs x 4 outputs multiply-accumulates, 2 FLOPs each
    assert count_gflops(model, batch) == pytest.approx(2 * 2 * 12 * 4 / 1e9)
    assert model.training  # restored after the eval-mode count
    assert model.seen_cams.tolist() == [1, 3]  # cams passed: the contract names them


def test_batch_has_the_sampler_layout():
    b = _batch(2, 3, 4, 2, torch.device("cpu"))
    assert b["labels"].tolist() == [0, 0, 0, 1, 1, 1] * 2
    assert b["modalities"].tolist() == [0] * 6 + [1] * 6
    assert b["images"].shape == (12, 3, 4, 2)


def test_train_throughput_takes_optimizer_steps():
    model = _Toy()
    before = model.fc.weight.detach().clone()
    rate, cpu = train_throughput(model, _ToyLoss(), _batch(2, 1, 2, 2, torch.device("cpu")), 2, 0)
    assert rate > 0 and cpu >= 0 and not torch.equal(before, model.fc.weight)


def test_registered_methods_have_configs():
    names = registered_methods(REPO / "configs/sysu")
    assert {"agw", "icre", "emif"} <= set(names) and "backbone" not in names


def test_main_writes_report(tmp_path):
    args = ["--methods", "icre", "--out", str(tmp_path), "--ids", "1", "--steps", "1"]
    code = main([*args, "--warmup", "0", "--no-gpu", *TINY])
    assert code == 0
    payload = json.loads((tmp_path / "methods.json").read_text())
    (row,) = payload["rows"]
    cfg = load_config(str(REPO / "configs/sysu/icre.yaml"), TINY)
    expected = sum(p.numel() for p in build_model(cfg, num_classes=395).parameters()) / 1e6
    assert row["method"] == "icre" and row["input"] == "64x32" and row["cpu_batch"] == 4
    assert row["params_M"] == pytest.approx(expected)
    assert row["gflops"] > 0 and row["cpu_train_img_s"] > 0 and row["cpu_s_per_img"] > 0
    assert row["gpu_train_img_s"] is None
    assert payload["machine"]["cpu_count"] >= 1 and "torch_threads" in payload["machine"]
    assert "| icre |" in (tmp_path / "methods.md").read_text()


def test_cli_dispatches_and_reports_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "methods", "--steps", "0"])
    assert "--steps" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_column_is_measured():
    row = bench_method("icre", REPO / "configs/sysu/icre.yaml", TINY, steps=1, warmup=0, gpu=True)
    assert row["gpu_train_img_s"] > 0 and row["gpu_batch"] == 64
