"""``dist-reid bench loader``: training-loader throughput, torch DataLoader vs DALI vs DALI with
the decode-once cache, with the same sampler and the same augmentation, over worker counts.

Images/s counts every image of a timed batch, the first batch of each run excluded (worker start,
graph build). The cache row is the steady state after one untimed pass that filled the cache;
its fill pass is reported separately. On a GPU the torch batches are copied to the device (pinned,
non-blocking) and DALI decodes ``mixed``, so both rows end with images on the GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dist_reid.bench.common import machine_info, markdown_table, write_report
from dist_reid.data.augment import AugmentOptions
from dist_reid.data.datasets import open_dataset
from dist_reid.data.pipeline import TorchTrainPipeline, dali_available
from dist_reid.data.sampler import ModalityBalancedSampler
from dist_reid.data.synthetic.layouts import generate


def _timed(pipeline: Any, batches: int, device: torch.device) -> tuple[float, int]:
    """(seconds, images) for ``batches`` batches after a first, untimed one; cycles epochs."""
    images, start, done, epoch = 0, None, 0, 0
    while done <= batches:
        pipeline.set_epoch(epoch)
        for batch in pipeline.iterate(0):
            x = batch["images"].to(device, non_blocking=True)
            if start is None:  # first batch: startup, not throughput
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
            else:
                images += x.shape[0]
            done += 1
            if done > batches:
                break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, images


def run_loader_benchmark(
    root: str | Path,
    dataset: str = "sysu",
    height: int = 288,
    width: int = 144,
    ids_per_batch: int = 8,
    instances: int = 4,
    workers: Sequence[int] = (1, 2),
    batches: int = 20,
    device: str = "auto",
    augment: AugmentOptions | None = None,
    loaders: Sequence[str] = ("torch", "dali", "dali-cache"),
) -> dict[str, Any]:
    """Rows of ``{"loader", "workers", "device", "batches", "images", "seconds", "images_per_s"}``."""
    augment = augment or AugmentOptions(pad=10, flip=True, channel_aug=True, random_erasing=0.5)
    dev = torch.device(
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else device
        if device != "auto"
        else "cpu"
    )
    ds = open_dataset(dataset, Path(root))
    records, labels = ds.train, ds.train_labels()
    unknown = set(loaders) - {"torch", "dali", "dali-cache"}
    if unknown:
        raise ValueError(
            f"--loaders: unknown loader(s) {sorted(unknown)}; use torch, dali, dali-cache"
        )
    if not dali_available():
        loaders = [name for name in loaders if name == "torch"]

    def sampler() -> ModalityBalancedSampler:
        return ModalityBalancedSampler(
            [r.pid for r in records], [r.modality for r in records], ids_per_batch, instances
        )

    rows: list[dict[str, Any]] = []
    for count in workers:
        for name in loaders:
            common = dict(height=height, width=width, augment=augment)
            if name == "torch":
                pipe: Any = TorchTrainPipeline(
                    records,
                    labels,
                    sampler(),
                    num_workers=count,
                    pin_memory=dev.type == "cuda",
                    **common,
                )
                decoder = "PIL (cpu)"
            else:
                from dist_reid.data.pipeline.dali_loader import DaliTrainPipeline

                pipe = DaliTrainPipeline(
                    records,
                    labels,
                    sampler(),
                    num_threads=max(1, count),
                    device=dev,
                    cache=name == "dali-cache",
                    **common,
                )
                decoder = "mixed" if dev.type == "cuda" else "cpu"
            if name == "dali-cache":  # fill pass: every image decoded once (what epoch 1 costs)
                fill_start = time.perf_counter()
                pipe.set_epoch(0)
                filled = 0
                for batch in pipe.iterate(0):
                    filled += batch["images"].shape[0]
                fill = time.perf_counter() - fill_start
                rows.append(
                    _row("dali-cache (fill pass)", count, dev, decoder, len(pipe), filled, fill)
                )
            seconds, images = _timed(pipe, batches, dev)
            rows.append(_row(name, count, dev, decoder, batches, images, seconds))
    return {
        "machine": machine_info(),
        "config": {
            "dataset": dataset,
            "train_images": len(records),
            "height": height,
            "width": width,
            "batch": ids_per_batch * instances * 2,
            "augment": str(augment),
            "dali": dali_available(),
        },
        "rows": rows,
    }


def _row(
    name: str,
    workers: int,
    dev: torch.device,
    decoder: str,
    batches: int,
    images: int,
    seconds: float,
) -> dict[str, Any]:
    return {
        "loader": name,
        "workers": workers,
        "device": str(dev),
        "decoder": decoder,
        "batches": batches,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else float("nan"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the benchmark, write ``loader_<dataset>_<H>x<W>.{json,md}``, print the table."""
    parser = argparse.ArgumentParser(
        prog="dist-reid bench loader", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--root", help="dataset folder (default: a synthetic tree in a temp dir)")
    parser.add_argument("--dataset", choices=("sysu", "regdb", "llcm"), default="sysu")
    parser.add_argument(
        "--synthetic-ids", type=int, default=40, help="identities of the synthetic tree"
    )
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=144)
    parser.add_argument("--ids-per-batch", type=int, default=8)
    parser.add_argument("--instances", type=int, default=4, help="images per identity and modality")
    parser.add_argument(
        "--workers", default="1,2", help="comma-separated DataLoader workers / DALI threads"
    )
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when present), cpu or cuda[:i]"
    )
    parser.add_argument("--loaders", default="torch,dali,dali-cache")
    parser.add_argument("--out", default="runs/bench", help="report folder (default: runs/bench)")
    args = parser.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers: expected comma-separated integers, got {args.workers!r}")
    if any(w < 0 for w in workers) or args.batches < 1:
        parser.error("--workers must be >= 0 and --batches >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = str(Path(tmp) / args.dataset)
            generate(args.dataset, root, args.synthetic_ids, seed=0)
        payload = run_loader_benchmark(
            root,
            dataset=args.dataset,
            height=args.height,
            width=args.width,
            ids_per_batch=args.ids_per_batch,
            instances=args.instances,
            workers=workers,
            batches=args.batches,
            device=args.device,
            loaders=args.loaders.split(","),
        )
    payload["config"]["root"] = "synthetic" if args.root is None else Path(args.root).name
    name = f"loader_{args.dataset}_{args.height}x{args.width}"
    json_path, md_path = write_report(name, payload, args.out)
    print(markdown_table(payload["rows"]), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
