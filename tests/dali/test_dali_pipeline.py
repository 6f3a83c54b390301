"""DALI training pipeline (CPU graph): parity with the torch pipeline, augmentation numerics,
resume, decode-once cache, bad input, trainer selection and a short training run."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from dist_reid.config import ConfigError, load_config
from dist_reid.data.augment import AugmentOptions
from dist_reid.data.datasets import open_dataset
from dist_reid.data.images import ImageDecodeError, RecordImageDataset
from dist_reid.data.pipeline import TorchTrainPipeline, build_train_pipeline
from dist_reid.data.pipeline.dali_loader import (
    DaliEvalPipeline,
    DaliTrainPipeline,
    sample_params,
)
from dist_reid.data.pipeline.torch_loader import sample_seed
from dist_reid.data.sampler import ModalityBalancedSampler
from dist_reid.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_test_transform

pytestmark = pytest.mark.dali

H, W = 64, 32
OFF = AugmentOptions(pad=0, flip=False)
ALL_ON = AugmentOptions(pad=10, flip=True, channel_aug=True, random_erasing=0.5)
# the keys PDM's released SYSU transform sets, plus non-ImageNet statistics
KEYED = AugmentOptions(
    pad=10,
    flip=True,
    channel_aug=True,
    random_erasing=0.5,
    grayscale=0.5,
    erasing_scale=(0.2, 0.8),
    erasing_fill=(0.485, 0.456, 0.406),
    erasing_mode="released",
    mean=(0.5, 0.4, 0.3),
    std=(0.5, 0.25, 0.2),
)
FIELDS = ("labels", "modalities", "cams", "indices")
# Measured on the synthetic JPEG trees: DALI's CPU decoder and PIL give identical pixels; DALI's
# Lanczos-3 resize differs from PIL's Lanczos by at most 8 uint8 levels (mean 0.14 levels).
# Tolerance (normalised units): 10 levels / 255 / smallest std, and a mean of under 1 level.
MAX_TOL = 10 / 255 / min(IMAGENET_STD)
MEAN_TOL = 1 / 255 / max(IMAGENET_STD)


@pytest.fixture(scope="module")
def sysu(synthetic_trees):
    root, _ = synthetic_trees["sysu"]
    ds = open_dataset("sysu", root)
    return ds.train, ds.train_labels()


def _sampler(records, rank: int = 0, world: int = 1) -> ModalityBalancedSampler:
    return ModalityBalancedSampler(
        [r.pid for r in records],
        [r.modality for r in records],
        4,
        2,
        num_replicas=world,
        rank=rank,
        seed=3,
    )


def _dali(records, labels, augment=OFF, epoch=0, **kw) -> DaliTrainPipeline:
    p = DaliTrainPipeline(
        records, labels, _sampler(records), height=H, width=W, augment=augment, seed=3, **kw
    )
    p.set_epoch(epoch)
    return p


def _torch(records, labels, augment=OFF, epoch=0, **kw) -> TorchTrainPipeline:
    p = TorchTrainPipeline(
        records,
        labels,
        _sampler(records),
        height=H,
        width=W,
        augment=augment,
        num_workers=0,
        seed=3,
        **kw,
    )
    p.set_epoch(epoch)
    return p


def test_without_augmentation_dali_cpu_matches_torch_within_resize_tolerance(sysu):
    records, labels = sysu
    dali, ref = (
        list(_dali(records, labels, epoch=1).iterate()),
        list(_torch(records, labels, epoch=1).iterate()),
    )
    assert len(dali) == len(ref) == len(_sampler(records))
    diffs = []
    for a, b in zip(dali, ref, strict=True):
        for key in FIELDS:
            assert torch.equal(a[key], b[key]), key
        assert a["images"].shape == b["images"].shape == (16, 3, H, W)
        assert a["images"].dtype == torch.float32
        diffs.append((a["images"] - b["images"]).abs())
    diff = torch.stack(diffs)
    assert diff.max() <= MAX_TOL, float(diff.max())
    assert diff.mean() <= MEAN_TOL, float(diff.mean())


def test_with_augmentation_batch_composition_is_identical_to_torch(sysu):
    records, labels = sysu
    dali = list(_dali(records, labels, ALL_ON, epoch=2).iterate())
    ref = list(_torch(records, labels, ALL_ON, epoch=2).iterate())
    plain = list(_dali(records, labels, OFF, epoch=2).iterate())
    assert len(dali) == len(ref)
    for a, b in zip(dali, ref, strict=True):
        for key in FIELDS:
            assert torch.equal(a[key], b[key]), key
    # ...and the pixels really are augmented
    assert not torch.allclose(dali[0]["images"], plain[0]["images"])


def _reference_augment(
    pixels: np.ndarray, params: dict[str, np.ndarray], options: AugmentOptions = ALL_ON
) -> torch.Tensor:
    """The torch pipeline's order on a resized uint8 HWC image, from explicit parameters."""
    pad = 10
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # zero fill before normalising
    sx, sy = (int(v) + pad for v in params["start"])
    x = x[:, sy : sy + H, sx : sx + W]
    if params["flip"]:
        x = x.flip(-1)
    mean, std = (
        torch.tensor(options.mean)[:, None, None],
        torch.tensor(options.std)[:, None, None],
    )
    x = (x - mean) / std
    x = torch.einsum("cd,dhw->chw", torch.from_numpy(params["mix"]), x)
    x = x + torch.from_numpy(params["shift"])[:, None, None]
    (ay, ax), (eh, ew) = params["erase_anchor"].astype(int), params["erase_shape"].astype(int)
    x[:, ay : ay + eh, ax : ax + ew] = torch.tensor(options.erasing_fill)[:, None, None]
    return x


@pytest.mark.parametrize("options", [ALL_ON, KEYED], ids=["default-keys", "pdm-keys"])
def test_augmentation_applies_the_sampled_parameters_exactly(sysu, options):
    records, labels = sysu
    pipe = _dali(records, labels, options, epoch=0, cache=True)
    batches = list(pipe.iterate())
    seen = {"flip": 0, "mix": 0, "erase": 0}
    for step in (0, 1):
        batch = batches[step]
        for position, index in enumerate(batch["indices"].tolist()):
            record = records[index]
            params = sample_params(
                sample_seed(3, 0, step, position), H, W, record.modality, options
            )
            expected = _reference_augment(pipe.cache[index].numpy(), params, options)
            torch.testing.assert_close(batch["images"][position], expected, rtol=0, atol=1e-5)
            seen["flip"] += int(params["flip"])
            seen["mix"] += int(not np.array_equal(params["mix"], np.eye(3)))
            seen["erase"] += int(params["erase_shape"].prod() > 0)
    assert all(v > 0 for v in seen.values()), seen  # every branch was exercised


def test_sample_params_follow_the_augment_switches():
    params = [sample_params(s, H, W, "infrared", ALL_ON) for s in range(400)]
    starts = np.array([p["start"] for p in params])
    assert starts.min() == -10 and starts.max() == 10  # crop anywhere in the 10-pixel padding
    assert 0.4 < np.mean([p["flip"] for p in params]) < 0.6
    gray = np.tile(np.array([0.2989, 0.5870, 0.1140], np.float32), (3, 1))
    kinds = [
        "gray"
        if np.allclose(p["mix"], gray)
        else "id"
        if np.allclose(p["mix"], np.eye(3))
        else "rep"
        for p in params
    ]
    # infrared: replicate 3/4, gray 1/8, identity 1/8 (CAJ)
    assert 0.68 < kinds.count("rep") / 400 < 0.82 and 0.07 < kinds.count("gray") / 400 < 0.18
    erased = [p for p in params if p["erase_shape"].prod() > 0]
    assert 0.4 < len(erased) / 400 < 0.6
    for p in erased:
        (ay, ax), (eh, ew) = p["erase_anchor"], p["erase_shape"]
        assert ay >= 0 and ay + eh <= H and ax >= 0 and ax + ew <= W
        assert 0.02 * H * W * 0.8 <= eh * ew <= 0.4 * H * W * 1.2
    off = sample_params(5, H, W, "visible", OFF)
    assert off["start"].tolist() == [0, 0] and int(off["flip"]) == 0
    assert np.array_equal(off["mix"], np.eye(3)) and off["erase_shape"].tolist() == [0, 0]


def test_grayscale_and_erasing_keys_in_the_sampled_parameters():
    """Gray is PIL's luma of the raw pixel, re-normalised: an affine map of the normalised one
    (float64 formula here); erased areas stay within ``erasing_area``; draws at a key's default
    are unchanged (the gray switch draws nothing when off)."""
    gray_only = AugmentOptions(pad=0, flip=False, grayscale=1.0, mean=KEYED.mean, std=KEYED.std)
    p = sample_params(7, H, W, "visible", gray_only)
    rng = np.random.default_rng(0)
    x = rng.normal(size=3)  # a normalised pixel
    raw = x * np.array(KEYED.std) + np.array(KEYED.mean)
    gray = 0.299 * raw[0] + 0.587 * raw[1] + 0.114 * raw[2]
    expected = (gray - np.array(KEYED.mean)) / np.array(KEYED.std)
    np.testing.assert_allclose(p["mix"] @ x + p["shift"], expected, rtol=1e-5, atol=1e-6)
    grays = [sample_params(s, H, W, "visible", KEYED) for s in range(400)]
    assert 0.4 < np.mean([np.any(g["shift"] != 0) for g in grays]) < 0.6  # p = 0.5
    areas = [g["erase_shape"].prod() / (H * W) for g in grays if g["erase_shape"].prod() > 0]
    assert 0.4 < len(areas) / 400 < 0.6
    # rounding the box sides to whole pixels moves the area by at most one row + column
    slack = (H + W + 1) / (H * W)
    assert min(areas) >= 0.2 - slack and max(areas) <= 0.8 + slack
    assert np.mean(areas) > 0.35  # the SYSU range, not the default 0.02-0.4
    for s in range(50):  # keys at their defaults leave today's parameters alone
        a = sample_params(s, H, W, "infrared", ALL_ON)
        b = sample_params(
            s, H, W, "infrared", AugmentOptions(**{**ALL_ON.__dict__, "grayscale": 0.0})
        )
        assert all(np.array_equal(a[k], b[k]) for k in a)


def _unnormalise(images: torch.Tensor, options: AugmentOptions) -> torch.Tensor:
    mean = torch.tensor(options.mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(options.std, dtype=torch.float64)[:, None, None]
    return images.double() * std + mean


def test_grayscale_one_gives_equal_channels_in_both_pipelines(sysu):
    records, labels = sysu
    gray = AugmentOptions(pad=0, flip=False, grayscale=1.0, mean=KEYED.mean, std=KEYED.std)
    dali = list(_dali(records, labels, gray, epoch=0).iterate())[:2]
    ref = list(_torch(records, labels, gray, epoch=0).iterate())[:2]
    for a, b in zip(dali, ref, strict=True):
        for images in (a["images"], b["images"]):
            raw = _unnormalise(images, gray)
            torch.testing.assert_close(raw[:, 0], raw[:, 1], rtol=0, atol=1e-5)
            torch.testing.assert_close(raw[:, 0], raw[:, 2], rtol=0, atol=1e-5)
        # PIL rounds gray to whole levels; DALI keeps it in float: under the resize tolerance
        diff = (_unnormalise(a["images"], gray) - _unnormalise(b["images"], gray)).abs()
        assert diff.max() <= 10.5 / 255 and diff.mean() <= 1 / 255


def test_erasing_fill_and_area_in_both_pipelines(sysu):
    records, labels = sysu
    options = AugmentOptions(
        pad=0,
        flip=False,
        random_erasing=1.0,
        erasing_scale=(0.2, 0.8),
        erasing_fill=(0.485, 0.456, 0.406),
    )
    fill = torch.tensor(options.erasing_fill)[:, None, None]
    for pipe in (_dali(records, labels, options), _torch(records, labels, options)):
        images = next(iter(pipe.iterate()))["images"]
        for image in images:
            erased = (image == fill).all(0)  # exact fill value, in normalised space
            rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert int(erased.sum()) == h * w  # one rectangle
            slack = (H + W + 1) / (H * W)
            assert 0.2 - slack <= h * w / (H * W) <= 0.8 + slack


def test_mean_and_std_follow_the_formula_in_both_pipelines(sysu):
    """Same pixels, two normalisations: x' = (x s + m - m') / s' channel by channel."""
    records, labels = sysu
    other = AugmentOptions(pad=0, flip=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for make in (_dali, _torch):
        base = next(iter(make(records, labels, OFF, epoch=1).iterate()))["images"].double()
        moved = next(iter(make(records, labels, other, epoch=1).iterate()))["images"].double()
        expected = (_unnormalise(base, OFF) - 0.5) / 0.5
        torch.testing.assert_close(moved, expected, rtol=0, atol=1e-5)
    dali = next(iter(_dali(records, labels, other, epoch=1).iterate()))["images"]
    ref = next(iter(_torch(records, labels, other, epoch=1).iterate()))["images"]
    assert (dali - ref).abs().max() <= 10 / 255 / 0.5  # the resize tolerance at std 0.5


def test_eval_pipeline_and_test_transform_honour_mean_and_std(sysu):
    records, _ = sysu
    records = records[:16]
    mean, std = (0.5, 0.4, 0.3), (0.5, 0.25, 0.2)
    out = torch.cat(
        [x for x, _ in DaliEvalPipeline(records, height=H, width=W, mean=mean, std=std)]
    )
    moved = RecordImageDataset(records, build_test_transform(H, W, mean, std))
    base = RecordImageDataset(records, build_test_transform(H, W))
    ref = torch.stack([moved[i][0] for i in range(len(records))])
    imagenet = torch.stack([base[i][0] for i in range(len(records))]).double()
    m, s = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (mean, std))
    raw = (
        imagenet * torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None]
        + torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
    )
    torch.testing.assert_close(ref.double(), (raw - m) / s, rtol=0, atol=1e-5)
    assert (out - ref).abs().max() <= 10 / 255 / min(std)


def test_resume_epochs_and_ranks(sysu):
    records, labels = sysu
    pipe = _dali(records, labels, ALL_ON, epoch=1)
    full = list(pipe.iterate())
    tail = list(pipe.iterate(3))
    assert len(tail) == len(full) - 3
    for a, b in zip(full[3:], tail, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["indices"], b["indices"])
    pipe.set_epoch(2)
    assert not torch.equal(next(pipe.iterate())["indices"], full[0]["indices"])
    # two ranks: exact equal batch counts, disjoint identity halves of the same global batch
    ranks = []
    for rank in (0, 1):
        p = DaliTrainPipeline(records, labels, _sampler(records, rank, 2), height=H, width=W)
        p.set_epoch(0)
        ranks.append(list(p.iterate()))
    assert len(ranks[0]) == len(ranks[1]) == len(_sampler(records))
    for a, b in zip(*ranks, strict=True):
        assert a["images"].shape[0] == b["images"].shape[0] == 8
        assert not set(a["labels"].tolist()) & set(b["labels"].tolist())


def test_decode_once_cache_gives_the_same_batches(sysu):
    records, labels = sysu
    plain = list(_dali(records, labels, ALL_ON, epoch=0).iterate())
    cached_pipe = _dali(records, labels, ALL_ON, epoch=0, cache=True)
    cached = list(cached_pipe.iterate())
    for a, b in zip(plain, cached, strict=True):
        assert torch.equal(a["indices"], b["indices"])
        torch.testing.assert_close(a["images"], b["images"], rtol=0, atol=1e-6)
    used = {i for b in cached for i in b["indices"].tolist()}
    assert set(np.flatnonzero(cached_pipe._cached).tolist()) == used  # decoded exactly those
    cached_pipe._fill_cache = None  # a second epoch must not decode again
    cached_pipe.set_epoch(0)
    again = list(cached_pipe.iterate())
    assert torch.equal(again[-1]["images"], cached[-1]["images"])


def test_eval_pipeline_matches_the_test_transform(sysu):
    records, _ = sysu
    records = records[:37]
    pipe = DaliEvalPipeline(records, height=H, width=W, batch_size=16)
    out = list(pipe)
    assert len(pipe) == 3 and [len(i) for _, i in out] == [16, 16, 5]
    assert torch.cat([i for _, i in out]).tolist() == list(range(37))
    dataset = RecordImageDataset(records, build_test_transform(H, W))
    ref = torch.stack([dataset[i][0] for i in range(len(records))])
    diff = (torch.cat([x for x, _ in out]) - ref).abs()
    assert diff.max() <= MAX_TOL and diff.mean() <= MEAN_TOL


def test_regdb_bmp_decodes_like_pil(synthetic_trees):
    root, _ = synthetic_trees["regdb"]
    records = open_dataset("regdb", root, trial=1).train[:20]
    assert all(r.path.endswith(".bmp") for r in records)
    out = torch.cat([x for x, _ in DaliEvalPipeline(records, height=H, width=W, batch_size=20)])
    dataset = RecordImageDataset(records, build_test_transform(H, W))
    diff = (out - torch.stack([dataset[i][0] for i in range(len(records))])).abs()
    assert diff.max() <= MAX_TOL and diff.mean() <= MEAN_TOL


def test_float16_output(sysu):
    records, labels = sysu
    half = next(_dali(records, labels, dtype=torch.float16).iterate())
    full = next(_dali(records, labels).iterate())
    assert half["images"].dtype == torch.float16
    torch.testing.assert_close(half["images"].float(), full["images"], rtol=0, atol=5e-3)


# -- bad input -------------------------------------------------------------------------------
@pytest.fixture
def broken(synthetic_trees, tmp_path):
    """A copy of the sysu tree; returns (records, labels, first batch, root)."""
    src, _ = synthetic_trees["sysu"]
    root = tmp_path / "sysu"
    shutil.copytree(src, root)
    ds = open_dataset("sysu", root)
    sampler = _sampler(ds.train)
    return ds.train, ds.train_labels(), next(iter(sampler))


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("make", ["truncated", "missing", "garbage"])
@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_bad_image_is_one_error_naming_the_file(broken, make, kind):
    records, labels, first = broken
    path = records[first[3]].path
    if make == "truncated":
        _truncate(path)
    elif make == "missing":
        Path(path).unlink()
    else:
        Path(path).write_bytes(b"not an image at all")
    pipe = (_dali if kind == "dali" else _torch)(records, labels)
    with pytest.raises(ImageDecodeError, match=re.escape(path)):
        list(pipe.iterate())


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_skip_corrupt_replaces_with_same_identity_and_modality(broken, kind, caplog):
    records, labels, first = broken
    clean = list((_dali if kind == "dali" else _torch)(records, labels).iterate())
    bad_truncated, bad_missing = first[0], first[-1]  # a visible and an infrared slot
    _truncate(records[bad_truncated].path)
    Path(records[bad_missing].path).unlink()
    with caplog.at_level(logging.WARNING):
        pipe = (_dali if kind == "dali" else _torch)(records, labels, skip_corrupt=True)
        out = list(pipe.iterate())
    assert len(out) == len(clean)
    assert "skipping corrupt image" in caplog.text and records[bad_missing].path in caplog.text
    if kind == "dali":
        assert pipe.skipped >= 2
    for a, b in zip(out, clean, strict=True):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(
            a["modalities"], b["modalities"]
        )
        for got, planned in zip(a["indices"].tolist(), b["indices"].tolist(), strict=True):
            if planned in (bad_truncated, bad_missing):
                assert got not in (bad_truncated, bad_missing)
                assert records[got].pid == records[planned].pid
                assert records[got].modality == records[planned].modality
            else:
                assert got == planned
    replaced = out[0]["indices"].tolist()
    assert replaced[0] != first[0] and replaced[-1] != first[-1]


# -- selection and training ------------------------------------------------------------------
def test_factory_picks_and_logs_the_pipeline(sysu, caplog):
    records, labels = sysu
    args = dict(height=H, width=W, augment=OFF, num_workers=0)
    with caplog.at_level(logging.INFO):
        auto = build_train_pipeline(
            "auto", records, labels, _sampler(records), device="cpu", **args
        )
        dali = build_train_pipeline(
            "dali", records, labels, _sampler(records), device="cpu", **args
        )
    assert isinstance(auto, TorchTrainPipeline)  # on CPU, auto keeps the reference pipeline
    assert isinstance(dali, DaliTrainPipeline) and not dali.gpu and dali.num_threads == 1
    assert "data pipeline: torch DataLoader" in caplog.text
    assert "data pipeline: DALI on cpu (decoder cpu" in caplog.text
    with pytest.raises(ValueError, match=r"data\.pipeline must be one of"):
        build_train_pipeline("nvjpeg", records, labels, _sampler(records), **args)


def test_config_rejects_unknown_pipeline():
    config = str(Path(__file__).resolve().parents[2] / "configs/experiments/demo_sysu_agw.yaml")
    with pytest.raises(ConfigError, match=r"data\.pipeline"):
        load_config(config, ["data.root=/nonexistent", "data.pipeline=nvjpeg"])


@pytest.mark.slow
def test_training_through_the_dali_cpu_graph_lowers_the_loss(synthetic_trees, tmp_path):
    from dist_reid.engine.build import build_trainer

    root, _ = synthetic_trees["sysu"]
    config = str(Path(__file__).resolve().parents[2] / "configs/experiments/demo_sysu_agw.yaml")
    overrides = [
        f"data.root={root}",
        "data.synthetic.enabled=false",
        f"run.output_dir={tmp_path}",
        "run.name=dali",
        "data.height=64",
        "data.width=32",
        "data.num_workers=1",
        "data.pipeline=dali",
        "data.dali_cache=true",
        "train.ids_per_batch=4",
        "train.instances_per_modality=2",
        "train.trackers=[]",
        "train.kernels=torch",
        "train.lr=0.002",
    ]
    trainer = build_trainer(load_config(config, overrides))
    assert isinstance(trainer.pipeline, DaliTrainPipeline)
    trainer.pipeline.set_epoch(0)
    losses = []
    for _ in range(2):  # two passes over the same first batches (same pixels): it must fit them
        for step, batch in enumerate(trainer.pipeline.iterate(0)):
            losses.append(trainer.train_step(batch)["total"])
            if step == 2:
                break
    assert all(np.isfinite(losses))
    assert sum(losses[3:]) < sum(losses[:3]), losses


# Released RandomErasing (PDM random_erasing.py, r1=0.3; random.seed(0), 20 000 draws with
# probability 1 on a zero 3x96x48 tensor): mean box h/w and area fraction per (sl, sh).
RELEASED_ERASING = {(0.2, 0.8): (2.082, 0.454), (0.02, 0.4): (1.901, 0.203)}


@pytest.mark.parametrize("area", list(RELEASED_ERASING))
def test_dali_released_erasing_mode_matches_the_released_box_statistics(area):
    options = AugmentOptions(
        pad=0, flip=False, random_erasing=1.0, erasing_scale=area, erasing_mode="released"
    )
    shapes = np.array(
        [sample_params(s, 96, 48, "visible", options)["erase_shape"] for s in range(3000)]
    )
    ratio, fraction = shapes[:, 0] / shapes[:, 1], shapes.prod(1) / (96 * 48)
    mean_ratio, mean_area = RELEASED_ERASING[area]
    assert abs(ratio.mean() - mean_ratio) < 0.06 and abs(fraction.mean() - mean_area) < 0.015
