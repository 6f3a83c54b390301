"""Figures and reports: the numbers behind them, and files a person can open."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dist_reid.cli import main
from dist_reid.data.records import Record
from dist_reid.viz.plots import (
    cmc_figure,
    cross_modal_distances,
    distance_figure,
    grad_cam,
    plot_cmc,
    plot_distance_histogram,
    plot_ranked_gallery,
)
from dist_reid.viz.report import compare_cmc, run_labels, write_report


def _is_picture(path, min_size=(200, 200)) -> bool:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
        inked = (pixels < 200).mean()  # share of non-background pixels: axes, lines, labels
        return image.size[0] >= min_size[0] and image.size[1] >= min_size[1] and inked > 0.005


def test_cross_modal_distances_split_by_identity():
    dist = np.array([[0.1, 0.9, 0.2], [0.8, 0.3, 0.7]])
    intra, inter = cross_modal_distances(dist, np.array([1, 2]), np.array([1, 2, 1]))
    assert sorted(intra) == [0.1, 0.2, 0.3] and sorted(inter) == [0.7, 0.8, 0.9]


def test_figure_contents_match_their_data():
    curves = {
        "agw": np.linspace(0.3, 1, 20),
        "pdm": np.linspace(0.4, 1, 20),
        "mip": np.linspace(0.5, 1, 20),
    }
    ax = cmc_figure(curves).axes[0]
    assert len(ax.get_lines()) == 3 and (ax.get_xlabel(), ax.get_ylabel()) == (
        "rank",
        "matching rate (%)",
    )
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "agw (R1 30.0)",
        "pdm (R1 40.0)",
        "mip (R1 50.0)",
    ]
    dist = np.array([[0.1, 0.9, 0.2], [0.8, 0.3, 0.7]])
    ax = distance_figure(dist, np.array([1, 2]), np.array([1, 2, 1])).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["intra-class (mean 0.200)", "inter-class (mean 0.800)"]
    assert [line.get_xdata()[0] for line in ax.get_lines()] == pytest.approx(
        [0.2, 0.8]
    )  # mean markers


def test_histogram_and_cmc_figures_are_pictures(tmp_path):
    rng = np.random.default_rng(0)
    dist = rng.random((20, 30))
    path = plot_distance_histogram(
        dist, rng.integers(0, 5, 20), rng.integers(0, 5, 30), tmp_path / "h.png"
    )
    assert _is_picture(path)
    assert _is_picture(
        plot_cmc({"a": np.linspace(0.3, 1, 20), "b": np.linspace(0.1, 0.9, 20)}, tmp_path / "c.png")
    )


def test_grad_cam_maps_are_normalised_and_follow_the_input():
    from dist_reid.models import create_model

    torch.manual_seed(0)
    model = create_model("agw", num_classes=4, backbone="resnet18")
    images = torch.randn(2, 3, 64, 32)
    cams = grad_cam(model, model.backbone.stages[-1], images, "visible")
    assert cams.shape == (2, 4, 2)  # last stride 1: 64x32 / 16
    assert float(cams.min()) >= 0 and torch.allclose(
        cams.flatten(1).max(dim=1).values, torch.ones(2)
    )
    assert not torch.allclose(cams[0], cams[1])
    assert not torch.is_grad_enabled() or all(p.grad is None for p in model.parameters())


def _fake_run(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    writer = SummaryWriter(str(run / "tensorboard"))
    for step in range(1, 6):
        writer.add_scalar("loss/total", 5.0 / step, step)
    writer.close()
    cmc = list(np.linspace(0.25, 1.0, 20))
    entry = {
        "mean": {k: 50.0 for k in ("R1", "R5", "R10", "R20", "mAP", "mINP")},
        "std": {k: 1.5 for k in ("R1", "R5", "R10", "R20", "mAP", "mINP")},
        "chance": {},
        "cmc_mean": cmc,
    }
    entry["mean"]["mAP"] = 42.42
    entry["std"]["R1"] = 6.74
    (run / "metrics.json").write_text(json.dumps({"dataset": "sysu", "settings": {"all": entry}}))
    (run / "final_metrics.json").write_text(
        json.dumps(
            {
                "last_epoch": {"epoch": 4, "metrics": {"all": entry["mean"]}},
                "best_epoch_selected_on_test_set_optimistic": {
                    "epoch": 3,
                    "selected_by": "all mAP",
                    "metrics": {},
                },
            }
        )
    )
    return run


def test_report_has_metrics_curves_and_figures(tmp_path):
    run = _fake_run(tmp_path)
    md, html = write_report(run)
    text = md.read_text()
    assert "42.42" in text and "optimistic" in text
    assert "figures/training_curves.png" in text and "figures/cmc.png" in text
    assert _is_picture(run / "figures" / "training_curves.png") and _is_picture(
        run / "figures" / "cmc.png"
    )
    # the full protocol has the trials' spread; the last-epoch record has none: no "± 0.00"
    assert "| all | 50.00 ± 6.74 |" in text and "42.42 ± 1.50" in text
    assert "| all | 50.00 | 50.00 | 50.00 | 50.00 | 42.42 | 50.00 |" in text
    assert "± 0.00" not in text
    page = html.read_text()
    assert "<table>" in page and "<td>42.42 ± 1.50</td>" in page and "<td>42.42</td>" in page
    # one self-contained file: the figures are embedded, byte for byte
    assert 'src="figures/' not in page
    embedded = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert {alt for alt, _ in embedded} >= {"training curves", "cmc"}
    for alt, data in embedded:
        name = "training_curves.png" if alt == "training curves" else f"{alt}.png"
        assert base64.b64decode(data) == (run / "figures" / name).read_bytes()


def test_compare_keeps_runs_with_the_same_folder_name_apart(tmp_path):
    first = _fake_run(tmp_path / "a")
    second = _fake_run(tmp_path / "b")
    assert run_labels([first, second]) == ["a/run", "b/run"]
    assert run_labels([first, tmp_path / "other"]) == ["run", "other"]
    compare_cmc([first, second], tmp_path / "cmp.png")
    ax = cmc_figure({"a/run/all": [0.2, 1.0], "b/run/all": [0.3, 1.0]}).axes[0]
    assert len(ax.get_legend().get_texts()) == 2


def test_cmc_ticks_are_whole_ranks():
    fig = cmc_figure({"x": np.linspace(0.3, 1.0, 5)})
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 5]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_ranked_gallery_has_no_empty_columns(tmp_path):
    records = []
    for i, modality in enumerate(["infrared", "visible", "visible", "visible"]):
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", (32, 64), (40 * i, 80, 120)).save(path)
        records.append(Record(str(path), pid=i % 2, cam=1 + i, modality=modality))
    dist = np.array([[0.3, 0.1, 0.2]])
    fig_path = plot_ranked_gallery(
        records[:1], records[1:], dist, [0], tmp_path / "g.png", top_k=10
    )
    with Image.open(fig_path) as image:
        width, height = image.size
    assert width < height * 2.5  # 1 query + 3 gallery columns, not 11
    assert _is_picture(fig_path, min_size=(100, 100))


def test_compare_cmc_names_a_missing_metrics_file(tmp_path):
    run = _fake_run(tmp_path)
    assert _is_picture(compare_cmc([run], tmp_path / "cmp.png"))
    with pytest.raises(FileNotFoundError, match=r"nowhere/metrics\.json"):
        compare_cmc([tmp_path / "nowhere"], tmp_path / "x.png")


def test_plot_command_writes_every_figure(synthetic_trees, tmp_path):
    root, _ = synthetic_trees["sysu"]
    overrides = [
        f"data.root={root}",
        "data.height=64",
        "data.width=32",
        "model.backbone=resnet18",
        "data.num_workers=0",
    ]
    assert (
        main(
            [
                "plot",
                "-c",
                "configs/sysu/agw.yaml",
                "--untrained",
                "--out",
                str(tmp_path),
                *overrides,
            ]
        )
        == 0
    )
    for name in ("distance_histogram", "tsne", "ranked_gallery", "grad_cam"):
        assert _is_picture(tmp_path / f"{name}.png", (150, 150)), name
