"""Test-wide settings: offline hubs, Triton interpreter before any kernel import, GPU skips."""

from __future__ import annotations

import os

# Both must be set before timm / triton kernels are imported (stack.md sections 1 and 5).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
import torch

from dist_reid.data.synthetic.layouts import SynthSummary, generate


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_trees(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, SynthSummary]]:
    """Small synthetic trees of all three layouts, generated once per session."""
    base = tmp_path_factory.mktemp("synthetic")
    trees = {}
    for layout, num_ids, per_camera in (("sysu", 30, 3), ("regdb", 12, 4), ("llcm", 30, 2)):
        root = base / layout
        trees[layout] = (
            root,
            generate(layout, root, num_ids, seed=7, images_per_camera=per_camera),
        )
    return trees
