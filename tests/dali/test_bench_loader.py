"""``dist-reid bench loader`` end to end on a tiny synthetic tree."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("nvidia.dali")

from dist_reid.cli import main as cli_main

pytestmark = pytest.mark.dali


def test_bench_loader_writes_all_three_loaders(synthetic_trees, tmp_path):
    root, _ = synthetic_trees["sysu"]
    argv = ["bench", "loader", "--root", str(root), "--workers", "0", "--batches", "2"]
    argv += ["--height", "32", "--width", "16", "--ids-per-batch", "4", "--instances", "2"]
    assert cli_main([*argv, "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "loader_sysu_32x16.json").read_text())
    rows = report["rows"]
    names = [(r["loader"], r["workers"]) for r in rows]
    for workers in (0,):
        for loader in ("torch", "dali", "dali-cache", "dali-cache (fill pass)"):
            assert (loader, workers) in names
    for r in rows:
        if r["loader"] != "dali-cache (fill pass)":
            assert r["images"] == 2 * 16  # two timed batches of P*K*2 images
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"])
    assert report["machine"]["torch"] and report["config"]["batch"] == 16
    assert "| loader |" in (tmp_path / "loader_sysu_32x16.md").read_text()
