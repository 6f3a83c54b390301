"""DALI on a GPU: nvJPEG (``mixed``) decoding and GPU augmentation against the CPU graph.

Skipped without CUDA (conftest) or without DALI.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nvidia.dali")

from dist_reid.data.augment import AugmentOptions
from dist_reid.data.datasets import open_dataset
from dist_reid.data.pipeline import build_train_pipeline
from dist_reid.data.pipeline.dali_loader import DaliTrainPipeline
from dist_reid.data.sampler import ModalityBalancedSampler
from dist_reid.data.transforms import IMAGENET_STD

pytestmark = [pytest.mark.dali, pytest.mark.gpu]
H, W = 64, 32
ON = AugmentOptions(pad=10, flip=True, channel_aug=True, random_erasing=0.5)
# nvJPEG's IDCT may differ from libjpeg-turbo by a few levels; allow 12 uint8 levels at most
MAX_TOL = 12 / 255 / min(IMAGENET_STD)


def _pipe(records, labels, device, **kw) -> DaliTrainPipeline:
    sampler = ModalityBalancedSampler(
        [r.pid for r in records], [r.modality for r in records], 4, 2, seed=1
    )
    pipe = DaliTrainPipeline(
        records, labels, sampler, height=H, width=W, augment=ON, device=device, **kw
    )
    pipe.set_epoch(0)
    return pipe


@pytest.mark.parametrize("cache", [False, True])
def test_mixed_decoding_matches_the_cpu_graph(synthetic_trees, cache):
    root, _ = synthetic_trees["sysu"]
    ds = open_dataset("sysu", root)
    gpu = list(_pipe(ds.train, ds.train_labels(), "cuda:0", cache=cache).iterate())
    cpu = list(_pipe(ds.train, ds.train_labels(), None).iterate())
    assert len(gpu) == len(cpu)
    for a, b in zip(gpu, cpu, strict=True):
        assert a["images"].is_cuda and a["images"].dtype == torch.float32
        assert torch.equal(a["indices"].cpu(), b["indices"]) and torch.equal(
            a["labels"].cpu(), b["labels"]
        )
        diff = (a["images"].cpu() - b["images"]).abs()
        assert diff.max() <= MAX_TOL and diff.mean() <= 1 / 255 / min(IMAGENET_STD)


def test_bmp_decodes_on_gpu_pipeline_and_is_logged(synthetic_trees, caplog):
    root, _ = synthetic_trees["regdb"]
    ds = open_dataset("regdb", root, trial=1)
    bmp = sum(r.path.lower().endswith(".bmp") for r in ds.train)
    with caplog.at_level("INFO"):
        pipe = _pipe(ds.train, ds.train_labels(), "cuda:0")
        batch = next(pipe.iterate())
    assert batch["images"].shape == (16, 3, H, W)
    assert ("decode on the CPU" in caplog.text) == (bmp > 0)


def test_auto_picks_dali_on_a_gpu(synthetic_trees):
    root, _ = synthetic_trees["sysu"]
    ds = open_dataset("sysu", root)
    sampler = ModalityBalancedSampler(
        [r.pid for r in ds.train], [r.modality for r in ds.train], 4, 2
    )
    pipe = build_train_pipeline(
        "auto",
        ds.train,
        ds.train_labels(),
        sampler,
        height=H,
        width=W,
        augment=ON,
        device="cuda:0",
        dtype=torch.float16,
    )
    assert isinstance(pipe, DaliTrainPipeline) and pipe.gpu
    assert next(pipe.iterate())["images"].dtype == torch.float16
