"""``dist-reid bench methods``: size, cost and training speed of every registered method.

For each method (``agw`` and whichever of ``pdm``, ``icre``, ``emif``, ``mip`` are registered)
the model and loss are built from ``configs/sysu/<method>.yaml`` (plus dotted overrides) and
measured on random images at the config's input size:

* ``params_M``: all parameters, classifier included (``--num-classes``, SYSU-MM01's 395 by
  default), in millions;
* ``gflops``: forward GFLOPs per image, counted by ``torch.utils.flop_counter.FlopCounterMode``
  on a batch of one visible and one infrared image (eval mode: BatchNorm cannot train on one
  sample per modality), divided by 2. FlopCounterMode counts 2 FLOPs per multiply-accumulate
  and only matmul/conv-like ops (no norms, activations or pooling);
* ``cpu_train_img_s``: images per second of training steps run by the engine's ``Trainer``
  (forward, fp32 loss, NaN guard, backward, SGD step) and timed by its timing hook, on a
  machine without a visible GPU, with a sampler-shaped batch (``--ids`` identities x
  ``--instances`` per modality), after ``--warmup`` untimed steps; ``cpu_s_per_img``: the
  process CPU time (all threads) per image of the same steps, steadier than wall time on a
  shared machine;
* ``gpu_train_img_s``: the same where a GPU is visible (the engine trains there), at the
  recipes' per-GPU batch of 8 x 4 per modality; the CPU columns are then ``None``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dist_reid.bench.common import machine_info, markdown_table, write_report
from dist_reid.engine.hooks import HookBase, TimerHook

METHODS = ("agw", "pdm", "icre", "emif", "mip")
_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_CAMS = (1, 3)  # a SYSU-MM01 visible and infrared camera, for models that embed camera ids


def registered_methods(config_dir: Path) -> list[str]:
    """The methods of :data:`METHODS` that are registered as model and loss and have a config."""
    from dist_reid.losses import LOSSES
    from dist_reid.models import MODELS

    out = []
    for name in METHODS:
        try:
            MODELS.get(name)
            LOSSES.get(name)
        except KeyError:
            continue
        if (config_dir / f"{name}.yaml").exists():
            out.append(name)
    return out


def _batch(
    ids: int, instances: int, height: int, width: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random images in the sampler's layout: K visible per id, then K infrared per id."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ids).repeat_interleave(instances).repeat(2)
    modalities = torch.tensor([0, 1]).repeat_interleave(ids * instances)
    n = labels.shape[0]
    return {
        "images": torch.randn(n, 3, height, width, generator=g).to(device),
        "labels": labels.to(device),
        "modalities": modalities.to(device),
        "cams": torch.tensor(_CAMS).repeat_interleave(ids * instances).to(device),
    }


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Call ``forward`` as the trainer does: with the batch fields the model's contract names."""
    extras = {name: batch[name] for name in getattr(model, "batch_fields", ())}
    return model(batch["images"], batch["modalities"], **extras)


class RepeatedBatch:
    """A pipeline (the trainer's interface) that yields one batch ``steps`` times an epoch:
    the loop runs as in training, without image decoding in the measurement."""

    name = "repeated batch"

    def __init__(self, batch: dict[str, torch.Tensor], steps: int) -> None:
        self.batch = batch
        self.steps = steps

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def iterate(self, cursor: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(cursor, self.steps):
            yield self.batch

    def close(self) -> None:
        pass


class _ProcessTime(HookBase):
    """Process CPU time (all threads) of the steps after the first ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.seconds = 0.0

    def before_train(self) -> None:
        if self.warmup == 0:
            self.start = time.process_time()

    def after_step(self) -> None:
        if self.trainer.global_step == self.warmup:
            self.start = time.process_time()

    def after_train(self) -> None:
        self.seconds = time.process_time() - self.start


def count_gflops(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Forward GFLOPs of ``model`` on ``batch`` (eval mode, no grad), as FlopCounterMode counts."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            _forward(model, batch)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def train_throughput(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: dict[str, torch.Tensor],
    steps: int,
    warmup: int,
) -> tuple[float, float]:
    """(images per second, CPU seconds per image of this process, all threads) of training
    steps through the engine's :class:`~dist_reid.engine.trainer.Trainer` (SGD, fp32, on the
    backend's device), timed by its :class:`~dist_reid.engine.hooks.TimerHook`. The CPU time is
    the steadier number on a shared machine, where wall time depends on the load."""
    from dist_reid.engine.backend_factory import create_backend
    from dist_reid.engine.trainer import Trainer

    backend = create_backend("accelerate", mixed_precision="no")
    batch = {k: v.to(backend.device) for k, v in batch.items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    timer, cpu = TimerHook(warmup_steps=warmup), _ProcessTime(warmup)
    trainer = Trainer(
        model,
        loss_fn,
        RepeatedBatch(batch, warmup + steps),
        opt,
        torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0),
        backend,
        [timer, cpu],
        epochs=1,
    )
    trainer.fit()
    summary = timer.summary()
    return summary["images_per_s"], cpu.seconds / (summary["images_per_step"] * steps)


def bench_method(
    name: str,
    config: Path,
    overrides: Sequence[str] = (),
    num_classes: int = 395,
    ids: int = 2,
    instances: int = 2,
    steps: int = 3,
    warmup: int = 1,
    gpu: bool | None = None,
) -> dict[str, Any]:
    """One table row for method ``name`` built from ``config`` (see the module docstring)."""
    from dist_reid.builders import build_loss, build_model
    from dist_reid.config import load_config

    cfg = load_config(str(config), list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=num_classes, pretrained=False)  # speed only
    loss_fn = build_loss(cfg)
    h, w = cfg.data.height, cfg.data.width
    row: dict[str, Any] = {
        "method": name,
        "config": f"{config.parent.name}/{config.name}",
        "backbone": cfg.model.backbone,
        "input": f"{h}x{w}",
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": count_gflops(model, _batch(1, 1, h, w, torch.device("cpu"))) / 2,
    }
    # The engine trains on the device it sees: one column per machine.
    cuda = torch.cuda.is_available()
    if gpu is not None and gpu != cuda:
        raise ValueError(
            "the GPU column needs CUDA"
            if gpu
            else "--no-gpu: the engine trains on the GPU it sees; time the CPU with "
            "CUDA_VISIBLE_DEVICES= (no GPU visible)"
        )
    row |= {"cpu_train_img_s": None, "cpu_s_per_img": None, "gpu_train_img_s": None}
    if cuda:  # the recipes' per-GPU batch: 8 ids x 4 per modality
        batch = _batch(8, 4, h, w, torch.device("cpu"))
        row["gpu_batch"] = batch["images"].shape[0]
        row["gpu_train_img_s"], _ = train_throughput(model, loss_fn, batch, 3 * steps, 2)
    else:
        batch = _batch(ids, instances, h, w, torch.device("cpu"))
        row["cpu_batch"] = batch["images"].shape[0]
        row["cpu_train_img_s"], row["cpu_s_per_img"] = train_throughput(
            model, loss_fn, batch, steps, warmup
        )
    return row


def run_methods_benchmark(
    methods: Sequence[str] | None = None,
    config_dir: Path = _REPO_CONFIGS / "sysu",
    overrides: Sequence[str] = (),
    **kwargs: Any,
) -> dict[str, Any]:
    """Rows for ``methods`` (default: every registered one) plus the machine description."""
    names = list(methods) if methods else registered_methods(config_dir)
    rows = []
    errors = {}
    threads = torch.get_num_threads()
    for name in names:
        config = config_dir / f"{name}.yaml"
        if not config.exists():
            raise FileNotFoundError(f"no config for method {name!r}: {config}")
        try:
            rows.append(bench_method(name, config, overrides, **kwargs))
        except Exception as exc:  # one broken method must not hide the others' numbers
            errors[name] = f"{type(exc).__name__}: {exc}"
    payload: dict[str, Any] = {
        "rows": rows,
        "machine": {**machine_info(), "torch_threads": threads},
        "settings": {
            "overrides": " ".join(overrides) or "none",
            **{k: v for k, v in kwargs.items() if v is not None},
            "gflops": "forward, 1 visible + 1 infrared image, per image; 2 FLOPs per MAC",
        },
    }
    if errors:
        payload["errors"] = errors
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: measure, write ``methods.{json,md}`` under ``--out``, print the table."""
    parser = argparse.ArgumentParser(
        prog="dist-reid bench methods", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--methods", default=None, help="comma-separated (default: every registered method)"
    )
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=_REPO_CONFIGS / "sysu",
        help="folder of <method>.yaml (default: the repository's configs/sysu)",
    )
    parser.add_argument("--num-classes", type=int, default=395, help="classifier width")
    parser.add_argument("--ids", type=int, default=2, help="identities per CPU training batch")
    parser.add_argument("--instances", type=int, default=2, help="images per id and modality")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    parser.add_argument(
        "--no-gpu",
        dest="gpu",
        action="store_false",
        default=None,
        help="time on the CPU only (an error where a GPU is visible)",
    )
    parser.add_argument("--out", default="runs/bench", help="report folder (default: runs/bench)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides for every config, e.g. data.height=128"
    )
    args = parser.parse_args(argv)
    if min(args.ids, args.instances, args.steps) < 1 or args.warmup < 0:
        parser.error("--ids, --instances and --steps must be >= 1 and --warmup >= 0")
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    payload = run_methods_benchmark(
        methods,
        args.config_dir,
        args.overrides,
        num_classes=args.num_classes,
        ids=args.ids,
        instances=args.instances,
        steps=args.steps,
        warmup=args.warmup,
        gpu=args.gpu,
    )
    json_path, md_path = write_report("methods", payload, args.out)
    print(markdown_table(payload["rows"]), end="")
    for name, err in payload.get("errors", {}).items():
        print(f"{name}: FAILED ({err})")
    print(f"wrote {json_path} and {md_path}")
    return 1 if payload.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
