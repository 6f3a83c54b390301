"""Training data pipelines behind one interface (torch DataLoader, NVIDIA DALI).

A pipeline is built for one rank from the records and an identity sampler (``data.sampler``);
``set_epoch(e)`` fixes the epoch's plan, ``iterate(start_step)`` yields batches
``{"images", "labels", "modalities", "cams", "indices"}`` from that step on, ``len()`` is exact.
:func:`build_train_pipeline` picks the implementation (``auto``, ``torch`` or ``dali``).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

import torch

from dist_reid.data.augment import AugmentOptions
from dist_reid.data.pipeline.torch_loader import TorchTrainPipeline, TrainPipeline
from dist_reid.data.records import Record
from dist_reid.data.sampler import IdentitySampler

__all__ = ["TorchTrainPipeline", "TrainPipeline", "build_train_pipeline", "dali_available"]
PIPELINES = ("auto", "torch", "dali")
log = logging.getLogger(__name__)


def dali_available() -> bool:
    """Whether NVIDIA DALI (the optional ``dali`` extra) can be imported."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no ``nvidia`` namespace package at all
        return False


def build_train_pipeline(
    kind: str,
    records: Sequence[Record],
    labels: dict[int, int],
    sampler: IdentitySampler,
    *,
    height: int,
    width: int,
    augment: AugmentOptions,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    seed: int = 0,
    dali_cache: bool = False,
    skip_corrupt: bool = False,
    dtype: torch.dtype = torch.float32,
) -> TrainPipeline:
    """The rank's training pipeline, logged by name.

    ``auto`` takes DALI with GPU decoding when ``device`` is a CUDA device and DALI is installed,
    else the torch DataLoader: on CPU the two run at a similar rate and the torch path resizes
    exactly like the reference (PIL Lanczos). ``dali`` on a CPU device runs DALI's CPU graph.
    ``num_workers`` is the DataLoader's worker count or DALI's thread count.
    """
    if kind not in PIPELINES:
        raise ValueError(f"data.pipeline must be one of {PIPELINES}, got {kind!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    on_gpu = device.type == "cuda"
    if kind == "auto":
        kind = "dali" if on_gpu and dali_available() else "torch"
    if kind == "dali" and not dali_available():
        raise ImportError(
            "data.pipeline=dali needs NVIDIA DALI: pip install -e '.[dali]' (nvidia-dali-cuda130)"
        )
    if kind == "torch":
        if dali_cache:
            log.warning("data.dali_cache has no effect with the torch pipeline")
        log.info("data pipeline: torch DataLoader (%d workers)", num_workers)
        return TorchTrainPipeline(
            records,
            labels,
            sampler,
            height=height,
            width=width,
            augment=augment,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            seed=seed,
            skip_corrupt=skip_corrupt,
        )
    from dist_reid.data.pipeline.dali_loader import DaliTrainPipeline  # optional dependency

    log.info(
        "data pipeline: DALI on %s (decoder %s, %d threads%s)",
        device,
        "mixed" if on_gpu else "cpu",
        max(1, num_workers),
        ", decode-once cache" if dali_cache else "",
    )
    return DaliTrainPipeline(
        records,
        labels,
        sampler,
        height=height,
        width=width,
        augment=augment,
        num_threads=max(1, num_workers),
        device=device,
        seed=seed,
        cache=dali_cache,
        skip_corrupt=skip_corrupt,
        dtype=dtype,
    )
