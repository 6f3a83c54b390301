"""Loaders under a job's stop signals: ``python signal_probe.py ROOT PIPELINE`` (torch or dali).

Run in its own session. The main process records SIGTERM/SIGUSR1/SIGINT (as the training loop's
handler does); after the first training batch, and again after the first evaluation batch, a
``kill`` sends each of them to the whole process group, as Slurm and torchrun do; then the main
process reads every remaining batch. Prints one JSON line: batches read, signals received, features extracted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch
from torch import nn

from dist_reid.data.augment import AugmentOptions
from dist_reid.data.datasets import open_dataset
from dist_reid.data.pipeline import build_train_pipeline
from dist_reid.data.sampler import ModalityBalancedSampler
from dist_reid.data.transforms import build_test_transform
from dist_reid.evaluation.features import extract_features

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Mean(nn.Module):
    batch_fields: tuple[str, ...] = ()  # the model contract's part that extraction reads

    def embed(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        return images.mean(dim=(2, 3))


def main() -> None:
    root, kind = sys.argv[1], sys.argv[2]
    received: list[int] = []
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: received.append(signum))

    def preempt() -> None:  # from another process, as the scheduler or launcher sends them
        for sig in SIGNALS:
            subprocess.run(["kill", "-s", sig.name, "--", f"-{os.getpgid(0)}"], check=False)

    ds = open_dataset("sysu", root)
    records = ds.train
    sampler = ModalityBalancedSampler([r.pid for r in records], [r.modality for r in records], 4, 2)
    pipeline = build_train_pipeline(
        kind, records, ds.train_labels(), sampler, height=64, width=32,
        augment=AugmentOptions(), num_workers=2,
    )  # fmt: skip
    batches = 0
    for _ in pipeline.iterate(0):
        batches += 1
        if batches == 1:
            preempt()
    calls = []
    features = extract_features(
        Mean(), records[:40], build_test_transform(64, 32), batch_size=4, num_workers=2,
        progress=lambda n: calls.append(n) or (len(calls) == 1 and preempt()),
    )  # fmt: skip
    print(
        json.dumps(
            {
                "batches": batches,
                "expected": len(pipeline),
                "received": sorted(received),
                "features": list(features.shape),
            }
        )
    )


if __name__ == "__main__":
    main()
