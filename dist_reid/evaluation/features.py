"""Feature extraction for evaluation, cached by image path."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dist_reid.data.images import RecordImageDataset
from dist_reid.data.records import MODALITIES, Record
from dist_reid.data.workers import ignore_stop_signals


@torch.no_grad()
def extract_features(
    model: nn.Module,
    records: Sequence[Record],
    transform: Callable,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    flip: bool = False,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(len(records), D) float32 features from ``model.embed(images, modality[, cams=...])``.

    Records are batched per modality because two-stream models pick their stem by modality; a
    model that names ``cams`` in its ``batch_fields`` (camera embeddings, e.g. MIP) gets the
    records' cameras.
    ``flip`` averages the embedding of each image and its mirror (CAJ/DEEN test-time aug).
    """
    model.eval()
    wants_cams = "cams" in model.batch_fields
    out: np.ndarray | None = None
    for modality in MODALITIES:
        positions = [i for i, r in enumerate(records) if r.modality == modality]
        if not positions:
            continue
        loader = DataLoader(
            RecordImageDataset([records[i] for i in positions], transform),
            batch_size=batch_size,
            num_workers=num_workers,
            shuffle=False,
            worker_init_fn=ignore_stop_signals,  # a stop signal is the main process's to handle
        )
        for images, local in loader:
            images = images.to(device)
            extra = {}
            if wants_cams:
                cams = [records[positions[i]].cam for i in local.tolist()]
                extra["cams"] = torch.tensor(cams, device=device)
            feats = model.embed(images, modality, **extra)
            if flip:
                feats = 0.5 * (feats + model.embed(torch.flip(images, dims=[3]), modality, **extra))
            feats = feats.float().cpu().numpy()
            if out is None:
                out = np.zeros((len(records), feats.shape[1]), dtype=np.float32)
            out[[positions[i] for i in local.tolist()]] = feats
            if progress is not None:
                progress(len(local))
    if out is None:
        raise ValueError("extract_features: no records given")
    return out


class FeatureCache:
    """Computes each image's feature once, then serves any subset by path (SYSU/LLCM trials
    re-draw galleries from the same images)."""

    def __init__(self, compute: Callable[[Sequence[Record]], np.ndarray]) -> None:
        self._compute = compute
        self._by_path: dict[str, np.ndarray] = {}

    def __call__(self, records: Sequence[Record], trial: int = 0) -> np.ndarray:
        del trial  # one model for every trial
        missing = list({r.path: r for r in records if r.path not in self._by_path}.values())
        if missing:
            for record, feat in zip(missing, self._compute(missing), strict=True):
                self._by_path[record.path] = feat
        return np.stack([self._by_path[r.path] for r in records])

    @classmethod
    def from_arrays(cls, paths: Sequence[str], features: np.ndarray) -> FeatureCache:
        """A cache over saved features; asking for an image that was not saved is an error."""

        def refuse(records: Sequence[Record]) -> np.ndarray:
            raise KeyError(
                f"saved features lack {len(records)} image(s) of the protocol, e.g. {records[0].path}"
            )

        cache = cls(refuse)
        cache._by_path = dict(zip(paths, features, strict=True))
        return cache
